"""CI guard for csrc/: every .cu compiles for sm_90 with nvcc, the bindings compile, and every
function the bindings call is defined by the .cu objects with the same signature.

Runs on a CPU machine when nvcc is on PATH (skipped with a reason otherwise). The CPU torch wheel
lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h); a one-line stand-in is put
on the include path when it is missing.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: nothing to compile-check")


def _torch_includes(tmp: Path) -> list[str]:
    from torch.utils import cpp_extension
    dirs = list(cpp_extension.include_paths())
    root = Path(dirs[0])
    if not (root / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        stub = tmp / "stub/c10/cuda/impl/cuda_cmake_macros.h"
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(tmp / "stub"))
    return [f"-I{d}" for d in dirs]


def _common_defines() -> list[str]:
    return [f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_EXTENSION_NAME=compile_check", "-std=c++20"]


def _compile_cu(source: Path, tmp: Path, includes: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    obj = tmp / (source.stem + ".o")
    cmd = [NVCC, "-c", str(source), "-o", str(obj), "-arch=sm_90", "-O3", "--use_fast_math",
           "-Xptxas=-v", "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS, *_common_defines(), *includes]
    return obj, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _compile_cpp(source: Path, tmp: Path, includes: list[str]) -> tuple[Path, subprocess.CompletedProcess]:
    obj = tmp / (source.stem + ".o")
    cmd = [CXX, "-c", str(source), "-o", str(obj), "-O0", "-fPIC", "-w",
           f"-I{sysconfig.get_paths()['include']}", *_common_defines(), *includes]
    return obj, subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Compile every source once, two at a time (this runs on 2-core CI machines)."""
    tmp = tmp_path_factory.mktemp("csrc")
    includes = _torch_includes(tmp)
    jobs = [(s, _compile_cu) for s in sorted(CSRC.glob("*.cu"))]
    if CXX is not None:
        jobs += [(s, _compile_cpp) for s in sorted(CSRC.glob("*.cpp"))]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {src.name: pool.submit(fn, src, tmp, includes) for src, fn in jobs}
        return {name: f.result() for name, f in futures.items()}


def _errors(proc: subprocess.CompletedProcess) -> str:
    lines = [l for l in (proc.stderr + proc.stdout).splitlines() if "error" in l.lower()]
    return "\n".join(lines[:30]) or (proc.stderr + proc.stdout)[-4000:]


@pytest.mark.parametrize("name", sorted(p.name for p in CSRC.glob("*.cu")))
def test_cu_compiles_for_sm90(compiled, name):
    _, proc = compiled[name]
    assert proc.returncode == 0, f"nvcc failed on csrc/{name}:\n{_errors(proc)}"
    # ptxas -v: a kernel that spills to local memory is a performance regression
    spills = re.findall(r"(\d+) bytes spill stores", proc.stdout + proc.stderr)
    assert spills and all(int(s) == 0 for s in spills), (
        f"csrc/{name}: a kernel spills registers (ptxas -v):\n"
        + "\n".join(l for l in (proc.stdout + proc.stderr).splitlines() if "spill" in l or "Compiling" in l))


def test_every_cuda_head_dim_is_compiled(compiled):
    """decode.CUDA_HEAD_DIMS (what Python sends to the kernel) == the split kernels built."""
    from prefix_kernels.ops.decode import CUDA_HEAD_DIMS
    _, proc = compiled["decode_attention.cu"]
    built = re.findall(r"decode_split_kernelI(6__half|13__nv_bfloat16)Li(\d+)E", proc.stdout + proc.stderr)
    for dtype in ("6__half", "13__nv_bfloat16"):
        assert sorted({int(d) for t, d in built if t == dtype}) == sorted(CUDA_HEAD_DIMS), built


@pytest.mark.skipif(CXX is None, reason="no host C++ compiler")
def test_bindings_compile_and_match_the_kernels(compiled):
    cpp = sorted(p.name for p in CSRC.glob("*.cpp"))
    for name in cpp:
        _, proc = compiled[name]
        assert proc.returncode == 0, f"g++ failed on csrc/{name}:\n{_errors(proc)}"
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm is not available to compare symbols")

    def symbols(name: str, kind: str) -> set[str]:
        out = subprocess.run([nm, "-C", str(compiled[name][0])], capture_output=True, text=True,
                             check=True).stdout
        tag = f" {kind} prefix_kernels::"
        return {l.split(f" {kind} ", 1)[1].strip() for l in out.splitlines() if tag in l}

    defined = set().union(*(symbols(p.name, "T") for p in CSRC.glob("*.cu")))
    for name in cpp:
        needed = symbols(name, "U")
        assert needed, f"csrc/{name} calls no prefix_kernels:: function?"
        missing = needed - defined
        assert not missing, (f"csrc/{name} declares functions no .cu defines (signature drift?):\n"
                             + "\n".join(sorted(missing)))
