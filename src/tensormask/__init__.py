"""tensormask: an experiment framework for TensorMask (Chen, Girshick, He, Dollar, ICCV 2019)."""

__version__ = "0.1.0"
