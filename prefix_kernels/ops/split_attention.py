"""Split prefix attention: the vendor's kernel for the own keys, Triton for the prefix.

The own causal keys go through PyTorch's cuDNN or flash attention op, which returns the output
and its natural-log log-sum-exp. One Triton kernel per query block computes the row's prefix part
(the P keys of its bank entry, always visible) and merges both by log-sum-exp, in place over the
vendor's output (the merge reads O once). The backward calls the vendor's backward with the
MERGED output and log-sum-exp: its softmax and its rowsum(dO*O) are then the global ones, so its
dq, dk, dv are exact for the own keys (PyTorch's ring attention runs its parts the same way).
Triton then adds the prefix's share of dq in place and computes the bank gradients, summed over
the rows sharing an entry and the heads of a GQA group in a fixed order (fp32 partials reduced by
the fused op's `_reduce_prefix_grads`: no atomics).

Only for what the vendor computes the same way (`split_plan` says when): CUDA fp16/bf16, causal
with Sq == Sk (the vendors align causal top-left, ours is bottom-right) or not causal, no key
padding, a head dim the vendor takes, determinism not requested (the vendor's backward need not
be bitwise deterministic). Everything else runs the fused op (ops/prefix_attention.py).

Variants, chosen per call (`SplitConfig`), measured by benchmarks/probe_split.py:
  vendor   "cudnn" | "flash" (PyTorch's aten ops) | "math" (a plain PyTorch stand-in with the same
           contract, used on the CPU so the tests can run the whole path under the interpreter)
  forward  "vendor": vendor forward + Triton merge | "fused": the fused Triton forward (prefix
           included), whose output and log-sum-exp feed the vendor's backward just the same
  backward "onepass": one kernel per (row, KV head, query split) adds the prefix dq and writes
           the bank partials, reading q, dO, O once (P <= ONEPASS_MAX_P) | "twopass": a dq kernel
           per query block, then a bank-gradient kernel per prefix block | "auto"
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .utils import LOG2E, interpreting, sm_count, warn_once

LN2 = 0.6931471805599453
# Inside @triton.jit code a global must be a tl.constexpr: a plain float passes the interpreter but
# fails compilation on the GPU ("CompilationError at 53:46", H200 probe, 2026-11-30).
KERNEL_LOG2E = tl.constexpr(1.4426950408889634)
KERNEL_LN2 = tl.constexpr(0.6931471805599453)
VENDORS = ("cudnn", "flash", "math")
FORWARDS = ("vendor", "fused")
BACKWARDS = ("auto", "onepass", "twopass")
PATHS = ("auto", "fused", "split")
# Largest head dim each vendor takes here (D % 8 == 0 too). cuDNN: 128 is what the torch 2.11
# cuDNN backend documents for Hopper backward; the probe reports whether 256 runs.
VENDOR_MAX_HEAD_DIM = {"cudnn": 128, "flash": 256, "math": 256}
# Whether the vendor op takes Hkv < Hq itself; otherwise K/V are expanded to the query heads and
# dK/dV summed over the group. flash (FA2) reads the KV head of each query head; cuDNN: measured
# by the probe (PREFIX_KERNELS_SPLIT_NATIVE_GQA=cudnn,flash overrides).
NATIVE_GQA = {"cudnn": False, "flash": True, "math": True}
# LSE layout each vendor returns and wants back: [B, H, S, 1] (cuDNN) or [B, H, S].
LSE_DIMS = {"cudnn": 4, "flash": 3, "math": 4}


class SplitConfig(NamedTuple):
    vendor: str = "cudnn"
    forward: str = "vendor"
    backward: str = "auto"


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _entry(pidx_ptr, b, N_ENTRIES, HAS_PIDX: tl.constexpr):
    """The row's bank entry clamped into the bank, and whether it was in range (else NaN rows)."""
    if HAS_PIDX:
        entry = tl.load(pidx_ptr + b).to(tl.int64)
        ok = (entry >= 0) & (entry < N_ENTRIES)
        return tl.where(ok, entry, 0), ok
    else:
        return 0, True


@triton.jit
def _split_fwd_merge(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, o_ptr, lse_own_ptr, lse_ptr,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_o_b, stride_o_h, stride_o_m, stride_o_d,
    stride_lo_b, stride_lo_h, stride_lo_m,
    H, G, SQ, P, N_ENTRIES, qk_scale, SEQ_BUCKET,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Prefix part of one query block, merged by log-sum-exp into the vendor's (o, lse_own).

    O is overwritten in place; lse_ptr [B*H, SQ] gets the merged natural-log LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    entry, entry_ok = _entry(pidx_ptr, b, N_ENTRIES, HAS_PIDX=HAS_PIDX)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_m
                + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)

    # -- the prefix: an online softmax over P always-visible keys --
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pk_base = pk_ptr + entry * stride_pk_n + hk * stride_pk_h
    pv_base = pv_ptr + entry * stride_pv_n + hk * stride_pv_h
    for start_n in range(0, P, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nd_ok = (offs_n < P)[:, None] & d_ok[None, :]
        pk = tl.load(pk_base + offs_n[:, None] * stride_pk_p + offs_d[None, :] * stride_pk_d,
                     mask=nd_ok, other=0.0)
        s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
        s = tl.where((offs_n < P)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.load(pv_base + offs_n[:, None] * stride_pv_p + offs_d[None, :] * stride_pv_d,
                     mask=nd_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(pv.dtype), pv, input_precision=PREC)
        m_i = m_new

    # -- merge: lse = logaddexp(own, prefix); O = O_own*e^(own-lse) + acc/l*e^(prefix-lse) --
    lse_own = tl.load(lse_own_ptr + b * stride_lo_b + h * stride_lo_h + offs_m * stride_lo_m,
                      mask=m_ok, other=0.0) * KERNEL_LOG2E
    lse_pre = m_i + tl.math.log2(l_i)
    top = tl.maximum(lse_own, lse_pre)
    lse = top + tl.math.log2(tl.math.exp2(lse_own - top) + tl.math.exp2(lse_pre - top))
    o_ptrs = o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_m + offs_d[None, :] * stride_o_d
    o_own = tl.load(o_ptrs, mask=md_ok, other=0.0).to(tl.float32)
    out = o_own * tl.math.exp2(lse_own - lse)[:, None] + acc * tl.math.exp2(m_i - lse)[:, None]
    if HAS_PIDX:
        out = tl.where(entry_ok, out, float("nan"))
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=md_ok)
    tl.store(lse_ptr + pid_bh * SQ + offs_m, lse * KERNEL_LN2, mask=m_ok)


@triton.jit
def _split_bwd_dq(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_o_b, stride_o_h, stride_o_m, stride_o_d,
    stride_do_b, stride_do_h, stride_do_m, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_m, stride_dq_d,
    H, G, SQ, P, N_ENTRIES, qk_scale, sm_scale, SEQ_BUCKET,
    DQ_GRAD: tl.constexpr, HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """delta = rowsum(dO*O) of one query block (for the bank-gradient kernel), and with DQ_GRAD
    the prefix keys' share of dQ added in place to the vendor's dQ."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    entry, _ = _entry(pidx_ptr, b, N_ENTRIES, HAS_PIDX=HAS_PIDX)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_m
                 + offs_d[None, :] * stride_do_d, mask=md_ok, other=0.0)
    o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_m
                + offs_d[None, :] * stride_o_d, mask=md_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * SQ + offs_m, delta, mask=m_ok)
    if DQ_GRAD:
        q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_m
                    + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)
        lse = tl.load(lse_ptr + pid_bh * SQ + offs_m, mask=m_ok, other=0.0) * KERNEL_LOG2E
        pk_base = pk_ptr + entry * stride_pk_n + hk * stride_pk_h
        pv_base = pv_ptr + entry * stride_pv_n + hk * stride_pv_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, P, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < P
            nd_ok = n_ok[:, None] & d_ok[None, :]
            pk = tl.load(pk_base + offs_n[:, None] * stride_pk_p + offs_d[None, :] * stride_pk_d,
                         mask=nd_ok, other=0.0)
            pv = tl.load(pv_base + offs_n[:, None] * stride_pv_p + offs_d[None, :] * stride_pv_d,
                         mask=nd_ok, other=0.0)
            s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
            p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(pv), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(pk.dtype), pk, input_precision=PREC)
        dq_ptrs = dq_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_m + offs_d[None, :] * stride_dq_d
        total = tl.load(dq_ptrs, mask=md_ok, other=0.0).to(tl.float32) + dq * sm_scale
        tl.store(dq_ptrs, total.to(dq_ptr.dtype.element_ty), mask=md_ok)


@triton.jit
def _split_bwd_dprefix(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, do_ptr, lse_ptr, delta_ptr, part_k_ptr, part_v_ptr,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_do_b, stride_do_h, stride_do_m, stride_do_d,
    HKV, G, SQ, P, N_ENTRIES, SPLITS, qk_scale, sm_scale, SEQ_BUCKET,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 partial dPrefixK/V [B, SPLITS, HKV, P, D] of one prefix key block over one query
    split of one (row, KV head), the GQA group's query heads looped over inside."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    entry, _ = _entry(pidx_ptr, b, N_ENTRIES, HAS_PIDX=HAS_PIDX)
    split = pid_n % SPLITS
    offs_n = (pid_n // SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < P
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    pk = tl.load(pk_ptr + entry * stride_pk_n + hk * stride_pk_h + offs_n[:, None] * stride_pk_p
                 + offs_d[None, :] * stride_pk_d, mask=nd_ok, other=0.0)
    pv = tl.load(pv_ptr + entry * stride_pv_n + hk * stride_pv_h + offs_n[:, None] * stride_pv_p
                 + offs_d[None, :] * stride_pv_d, mask=nd_ok, other=0.0)
    rows_per_split = tl.cdiv(tl.cdiv(SQ, SPLITS), BLOCK_M) * BLOCK_M
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, SQ)
    H = HKV * G
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        for start_m in range(lo, hi, BLOCK_M):
            # rows past SQ load as zeros (q = dO = lse = delta = 0) and add nothing
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < SQ
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_m
                        + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)
            do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_m
                         + offs_d[None, :] * stride_do_d, mask=md_ok, other=0.0)
            lse = tl.load(lse_ptr + bh * SQ + offs_m, mask=m_ok, other=0.0) * KERNEL_LOG2E
            delta = tl.load(delta_ptr + bh * SQ + offs_m, mask=m_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(pk, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(pv, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    part = (((b * SPLITS + split) * HKV + hk) * P + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(part_k_ptr + part, dk * sm_scale, mask=nd_ok)
    tl.store(part_v_ptr + part, dv, mask=nd_ok)


@triton.jit
def _split_bwd_onepass(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, part_k_ptr, part_v_ptr,
    stride_q_b, stride_q_h, stride_q_m, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_o_b, stride_o_h, stride_o_m, stride_o_d,
    stride_do_b, stride_do_h, stride_do_m, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_m, stride_dq_d,
    HKV, G, SQ, P, N_ENTRIES, SPLITS, qk_scale, sm_scale, SEQ_BUCKET,
    DQ_GRAD: tl.constexpr, HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The whole prefix backward of one query split of one (row, KV head) when all P keys fit
    one block (P <= BLOCK_N): q, dO, O are read once; dQ gets the prefix share in place; the
    bank partials [B, SPLITS, HKV, P, D] accumulate over the GQA group's heads in registers."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    entry, _ = _entry(pidx_ptr, b, N_ENTRIES, HAS_PIDX=HAS_PIDX)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < P
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    pk = tl.load(pk_ptr + entry * stride_pk_n + hk * stride_pk_h + offs_n[:, None] * stride_pk_p
                 + offs_d[None, :] * stride_pk_d, mask=nd_ok, other=0.0)
    pv = tl.load(pv_ptr + entry * stride_pv_n + hk * stride_pv_h + offs_n[:, None] * stride_pv_p
                 + offs_d[None, :] * stride_pv_d, mask=nd_ok, other=0.0)
    rows_per_split = tl.cdiv(tl.cdiv(SQ, SPLITS), BLOCK_M) * BLOCK_M
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, SQ)
    H = HKV * G
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        for start_m in range(lo, hi, BLOCK_M):
            # rows past SQ load as zeros (q = dO = O = lse = 0) and add nothing
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < SQ
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_m
                        + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)
            do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_m
                         + offs_d[None, :] * stride_do_d, mask=md_ok, other=0.0)
            o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_m
                        + offs_d[None, :] * stride_o_d, mask=md_ok, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            lse = tl.load(lse_ptr + bh * SQ + offs_m, mask=m_ok, other=0.0) * KERNEL_LOG2E
            s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
            p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(pv), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            if DQ_GRAD:
                dq_ptrs = (dq_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_m
                           + offs_d[None, :] * stride_dq_d)
                dq = tl.dot(ds.to(pk.dtype), pk, input_precision=PREC) * sm_scale
                total = tl.load(dq_ptrs, mask=md_ok, other=0.0).to(tl.float32) + dq
                tl.store(dq_ptrs, total.to(dq_ptr.dtype.element_ty), mask=md_ok)
    part = (((b * SPLITS + split) * HKV + hk) * P + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(part_k_ptr + part, dk * sm_scale, mask=nd_ok)
    tl.store(part_v_ptr + part, dv, mask=nd_ok)


# --------------------------------------------------------------------------------------------
# Launch configs
# --------------------------------------------------------------------------------------------

def _config(block_m, warps, stages):
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)


# These kernels move q, O, dO, dQ once each and do little math (P << S): memory-bound, so wide
# query blocks and enough programs in flight matter more than the pipeline. Two candidates per
# kernel and head-dim class (each compiles ~1 s at first use); default first, which
# PREFIX_KERNELS_AUTOTUNE=0 takes untimed. The one-pass kernel holds 2 x BLOCK_N x D fp32
# accumulators: 8 warps from D=128 on.
_LOOP_CONFIGS = {64: [_config(64, 4, 2), _config(128, 8, 2)],
                 128: [_config(64, 4, 2), _config(128, 8, 2)],
                 256: [_config(32, 4, 2), _config(64, 8, 2)]}
_CANDIDATES = {
    "merge": _LOOP_CONFIGS, "dq": _LOOP_CONFIGS, "dprefix": _LOOP_CONFIGS,
    "onepass": {64: [_config(64, 4, 2), _config(128, 8, 2), _config(32, 4, 2)],
                128: [_config(64, 8, 2), _config(32, 4, 2)],
                256: [_config(32, 8, 2), _config(16, 4, 2)]},
}
_INTERPRET_CONFIG = _config(16, 4, 1)
_KERNELS = {"merge": _split_fwd_merge, "dq": _split_bwd_dq, "dprefix": _split_bwd_dprefix,
            "onepass": _split_bwd_onepass}
# In-place outputs: autotune must put them back after each timed run.
_RESTORE = {"merge": ["o_ptr"], "dq": ["dq_ptr"], "dprefix": None, "onepass": ["dq_ptr"]}
_TUNE_KEY = ["HEAD_DIM", "BLOCK_N", "SEQ_BUCKET", "HAS_PIDX", "PREC"]
# All P keys of a one-pass program sit in one block of its registers.
ONEPASS_MAX_P = {64: 128, 128: 64, 256: 32}
_CHOSEN: dict = {}


def _autotune_enabled() -> bool:
    return os.environ.get("PREFIX_KERNELS_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _tuned(name: str, head_dim_class: int, tune: bool):
    kernel = _KERNELS[name]
    if interpreting():
        return triton.autotune(configs=[_INTERPRET_CONFIG], key=_TUNE_KEY)(kernel)
    configs = _CANDIDATES[name][head_dim_class]
    return triton.autotune(configs=configs if tune else configs[:1], key=_TUNE_KEY,
                           restore_value=_RESTORE[name])(kernel)


def _launch(name, grid, args, constexprs, dtype):
    """Launch with the config autotune chose for this key; later calls skip triton's
    Autotuner.run (~70 us of host time per launch, see ops/prefix_attention.py `_launch`)."""
    tune = _autotune_enabled()
    key = (name, dtype, tune, args[-1], *sorted(constexprs.items()))      # args[-1]: SEQ_BUCKET
    config = _CHOSEN.get(key)
    if config is None:
        tuner = _tuned(name, _head_dim_class(constexprs["HEAD_DIM"]), tune)
        tuner[grid](*args, **constexprs)
        _CHOSEN[key] = tuner.best_config
        return
    _KERNELS[name][grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                         num_stages=config.num_stages)


def _head_dim_class(d: int) -> int:
    return 64 if d <= 64 else 128 if d <= 128 else 256


def _meta(q, p, one_block=False):
    d = q.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
                BLOCK_N=max(16, triton.next_power_of_2(p)) if one_block else _prefix_block(p, d))


def _prefix_block(p: int, d: int) -> int:
    """Prefix keys per block of the looping kernels: all of P up to 64 (32 at D=256); 16 under
    the interpreter so that small test prefixes span several blocks."""
    if interpreting():
        return 16
    return max(16, min(triton.next_power_of_2(p), 32 if d > 128 else 64))


def _onepass_fits(p: int, d: int) -> bool:
    return p <= ONEPASS_MAX_P[_head_dim_class(d)]


def _seq_bucket(n: int) -> int:
    return max(256, triton.next_power_of_2(n))


def _query_splits(sq: int, programs_per_split: int, device) -> int:
    """Query ranges per (row, KV head): about 4 programs per SM, so that a memory-bound grid has
    loads in flight everywhere (the fp32 partials this costs are B*SPLITS*Hkv*P*D, small)."""
    sms = sm_count(device) if device.type == "cuda" else 4
    want = triton.cdiv(4 * sms, max(programs_per_split, 1))
    return max(1, min(want, triton.cdiv(sq, 64), 64))


# --------------------------------------------------------------------------------------------
# The vendor kernels (own keys only), and a stand-in with the same contract for the CPU
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _native_gqa(vendor: str) -> bool:
    override = os.environ.get("PREFIX_KERNELS_SPLIT_NATIVE_GQA")
    if override is not None:
        return vendor == "math" or vendor in override.split(",")
    return NATIVE_GQA[vendor]


def _expand_heads(t, hq):
    """[B, Hkv, S, D] -> [B, Hq, S, D], query head h reading KV head h // G."""
    b, hkv, s, d = t.shape
    return t[:, :, None].expand(b, hkv, hq // hkv, s, d).reshape(b, hq, s, d)


def _sum_heads(t, hkv, like):
    """[B, Hq, S, D] -> [B, Hkv, S, D] in the layout of `like`: sum over each GQA group."""
    b, hq, s, d = t.shape
    out = torch.empty_like(like)
    torch.sum(t.view(b, hkv, hq // hkv, s, d), dim=2, out=out)
    return out


@functools.lru_cache(maxsize=None)
def _zero_seed(device):
    """The RNG seed/offset the vendor backwards take; never read at dropout 0."""
    return torch.zeros((), dtype=torch.int64, device=device)


def _vendor_forward(vendor, q, k, v, scale, causal):
    """o [B, H, Sq, D] and its LSE (natural log, the vendor's own layout) over the own keys."""
    hq = q.shape[1]
    if k.shape[1] != hq and not _native_gqa(vendor):
        k, v = _expand_heads(k, hq), _expand_heads(v, hq)
    if vendor == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                                 False, scale=scale)
    elif vendor == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        res = _math_forward(q, k, v, scale, causal)
    return res[0], res[1]


def _vendor_backward(vendor, do, q, k, v, out, lse, scale, causal):
    """dq, dk, dv of the own keys given the MERGED out and lse (natural log, [B, H, Sq])."""
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    expand = hkv != hq and not _native_gqa(vendor)
    ke, ve = (_expand_heads(k, hq), _expand_heads(v, hq)) if expand else (k, v)
    lse = lse.unsqueeze(-1) if LSE_DIMS[vendor] == 4 else lse
    if do.stride() != out.stride():       # the vendors want dO laid out as O
        do = torch.empty_like(out).copy_(do)
    if vendor == "cudnn":
        seed = _zero_seed(q.device)       # dropout 0: the RNG state is never read
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            do, q, ke, ve, out, lse, seed, seed, None, None, None, sq, sk, 0.0, causal, scale=scale)
    elif vendor == "flash":
        seed = _zero_seed(q.device)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, ke, ve, out, lse, None, None, sq, sk, 0.0, causal, seed, seed, scale=scale)
    else:
        dq, dk, dv = _math_backward(do, q, ke, ve, out, lse, scale, causal)
    if expand:
        dk, dv = _sum_heads(dk, hkv, k), _sum_heads(dv, hkv, v)
    return dq, dk, dv


def _math_scores(q, k, scale, causal):
    hq = q.shape[1]
    kf = k.float().repeat_interleave(hq // k.shape[1], dim=1)
    s = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    if causal:
        sq, sk = s.shape[-2:]
        visible = torch.arange(sk, device=q.device)[None, :] <= torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        s = s.masked_fill(~visible, float("-inf"))
    return s, kf


def _math_forward(q, k, v, scale, causal):
    """The stand-in vendor: plain PyTorch in fp32, LSE natural log [B, H, S, 1] like cuDNN's."""
    s, _ = _math_scores(q, k, scale, causal)
    lse = torch.logsumexp(s, dim=-1)
    vf = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    o = torch.matmul(torch.exp(s - lse[..., None]), vf)
    return o.to(q.dtype), lse.unsqueeze(-1)


def _math_backward(do, q, k, v, out, lse, scale, causal):
    """The vendors' backward contract: softmax and rowsum(dO*O) from the GIVEN out and lse."""
    hq, hkv = q.shape[1], k.shape[1]
    s, kf = _math_scores(q, k, scale, causal)
    p = torch.exp(s - lse.reshape(s.shape[:-1])[..., None].float())
    dof = do.float()
    vf = v.float().repeat_interleave(hq // hkv, dim=1)
    delta = (dof * out.float()).sum(-1, keepdim=True)
    dv = torch.matmul(p.transpose(-1, -2), dof)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.float()) * scale
    b, _, sk, d = dk.shape
    dk = dk.view(b, hkv, hq // hkv, sk, d).sum(2)
    dv = dv.view(b, hkv, hq // hkv, sk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _in_layout_of(t, like):
    """t laid out as torch.empty_like(like), which is what the custom ops' fakes promise."""
    if t.stride() == like.stride():
        return t
    target = torch.empty_like(like)
    return t if t.stride() == target.stride() else target.copy_(t)


def _lse_bhs(lse, b, h, sq):
    """The vendor's LSE as a [B, H, Sq] view ([B, H, S, 1] from cuDNN, [B, H, S] from flash)."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if tuple(lse.shape) != (b, h, sq):
        raise RuntimeError(f"split attention: the vendor returned a log-sum-exp of shape "
                           f"{tuple(lse.shape)}, expected [{b}, {h}, {sq}] (or with a trailing 1); "
                           f"use path='fused'")
    return lse


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, forward,
                    match_layout=False):
    """Merged (out, lse): lse natural log [B, H, Sq] fp32 contiguous; out in the vendor's layout,
    or in q's (as the custom op's fake promises) with match_layout."""
    b, h, sq, _ = q.shape
    hkv, p = k.shape[1], prefix_k.shape[2]
    if forward == "fused":
        from .prefix_attention import _launch_forward as fused_forward
        out, lse2 = fused_forward(q, k, v, prefix_k, prefix_v, prefix_index, None, scale, causal)
        return out, lse2 * LN2
    out, lse_own = _vendor_forward(vendor, q, k, v, scale, causal)
    lse_own = _lse_bhs(lse_own, b, h, sq)
    if match_layout:
        out = _in_layout_of(out, q)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    meta = _meta(q, p)
    _launch("merge", lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h),
            (q, prefix_k, prefix_v, prefix_index if prefix_index is not None else q, out, lse_own, lse,
             *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *lse_own.stride(),
             h, h // hkv, sq, p, prefix_k.shape[0], scale * LOG2E, _seq_bucket(sq)),
            dict(HAS_PIDX=prefix_index is not None, **meta), q.dtype)
    return out, lse


def _backward_kind(backward, p, d):
    """onepass when all P keys fit its one block (asked for, or auto), else twopass."""
    return "onepass" if backward in ("auto", "onepass") and _onepass_fits(p, d) else "twopass"


def _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, scale, causal,
                     vendor, backward, need_dq, need_dkv, need_prefix, match_layout=False):
    """dq, dk, dv (the vendor's, in its layout, or as q, k, v's with match_layout) with the
    prefix's dq added, and the bank gradients; empty tensors for what is not needed."""
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    dq, dk, dv = q.new_empty(0), k.new_empty(0), v.new_empty(0)
    dpk, dpv = prefix_k.new_empty(0), prefix_v.new_empty(0)
    if need_dq or need_dkv:
        dq, dk, dv = _vendor_backward(vendor, do, q, k, v, out, lse, scale, causal)
        if match_layout:
            dq, dk, dv = _in_layout_of(dq, q), _in_layout_of(dk, k), _in_layout_of(dv, v)
        dq = dq if need_dq else q.new_empty(0)
        dk, dv = (dk, dv) if need_dkv else (k.new_empty(0), v.new_empty(0))
    if not (need_dq or need_prefix):
        return dq, dk, dv, dpk, dpv

    kind = _backward_kind(backward, p, d) if need_prefix else "twopass"
    meta = _meta(q, p, one_block=kind == "onepass")
    pidx = prefix_index if prefix_index is not None else q
    dq_arg = dq if need_dq else q
    common = dict(HAS_PIDX=prefix_index is not None, **meta)
    bucket = _seq_bucket(sq)
    if need_prefix:
        prefix_programs = triton.cdiv(p, meta["BLOCK_N"]) if kind == "twopass" else 1
        splits = _query_splits(sq, b * hkv * prefix_programs, q.device)
        part_k = torch.empty((b, splits, hkv, p, d), device=q.device, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
    if kind == "onepass":
        _launch("onepass", lambda m: (splits, b * hkv),
                (q, prefix_k, prefix_v, pidx, out, do, lse, dq_arg, part_k, part_v,
                 *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *do.stride(),
                 *dq_arg.stride(), hkv, h // hkv, sq, p, n, splits, scale * LOG2E, scale, bucket),
                dict(DQ_GRAD=need_dq, **common), q.dtype)
    else:
        delta = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
        _launch("dq", lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h),
                (q, prefix_k, prefix_v, pidx, out, do, lse, delta, dq_arg,
                 *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *do.stride(),
                 *dq_arg.stride(), h, h // hkv, sq, p, n, scale * LOG2E, scale, bucket),
                dict(DQ_GRAD=need_dq, **common), q.dtype)
        if need_prefix:
            _launch("dprefix", lambda m: (triton.cdiv(p, meta["BLOCK_N"]) * splits, b * hkv),
                    (q, prefix_k, prefix_v, pidx, do, lse, delta, part_k, part_v,
                     *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *do.stride(),
                     hkv, h // hkv, sq, p, n, splits, scale * LOG2E, scale, bucket),
                    common, q.dtype)
    if need_prefix:
        from .prefix_attention import _reduce_prefix_grads
        dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
        row = hkv * p * d
        block = 1024 if not interpreting() else 256
        _reduce_prefix_grads[(triton.cdiv(row, block), n)](
            part_k, part_v, pidx, dpk, dpv, b, row, splits,
            HAS_PIDX=prefix_index is not None, BLOCK=block)
    return dq, dk, dv, dpk, dpv


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces them) and the autograd rule
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefix_kernels::split_attention_fwd", mutates_args=())
def _split_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                         prefix_index: Optional[torch.Tensor], scale: float, causal: bool,
                         vendor: str, forward: str, backward: str) -> tuple[torch.Tensor, torch.Tensor]:
    # `backward` does not change the forward: it rides along for the autograd rule
    return _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, forward,
                           match_layout=True)


@_split_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, forward, backward):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::split_attention_bwd", mutates_args=())
def _split_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                         prefix_index: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                         scale: float, causal: bool, vendor: str, backward: str,
                         need_dq: bool, need_dkv: bool, need_prefix: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, scale, causal,
                            vendor, backward, need_dq, need_dkv, need_prefix, match_layout=True)


@_split_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, scale, causal, vendor, backward,
      need_dq, need_dkv, need_prefix):
    def like(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)

    def dense(t, needed):       # the bank gradients are written densely
        return t.new_empty(t.shape) if needed else t.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            dense(prefix_k, need_prefix), dense(prefix_v, need_prefix))


def _grads(ctx, grad_out, launch_backward):
    """The five input gradients (None where autograd asks for none)."""
    q, k, v, prefix_k, prefix_v, prefix_index, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dkv, need_prefix = need[0], need[1] or need[2], need[3] or need[4]
    dq, dk, dv, dpk, dpv = launch_backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, ctx.scale, ctx.causal,
        ctx.config.vendor, ctx.config.backward, need_dq, need_dkv, need_prefix)
    return (dq if need_dq else None, dk if need[1] else None, dv if need[2] else None,
            dpk if need[3] else None, dpv if need[4] else None)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, forward, backward = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, out, lse)
    ctx.scale, ctx.causal, ctx.config = scale, causal, SplitConfig(vendor, forward, backward)


def _backward(ctx, grad_out, grad_lse):
    return _grads(ctx, grad_out, _split_attention_bwd) + (None,) * 6


_split_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SplitAttention(torch.autograd.Function):
    """The eager path: the launchers without the custom-op dispatch (~45 us of host time)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, config):
        out, lse = _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal,
                                   config.vendor, config.forward)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, out, lse)
        ctx.scale, ctx.causal, ctx.config = scale, causal, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _launch_backward) + (None,) * 4


# --------------------------------------------------------------------------------------------
# When to split, and the entry point the public op calls
# --------------------------------------------------------------------------------------------

# path="auto": the split variant that beats the fused op on the H200, or None for the fused op
# everywhere. None until benchmarks/probe_split.py has run on the GPU; then e.g.
# SplitConfig("cudnn", "fused", "auto") (see `_auto_config` for a per-shape rule).
AUTO_SPLIT: Optional[SplitConfig] = None


def _auto_config(q, k, prefix_k) -> Optional[SplitConfig]:
    """path='auto': the split variant to run for this shape, or None (the fused op)."""
    return AUTO_SPLIT


def default_config(q) -> SplitConfig:
    """The split variant `path='split'` runs: env PREFIX_KERNELS_SPLIT_VENDOR / _FORWARD /
    _BACKWARD override the defaults; CPU tensors (interpreter) take the PyTorch stand-in."""
    env = os.environ.get
    vendor = "math" if not q.is_cuda else env("PREFIX_KERNELS_SPLIT_VENDOR", "cudnn")
    forward = env("PREFIX_KERNELS_SPLIT_FORWARD", "vendor")
    backward = env("PREFIX_KERNELS_SPLIT_BACKWARD", "auto")
    config = SplitConfig(vendor, forward, backward)
    for value, allowed in zip(config, (VENDORS, FORWARDS, BACKWARDS)):
        if value not in allowed:
            raise ValueError(f"prefix_attention: split setting {value!r} is not one of {allowed} "
                             f"(PREFIX_KERNELS_SPLIT_VENDOR / _FORWARD / _BACKWARD)")
    return config


def ineligible_reason(q, k, key_padding_mask, causal, vendor, **features) -> Optional[str]:
    """Why the split path cannot compute this call exactly as the fused op, or None.

    `features`: keyword arguments of the fused op the vendor kernels lack (dropout, softcap,
    sliding window, packed sequences...): any one set (not None, not 0/False) disqualifies."""
    set_features = sorted(name for name, value in features.items() if value is not None and value is not False
                          and not (isinstance(value, (int, float)) and value == 0))
    if set_features:
        return f"{', '.join(set_features)} (only the fused kernel has them)"
    if torch.are_deterministic_algorithms_enabled():
        return "torch deterministic algorithms are on (the vendor backward is not bitwise deterministic)"
    if key_padding_mask is not None:
        return "a key padding mask (the vendor kernels take none here)"
    if causal and q.shape[2] != k.shape[2]:
        return (f"causal with Sq={q.shape[2]} != Sk={k.shape[2]} (the vendors align causal masks "
                f"top-left, this op bottom-right)")
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {q.dtype} (the vendor kernels take fp16/bf16)"
        if vendor == "math":
            return "the 'math' stand-in is for CPU tests only"
        if not torch.compiler.is_compiling() and _capability(q.device) < (8, 0):   # dynamo: no capability query
            return f"a GPU of compute capability {_capability(q.device)} (the vendor kernels need 8.0+)"
    elif not interpreting():
        return "CPU tensors (the split path runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    elif vendor != "math":
        return f"vendor {vendor!r} on the CPU (only the 'math' stand-in runs there)"
    d = q.shape[-1]
    if d % 8 != 0 or d > VENDOR_MAX_HEAD_DIM[vendor] or d < 16:
        return f"head_dim {d} ({vendor} takes multiples of 8 from 16 to {VENDOR_MAX_HEAD_DIM[vendor]})"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "an empty sequence"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


def split_plan(path, q, k, prefix_k, key_padding_mask, causal, **features) -> Optional[SplitConfig]:
    """The split variant to run for this call, or None for the fused path.

    path: "auto" | "fused" | "split"; None reads PREFIX_KERNELS_ATTENTION (default "auto").
    A requested split that cannot run is announced once with the reason; the fused path runs."""
    if path is None:
        path = os.environ.get("PREFIX_KERNELS_ATTENTION", "auto")
    if path not in PATHS:
        raise ValueError(f"prefix_attention: path must be one of {PATHS}, got {path!r} "
                         f"(keyword path= or env PREFIX_KERNELS_ATTENTION)")
    if path == "fused":
        return None
    config = default_config(q) if path == "split" else _auto_config(q, k, prefix_k)
    if config is None:
        return None
    reason = ineligible_reason(q, k, key_padding_mask, causal, config.vendor, **features)
    if reason is not None:
        if path == "split":
            warn_once(f"prefix_attention: path='split' runs the fused kernels instead for {reason}")
        return None
    return config


def split_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, scale: float, causal: bool,
                           config: SplitConfig = SplitConfig()):
    """The split path (inputs already checked by `prefix_attention`; prefix_k [N, Hkv, P, D]).

    Returns out (batch, heads_q, seqlen_q, head_dim) in q's dtype; gradients as the fused op's."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if torch.compiler.is_compiling():
        out, _ = _split_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, float(scale),
                                      bool(causal), *config)
        return out
    return _SplitAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, float(scale),
                                 bool(causal), config)
