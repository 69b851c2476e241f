"""What `prefix_attention` accepts: checks with errors that say what to do, and the conversions
of convenient inputs (a list of prefix ids, HF's float additive mask) to what the kernels read."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _fail(msg):
    raise ValueError(f"prefix_attention: {msg}")


def as_prefix_index(prefix_index, q) -> Optional[torch.Tensor]:
    """A list/tuple/numpy array of entry ids (or one int for every row) as an int64 tensor."""
    if prefix_index is None or isinstance(prefix_index, torch.Tensor):
        return prefix_index
    if isinstance(prefix_index, bool):
        _fail(f"prefix_index must be ints (bank entries), got {prefix_index!r}")
    if isinstance(prefix_index, int):
        return torch.full((q.shape[0],), prefix_index, dtype=torch.int64)
    try:
        index = torch.as_tensor(prefix_index)
    except (TypeError, ValueError, RuntimeError) as e:
        _fail(f"prefix_index must be a tensor, list or numpy array of ints, got "
              f"{type(prefix_index).__name__} ({e})")
    if index.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
        _fail(f"prefix_index must hold ints (bank entries), got {index.dtype} values")
    return index.long()


def check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, backend):
    if backend not in ("auto", "triton", "reference"):
        _fail(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            _fail(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                  f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not q.is_floating_point():
        _fail(f"q has dtype {q.dtype}: attention takes floating-point q, k, v and bank "
              "(fp16, bf16, fp32; fp64 runs the reference); cast them first")
    if prefix_k.dim() not in (3, 4) or prefix_k.shape != prefix_v.shape:
        _fail(f"prefix_k and prefix_v must both be [N, Hkv, P, D] (or [Hkv, P, D]), got "
              f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    b, hq, sq, d = q.shape
    if k.shape != v.shape:
        _fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[3] != d:
        _fail(f"k {tuple(k.shape)} must be [batch={b}, Hkv, Sk, head_dim={d}] to match q {tuple(q.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        _fail(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    pk = prefix_k if prefix_k.dim() == 4 else prefix_k[None]
    if pk.shape[1] != hkv or pk.shape[3] != d:
        _fail(f"prefix_k {tuple(prefix_k.shape)} must have Hkv={hkv} heads and head_dim={d}")
    if pk.shape[2] < 1:
        _fail("the prefix must have at least one slot (P >= 1)")
    if pk.shape[0] < 1:
        _fail("the prefix bank is empty (N = 0)")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            _fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
    if prefix_index is not None:
        if prefix_index.shape != (b,) or prefix_index.dtype not in (torch.int32, torch.int64):
            _fail(f"prefix_index must be an int32/int64 tensor of shape [{b}], got "
                  f"{prefix_index.dtype} {tuple(prefix_index.shape)}")
        if prefix_index.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= pk.shape[0]:
                _fail(f"prefix_index has values in [{lo}, {hi}] but the bank has {pk.shape[0]} entries")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            _fail(f"key_padding_mask must be a tensor, got {type(key_padding_mask).__name__}")
        if key_padding_mask.shape != (b, k.shape[2]):
            _fail(f"key_padding_mask must be [batch={b}, Sk={k.shape[2]}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            _fail(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def check_features(q, k, causal, dropout_p, softcap, window, segment_start):
    """The optional features as the kernels take them: softcap (0.0 = off), window (0 = off),
    segment_start (contiguous int32 or None)."""
    if not 0.0 <= dropout_p < 1.0:
        _fail(f"dropout_p must be in [0, 1), got {dropout_p}")
    if softcap is not None and softcap != 0:
        if not softcap > 0:
            _fail(f"softcap must be a positive number (or None), got {softcap}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            _fail(f"window must be a positive int (keys within `window` positions of the query), "
                  f"got {window!r}")
        if not causal:
            _fail("a sliding window needs causal=True")
    if segment_start is not None:
        b, sq = q.shape[0], q.shape[2]
        if not isinstance(segment_start, torch.Tensor) or segment_start.shape != (b, sq):
            _fail(f"segment_start must be a [batch={b}, seqlen_q={sq}] int tensor, got "
                  f"{tuple(segment_start.shape) if isinstance(segment_start, torch.Tensor) else segment_start!r}")
        if segment_start.is_floating_point() or segment_start.dtype == torch.bool:
            _fail(f"segment_start must hold ints (key positions), got {segment_start.dtype}")
        if segment_start.device != q.device:
            _fail(f"segment_start is on {segment_start.device} but q is on {q.device}")
        if not causal:
            _fail("packed sequences (segment_start) need causal=True")
        segment_start = segment_start.to(torch.int32).contiguous()
    return float(softcap or 0.0), int(window or 0), segment_start


def padding_mask_as_bool(mask):
    """The [B, Sk] padding mask as bool, True = real token.

    bool and int masks: nonzero is real. A float mask is read as HF's additive mask: 0 = real,
    -inf or the dtype's most negative value = padding; anything else is refused (it would be a
    bias, which the kernels do not add). Checking a CUDA float mask costs one device sync; it is
    skipped while compiling or capturing a CUDA graph."""
    if mask is None or not mask.is_floating_point():
        return mask if mask is None or mask.dtype in (torch.bool, torch.uint8) else mask != 0
    real = mask == 0
    padding = mask <= torch.finfo(mask.dtype).min       # -inf too
    capturing = mask.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing and not bool((real | padding).all()):
        odd = mask[~(real | padding)]
        _fail(f"key_padding_mask is a float mask with values other than 0 and -inf/the dtype's min "
              f"(e.g. {odd[0].item():g}): only 0/-inf additive masks are accepted; pass a bool mask "
              "(True = real token)")
    return real


def triton_unsupported_reason(q) -> Optional[str]:
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernels take fp16, bf16, fp32)"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 16:
        return f"head_dim {q.shape[-1]} (the kernels take 16..{MAX_HEAD_DIM})"
    return None
