"""Packaging entry point.

The CUDA extension in csrc/ is built ahead of time only when asked (PREFIX_KERNELS_BUILD_CUDA=1);
otherwise it is JIT-built on first use (prefix_kernels/ops/_build.py). This file never probes
the GPU and never downloads anything.
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


# committed GPU results that `prefix-kernels bench attention` prints on a machine without a GPU
SHIPPED_RESULTS = ["benchmarks/results/attention-h200.json"]


class BuildPyWithCsrc(build_py):
    """Ship csrc/ inside the package as prefix_kernels/_csrc: an installed wheel has no checkout
    to JIT-build the decode kernel from. The committed H200 results go to
    prefix_kernels/bench/results/ for the same reason."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "prefix_kernels", "_csrc")
        self.mkpath(target)
        for path in sorted(glob.glob(os.path.join("csrc", "*"))):
            self.copy_file(path, os.path.join(target, os.path.basename(path)))
        results = os.path.join(self.build_lib, "prefix_kernels", "bench", "results")
        self.mkpath(results)
        for path in SHIPPED_RESULTS:
            if os.path.isfile(path):
                self.copy_file(path, os.path.join(results, os.path.basename(path)))


ext_modules, cmdclass = [], {"build_py": BuildPyWithCsrc}
if os.environ.get("PREFIX_KERNELS_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    ext_modules = [CUDAExtension("prefix_kernels._C", sources,
                                 extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math"]})]
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
