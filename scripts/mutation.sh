#!/usr/bin/env bash
# Mutation testing with mutmut (docs/testing.md "Mutation testing"), run outside CI.
#
#   bash scripts/mutation.sh [SCOPE...] [-- TESTS...]
#
# SCOPE: source files (globs) whose mutants are made; default: every .py of modeling/, evaluation/,
# data/ and framework/. TESTS: the pytest paths run against each mutant; default: tests/. Tests
# marked slow are left out (`-m "not slow"`).
#
# Full run (default): every mutant of SCOPE. Sampled run: MUTATION_SAMPLE=N runs N mutants drawn
# uniformly at random (random.Random(MUTATION_SEED, default 0).sample) from each package of SCOPE
# (src/tensormask/<package>/), and prints each package's score with a 95% (Wilson) interval. Both
# print the surviving mutants (`cd $MUTATION_DIR && python -m mutmut show <name>` shows one).
#
# The run happens in a copy of the repository (a temporary folder, or MUTATION_DIR), at
# `nice -n 15` with OMP_NUM_THREADS=1, so the checkout is never touched. PYTHON chooses the
# interpreter (default .venv/bin/python), MUTATION_JOBS the parallel children (2). Needs the dev
# extra (mutmut 3). Examples (the sampled run recorded in docs/testing.md lists its exact command):
#   bash scripts/mutation.sh src/tensormask/modeling/losses.py -- tests/modeling
#   MUTATION_SAMPLE=64 MUTATION_SEED=18 bash scripts/mutation.sh src/tensormask/modeling/*.py \
#     src/tensormask/evaluation/*.py -- tests/modeling tests/evaluation
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
scope=()
tests=()
seen_sep=0
for arg in "$@"; do
  if [[ "$arg" == "--" ]]; then seen_sep=1; continue; fi
  if (( seen_sep )); then tests+=("$arg"); else scope+=("$arg"); fi
done
if (( ${#scope[@]} == 0 )); then
  scope=(src/tensormask/modeling/*.py src/tensormask/evaluation/*.py src/tensormask/data/*.py
         src/tensormask/framework/*.py)
fi
(( ${#tests[@]} )) || tests=(tests)
# lit_module.py cannot be mutated: mutmut wraps every function in a trampoline, and Lightning's
# save_hyperparameters() reads the hyperparameters from the frame that called __init__ (the trampoline's)
kept=()
for f in "${scope[@]}"; do [[ "$f" == */framework/lit_module.py ]] || kept+=("$f"); done
scope=("${kept[@]}")
work="${MUTATION_DIR:-$(mktemp -d)}"
echo "mutation run in $work"
cp -r "$repo/src" "$repo/tests" "$repo/conf" "$repo/scripts" "$repo/pyproject.toml" "$work/"
cd "$work"
"$python" - "${#scope[@]}" "${scope[@]}" "${tests[@]}" <<'PY'
import json, sys
n = int(sys.argv[1])
scope, tests = sys.argv[2:2 + n], sys.argv[2 + n:]
with open("pyproject.toml", "a") as f:
    f.write("\n[tool.mutmut]\n")
    f.write('source_paths = ["src"]\n')
    f.write(f"only_mutate = {json.dumps(scope)}\n")
    f.write(f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n")
    f.write('pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-m", "not slow"]\n')
    f.write('also_copy = ["conf", "scripts"]\n')
PY
unset PYTHONPATH  # mutmut puts mutants/src first and removes src from the path itself
export OMP_NUM_THREADS=1
mutmut=(nice -n 15 "$python" -m mutmut)
jobs="${MUTATION_JOBS:-2}"
if [[ -z "${MUTATION_SAMPLE:-}" ]]; then
  "${mutmut[@]}" run --max-children "$jobs" || true
  "$python" -m mutmut results --all true 2>/dev/null || "$python" -m mutmut results
  exit 0
fi

# Sampled run. mutmut 3 has no "generate only": a name that matches no mutant makes `mutmut run`
# generate every mutant and collect which tests reach each function, then stop ("nothing matches").
"${mutmut[@]}" run --max-children "$jobs" "no-such-mutant" >generate.log 2>&1 || true
grep -q "nothing matches" generate.log || { cat generate.log; echo "mutant generation failed" >&2; exit 1; }
"$python" - "${MUTATION_SAMPLE}" "${MUTATION_SEED:-0}" <<'PY' >sample.txt
import json, pathlib, random, sys
n, seed = int(sys.argv[1]), int(sys.argv[2])
names = sorted(k for meta in pathlib.Path("mutants").rglob("*.py.meta")
               for k in json.loads(meta.read_text())["exit_code_by_key"])
by_package: dict[str, list[str]] = {}
for name in names:  # tensormask.<package>.<module>.<function>__mutmut_<i>
    by_package.setdefault(name.split(".")[1], []).append(name)
for package, members in sorted(by_package.items()):
    print(f"{package}: {len(members)} mutants, sampling {min(n, len(members))}", file=sys.stderr)
    for name in random.Random(seed).sample(members, min(n, len(members))):
        print(name)
PY
mapfile -t sample <sample.txt
"${mutmut[@]}" run --max-children "$jobs" "${sample[@]}" || true
"$python" - <<'PY'
import json, math, pathlib
from mutmut.stats import status_by_exit_code
sample = pathlib.Path("sample.txt").read_text().split()
codes = {k: v for meta in pathlib.Path("mutants").rglob("*.py.meta")
         for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()}
by_package: dict[str, dict[str, list[str]]] = {}
for name in sample:
    status = status_by_exit_code[codes[name]]
    by_package.setdefault(name.split(".")[1], {}).setdefault(status, []).append(name)

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half

for package, statuses in sorted(by_package.items()):
    caught = len(statuses.get("killed", [])) + len(statuses.get("timeout", []))
    tested = caught + len(statuses.get("survived", []))
    lo, hi = wilson(caught, tested)
    counts = ", ".join(f"{s} {len(v)}" for s, v in sorted(statuses.items()))
    print(f"{package}: {counts}; caught {caught}/{tested} = {100 * caught / max(tested, 1):.1f}% "
          f"(95% CI {100 * lo:.1f}-{100 * hi:.1f}%)")
    for status in ("survived", "no tests", "suspicious", "not checked"):
        for name in statuses.get(status, []):
            print(f"  {status}: {name}")
PY
