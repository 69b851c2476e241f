"""Helpers the test modules import (`from utils import ...`); conftest.py keeps only fixtures."""
import os

import pytest
import torch


def kernel_device() -> str:
    """Where the Triton kernels can run: the GPU, else the CPU under the interpreter."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (the README's test command sets it)")


requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- a stand-in for a triton JIT kernel and its compiled kernel (ops/launch.py without a GPU) ------

class FakeParam:
    """What ops/launch.py reads of a JITFunction's params."""

    def __init__(self, name: str, is_constexpr: bool):
        self.name, self.is_constexpr = name, is_constexpr


def python_function(kernel):
    """The Python function under a JITFunction, Heuristics or the interpreter's stand-in."""
    import inspect
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


def kernel_params(kernel) -> list:
    """FakeParams of a real kernel, from its Python function's signature."""
    import inspect

    import triton.language as tl
    return [FakeParam(p.name, p.annotation in (tl.constexpr, "tl.constexpr"))
            for p in inspect.signature(python_function(kernel)).parameters.values()]


class FakeCompiled:
    """A compiled kernel whose launcher launches nothing: it appends ("direct", grid, args) to
    `log` if given, and refuses any other argument count than `accepts` if given."""

    def __init__(self, log=None, accepts=None):
        self.log, self.accepts = log, accepts

    def __getitem__(self, grid):
        def run(*args):
            if self.accepts is not None and len(args) != self.accepts:
                raise TypeError(f"function takes exactly {self.accepts} arguments ({len(args)} given)")
            if self.log is not None:
                self.log.append(("direct", grid, args))
        return run


class FakeJit:
    """A JIT kernel with these params whose dispatch appends ("jit", grid, args, kwargs) to `log`
    if given and returns a FakeCompiled."""

    def __init__(self, params, log=None, accepts=None):
        self.params, self.log, self.accepts = params, log, accepts

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if self.log is not None:
                self.log.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.log, self.accepts)
        return run
