"""The CUDA extension in csrc/: the prebuilt `prefix_kernels._C`, else a JIT build on first use.

Nothing here runs at import. `cuda_extension()` is called by the decode dispatch the first time a
CUDA tensor reaches it; it returns the module or None with the reason, and never raises.

Build cache: `$PREFIX_KERNELS_CACHE_DIR`, else `$XDG_CACHE_HOME/prefix_kernels`, else
`~/.cache/prefix_kernels`, one directory per (package version, torch version, CUDA version, GPU
arch, source hash), built under an exclusive `fcntl.flock` so that processes starting together
build once and the others wait and load the result.

Environment:
    PREFIX_KERNELS_NO_CUDA_EXT=1   never use the extension (the Triton decode kernel runs instead)
    PREFIX_KERNELS_BUILD_CUDA=0    use a prebuilt `prefix_kernels._C` only, never JIT-build
                                   (=1 at `pip install` time builds `_C` ahead, see setup.py)
    PREFIX_KERNELS_CUDA_ARCH=90    build for this compute capability instead of the device's
    PREFIX_KERNELS_VERBOSE_BUILD=1 show the ninja/nvcc output (and ptxas register counts)
    MAX_JOBS                       parallel compile jobs (read by torch.utils.cpp_extension)
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import logging
import os
import re
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger("prefix_kernels")

_SOURCES = ("decode_attention.cu", "bindings.cpp")      # compiled; headers beside them included
_HASHED = ("*.cu", "*.cuh", "*.cpp", "*.h")


def csrc_dir() -> Path:
    """$PREFIX_KERNELS_CSRC, else the copy a wheel ships (prefix_kernels/_csrc, see setup.py),
    else csrc/ of a source checkout (editable install)."""
    env = os.environ.get("PREFIX_KERNELS_CSRC")
    if env:
        return Path(env)
    shipped = Path(__file__).resolve().parents[1] / "_csrc"
    return shipped if shipped.is_dir() else Path(__file__).resolve().parents[2] / "csrc"


def _cache_root() -> Path:
    env = os.environ.get("PREFIX_KERNELS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "prefix_kernels"


def _device_arch() -> str:
    env = os.environ.get("PREFIX_KERNELS_CUDA_ARCH")
    if env:
        return env.replace(".", "")
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}"


def _arch_flags(arch: str) -> list[str]:
    # SASS for exactly this GPU (sm_90 on the H200) and no PTX: torch's default would add PTX
    # for a JIT at load time and pick archs from TORCH_CUDA_ARCH_LIST.
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def _source_hash(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for pattern in _HASHED for p in directory.glob(pattern)):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def _build_key(arch: str) -> str:
    from .. import __version__
    raw = (f"pk{__version__}-torch{torch.__version__}-cu{torch.version.cuda}-sm{arch}-"
           f"{_source_hash(csrc_dir())}")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


@contextlib.contextmanager
def _exclusive_lock(directory: Path):
    """fcntl.flock on directory/.build.lock; released by the kernel if the process dies."""
    try:
        import fcntl
    except ImportError:      # not POSIX: no lock, torch's own FileBaton still guards the build
        yield
        return
    with open(directory / ".build.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _prebuilt() -> tuple[Optional[ModuleType], Optional[str]]:
    try:
        module = importlib.import_module("prefix_kernels._C")
    except ImportError as exc:
        return None, f"no prebuilt prefix_kernels._C ({exc})"
    archs = getattr(module, "compiled_archs", lambda: "")()
    arch = _device_arch()
    if f"{arch}0" not in archs.split(","):
        return None, f"prebuilt prefix_kernels._C has SASS for {archs or 'unknown'}, not sm_{arch}"
    return module, None


def _jit_build() -> ModuleType:
    from torch.utils import cpp_extension

    sources = [csrc_dir() / name for name in _SOURCES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise RuntimeError(f"CUDA sources not found: {', '.join(missing)} (install from a source "
                           "checkout, set PREFIX_KERNELS_CSRC, or build ahead with "
                           "PREFIX_KERNELS_BUILD_CUDA=1 pip install .)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError("nvcc not found: set CUDA_HOME to the CUDA toolkit")
    arch = _device_arch()
    key = _build_key(arch)
    build_dir = _cache_root() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    verbose = os.environ.get("PREFIX_KERNELS_VERBOSE_BUILD") == "1"
    cuda_flags = ["-O3", "--use_fast_math", "-lineinfo", *_arch_flags(arch)]
    if verbose:
        cuda_flags.append("-Xptxas=-v")
    with _exclusive_lock(build_dir):
        # Holding the flock, nobody else is building here: a FileBaton 'lock' file that torch
        # left behind (a build killed midway) would only make load() wait forever.
        stale = build_dir / "lock"
        if stale.exists():
            stale.unlink()
        if not (build_dir / "prefix_kernels_decode.so").exists():
            log.warning("prefix_kernels: building the CUDA decode kernel for sm_%s into %s "
                        "(first use only, about a minute)", arch, build_dir)
        return cpp_extension.load(
            name="prefix_kernels_decode",
            sources=[str(p) for p in sources],
            extra_cflags=["-O3"],
            extra_cuda_cflags=cuda_flags,
            build_directory=str(build_dir),
            verbose=verbose,
        )


@functools.cache
def cuda_extension() -> tuple[Optional[ModuleType], str]:
    """(module, how it was found) or (None, why not). Cached: the build runs at most once."""
    if os.environ.get("PREFIX_KERNELS_NO_CUDA_EXT") == "1":
        return None, "disabled by PREFIX_KERNELS_NO_CUDA_EXT=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    module, why_not_prebuilt = _prebuilt()
    if module is not None:
        return module, "prebuilt prefix_kernels._C"
    if os.environ.get("PREFIX_KERNELS_BUILD_CUDA") == "0":
        return None, f"{why_not_prebuilt}, and PREFIX_KERNELS_BUILD_CUDA=0 forbids a JIT build"
    try:
        module = _jit_build()
    except Exception as exc:   # a failed build must leave the Triton path working
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("prefix_kernels: JIT build of the CUDA decode kernel failed: %s", exc)
        return None, f"JIT build failed: {first_line} (PREFIX_KERNELS_VERBOSE_BUILD=1 shows why)"
    return module, "JIT-built from csrc/"
