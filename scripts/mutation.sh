#!/usr/bin/env bash
# Mutation testing with mutmut (docs/testing.md "Mutation testing"), run outside CI.
#
#   bash scripts/mutation.sh [SCOPE...] [-- TESTS...]
#
# SCOPE: source files (globs) whose mutants are made; default: every .py of modeling/, evaluation/,
# data/ and framework/. TESTS: the pytest paths run against each mutant; default: tests/.
# The run happens in a copy of the repository (a temporary folder), niced, so the checkout is never
# touched; the summary and the surviving mutants are printed at the end (mutmut results).
# Needs the dev extra (mutmut). Example (the bounded run recorded in docs/testing.md):
#   bash scripts/mutation.sh src/tensormask/modeling/losses.py src/tensormask/modeling/inference.py \
#     -- tests/modeling/test_criterion_worked.py tests/modeling/test_inference_worked.py
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
work="${MUTATION_DIR:-$(mktemp -d)}"
echo "mutation run in $work"
cp -r "$repo/src" "$repo/tests" "$repo/conf" "$repo/pyproject.toml" "$work/"
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
    f.write('pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n')
    f.write('also_copy = ["conf"]\n')
PY
unset PYTHONPATH  # mutmut puts mutants/src first and removes src from the path itself
nice -n 10 "$python" -m mutmut run --max-children "${MUTATION_JOBS:-2}" || true
"$python" -m mutmut results --all true 2>/dev/null || "$python" -m mutmut results
