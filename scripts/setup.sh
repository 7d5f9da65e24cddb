#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with PyTorch, the package (editable) and its
# compiled align2nat extension, and the test tools. Safe to run again: it rebuilds only when the
# build inputs changed.
#
# Switches (environment variables):
#   TENSORMASK_CUDA=0|1        compile the CUDA kernels too (default: 1 when a CUDA toolkit is found)
#   TORCH_CUDA_ARCH_LIST       architectures for the CUDA kernels (default "9.0")
#   PYTHON                     the interpreter to build the venv from (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
# pip, minus the per-package notes some local mirrors cause ("Location ... is ignored")
pip_quiet() { "${PIP[@]}" "$@" 2>&1 | { grep -v "^WARNING: Location '.*' is ignored" || true; }; }

if [[ -z ${CUDA_HOME:-} ]]; then
  for candidate in /usr/local/cuda /usr/local/cuda-13.0; do
    [[ -x $candidate/bin/nvcc ]] && { export CUDA_HOME=$candidate; break; }
  done
fi
if [[ -z ${TENSORMASK_CUDA:-} ]]; then
  if [[ -n ${CUDA_HOME:-} ]]; then TENSORMASK_CUDA=1; else TENSORMASK_CUDA=0; fi
fi
export TENSORMASK_CUDA
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-2}

stamp_inputs() {
  cat pyproject.toml setup.py scripts/setup.sh
  find src/tensormask/ops/csrc -type f | sort | xargs cat
  echo "cuda=$TENSORMASK_CUDA archs=$TORCH_CUDA_ARCH_LIST"
}
want=$(stamp_inputs | sha256sum | cut -d' ' -f1)
have=$(cat .venv/.setup-stamp 2>/dev/null || true)
if [[ $want == "$have" ]]; then
  echo "[setup] .venv is up to date"
  exit 0
fi

# PyTorch first, pinned, so that nothing later resolves (and downloads) another build.
pip_quiet install -q "torch==2.14.1" "torchvision==0.29.1" "setuptools>=64" wheel
echo "[setup] building tensormask (CUDA kernels: $TENSORMASK_CUDA, archs: $TORCH_CUDA_ARCH_LIST)"
pip_quiet install -q --no-build-isolation -e ".[dev]"
.venv/bin/python -c "import tensormask.ops as o; print('[setup]', o.backend_summary())"
echo "$want" > .venv/.setup-stamp
