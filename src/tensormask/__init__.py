"""tensormask: an experiment framework for TensorMask (Chen, Girshick, He, Dollar, ICCV 2019)."""

from tensormask import allocator as _allocator

__version__ = "0.1.0"

# Large CPU tensors come from a heap that is reused instead of freshly faulted-in mmap'ed pages
# (docs/ops.md, "The op as called in a default process"); TENSORMASK_MALLOC=0 keeps glibc's defaults.
_allocator.configure()
