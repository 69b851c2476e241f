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
