"""What the op files share: constants, the interpreter switch, warn-once, device queries."""
from __future__ import annotations

import functools
import os
import warnings

import torch

LOG2E = 1.4426950408889634      # the kernels run softmax in base 2: scores are pre-scaled by log2(e)


# os.environ's own dict on POSIX (bytes -> bytes; os.environ[...] = and monkeypatch.setenv keep it
# current): a read from it costs ~0.1 us against ~0.7 us through os.environ.get (dev CPU), and
# the op reads ~15 settings per forward+backward
_ENVIRON_BYTES = getattr(os.environ, "_data", None)
if not (isinstance(_ENVIRON_BYTES, dict) and all(isinstance(k, bytes) for k in list(_ENVIRON_BYTES)[:1])):
    _ENVIRON_BYTES = None


def env_get(name: str, default: str) -> str:
    """os.environ.get(name, default), faster on the hot path of every op call."""
    if _ENVIRON_BYTES is None:
        return os.environ.get(name, default)
    value = _ENVIRON_BYTES.get(name.encode())
    return default if value is None else value.decode()


def interpreting() -> bool:
    """Triton runs on the CPU under its interpreter (TRITON_INTERPRET=1, read at import)."""
    return env_get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """A fallback or a degraded path is announced once per distinct message, not per call."""
    warnings.warn(message, stacklevel=3)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _l2_cache_bytes(device_index: int) -> int:
    # L2_cache_size came with torch 2.3; 40 MiB (A100's) for an older torch
    return getattr(torch.cuda.get_device_properties(device_index), "L2_cache_size", 40 << 20)


def l2_cache_bytes(device: torch.device) -> int:
    """L2 cache size of a CUDA device in bytes (cached like sm_count)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _l2_cache_bytes(index)


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (cached: the property query costs ~10 us per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def autotune_enabled() -> bool:
    """PREFIX_KERNELS_AUTOTUNE=0 takes each kernel's first candidate untimed (tests, quick runs)."""
    return env_get("PREFIX_KERNELS_AUTOTUNE", "1") != "0"


def cdiv(a: int, b: int) -> int:
    """Ceiling division for host code: triton.cdiv is a ConstexprFunction in newer Triton (3.9:
    ~5 us a call, several per layer per step)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1), for host code, as cdiv."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def seq_bucket(n: int) -> int:
    """Autotune once per power-of-two length class (>= 256) rather than per exact length."""
    return max(256, next_power_of_2(n))


def head_dim_class(head_dim: int) -> int:
    """The autotune table's head-dim class: 64, 128 or 256."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
