"""Builds the align2nat extension `tensormask._C`, and ships the configs inside the package.

`conf/` and `sweeps/` stay at the top level of the repository (where people edit them); a wheel
carries them as `tensormask/conf` and `tensormask/sweeps`, where `tensormask.framework.entry`
finds them after a plain (non-editable) `pip install .`. An editable install reads them in place.

The build is switched explicitly, never guessed from the machine:
  TENSORMASK_CUDA=1        also compile the CUDA kernels (needs CUDA_HOME / nvcc); 0 = CPU only (default)
  TORCH_CUDA_ARCH_LIST     the GPU architectures to compile for, e.g. "9.0" or "8.0;9.0+PTX"
  TENSORMASK_NO_EXTENSION=1  build nothing (the package then runs on the pure-PyTorch reference)
"""

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("src", "tensormask", "ops", "csrc")


def _flag(name: str) -> bool:
    value = os.environ.get(name, "0").strip().lower()
    if value not in {"0", "1", "true", "false", "yes", "no", ""}:
        raise SystemExit(f"{name}={value!r}: expected 0 or 1")
    return value in {"1", "true", "yes"}


def _extensions():
    if _flag("TENSORMASK_NO_EXTENSION"):
        print("[tensormask build] TENSORMASK_NO_EXTENSION=1: no extension, pure-PyTorch reference only", file=sys.stderr)
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # No -std flag: torch's BuildExtension adds the C++ standard its headers need (C++20 for torch 2.14).
    # -ffp-contract=off: no fused multiply-adds, so the float64 kernels keep detectron2's exact rounding.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    extra = {"cxx": cxx_flags}
    with_cuda = _flag("TENSORMASK_CUDA")
    if with_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            raise SystemExit("TENSORMASK_CUDA=1 needs an explicit TORCH_CUDA_ARCH_LIST (for example '9.0')")
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        include_dirs = []
        # The pip CUDA wheels carry headers (cusparse.h, ...) that a trimmed toolkit may lack.
        import torch

        site = os.path.dirname(os.path.dirname(torch.__file__))
        cu_include = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(cu_include):
            include_dirs.append(cu_include)
        # --fmad=false: nvcc contracts no multiply-add either (its default would fuse them), so the CUDA
        # kernels round every product and sum like the CPU kernels and the reference (docs/ops.md, "CUDA").
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "--fmad=false", "-DWITH_CUDA"]
        extra["cxx"] = cxx_flags + ["-DWITH_CUDA"]
        ext = CUDAExtension(
            "tensormask._C", sources, include_dirs=include_dirs, extra_compile_args=extra,
            extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "tensormask._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"], py_limited_api=True,
        )
    print(
        f"[tensormask build] extension tensormask._C: CPU kernels yes, CUDA kernels "
        f"{'yes, archs ' + os.environ['TORCH_CUDA_ARCH_LIST'] if with_cuda else 'no'}; "
        f"{len(sources)} sources",
        file=sys.stderr,
    )
    return [ext], {"build_ext": BuildExtension}


DATA_FOLDERS = ("conf", "sweeps")


class BuildPyWithConfigs(build_py):
    """build_py that also copies the top-level config folders into the package (not for editable
    installs: those read the checkout's folders)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for name in DATA_FOLDERS:
            target = os.path.join(self.build_lib, "tensormask", name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(os.path.join(HERE, name), target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


ext_modules, cmdclass = _extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithConfigs}
setup(ext_modules=ext_modules, cmdclass=cmdclass, options={"bdist_wheel": {"py_limited_api": "cp310"}})
