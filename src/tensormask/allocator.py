"""Keep large CPU tensors off fresh mmap'ed pages (glibc's malloc thresholds, set at ``import tensormask``).

By default glibc serves every block larger than its mmap threshold (128 KiB, adapted upwards to at most
32 MiB as blocks are freed) with a fresh ``mmap`` and unmaps it on ``free``, and it returns free memory at
the top of its heap to the system once that passes a trim threshold. A CPU model at real image sizes
allocates tensors of tens of MB on every call (a bipyramid level of an 800x1216 image is 55 MB, a P2
feature map of a 2-image batch 124 MB) and frees them again, so every call faults all of that memory in
page by page (4 KiB each, the kernel zeroing each page): swap_align2nat forward + backward on one such level
ran ~6-8x its memory-copy floor instead of ~2x (docs/ops.md, "The op as called in a default process").

At import the package therefore sets, with ``mallopt``:
  M_MMAP_THRESHOLD = 1 GiB   blocks up to 1 GiB come from the heap (reused between calls, no page faults);
  M_TRIM_THRESHOLD = -1      the heap is never trimmed (documented in mallopt(3): -1 disables trimming).
The process keeps the heap at its peak (as PyTorch's CUDA caching allocator keeps GPU memory) instead of
returning it between calls. Blocks over 1 GiB are still mmap'ed. On glibc older than 2.35, which caps the mmap
threshold at 32 MiB, ``M_MMAP_MAX = 0`` (no mmap for any size) is used instead.

``TENSORMASK_MALLOC=0`` (read at import) keeps glibc's defaults. Other C libraries (musl, macOS) have
no ``mallopt``: nothing is changed there. The settings replace malloc thresholds given in
``GLIBC_TUNABLES``; set ``TENSORMASK_MALLOC=0`` to keep those.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ENV_VAR = "TENSORMASK_MALLOC"

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MMAP_THRESHOLD = 1 << 30

#: What :func:`configure` did, one line (printed by the benchmarks and ``backend_summary``-like reports).
state = "not configured"


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def configure() -> str:
    """Apply the package's malloc settings unless ``TENSORMASK_MALLOC=0``; return (and keep) what was done."""
    global state
    choice = os.environ.get(ENV_VAR, "1").strip().lower()
    if choice in ("0", "false", "no", "off"):
        state = f"glibc malloc defaults ({ENV_VAR}={os.environ[ENV_VAR]})"
        return state
    libc = _libc()
    if libc is None:
        state = "allocator defaults (no glibc mallopt)"
        return state
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    if not libc.mallopt(M_TRIM_THRESHOLD, -1):
        state = "allocator defaults (mallopt failed)"
        return state
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        state = "glibc malloc: mmap threshold 1 GiB, no heap trimming"
    elif libc.mallopt(M_MMAP_MAX, 0):
        state = "glibc malloc: no mmap, no heap trimming"
    else:
        state = "glibc malloc: no heap trimming (mmap threshold not settable)"
    return state
