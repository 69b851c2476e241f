"""Each row's prefix as keys of its own: the bank entry's P keys/values prepended to the row's own
keys (one launch for K and V), and back: the prefix rows of dK/dV summed per bank entry (one
launch for both). What the split path's "pad" mode hands the vendor kernel and takes back.

They replace torch ops that cost ~8 launches per layer (a bank gather, a NaN mask for
out-of-range entries, two cats; a reshape copy and a one-hot matmul per gradient), where the
split path at S=1024 lost most of its time to small launches (pad's forward 0.387 ms against
cuDNN's 0.160 at B8 H32/8 S1024 D128, H200, 9d60646).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import launch_direct
from .prefix_attention_kernels import _bank_entry
from .utils import cdiv, interpreting, next_power_of_2

_LAUNCHES: dict = {}        # launch_direct's compiled kernels


@triton.jit
def _concat_prefix_kv(
    pk_ptr, pv_ptr, pidx_ptr, k_ptr, v_ptr, ck_ptr, cv_ptr,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    num_kv_heads, prefix_len, seqlen_k, num_entries,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """ck, cv [B, Hkv, P + Sk, D] contiguous: rows [0, P) from the row's bank entry (NaN when the
    entry is out of range, so the row's output is NaN as the fused op's), then the own keys."""
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    entry, entry_ok = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    rows = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    total = prefix_len + seqlen_k
    in_prefix = rows < prefix_len
    own = rows - prefix_len
    prefix_tile = (in_prefix & (rows >= 0))[:, None] & d_ok[None, :]
    own_tile = ((rows >= prefix_len) & (rows < total))[:, None] & d_ok[None, :]
    out = (pid_bh * total + rows[:, None]) * HEAD_DIM + offs_d[None, :]
    out_ok = (rows < total)[:, None] & d_ok[None, :]

    pk = tl.load(pk_ptr + entry * stride_pk_n + hk * stride_pk_h + rows[:, None] * stride_pk_p
                 + offs_d[None, :] * stride_pk_d, mask=prefix_tile, other=0.0)
    kk = tl.load(k_ptr + b * stride_k_b + hk * stride_k_h + own[:, None] * stride_k_n
                 + offs_d[None, :] * stride_k_d, mask=own_tile, other=0.0)
    ck = tl.where(in_prefix[:, None], pk, kk).to(tl.float32)
    if HAS_PIDX:
        ck = tl.where(in_prefix[:, None] & (entry_ok == 0), float("nan"), ck)
    tl.store(ck_ptr + out, ck.to(ck_ptr.dtype.element_ty), mask=out_ok)
    pv = tl.load(pv_ptr + entry * stride_pv_n + hk * stride_pv_h + rows[:, None] * stride_pv_p
                 + offs_d[None, :] * stride_pv_d, mask=prefix_tile, other=0.0)
    vv = tl.load(v_ptr + b * stride_v_b + hk * stride_v_h + own[:, None] * stride_v_n
                 + offs_d[None, :] * stride_v_d, mask=own_tile, other=0.0)
    cv = tl.where(in_prefix[:, None], pv, vv).to(tl.float32)
    if HAS_PIDX:
        cv = tl.where(in_prefix[:, None] & (entry_ok == 0), float("nan"), cv)
    tl.store(cv_ptr + out, cv.to(cv_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _sum_prefix_rows(
    dk_ptr, dv_ptr, pidx_ptr, dpk_ptr, dpv_ptr,
    stride_dk_b, stride_dk_h, stride_dk_s, stride_dk_d,
    stride_dv_b, stride_dv_h, stride_dv_s, stride_dv_d,
    batch, prefix_len, row,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    """dPrefix[n] [Hkv, P, D] = sum over the rows b with entry n (every row: entry 0 without an
    index) of rows [0, P) of dK, dV [B, Hkv, P + Sk, D], in row order (deterministic); fp32 sums."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)      # over [Hkv, P, D] flattened
    n = tl.program_id(1)
    ok = offs < row
    hk = offs // (prefix_len * HEAD_DIM)
    slot = (offs // HEAD_DIM) % prefix_len
    d = offs % HEAD_DIM
    # row b's tiles: pointers advanced by a stride per row (64-bit pointer arithmetic)
    dk_row = dk_ptr + hk * stride_dk_h + slot * stride_dk_s + d * stride_dk_d
    dv_row = dv_ptr + hk * stride_dv_h + slot * stride_dv_s + d * stride_dv_d
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, batch):
        if HAS_PIDX:
            mine = tl.load(pidx_ptr + b) == n
        else:
            mine = n == 0
        if mine:
            acc_k += tl.load(dk_row, mask=ok, other=0.0).to(tl.float32)
            acc_v += tl.load(dv_row, mask=ok, other=0.0).to(tl.float32)
        dk_row += stride_dk_b
        dv_row += stride_dv_b
    tl.store(dpk_ptr + n.to(tl.int64) * row + offs, acc_k.to(dpk_ptr.dtype.element_ty), mask=ok)
    tl.store(dpv_ptr + n.to(tl.int64) * row + offs, acc_v.to(dpv_ptr.dtype.element_ty), mask=ok)


def concat_prefix_kv(k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                     prefix_index):
    """(ck, cv) [B, Hkv, P + Sk, D] contiguous, in k's dtype: each row's bank entry (prefix_index
    [B], None: entry 0 for every row) prepended to its own keys/values."""
    b, hkv, sk, d = k.shape
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    ck = k.new_empty((b, hkv, p + sk, d))
    cv = v.new_empty((b, hkv, p + sk, d))
    block_s = 16 if interpreting() else 64
    launch_direct(_LAUNCHES, _concat_prefix_kv, (cdiv(p + sk, block_s), b * hkv),
                  (prefix_k, prefix_v, prefix_index if prefix_index is not None else k, k, v, ck, cv,
                   *prefix_k.stride(), *prefix_v.stride(), *k.stride(), *v.stride(), hkv, p, sk, n),
                  dict(HAS_PIDX=prefix_index is not None, HEAD_DIM=d, BLOCK_S=block_s,
                       BLOCK_D=max(16, next_power_of_2(d))))
    return ck, cv


def sum_prefix_rows(dk: torch.Tensor, dv: torch.Tensor, prefix_index, prefix_k: torch.Tensor,
                    prefix_v: torch.Tensor):
    """(dprefix_k, dprefix_v) shaped as the bank [N, Hkv, P, D], in its dtype, from the gradients
    dk, dv [B, Hkv, P + Sk, D] (any strides) of the concatenated keys/values."""
    n, hkv, p, d = prefix_k.shape
    dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    row = hkv * p * d
    block = 64 if interpreting() else 256
    launch_direct(_LAUNCHES, _sum_prefix_rows, (cdiv(row, block), n),
                  (dk, dv, prefix_index if prefix_index is not None else dk, dpk, dpv,
                   *dk.stride(), *dv.stride(), dk.shape[0], p, row),
                  dict(HAS_PIDX=prefix_index is not None, HEAD_DIM=d, BLOCK=block))
    return dpk, dpv
