"""scripts/gpu_check.sh (the first-GPU-run check) stops at once, with exit status 2 and a summary that
says why, when the CUDA kernels are not loaded: nothing else runs (on a GPU without them, every GPU test
would quietly run the reference and pass)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA device")
def test_gpu_check_fails_fast_without_cuda_kernels(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "results")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    summary = (tmp_path / "results" / "summary.txt").read_text()
    assert "0_kernel       FAILED: the CUDA kernels are not loaded or do not run (nothing else was run)" in summary
    assert "no CUDA device visible to PyTorch" in summary or "has no CUDA kernels" in summary
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["0_kernel.log", "gpu.txt", "summary.txt"]
