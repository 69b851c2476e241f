"""Fused prefix attention: Triton forward/backward kernels -> launchers -> custom op -> public fn.

Every query attends to the P keys of its row's prefix-bank entry (always visible) and to its own
causal keys that the padding mask keeps. The prefix is read straight from the bank
[N, Hkv, P, D]: no concatenated KV, no repeated GQA heads, no mask tensor is ever built.

Softmax runs in base 2 (exp2): scores are pre-multiplied by scale*log2(e) and the saved
log-sum-exp is log2-based.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import split_attention
from .reference import reference_prefix_attention
from .utils import LOG2E, interpreting as _interpreting, sm_count, warn_once as _warn_once

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(ptrs, row_ok, col_ok, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
    if ROW_MASK and COL_MASK:
        return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    elif ROW_MASK:
        return tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COL_MASK:
        return tl.load(ptrs, mask=col_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               kpm_base, stride_kpm_n, lo, hi, n_limit, q_pos, offs_d, qk_scale,
               CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        # k is loaded transposed, [BLOCK_D, BLOCK_N], so q @ kT needs no shuffle
        kt = tl.trans(_load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                                 n_ok, d_ok, BOUNDS_MASK, BLOCK_D != HEAD_DIM))
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        if BOUNDS_MASK:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n * stride_kpm_n, mask=n_ok, other=0) != 0
            s = tl.where(keep[None, :], s, float("-inf"))
        # m_i is finite here: the prefix (P >= 1) is always processed first
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       n_ok, d_ok, BOUNDS_MASK, BLOCK_D != HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _bank_entry(PIDX, b, N_ENTRIES, HAS_PIDX: tl.constexpr):
    """The row's bank entry, clamped into the bank so nothing reads out of bounds.

    A CUDA prefix_index is not range-checked on the host (that costs a sync per layer); a row
    whose entry is out of range gets a NaN output instead of a silent wrong one."""
    if HAS_PIDX:
        entry = tl.load(PIDX + b).to(tl.int64)
        entry_ok = (entry >= 0) & (entry < N_ENTRIES)
        return tl.where(entry_ok, entry, 0), entry_ok
    else:
        return 0, True


@triton.jit
def _own_key_ranges(start_m, SQ, SK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Key ranges of a query block: [0, full_hi) seen by every query, [full_hi, hi) by some."""
    if CAUSAL:
        off = SK - SQ
        full_hi = tl.maximum(tl.minimum(start_m + off + 1, SK), 0)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + off, SK), full_hi)
    else:
        full_hi = (SK // BLOCK_N) * BLOCK_N
        hi = SK
    return full_hi, hi


@triton.jit
def _prefix_attn_fwd(
    Q, K, V, PK, PV, PIDX, KPM, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_kpm_b, stride_kpm_n,
    stride_ob, stride_oh, stride_om, stride_od,
    H, G, SQ, SK, P, N_ENTRIES, qk_scale, SEQ_BUCKET,
    HAS_PIDX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    entry, entry_ok = _bank_entry(PIDX, b, N_ENTRIES, HAS_PIDX)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, m_ok, d_ok, True, BLOCK_D != HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_pos = offs_m + (SK - SQ)
    kpm_base = KPM + b * stride_kpm_b

    # -- prefix blocks: always visible, never padded --
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, PK + entry * stride_pkn + hk * stride_pkh,
        PV + entry * stride_pvn + hk * stride_pvh, stride_pkp, stride_pkd, stride_pvp, stride_pvd,
        kpm_base, stride_kpm_n, 0, P, P, q_pos, offs_d, qk_scale,
        False, True, False, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)
    # -- own keys: blocks every query sees, then the diagonal/edge blocks --
    full_hi, hi = _own_key_ranges(start_m, SQ, SK, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        kpm_base, stride_kpm_n, 0, full_hi, SK, q_pos, offs_d, qk_scale,
        False, False, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
        kpm_base, stride_kpm_n, full_hi, hi, SK, q_pos, offs_d, qk_scale,
        CAUSAL, True, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)

    acc = acc / l_i[:, None]
    if HAS_PIDX:
        acc = tl.where(entry_ok, acc, float("nan"))
    tl.store(LSE + pid_bh * SQ + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                  stride_vd, kpm_base, stride_kpm_n, lo, hi, n_limit, q_pos, offs_d, qk_scale,
                  CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  PREC: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        k = _load_tile(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                       n_ok, d_ok, BOUNDS_MASK, BLOCK_D != HEAD_DIM)
        v = _load_tile(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                       n_ok, d_ok, BOUNDS_MASK, BLOCK_D != HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if BOUNDS_MASK:
            p = tl.where(n_ok[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(offs_n[None, :] <= q_pos[:, None], p, 0.0)
        if HAS_KPM:
            keep = tl.load(kpm_base + offs_n * stride_kpm_n, mask=n_ok, other=0) != 0
            p = tl.where(keep[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _prefix_attn_bwd_dq(
    Q, K, V, PK, PV, PIDX, KPM, O, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_kpm_b, stride_kpm_n,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, G, SQ, SK, P, N_ENTRIES, qk_scale, sm_scale, SEQ_BUCKET,
    DQ_GRAD: tl.constexpr, HAS_PIDX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ of one query block, and delta = rowsum(O * dO) for the dK/dV kernel launched next
    (computed here rather than in a kernel of its own: one launch less per backward).
    With DQ_GRAD False only delta is written."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    entry, entry_ok = _bank_entry(PIDX, b, N_ENTRIES, HAS_PIDX)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < SQ
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm
                   + offs_d[None, :] * stride_qd, m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom
                    + offs_d[None, :] * stride_dod, m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om
                   + offs_d[None, :] * stride_od, m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * SQ + offs_m, delta, mask=m_ok)
    if not DQ_GRAD:
        return
    lse = tl.load(LSE + pid_bh * SQ + offs_m, mask=m_ok, other=0.0)
    q_pos = offs_m + (SK - SQ)
    kpm_base = KPM + b * stride_kpm_b
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- prefix blocks --
    dq = _bwd_dq_inner(dq, q, do, lse, delta, PK + entry * stride_pkn + hk * stride_pkh,
                       PV + entry * stride_pvn + hk * stride_pvh, stride_pkp, stride_pkd,
                       stride_pvp, stride_pvd, kpm_base, stride_kpm_n, 0, P, P, q_pos, offs_d,
                       qk_scale, False, True, False, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)
    # -- own keys --
    full_hi, hi = _own_key_ranges(start_m, SQ, SK, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                       stride_vd, kpm_base, stride_kpm_n, 0, full_hi, SK, q_pos, offs_d, qk_scale,
                       False, False, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                       stride_vd, kpm_base, stride_kpm_n, full_hi, hi, SK, q_pos, offs_d, qk_scale,
                       CAUSAL, True, HAS_KPM, BLOCK_N, HEAD_DIM, BLOCK_D, PREC)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, keep, q_base, do_base, lse_base, delta_base,
                  stride_qm, stride_qd, stride_dom, stride_dod, lo, hi, SQ, k_pos, q_shift,
                  offs_d, qk_scale,
                  CAUSAL_MASK: tl.constexpr, KEEP_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head.

    Out-of-range query rows load as zeros (q = dO = lse = delta = 0) and contribute nothing.
    """
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < SQ
        q = _load_tile(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                       m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        do = _load_tile(do_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                        m_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale       # [BLOCK_N, BLOCK_M]
        pt = tl.math.exp2(st - lse[None, :])
        if CAUSAL_MASK:
            pt = tl.where(k_pos[:, None] <= (offs_m + q_shift)[None, :], pt, 0.0)
        if KEEP_MASK:
            pt = tl.where(keep[:, None], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def _prefix_attn_bwd_dkdv(
    Q, K, V, PK, PV, PIDX, KPM, DO, LSE, DELTA, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pkn, stride_pkh, stride_pkp, stride_pkd,
    stride_pvn, stride_pvh, stride_pvp, stride_pvd,
    stride_kpm_b, stride_kpm_n,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    HKV, G, SQ, SK, P, N_ENTRIES, qk_scale, sm_scale, SEQ_BUCKET,
    SPLITS: tl.constexpr, PREFIX_GRAD: tl.constexpr, OWN_GRAD: tl.constexpr,
    KEEP_MASK: tl.constexpr, HAS_PIDX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per key block of one (row, KV head); prefix blocks come first in the grid.

    A prefix program covers one of SPLITS contiguous query ranges and writes its fp32 partial
    dPrefixK/V to DPK/DPV [B, SPLITS, HKV, P, D]; the host reduces them over splits and over
    the rows sharing a bank entry in a fixed order (deterministic: no atomics). The GQA group's
    query heads are looped over inside the program, so nothing is shared between programs.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    H = HKV * G
    if PREFIX_GRAD:
        num_prefix_programs = tl.cdiv(P, BLOCK_N) * SPLITS
    else:
        num_prefix_programs = 0
    if pid_n < num_prefix_programs:
        # -- a prefix key block, over one split of the queries --
        entry, entry_ok = _bank_entry(PIDX, b, N_ENTRIES, HAS_PIDX)
        split = pid_n % SPLITS
        offs_n = (pid_n // SPLITS) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < P
        k = _load_tile(PK + entry * stride_pkn + hk * stride_pkh + offs_n[:, None] * stride_pkp
                       + offs_d[None, :] * stride_pkd, n_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        v = _load_tile(PV + entry * stride_pvn + hk * stride_pvh + offs_n[:, None] * stride_pvp
                       + offs_d[None, :] * stride_pvd, n_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        rows_per_split = tl.cdiv(tl.cdiv(SQ, SPLITS), BLOCK_M) * BLOCK_M
        lo = split * rows_per_split
        hi = tl.minimum(lo + rows_per_split, SQ)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, G):
            h = hk * G + g
            bh = b * H + h
            dk, dv = _bwd_kv_inner(dk, dv, k, v, n_ok, Q + b * stride_qb + h * stride_qh,
                                   DO + b * stride_dob + h * stride_doh, LSE + bh * SQ,
                                   DELTA + bh * SQ, stride_qm, stride_qd, stride_dom, stride_dod,
                                   lo, hi, SQ, offs_n, 0, offs_d, qk_scale,
                                   False, True, HEAD_DIM, BLOCK_D, BLOCK_M, PREC)
        part = (((b * SPLITS + split) * HKV + hk) * P + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
        tile_ok = n_ok[:, None] & d_ok[None, :]
        tl.store(DPK + part, dk * sm_scale, mask=tile_ok)
        tl.store(DPV + part, dv, mask=tile_ok)
    else:
        # -- an own key block: dK, dV are activation gradients --
        start_n = (pid_n - num_prefix_programs) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < SK
        k = _load_tile(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_kn
                       + offs_d[None, :] * stride_kd, n_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        v = _load_tile(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vn
                       + offs_d[None, :] * stride_vd, n_ok, d_ok, True, BLOCK_D != HEAD_DIM)
        if HAS_KPM:
            keep = tl.load(KPM + b * stride_kpm_b + offs_n * stride_kpm_n, mask=n_ok, other=0) != 0
        else:
            keep = n_ok
        q_shift = SK - SQ
        if CAUSAL:
            # queries i see key j iff j <= i + q_shift
            lo = (tl.maximum(start_n - q_shift, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0), BLOCK_M) * BLOCK_M
            full_lo = tl.maximum(tl.minimum(full_lo, SQ), lo)
        else:
            lo = 0
            full_lo = 0
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, G):
            h = hk * G + g
            bh = b * H + h
            q_base = Q + b * stride_qb + h * stride_qh
            do_base = DO + b * stride_dob + h * stride_doh
            dk, dv = _bwd_kv_inner(dk, dv, k, v, keep, q_base, do_base, LSE + bh * SQ,
                                   DELTA + bh * SQ, stride_qm, stride_qd, stride_dom, stride_dod,
                                   lo, full_lo, SQ, offs_n, q_shift, offs_d, qk_scale,
                                   CAUSAL, KEEP_MASK, HEAD_DIM, BLOCK_D, BLOCK_M, PREC)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, keep, q_base, do_base, LSE + bh * SQ,
                                   DELTA + bh * SQ, stride_qm, stride_qd, stride_dom, stride_dod,
                                   full_lo, SQ, SQ, offs_n, q_shift, offs_d, qk_scale,
                                   False, KEEP_MASK, HEAD_DIM, BLOCK_D, BLOCK_M, PREC)
        tile_ok = n_ok[:, None] & d_ok[None, :]
        tl.store(DK + b * stride_dkb + hk * stride_dkh + offs_n[:, None] * stride_dkn
                 + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile_ok)
        tl.store(DV + b * stride_dvb + hk * stride_dvh + offs_n[:, None] * stride_dvn
                 + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=tile_ok)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Per kernel and head-dim class: the default first (FlexAttention's H100 defaults: fwd 128x64,
# 8 warps, 3 stages at D=128; bwd 64x128 for dK/dV and 128x64 for dQ), then the neighbours
# autotune may pick instead. fp32 runs exact (ieee) dots and gets small tiles.
_CANDIDATES = {
    "fwd": {"fp32": [_config(64, 32, 4, 2), _config(32, 32, 4, 2)],
            64: [_config(128, 128, 4, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3), _config(128, 64, 8, 3)],
            128: [_config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3)],
            256: [_config(64, 32, 4, 3), _config(64, 64, 8, 2), _config(128, 32, 8, 2)]},
    "dq": {"fp32": [_config(32, 32, 4, 2), _config(64, 32, 4, 2)],
           64: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 4, 3), _config(64, 128, 8, 2)],
           128: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 8, 3), _config(64, 32, 4, 3)],
           256: [_config(64, 64, 8, 2), _config(64, 32, 4, 2), _config(32, 64, 4, 2)]},
    "dkdv": {"fp32": [_config(16, 32, 4, 2), _config(32, 32, 4, 2)],
             64: [_config(64, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 128, 4, 3), _config(128, 128, 8, 2)],
             128: [_config(64, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 128, 4, 3), _config(64, 128, 8, 2)],
             256: [_config(64, 64, 8, 2), _config(32, 64, 4, 2), _config(32, 32, 4, 2)]},
}
# Hopper candidates (issue 10, design 2), appended after the ones above: deeper pipelines and
# 8 warps at D=128, after Triton's fused-attention tutorial on H100 (fwd 128x128, 8 warps, 3-4
# stages; bwd 32x128 dK/dV and 128x32 dQ at 4-5 stages). Configs over the shared memory of a GPU
# fail to compile and autotune skips them; benchmarks/probe_split.py prints which ones win.
_HOPPER_CANDIDATES = {
    "fwd": {64: [_config(128, 128, 8, 3), _config(128, 64, 4, 4)],
            128: [_config(128, 64, 8, 4), _config(128, 128, 8, 4)]},
    "dq": {64: [_config(128, 64, 4, 4), _config(128, 128, 8, 3)],
           128: [_config(128, 64, 8, 4), _config(128, 128, 8, 3)]},
    "dkdv": {64: [_config(32, 128, 4, 5), _config(64, 128, 4, 4)],
             128: [_config(32, 128, 4, 5), _config(64, 128, 8, 4)]},
}
for _name, _table in _HOPPER_CANDIDATES.items():
    for _cls, _configs in _table.items():
        _CANDIDATES[_name][_cls].extend(_configs)
# 16x16 blocks under the interpreter: small test shapes then span several blocks.
_INTERPRET_CONFIG = _config(16, 16, 4, 1)
_TUNE_KEY = {"fwd": ["HEAD_DIM", "SEQ_BUCKET", "CAUSAL", "HAS_KPM"],
             "dq": ["HEAD_DIM", "SEQ_BUCKET", "CAUSAL", "HAS_KPM", "DQ_GRAD"],
             "dkdv": ["HEAD_DIM", "SEQ_BUCKET", "CAUSAL", "HAS_KPM", "PREFIX_GRAD", "OWN_GRAD"]}


def _autotune_enabled() -> bool:
    # PREFIX_KERNELS_AUTOTUNE=0 takes each default untimed (tests, quick runs).
    return os.environ.get("PREFIX_KERNELS_AUTOTUNE", "1") != "0"


def _head_dim_class(head_dim: int, dtype) -> object:
    if dtype == torch.float32:
        return "fp32"
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    """The kernel wrapped in an autotuner over the candidates of the call's head-dim class."""
    kernel = {"fwd": _prefix_attn_fwd, "dq": _prefix_attn_bwd_dq, "dkdv": _prefix_attn_bwd_dkdv}[kernel_name]
    if _interpreting():
        return triton.autotune(configs=[_INTERPRET_CONFIG], key=_TUNE_KEY[kernel_name])(kernel)
    table = _CANDIDATES[kernel_name]
    every = [c for configs in table.values() for c in configs]

    def candidates(configs, named_args, **kwargs):
        cls = _head_dim_class(kwargs["HEAD_DIM"], named_args["Q"].dtype)
        return table[cls] if _autotune_enabled() else table[cls][:1]

    return triton.autotune(configs=every, key=_TUNE_KEY[kernel_name],
                           prune_configs_by={"early_config_prune": candidates})(kernel)


_KERNELS = {"fwd": _prefix_attn_fwd, "dq": _prefix_attn_bwd_dq, "dkdv": _prefix_attn_bwd_dkdv}
_CHOSEN: dict = {}


def _launch(kernel_name, grid, args, constexprs, dtype):
    """Launch with the config autotune chose for this key, skipping triton's Autotuner.run on
    later calls: it cost ~70 us of host time per launch (H200 host, triton 3.6), which left
    the GPU idle at B16 S1024 D64 (1.06 ms host vs 0.6 ms GPU per forward+backward)."""
    key = (kernel_name, dtype, args[-1], *sorted(constexprs.items()))   # args[-1]: SEQ_BUCKET
    config = _CHOSEN.get(key)
    if config is None:
        tuner = _tuned(kernel_name)
        tuner[grid](*args, **constexprs)
        _CHOSEN[key] = tuner.best_config
        return
    _KERNELS[kernel_name][grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)


def _seq_bucket(n: int) -> int:
    # Autotune once per power-of-two length class (>= 256) rather than per exact length.
    return max(256, triton.next_power_of_2(n))


def _common_meta(q, k, prefix_k):
    d = q.shape[-1]
    return dict(HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                PREC="ieee" if q.dtype == torch.float32 else "tf32")


def _kpm_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, 0          # any pointer: never read when HAS_KPM is False
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


def _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    p = prefix_k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    kpm, s_kpm_b, s_kpm_n = _kpm_args(key_padding_mask, q)
    _launch("fwd", lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h),
            (q, k, v, prefix_k, prefix_v, prefix_index if prefix_index is not None else q, kpm, out, lse,
             *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
             s_kpm_b, s_kpm_n, *out.stride(),
             h, h // hkv, sq, sk, p, prefix_k.shape[0], scale * LOG2E, _seq_bucket(max(sq, sk))),
            dict(HAS_PIDX=prefix_index is not None, HAS_KPM=key_padding_mask is not None,
                 CAUSAL=causal, **_common_meta(q, k, prefix_k)), q.dtype)
    return out, lse


def _prefix_splits(sq, rows, p, own_grad, device):
    """How many query ranges each prefix key block is split over.

    With own-key programs in the same grid, 2 splits make a prefix program about as long as an
    average own-key program; alone (first layer) they are split until the GPU is full.
    """
    if own_grad:
        want = 2
    else:
        sms = sm_count(device) if device.type == "cuda" else 4
        want = triton.cdiv(2 * sms, rows * triton.cdiv(p, 64))
    return max(1, min(want, triton.cdiv(sq, 64), 64))


@triton.jit
def _reduce_prefix_grads(PART_K, PART_V, PIDX, DPK, DPV, B, ROW, SPLITS,
                         HAS_PIDX: tl.constexpr, BLOCK: tl.constexpr):
    """dPrefix[n] = sum over rows b with entry n and over splits of the fp32 partials
    [B, SPLITS, Hkv, P, D] (ROW = Hkv*P*D), in a fixed order: deterministic, no atomics. One launch
    for K and V replaces ~12 small torch ops, which left the GPU idle for ~0.3 ms per
    backward at B8 S1024 with 4 entries (H200)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)      # over [Hkv, P, D] flattened
    n = tl.program_id(1)
    ok = offs < ROW
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, B):
        if HAS_PIDX:
            mine = tl.load(PIDX + b) == n
        else:
            mine = n == 0
        if mine:
            for split in range(0, SPLITS):
                base = (b * SPLITS + split).to(tl.int64) * ROW
                acc_k += tl.load(PART_K + base + offs, mask=ok, other=0.0)
                acc_v += tl.load(PART_V + base + offs, mask=ok, other=0.0)
    tl.store(DPK + n.to(tl.int64) * ROW + offs, acc_k.to(DPK.dtype.element_ty), mask=ok)
    tl.store(DPV + n.to(tl.int64) * ROW + offs, acc_v.to(DPV.dtype.element_ty), mask=ok)


def _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                     scale, causal, need_dq, need_dkv, need_prefix):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    meta = _common_meta(q, k, prefix_k)
    kpm, s_kpm_b, s_kpm_n = _kpm_args(key_padding_mask, q)
    pidx = prefix_index if prefix_index is not None else q
    bucket = _seq_bucket(max(sq, sk))
    flags = dict(HAS_PIDX=prefix_index is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal)

    delta = torch.empty_like(lse)
    dq = torch.empty_like(q) if need_dq else q.new_empty(0)
    dk = torch.empty_like(k) if need_dkv else k.new_empty(0)
    dv = torch.empty_like(v) if need_dkv else v.new_empty(0)
    dq_arg = dq if need_dq else q
    _launch("dq", lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h),
            (q, k, v, prefix_k, prefix_v, pidx, kpm, out, do, lse, delta, dq_arg,
             *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
             s_kpm_b, s_kpm_n, *out.stride(), *do.stride(), *dq_arg.stride(),
             h, h // hkv, sq, sk, p, n, scale * LOG2E, scale, bucket),
            dict(DQ_GRAD=need_dq, **flags, **meta), q.dtype)

    dpk, dpv = prefix_k.new_empty(0), prefix_v.new_empty(0)
    if need_dkv or need_prefix:
        splits = _prefix_splits(sq, b * hkv, p, need_dkv, q.device) if need_prefix else 1
        part_shape = (b, splits, hkv, p, d) if need_prefix else (0,)
        part_k = torch.empty(part_shape, device=q.device, dtype=torch.float32)
        part_v = torch.empty(part_shape, device=q.device, dtype=torch.float32)
        dk_arg = dk if need_dkv else k
        dv_arg = dv if need_dkv else v

        def grid(m):
            prefix_programs = triton.cdiv(p, m["BLOCK_N"]) * splits if need_prefix else 0
            own_programs = triton.cdiv(sk, m["BLOCK_N"]) if need_dkv else 0
            return (prefix_programs + own_programs, b * hkv)

        _launch("dkdv", grid,
                (q, k, v, prefix_k, prefix_v, pidx, kpm, do, lse, delta, dk_arg, dv_arg, part_k, part_v,
                 *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
                 s_kpm_b, s_kpm_n, *do.stride(), *dk_arg.stride(), *dv_arg.stride(),
                 hkv, h // hkv, sq, sk, p, n, scale * LOG2E, scale, bucket),
                dict(SPLITS=splits, PREFIX_GRAD=need_prefix, OWN_GRAD=need_dkv,
                     # out-of-range own keys need masking only without the causal mask
                     KEEP_MASK=key_padding_mask is not None or not causal, **flags, **meta), q.dtype)
        if need_prefix:
            dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
            row = hkv * p * d
            block = 1024 if not _interpreting() else 256
            _reduce_prefix_grads[(triton.cdiv(row, block), n)](
                part_k, part_v, pidx, dpk, dpv, b, row, splits,
                HAS_PIDX=prefix_index is not None, BLOCK=block)
    return dq, dk, dv, dpk, dpv


# --------------------------------------------------------------------------------------------
# Custom ops (so torch.compile traces through) and the autograd rule
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefix_kernels::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                          prefix_index: Optional[torch.Tensor],
                          key_padding_mask: Optional[torch.Tensor],
                          scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal)


@_prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                          prefix_index: Optional[torch.Tensor],
                          key_padding_mask: Optional[torch.Tensor],
                          out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                          need_dq: bool, need_dkv: bool, need_prefix: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out,
                            lse, scale, causal, need_dq, need_dkv, need_prefix)


@_prefix_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, scale, causal,
      need_dq, need_dkv, need_prefix):
    def like(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)
    def contiguous_like(t, needed):   # the prefix gradients are written densely
        return t.new_empty(t.shape) if needed else t.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            contiguous_like(prefix_k, need_prefix), contiguous_like(prefix_v, need_prefix))


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse)
    ctx.scale, ctx.causal = scale, causal


def _grads(ctx, grad_out, launch_backward):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dkv, need_prefix = need[0], need[1] or need[2], need[3] or need[4]
    dq, dk, dv, dpk, dpv = launch_backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        ctx.scale, ctx.causal, need_dq, need_dkv, need_prefix)
    return (dq if need_dq else None, dk if need[1] else None, dv if need[2] else None,
            dpk if need[3] else None, dpv if need[4] else None, None, None, None, None)


def _backward(ctx, grad_out, grad_lse):
    return _grads(ctx, grad_out, _prefix_attention_bwd)


class _PrefixAttention(torch.autograd.Function):
    """The eager path: the same launchers without the custom-op dispatch, which cost ~45 us
    per call on the host (fwd 61 us vs 16 us for a trivial op, torch 2.13, CPU)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal):
        out, lse = _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                   scale, causal)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _launch_backward)


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, backend):
    def fail(msg):
        raise ValueError(f"prefix_attention: {msg}")

    if backend not in ("auto", "triton", "reference"):
        fail(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            fail(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if prefix_k.dim() not in (3, 4) or prefix_k.shape != prefix_v.shape:
        fail(f"prefix_k and prefix_v must both be [N, Hkv, P, D] (or [Hkv, P, D]), got "
             f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    b, hq, sq, d = q.shape
    if k.shape != v.shape:
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[3] != d:
        fail(f"k {tuple(k.shape)} must be [batch={b}, Hkv, Sk, head_dim={d}] to match q {tuple(q.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        fail(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    pk = prefix_k if prefix_k.dim() == 4 else prefix_k[None]
    if pk.shape[1] != hkv or pk.shape[3] != d:
        fail(f"prefix_k {tuple(prefix_k.shape)} must have Hkv={hkv} heads and head_dim={d}")
    if pk.shape[2] < 1:
        fail("the prefix must have at least one slot (P >= 1)")
    if pk.shape[0] < 1:
        fail("the prefix bank is empty (N = 0)")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            fail(f"{name} is on {t.device} but q is on {q.device}")
    if prefix_index is not None:
        if prefix_index.shape != (b,) or prefix_index.dtype not in (torch.int32, torch.int64):
            fail(f"prefix_index must be an int32/int64 tensor of shape [{b}], got "
                 f"{prefix_index.dtype} {tuple(prefix_index.shape)}")
        if prefix_index.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= pk.shape[0]:
                fail(f"prefix_index has values in [{lo}, {hi}] but the bank has {pk.shape[0]} entries")

    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, k.shape[2]):
            fail(f"key_padding_mask must be [batch={b}, Sk={k.shape[2]}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            fail(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def _triton_unsupported_reason(q) -> Optional[str]:
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernels take fp16, bf16, fp32)"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 16:
        return f"head_dim {q.shape[-1]} (the kernels take 16..{MAX_HEAD_DIM})"
    return None


def prefix_attention(q, k, v, prefix_k, prefix_v, *, prefix_index=None, key_padding_mask=None,
                     scale=None, causal=True, backend="auto", path=None):
    """Attention over a per-row prefix from a prefix bank plus the row's own keys.

    Args:
        q: (batch, heads_q, seqlen_q, head_dim), fp16/bf16/fp32, any strides.
        k, v: (batch, heads_kv, seqlen_k, head_dim); heads_q is a multiple of heads_kv (GQA/MQA).
        prefix_k, prefix_v: the bank, (num_entries, heads_kv, prefix_len, head_dim), or
            (heads_kv, prefix_len, head_dim) for a single prefix. Same dtype as q.
        prefix_index: (batch,) int: bank entry of each row; None means entry 0 for every row.
            Out-of-range values raise ValueError when it is on the CPU (it is moved to the GPU
            without a sync); on CUDA it is not checked on the host (a sync per layer), and a
            row with an out-of-range entry gets NaN output rather than a wrong one.
        key_padding_mask: (batch, seqlen_k) bool or 0/1 ints, True = real token. Prefix slots are
            never masked, so a fully padded row still attends to its prefix.
        scale: softmax scale, default 1/sqrt(head_dim).
        causal: query i sits at key position seqlen_k - seqlen_q + i (bottom-right alignment).
        backend: "auto" (Triton for CUDA tensors, the reference elsewhere), "triton" (on CPU
            tensors only under TRITON_INTERPRET=1), or "reference".
        path: how the Triton backend runs: "fused" (our kernels for all keys), "split" (the
            vendor's cuDNN kernel does the attention, the prefix padded into the same call or
            merged by log-sum-exp: ops/split_attention.py; needs fp16/bf16, no key padding,
            causal only with Sq == Sk, determinism not requested; other calls run fused,
            announced once), or "auto" (the faster for the shape). None reads
            PREFIX_KERNELS_ATTENTION (default "auto").

    Returns:
        (batch, heads_q, seqlen_q, head_dim), dtype of q. Gradients flow to q, k, v and to the
        bank (summed over the rows that share an entry and the query heads of a GQA group).
    """
    _check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, backend)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        if not q.is_cuda and not _interpreting():
            raise ValueError("prefix_attention: backend='triton' needs CUDA tensors, or "
                             "TRITON_INTERPRET=1 set before import to run the kernels on the CPU")
        reason = _triton_unsupported_reason(q)
        if reason is not None:
            _warn_once(f"prefix_attention: falling back to the PyTorch reference for {reason}")
            backend = "reference"
    if backend == "reference":
        return reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index,
                                          key_padding_mask, scale, causal)

    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    if key_padding_mask is not None and key_padding_mask.dtype != torch.uint8:
        key_padding_mask = (key_padding_mask != 0).to(torch.uint8)    # [B, Sk] bytes: tiny
    if prefix_index is not None:
        prefix_index = prefix_index.to(q.device, non_blocking=True)
    split = split_attention.split_plan(path, q, k, prefix_k, key_padding_mask, causal)
    if split is not None:
        return split_attention.split_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index,
                                                      float(scale), bool(causal), split)
    if torch.compiler.is_compiling():
        out, _ = _prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index,
                                       key_padding_mask, float(scale), bool(causal))
        return out
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                  float(scale), bool(causal))
