"""Decode attention: a few new queries per row over the row's prefix-bank entry + its KV cache.

Split-KV ("flash-decoding"): each (row, KV head) key range - the P prefix slots, then the row's
cached keys - is cut into splits that run in parallel and write a partial output and its
log-sum-exp; a combine step merges them. Every K/V tile is read once for all the query heads of
its GQA group (the group's G heads x Sq queries are the rows of one tile product).

Paths, fastest first: the CUDA C++ kernel in csrc/ (built on first use, `_build.py`), the Triton
kernels below (also run on the CPU under TRITON_INTERPRET=1), and the PyTorch reference.

File order: Triton kernels -> launchers (Triton, CUDA, reference) -> checks and dispatch -> public
function. Softmax runs in base 2: scores are pre-multiplied by scale*log2(e).
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import reference_prefix_attention
from .utils import LOG2E, cdiv, interpreting as _interpreting, next_power_of_2, sm_count, warn_once as _warn_once

log = logging.getLogger("prefix_kernels")

MAX_DECODE_QUERIES = 16            # Sq per row; longer query blocks are prefill: prefix_attention
CUDA_HEAD_DIMS = (64, 80, 96, 128, 256)
CUDA_DTYPES = (torch.float16, torch.bfloat16)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 128


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _decode_tile(acc, l_i, m_i, q, k, v, offs_n, n_ok, bound, qk_scale, PREC: tl.constexpr):
    """One key tile of the online softmax; bound[m] = last virtual key row m may see."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    visible = n_ok[None, :] & (offs_n[None, :] <= bound[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with nothing visible yet stays at -inf: exponentiate against 0, not -inf (NaN)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, seqlens_ptr, pidx_ptr, part_o_ptr, part_lse_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    num_kv_heads, group, seqlen_q, rows_per_head, max_cache_len, prefix_len, num_entries,
    num_splits, qk_scale,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One program = one split of the keys of one (row, KV head) for BLOCK_M of its G*Sq rows.

    Row r of a (row, KV head) is query head hk*G + r // Sq, query r % Sq. Writes the split's
    normalized output and log2-sum-exp to part_o [rows, splits, D], part_lse [rows, splits].
    """
    split = tl.program_id(0)
    chunk = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads

    # -- the row's key range: P prefix slots, then `seqlen` cached keys; this split's part --
    seqlen = tl.load(seqlens_ptr + b).to(tl.int32)
    if HAS_PIDX:
        entry = tl.load(pidx_ptr + b).to(tl.int64)
    else:
        entry = b * 0
    # values are not checked on the host for device tensors: a bad row reads nothing, gets NaN
    bad = (seqlen < 0) | (seqlen > max_cache_len) | (entry < 0) | (entry >= num_entries)
    seqlen = tl.where(bad, 0, seqlen)
    entry = tl.where(bad, 0, entry)
    total = prefix_len + seqlen
    per_split = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    t_begin = tl.minimum(split * per_split, total)
    t_end = tl.minimum(t_begin + per_split, total)

    offs_m = chunk * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < rows_per_head
    head = hk * group + offs_m // seqlen_q
    qi = offs_m % seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_q_b + head[:, None] * stride_q_h + qi[:, None] * stride_q_s
                + offs_d[None, :] * stride_q_d, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    # query qi sits at cache position seqlen - Sq + qi; the prefix is always visible
    bound = tl.minimum(tl.maximum(prefix_len - 1, prefix_len + seqlen - seqlen_q + qi), t_end - 1)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- prefix slots of the row's bank entry --
    pk_base = pk_ptr + entry * stride_pk_n + hk * stride_pk_h
    pv_base = pv_ptr + entry * stride_pv_n + hk * stride_pv_h
    prefix_hi = tl.minimum(t_end, prefix_len)
    for start in range(t_begin, prefix_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < prefix_hi
        tile_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(pk_base + offs_n[:, None] * stride_pk_p + offs_d[None, :] * stride_pk_d,
                    mask=tile_ok, other=0.0)
        v = tl.load(pv_base + offs_n[:, None] * stride_pv_p + offs_d[None, :] * stride_pv_d,
                    mask=tile_ok, other=0.0)
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k, v, offs_n, n_ok, bound, qk_scale, PREC)

    # -- the row's cached keys (virtual index P + n) --
    k_base = k_ptr + b * stride_k_b + hk * stride_k_h
    v_base = v_ptr + b * stride_v_b + hk * stride_v_h
    for start in range(tl.maximum(t_begin, prefix_len), t_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < t_end
        tile_ok = n_ok[:, None] & d_ok[None, :]
        rows = (offs_n - prefix_len).to(tl.int64)
        k = tl.load(k_base + rows[:, None] * stride_k_n + offs_d[None, :] * stride_k_d,
                    mask=tile_ok, other=0.0)
        v = tl.load(v_base + rows[:, None] * stride_v_n + offs_d[None, :] * stride_v_d,
                    mask=tile_ok, other=0.0)
        acc, l_i, m_i = _decode_tile(acc, l_i, m_i, q, k, v, offs_n, n_ok, bound, qk_scale, PREC)

    # -- the split's partial: normalized output and log2-sum-exp (-inf when nothing visible) --
    seen = l_i > 0
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(bad, float("nan"), out)
    lse = tl.where(bad, 0.0, lse)
    slot = ((b * num_kv_heads + hk) * rows_per_head + offs_m) * num_splits + split
    tl.store(part_o_ptr + slot[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + slot, lse, mask=m_ok)


@triton.jit
def _decode_combine_kernel(part_o_ptr, part_lse_ptr, out_ptr, num_splits,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per query row: out = sum_s exp2(lse_s - lse) * o_s, over the splits."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m_use)                          # empty split: lse = -inf -> 0
    o = tl.load(part_o_ptr + (row * num_splits + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _triton_num_splits(base_programs: int, max_keys: int, block_n: int, device) -> int:
    """Enough programs for ~2 per SM, at least one key tile each, no two splits per tile."""
    if device.type != "cuda":
        return max(1, min(3, cdiv(max_keys, block_n)))   # several splits under the interpreter
    target = 2 * sm_count(device)
    tiles = max(1, cdiv(max_keys, block_n))
    want = cdiv(target, max(base_programs, 1))
    return max(1, min(want, tiles, MAX_SPLITS))


def _launch_triton(q, k_cache, v_cache, seqlens, prefix_k, prefix_v, prefix_index, scale,
                   max_keys, num_splits):
    b, hq, sq, d = q.shape
    hkv, smax = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    rows_per_head = group * sq
    block_d = max(16, next_power_of_2(d))
    if _interpreting():
        block_m, block_n, warps, stages = 16, 16, 4, 1      # small tiles: tests span several
    else:
        block_m = max(16, min(64, next_power_of_2(rows_per_head)))
        block_n = 32 if d > 128 else 64
        warps, stages = 4, 3
    m_chunks = cdiv(rows_per_head, block_m)
    if num_splits is None:
        num_splits = _triton_num_splits(b * hkv * m_chunks, max_keys, block_n, q.device)
    rows = b * hq * sq
    part_o = torch.empty((rows, num_splits, d), device=q.device, dtype=torch.float32)
    part_lse = torch.empty((rows, num_splits), device=q.device, dtype=torch.float32)
    _decode_split_kernel[(num_splits, m_chunks, b * hkv)](
        q, k_cache, v_cache, prefix_k, prefix_v, seqlens,
        prefix_index if prefix_index is not None else seqlens, part_o, part_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *prefix_k.stride(), *prefix_v.stride(),
        hkv, group, sq, rows_per_head, smax, prefix_k.shape[2], prefix_k.shape[0], num_splits,
        scale * LOG2E,
        HAS_PIDX=prefix_index is not None, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m,
        BLOCK_N=block_n, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    out = torch.empty((b, hq, sq, d), device=q.device, dtype=q.dtype)
    _decode_combine_kernel[(rows,)](
        part_o, part_lse, out, num_splits, HEAD_DIM=d, BLOCK_D=block_d,
        BLOCK_S=max(2, next_power_of_2(num_splits)), num_warps=4 if d > 64 else 2)
    return out


def _launch_cuda(ext, q, k_cache, v_cache, seqlens, prefix_k, prefix_v, prefix_index, scale,
                 max_seqlen, num_splits, counters=None):
    """counters: a DecodeWorkspace's int32 buffer (the last block of a split merges), or None
    (a separate combine kernel merges)."""
    return ext.decode_attention_fwd(q, k_cache, v_cache, seqlens, prefix_k, prefix_v,
                                    prefix_index, float(scale), int(num_splits or 0),
                                    int(max_seqlen or 0), counters)


def reference_decode_attention(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v,
                               prefix_index=None, scale=None, upcast=True):
    """The decode semantics through `reference_prefix_attention` (one call, any lengths).

    The reference aligns queries bottom-right over the whole key axis, so each row's valid keys
    are moved to the end of a [.., max_len, ..] window and the moved-out front is masked; with
    Sq = 1 or equal lengths that is a plain slice. Reads cache_seqlens on the host.
    """
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    b, hkv, _, d = k_cache.shape
    sq = q.shape[2]
    lens = cache_seqlens.to(device=k_cache.device, dtype=torch.long)
    max_len = int(lens.max()) if b > 0 else 0
    positions = torch.arange(max_len, device=k_cache.device)
    if sq == 1 or bool((lens == max_len).all()):
        k, v = k_cache[:, :, :max_len], v_cache[:, :, :max_len]
        mask = positions[None, :] < lens[:, None]
    else:
        src = positions[None, :] - (max_len - lens)[:, None]        # [B, max_len]
        mask = src >= 0
        index = src.clamp(min=0)[:, None, :, None].expand(b, hkv, max_len, d)
        k = torch.gather(k_cache[:, :, :max_len], 2, index)
        v = torch.gather(v_cache[:, :, :max_len], 2, index)
    if prefix_index is not None:
        prefix_index = prefix_index.to(q.device)
    return reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index,
                                      key_padding_mask=mask.to(q.device), scale=scale,
                                      causal=True, upcast=upcast)


# --------------------------------------------------------------------------------------------
# The caller's workspace
# --------------------------------------------------------------------------------------------

CUDA_M_TILE = 16     # query rows per block of the CUDA kernel (csrc M_TILE): one counter per block


class DecodeWorkspace:
    """Scratch memory that the caller owns for `decode_attention`'s CUDA kernel (as flashinfer's
    `float_workspace_buffer`): the counters of its in-kernel combine.

    When a launch splits the keys, the last block of each (row, KV head, 16-query chunk) to
    finish merges the splits, found by an atomic counter that it sets back to 0: the buffer,
    zeroed once here, is zero again after every launch and serves the next one in stream order.
    Create it outside any CUDA graph capture; a captured launch then reads its fixed address.
    One workspace serves one stream at a time (launches running concurrently on two streams
    need one each).

    Args:
        device: where the kernel runs.
        batch, heads_q, heads_kv, seqlen_q: the largest launch it serves; any smaller launch
            (fewer rows or queries) fits too.

    Attributes:
        counters: int32 [size] on `device`, all zero between launches.
    """

    def __init__(self, device, batch: int, heads_q: int, heads_kv: int, seqlen_q: int = 1):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.size = self.required(batch, heads_q, heads_kv, seqlen_q)
        self.counters = torch.zeros(max(self.size, 1), dtype=torch.int32, device=self.device)

    @staticmethod
    def required(batch: int, heads_q: int, heads_kv: int, seqlen_q: int = 1) -> int:
        """Counters a launch needs: batch * heads_kv * ceil(heads_q / heads_kv * seqlen_q / 16)."""
        if min(batch, heads_q, heads_kv, seqlen_q) < 0 or heads_kv == 0 or heads_q % heads_kv:
            raise ValueError(f"DecodeWorkspace: need batch, seqlen_q >= 0 and heads_q a multiple of "
                             f"heads_kv >= 1, got batch={batch}, heads_q={heads_q}, "
                             f"heads_kv={heads_kv}, seqlen_q={seqlen_q}")
        return batch * heads_kv * -(-(heads_q // heads_kv) * seqlen_q // CUDA_M_TILE)

    @classmethod
    def over(cls, counters: torch.Tensor) -> "DecodeWorkspace":
        """A workspace over existing counters (int32, all zero): how the custom op, which takes
        tensors only, gets its caller's workspace back."""
        workspace = cls.__new__(cls)
        workspace.device, workspace.size, workspace.counters = counters.device, counters.numel(), counters
        return workspace

    def __repr__(self) -> str:
        return f"DecodeWorkspace(device={self.device}, counters={self.size})"


def _check_workspace(workspace, q, heads_kv):
    if workspace is None:
        return
    if not isinstance(workspace, DecodeWorkspace):
        _fail(f"workspace must be a DecodeWorkspace or None, got {type(workspace).__name__}")
    if workspace.device != q.device:
        _fail(f"the workspace is on {workspace.device} but q is on {q.device}: create one per device")
    b, hq, sq, _ = q.shape
    needed = DecodeWorkspace.required(b, hq, heads_kv, sq)
    if workspace.counters.numel() < needed:
        _fail(f"the workspace holds {workspace.counters.numel()} counters but this launch (batch={b}, "
              f"heads_q={hq}, heads_kv={heads_kv}, seqlen_q={sq}) needs {needed}: create "
              f"DecodeWorkspace(device, batch, heads_q, heads_kv, seqlen_q) for the largest launch")


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    # the path is the same for every layer and step: said once, not ~1,200 times during warm-up
    log.info(message)


# --------------------------------------------------------------------------------------------
# Checks and dispatch
# --------------------------------------------------------------------------------------------

def _fail(msg: str):
    raise ValueError(f"decode_attention: {msg}")


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_inputs(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v, prefix_index, backend):
    if backend not in ("auto", "cuda", "triton", "reference"):
        _fail(f"backend must be 'auto', 'cuda', 'triton' or 'reference', got {backend!r}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            _fail(f"{name} must be a 4-D tensor, got {_shape(t)}")
    b, hq, sq, d = q.shape
    if k_cache.shape != v_cache.shape:
        _fail(f"k_cache {_shape(k_cache)} and v_cache {_shape(v_cache)} must have the same shape")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        _fail(f"k_cache {_shape(k_cache)} must be [batch={b}, Hkv, Smax, head_dim={d}] to match "
              f"q {_shape(q)}")
    hkv = k_cache.shape[1]
    if hkv == 0 or hq % hkv != 0:
        _fail(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if not 1 <= sq <= MAX_DECODE_QUERIES:
        _fail(f"q has {sq} queries per row; decode takes 1..{MAX_DECODE_QUERIES} "
              "(use prefix_attention for longer blocks)")
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if not isinstance(t, torch.Tensor) or t.dim() not in (3, 4):
            _fail(f"{name} must be [N, Hkv, P, D] (or [Hkv, P, D]), got {_shape(t)}")
    if prefix_k.shape != prefix_v.shape:
        _fail(f"prefix_k {_shape(prefix_k)} and prefix_v {_shape(prefix_v)} must have the same shape")
    bank = prefix_k if prefix_k.dim() == 4 else prefix_k[None]
    if bank.shape[1] != hkv or bank.shape[3] != d:
        _fail(f"prefix_k {_shape(prefix_k)} must have Hkv={hkv} heads and head_dim={d}")
    if bank.shape[0] < 1 or bank.shape[2] < 1:
        _fail(f"the prefix bank needs N >= 1 entries and P >= 1 slots, got {_shape(prefix_k)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("prefix_k", prefix_k),
                    ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            _fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            _fail(f"{name} is on {t.device} but q is on {q.device}")
    for name, t in (("cache_seqlens", cache_seqlens), ("prefix_index", prefix_index)):
        if t is None and name == "prefix_index":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (b,) or t.dtype not in (torch.int32, torch.int64):
            _fail(f"{name} must be an int32/int64 tensor of shape [{b}], got "
                  f"{getattr(t, 'dtype', type(t).__name__)} {_shape(t)}")
        if t.device.type != "cpu" and t.device != q.device:
            _fail(f"{name} is on {t.device}; put it on the CPU or on {q.device}")


def _check_index_values(cache_seqlens, prefix_index, max_cache_len, num_entries):
    """Range checks for index tensors on the CPU (free there; on a GPU they would sync)."""
    if cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0 or hi > max_cache_len:
            _fail(f"cache_seqlens has values in [{lo}, {hi}] but the cache holds {max_cache_len} keys")
    if prefix_index is not None and prefix_index.device.type == "cpu" and prefix_index.numel():
        lo, hi = int(prefix_index.min()), int(prefix_index.max())
        if lo < 0 or hi >= num_entries:
            _fail(f"prefix_index has values in [{lo}, {hi}] but the bank has {num_entries} entries")


def _cuda_unsupported_reason(q, k_cache, v_cache, prefix_k, prefix_v) -> Optional[str]:
    if not q.is_cuda:
        return "tensors are on the CPU"
    if q.dtype not in CUDA_DTYPES:
        return f"dtype {q.dtype} (the CUDA kernel takes float16, bfloat16)"
    if q.shape[-1] not in CUDA_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the CUDA kernel takes {', '.join(map(str, CUDA_HEAD_DIMS))})"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("prefix_k", prefix_k),
                    ("prefix_v", prefix_v)):
        if t.stride(-1) != 1 or any(s % 8 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1) \
                or t.data_ptr() % 16:
            return f"{name} rows are not 16-byte aligned (strides {t.stride()})"
    ext, how = _extension()
    if ext is None:
        return f"CUDA extension unavailable: {how}"
    return None


def _extension():
    from ._build import cuda_extension
    return cuda_extension()


def _triton_unsupported_reason(q) -> Optional[str]:
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {q.dtype} (the Triton kernel takes float16, bfloat16, float32)"
    if not 16 <= q.shape[-1] <= 256:
        return f"head_dim {q.shape[-1]} (the Triton kernel takes 16..256)"
    if not q.is_cuda and not _interpreting():
        return "tensors are on the CPU (set TRITON_INTERPRET=1 to run Triton there)"
    return None


def select_backend(q, k_cache, v_cache, prefix_k, prefix_v, backend="auto") -> tuple[str, str]:
    """(path, why): the path `decode_attention` takes for these tensors."""
    if backend == "reference":
        return "reference", "backend='reference' was asked for"
    if backend == "cuda":
        why = _cuda_unsupported_reason(q, k_cache, v_cache, prefix_k, prefix_v)
        if why is not None:
            _fail(f"backend='cuda' is not possible: {why}")
        return "cuda", "backend='cuda' was asked for"
    if backend == "triton":
        why = _triton_unsupported_reason(q)
        return ("triton", "backend='triton' was asked for") if why is None else ("reference", why)
    if not q.is_cuda:
        return "reference", "tensors are on the CPU"
    why_not_cuda = _cuda_unsupported_reason(q, k_cache, v_cache, prefix_k, prefix_v)
    if why_not_cuda is None:
        return "cuda", f"CUDA kernel ({_extension()[1]})"
    why_not_triton = _triton_unsupported_reason(q)
    if why_not_triton is None:
        return "triton", why_not_cuda
    return "reference", f"{why_not_cuda}; Triton: {why_not_triton}"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     prefix_k: torch.Tensor, prefix_v: torch.Tensor, *, prefix_index: torch.Tensor | None = None,
                     scale: float | None = None, backend: str = "auto", max_seqlen: int | None = None,
                     num_splits: int | None = None, workspace: "DecodeWorkspace | None" = None) -> torch.Tensor:
    """Attention of a few new queries per row over the row's prefix and its static KV cache.

    Row b attends to the P slots of bank entry prefix_index[b] (always visible, no mask) and to
    its cached keys 0..cache_seqlens[b]-1; query i of the Sq new tokens sits at cache position
    cache_seqlens[b] - Sq + i (the new tokens are already written to the cache) and sees the
    cached keys at or before it.

    Args:
        q: (batch, heads_q, seqlen_q, head_dim), seqlen_q in 1..16; fp16/bf16 (fp32: Triton and
            reference only). Any strides (copied to contiguous for the CUDA kernel).
        k_cache, v_cache: (batch, heads_kv, max_cache_len, head_dim); heads_q a multiple of
            heads_kv (GQA/MQA). Any strides with contiguous head_dim rows; the CUDA kernel needs
            16-byte aligned rows (other layouts take the Triton path).
        cache_seqlens: (batch,) int32/int64: valid keys per row, 0..max_cache_len. int32 on the
            GPU costs nothing extra; on the CPU its range is checked and its max sets the split.
        prefix_k, prefix_v: the bank, (num_entries, heads_kv, prefix_len, head_dim), or
            (heads_kv, prefix_len, head_dim) for one prefix. Same dtype as q.
        prefix_index: (batch,) int32/int64: bank entry of each row; None = entry 0 for all rows.
            On the CPU its range is checked; on the GPU it is not (no sync): a row whose index or
            length is out of range gets NaN outputs from the kernels.
        scale: softmax scale, default 1/sqrt(head_dim).
        backend: "auto" (CUDA kernel, else Triton, else the reference, saying once why when not
            CUDA), "cuda", "triton" or "reference".
        max_seqlen: optional host-side upper bound of cache_seqlens: sizes the key split without
            reading the lengths (default: their max when on the CPU, else max_cache_len).
        num_splits: force the number of key splits (1..128); default: chosen to fill the GPU.
        workspace: a DecodeWorkspace on q's device, sized for this launch or larger: the CUDA
            kernel's last block of each split group merges the splits (no extra launch). None:
            a separate combine kernel merges them (one more launch, no state kept anywhere).
            Checked on every path; only the CUDA kernel uses it.

    Returns:
        (batch, heads_q, seqlen_q, head_dim), dtype of q, contiguous.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v, prefix_index, backend)
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if num_splits is not None and not 1 <= int(num_splits) <= MAX_SPLITS:
        _fail(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    max_cache_len = k_cache.shape[2]
    _check_index_values(cache_seqlens, prefix_index, max_cache_len, prefix_k.shape[0])
    _check_workspace(workspace, q, k_cache.shape[1])

    path, why = select_backend(q, k_cache, v_cache, prefix_k, prefix_v, backend)
    if path == "cuda":
        _log_once(f"decode_attention: {why}")
    elif backend == "auto" or path != backend:
        _warn_once(f"decode_attention: using the {'Triton kernel' if path == 'triton' else 'PyTorch reference'}"
                   f" ({why})")

    if path == "reference":
        return reference_decode_attention(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v,
                                          prefix_index, scale)

    if max_seqlen is None and cache_seqlens.device.type == "cpu":
        max_seqlen = int(cache_seqlens.max()) if cache_seqlens.numel() else 0
    max_seqlen = max_cache_len if max_seqlen is None else min(int(max_seqlen), max_cache_len)
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32, non_blocking=True)
    if prefix_index is not None:
        prefix_index = prefix_index.to(device=q.device, dtype=torch.int32, non_blocking=True)
    if path == "cuda":
        return _launch_cuda(_extension()[0], q.contiguous(), k_cache, v_cache, seqlens.contiguous(),
                            prefix_k, prefix_v, prefix_index, scale, max_seqlen, num_splits,
                            None if workspace is None else workspace.counters)
    return _launch_triton(q, k_cache, v_cache, seqlens, prefix_k, prefix_v, prefix_index, scale,
                          prefix_k.shape[2] + max_seqlen, num_splits)


# --------------------------------------------------------------------------------------------
# Custom op: decode attention inside a compiled graph
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefix_kernels::decode_attention", mutates_args=("workspace_counters",))
def decode_attention_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cache_seqlens: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                        prefix_index: Optional[torch.Tensor], scale: float, backend: str,
                        max_seqlen: Optional[int], workspace_counters: Optional[torch.Tensor]
                        ) -> torch.Tensor:
    """`decode_attention` as one opaque node of a `torch.compile` graph: the same arguments, all
    positional (prefix_k/prefix_v [N, Hkv, P, D]), the workspace as its counter tensor
    (`DecodeWorkspace.counters`; None or an empty tensor: none), which the CUDA kernel uses and
    leaves zero. Compiled callers pass an empty tensor rather than None: inductor (torch 2.13)
    fails on a mutable argument given None ("getitem is not an OpOverload"). The kernel
    choice and the input checks run when the graph runs (once, at capture, under a CUDA graph);
    the result is a new tensor [B, Hq, Sq, D], contiguous, never a view of an input."""
    no_workspace = workspace_counters is None or workspace_counters.numel() == 0
    workspace = None if no_workspace else DecodeWorkspace.over(workspace_counters)
    return decode_attention(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v,
                            prefix_index=prefix_index, scale=scale, backend=backend,
                            max_seqlen=max_seqlen, workspace=workspace)


@decode_attention_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, prefix_k, prefix_v, prefix_index, scale, backend,
      max_seqlen, workspace_counters):
    return q.new_empty(q.shape)
