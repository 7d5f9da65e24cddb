#!/usr/bin/env bash
# The first-GPU-run check (docs/ops.md, "CUDA"): on a machine with a CUDA GPU and an extension built
# with TENSORMASK_CUDA=1, in this order, each step's output saved under the results folder:
#   0. fail fast unless the CUDA kernels of tensormask._C are loaded (else every GPU test would quietly
#      run the pure-PyTorch reference on the GPU and pass)
#   1. the gpu-marked tests (tests/ops/test_align2nat_gpu.py and the rest):   pytest -m gpu
#   2. bench/bench_ops.py --device cuda (kernels vs the CUDA copy floor)
#   3. bench/bench_model.py --device cuda (TensorMask vs Mask R-CNN training step and inference)
#   4. a short real-size training (synthetic images at 800 px, TensorMask R50, tensormask-train on the
#      GPU), iterations per second measured by bench/train_speed.py
# Designed to take under 8 minutes of device time in all (each step has its own time limit).
#
#   bash scripts/gpu_check.sh [RESULTS_DIR]       (default: gpu_check_results/<UTC date-time>)
#   PYTHON=... to pick the interpreter (default .venv/bin/python); STEPS="0 1 2" to run some steps only.
# Exit status: 0 when every step passed, else 1 (the summary names the failed steps); 2 when the CUDA
# kernels are not loaded (nothing else runs).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu_check_results/$(date -u +%Y%m%dT%H%M%SZ)}
STEPS=${STEPS:-0 1 2 3 4}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TENSORMASK_OPS_BACKEND=extension  # never fall back to the reference silently
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
failed=()

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: runs it with a time limit, output to $OUT/NAME.log, result in the summary.
step() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local status=passed
  if [[ $rc -ne 0 ]]; then
    status="FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ", time limit ${limit} s"))"
    failed+=("$name")
  fi
  note "$(printf '%-14s %-40s %4d s' "$name" "$status" $((SECONDS - t0)))"
  tail -n 3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
}

note "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
note "gpu: $(head -n 1 "$OUT/gpu.txt")"

if [[ " $STEPS " == *" 0 "* ]]; then
  # 0. The CUDA kernels must be loaded (and a GPU visible).
  if ! "$PYTHON" - > "$OUT/0_kernel.log" 2>&1 <<'PY'
import sys
import torch
from tensormask.ops import backend
print(torch.__version__, "cuda", torch.version.cuda, "| devices:", torch.cuda.device_count())
print(backend.backend_summary())
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to PyTorch")
if not backend.has_kernel("cuda"):
    sys.exit("tensormask._C has no CUDA kernels: rebuild with "
             "TENSORMASK_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 bash scripts/setup.sh")
x = torch.randn(1, 9, 8, 8, device="cuda")
out = torch.ops.tensormask.align2nat(x, [3, 3], [6, 6], [4, 4], 2.0, 1.0, 1.0, 2.0, -6.0, "bilinear")
torch.cuda.synchronize()
print("CUDA kernel ran:", tuple(out.shape))
PY
  then
    note "0_kernel       FAILED: the CUDA kernels are not loaded or do not run (nothing else was run)"
    sed 's/^/    /' "$OUT/0_kernel.log" | tee -a "$SUMMARY"
    exit 2
  fi
  note "0_kernel       passed: $(tail -n 2 "$OUT/0_kernel.log" | head -n 1)"
fi

[[ " $STEPS " == *" 1 "* ]] && step 1_gpu_tests 240 "$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider \
  --junitxml="$OUT/1_gpu_tests.xml"
[[ " $STEPS " == *" 2 "* ]] && step 2_bench_ops 60 "$PYTHON" bench/bench_ops.py --device cuda --rounds 3
[[ " $STEPS " == *" 3 "* ]] && step 3_bench_model 90 "$PYTHON" bench/bench_model.py --device cuda --size 800 \
  --repeats 5
if [[ " $STEPS " == *" 4 "* ]]; then
  # 4. 60 steps of TensorMask (R50-FPN, the paper's model) on 800 px synthetic images, batch 4 on one
  #    GPU, no evaluation; iterations per second over the steps after the first 10.
  step 4_train_speed 150 env PYTHONPATH="$PWD/bench:$PYTHONPATH" "$PYTHON" -m tensormask.train \
    trainer=gpu model=tensormask data=synthetic data.synthetic.image_size=800 data.synthetic.num_train=64 \
    data.synthetic.num_val=4 'data.train_transforms.min_size=[800]' data.train_transforms.max_size=1333 \
    data.test_transforms.min_size=800 data.test_transforms.max_size=1333 \
    data.global_batch_size=4 data.num_workers=4 trainer.max_steps=60 evaluate=false \
    hydra.run.dir="$OUT/4_train_run" +callbacks.train_speed._target_=train_speed.TrainSpeed \
    +callbacks.train_speed.out="$OUT/4_train_speed.json" +callbacks.train_speed.warmup=10
fi

if [[ ${#failed[@]} -gt 0 ]]; then
  note "FAILED: ${failed[*]} (logs in $OUT)"
  exit 1
fi
note "all steps passed (results in $OUT)"
