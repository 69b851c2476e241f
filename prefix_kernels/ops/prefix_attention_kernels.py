"""Triton kernels of the fused prefix attention: the math only (launchers, custom op, autograd
and the public function live in prefix_attention.py).

Every query attends to the P keys of its row's prefix-bank entry (always visible) and to its own
causal keys that the padding mask keeps and, with a sliding window or packed segments, that are
not below the query's lower bound. Softmax runs in base 2 (exp2): scores are pre-multiplied by
scale*log2(e) (with a softcap: tanh(scale*s/c) times c*log2(e)) and the saved log-sum-exp is
log2-based. Feature flags are constexprs: a call without a feature compiles without its code.

Naming (shared with decode.py): pointers end in `_ptr`, strides are `stride_<tensor>_<dim>` with
dims b (row), h (head), s (query), n (own key, or bank entry for pk/pv), p (prefix slot), d.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import next_power_of_2


def _block_d(args):
    return max(16, next_power_of_2(args["HEAD_DIM"]))


# Constexprs every attention kernel derives from its arguments rather than taking from the host.
DERIVED = {
    "BLOCK_D": _block_d,
    # head dims that are no power of two (or < 16) pad the d axis: those loads need a mask
    "EVEN_HEADDIM": lambda args: args["HEAD_DIM"] == _block_d(args),
    # fp32 runs exact (ieee) dots; fp16/bf16 ignore the precision
    "PREC": lambda args: "ieee" if args["q_ptr"].dtype == torch.float32 else "tf32",
    # own keys below a per-query bound are hidden (sliding window, packed segments)
    "LOWER_BOUND": lambda args: args["HAS_WINDOW"] or args["HAS_SEGMENTS"],
}
_derive = triton.heuristics(DERIVED)


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
def _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX: tl.constexpr):
    """The row's bank entry, clamped into the bank so nothing reads out of bounds.

    A CUDA prefix_index is not range-checked on the host (that costs a sync per layer); a row
    whose entry is out of range gets a NaN output instead of a silent wrong one."""
    if HAS_PIDX:
        entry = tl.load(pidx_ptr + b).to(tl.int64)
        entry_ok = (entry >= 0) & (entry < num_entries)
        return tl.where(entry_ok, entry, 0), entry_ok
    else:
        return 0, True


@triton.jit
def _program_tile(num_blocks, num_rows, l2_rows, min_programs, LPT: tl.constexpr,
                  LONGEST_LAST: tl.constexpr):
    """(block, row) of this program: its query or key block and its (row x head) index.

    LPT (longest processing time first): a 1-D grid walked section by section, each section
    block-major over its rows with its longest blocks first, so the causal programs that run
    longest start first and the last to start are the shortest. The block-fastest 2-D grid left
    one long program running on an otherwise idle GPU: 1.48x the ideal dK/dV time at
    B8 H32/4 S1024 D64 in a list-scheduling model, 1.04x with sections. A section holds as many
    rows as keep the K/V (forward, dQ) or Q/dO (dK/dV) its programs share in L2 (`l2_rows`,
    from the launcher), at least enough for `min_programs` programs (4 waves: the rest of a
    section's tail hides under the next one), split evenly (a short last section has a tail).
    LONGEST_LAST: block num_blocks - 1 is the longest (query blocks of a causal forward or dQ),
    otherwise block 0 (key blocks of dK/dV). Without LPT: the 2-D grid (block, row)."""
    if LPT:
        section = tl.minimum(tl.maximum(l2_rows, tl.cdiv(min_programs, num_blocks)), num_rows)
        section = tl.cdiv(num_rows, tl.cdiv(num_rows, section))
        pid = tl.program_id(0)
        first = (pid // (section * num_blocks)) * section
        rest = pid - first * num_blocks
        width = tl.minimum(section, num_rows - first)
        block = rest // width
        row = first + rest - block * width
        if LONGEST_LAST:
            block = num_blocks - 1 - block
        return block, row.to(tl.int64)
    else:
        return tl.program_id(0), tl.program_id(1).to(tl.int64)


@triton.jit
def _tanh(x):
    # from exp2: libdevice's tanh has no interpreter implementation (triton 3.9)
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))      # exp(-2|x|)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _key_lower_bound(seg_row_ptr, offs_m, m_ok, q_pos, window,
                     HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr):
    """First own key each query may see: q_pos - window + 1 (HF's sliding window: key j visible
    iff q_pos - window < j), and its document's start (packed sequences)."""
    lower = tl.zeros_like(q_pos)
    if HAS_WINDOW:
        lower = tl.maximum(lower, q_pos - window + 1)
    if HAS_SEGMENTS:
        lower = tl.maximum(lower, tl.load(seg_row_ptr + offs_m, mask=m_ok, other=0))
    return lower


@triton.jit
def _own_key_ranges(start_m, m_ok, lower, seqlen_q, seqlen_k, CAUSAL: tl.constexpr,
                    LOWER_BOUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key block ranges of a query block: [lo, mid) seen by the queries whose lower bound allows,
    [mid, full_hi) by every query, [diag_lo, hi) by some (causal diagonal and edge; lower bound
    too). Blocks below every query's lower bound are skipped."""
    if CAUSAL:
        off = seqlen_k - seqlen_q
        full_hi = tl.maximum(tl.minimum(start_m + off + 1, seqlen_k), 0)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + off, seqlen_k), full_hi)
    else:
        full_hi = (seqlen_k // BLOCK_N) * BLOCK_N
        hi = seqlen_k
    if LOWER_BOUND:
        lo = (tl.min(tl.where(m_ok, lower, seqlen_k), 0) // BLOCK_N) * BLOCK_N
        mid = tl.minimum(tl.cdiv(tl.max(tl.where(m_ok, lower, 0), 0), BLOCK_N) * BLOCK_N, full_hi)
        # a query whose bound is past its own position sees only the prefix: lo may pass full_hi
        diag_lo = tl.maximum(full_hi, lo)
    else:
        lo = 0
        mid = 0
        diag_lo = full_hi
    return lo, mid, full_hi, diag_lo, hi


# Philox rounds: 7 pass TestU01's BigCrush for Philox4x32 (Salmon et al., SC'11); 10 (the
# default) only add margin, at 10/7 the cost of what dominates a dropout tile.
PHILOX_ROUNDS = tl.constexpr(7)


@triton.jit
def _dropout_keep(seed, rng_offset, stream, offs_m, start_n, threshold, BLOCK_N: tl.constexpr):
    """keep [BLOCK_M, BLOCK_N]: which probabilities of queries offs_m and keys start_n + [0, BLOCK_N)
    survive dropout (start_n a multiple of 8).

    Counter-based: one Philox call, keyed by `seed`, per (query, group of 8 keys), counter
    (key group, query, stream, call offset) with stream = 2 * (row * heads + head) + 1 for own
    keys, + 0 for prefix slots. Its 4 words give 8 16-bit draws: key kept iff draw >= threshold
    = round(p * 65536). Nothing is stored: forward, both backward kernels and dropout_mask
    redraw the same bits.
    """
    groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
    zero = (offs_m[:, None] * 0 + groups[None, :] * 0).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, zero + groups[None, :].to(tl.uint32), zero + offs_m[:, None].to(tl.uint32),
                               zero + stream.to(tl.uint32), zero + rng_offset.to(tl.uint32),
                               n_rounds=PHILOX_ROUNDS)
    draws = tl.join(tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16)),
                    tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16)))
    draws = tl.reshape(draws, [offs_m.shape[0], BLOCK_N])
    return draws.to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed", "rng_offset"])
def dropout_mask(keep_ptr, seed, rng_offset, num_heads, seqlen_q, seqlen_k, prefix_len, threshold,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """keep [B, H, Sq, P + Sk] int8, exactly as the attention kernels draw it: prefix slots first,
    then own keys. A test and debugging aid (the kernels never materialize it)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < seqlen_q
    width = prefix_len + seqlen_k
    row_ptr = keep_ptr + (pid_bh * seqlen_q + offs_m[:, None]) * width
    for start_n in range(0, prefix_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rng_offset, 2 * pid_bh, offs_m, start_n, threshold, BLOCK_N=BLOCK_N)
        tl.store(row_ptr + offs_n[None, :], keep.to(tl.int8), mask=m_ok[:, None] & (offs_n < prefix_len)[None, :])
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, rng_offset, 2 * pid_bh + 1, offs_m, start_n, threshold, BLOCK_N=BLOCK_N)
        tl.store(row_ptr + prefix_len + offs_n[None, :], keep.to(tl.int8),
                 mask=m_ok[:, None] & (offs_n < seqlen_k)[None, :])


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
               kpm_ptr, stride_kpm_n, lo, hi, n_limit, offs_m, q_pos, lower, offs_d, qk_scale, softcap,
               dropout_threshold, keep_scale, seed, rng_offset, stream,
               CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
               LOWER_MASK: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
               BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_HEADDIM: tl.constexpr,
               PREC: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        # k is loaded transposed, [BLOCK_D, BLOCK_N], so q @ kT needs no shuffle
        kt = tl.trans(_load_tile(k_ptr + offs_n[:, None] * stride_k_n + offs_d[None, :] * stride_k_d,
                                 n_ok, d_ok, ROW_MASK=BOUNDS_MASK, COL_MASK=not EVEN_HEADDIM))
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        if SOFTCAP:
            s = _tanh(s) * softcap
        if BOUNDS_MASK:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        if CAUSAL_MASK:
            s = tl.where(offs_n[None, :] <= q_pos[:, None], s, float("-inf"))
        if LOWER_MASK:
            s = tl.where(offs_n[None, :] >= lower[:, None], s, float("-inf"))
        if HAS_KPM:
            real = tl.load(kpm_ptr + offs_n * stride_kpm_n, mask=n_ok, other=0) != 0
            s = tl.where(real[None, :], s, float("-inf"))
        # m_i is finite here: the prefix (P >= 1) is always processed first
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)      # the softmax normalizer counts dropped keys too
        if DROPOUT:
            keep = _dropout_keep(seed, rng_offset, stream, offs_m, start_n, dropout_threshold,
                                 BLOCK_N=BLOCK_N)
            p = tl.where(keep, p, 0.0)
        v = _load_tile(v_ptr + offs_n[:, None] * stride_v_n + offs_d[None, :] * stride_v_d,
                       n_ok, d_ok, ROW_MASK=BOUNDS_MASK, COL_MASK=not EVEN_HEADDIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@_derive
# the schedule ints vary with the batch: unspecialized, one compile for every batch size
@triton.jit(do_not_specialize=["seed", "rng_offset", "num_rows", "l2_rows", "min_programs"])
def prefix_attn_fwd(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, seg_ptr, o_ptr, lse_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_kpm_b, stride_kpm_n, stride_seg_b,
    stride_o_b, stride_o_h, stride_o_s, stride_o_d,
    num_heads, group, seqlen_q, seqlen_k, prefix_len, num_entries, qk_scale, softcap, window,
    dropout_threshold, keep_scale, seed, rng_offset, seq_bucket, num_rows, l2_rows, min_programs,
    LPT: tl.constexpr, HAS_PIDX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
    SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_HEADDIM: tl.constexpr, PREC: tl.constexpr, LOWER_BOUND: tl.constexpr,
):
    """One program per (query block, row x query head): O and the log2-sum-exp."""
    pid_m, pid_bh = _program_tile(tl.cdiv(seqlen_q, BLOCK_M), num_rows, l2_rows, min_programs, LPT=LPT,
                                  LONGEST_LAST=CAUSAL)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    entry, entry_ok = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
                   + offs_d[None, :] * stride_q_d, m_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_pos = offs_m + (seqlen_k - seqlen_q)
    kpm_row_ptr = kpm_ptr + b * stride_kpm_b
    lower = _key_lower_bound(seg_ptr + b * stride_seg_b, offs_m, m_ok, q_pos, window,
                             HAS_WINDOW=HAS_WINDOW, HAS_SEGMENTS=HAS_SEGMENTS)

    # -- prefix blocks: always visible, never padded --
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, pk_ptr + entry * stride_pk_n + hk * stride_pk_h,
        pv_ptr + entry * stride_pv_n + hk * stride_pv_h, stride_pk_p, stride_pk_d, stride_pv_p, stride_pv_d,
        kpm_row_ptr, stride_kpm_n, 0, prefix_len, prefix_len, offs_m, q_pos, lower, offs_d, qk_scale,
        softcap, dropout_threshold, keep_scale, seed, rng_offset, 2 * pid_bh,
        CAUSAL_MASK=False, BOUNDS_MASK=True, HAS_KPM=False, LOWER_MASK=False, SOFTCAP=SOFTCAP,
        DROPOUT=DROPOUT, BLOCK_N=BLOCK_P, HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    # -- own keys: blocks some queries see from their lower bound, blocks every query sees, then
    #    the diagonal/edge blocks --
    lo, mid, full_hi, diag_lo, hi = _own_key_ranges(start_m, m_ok, lower, seqlen_q, seqlen_k, CAUSAL=CAUSAL,
                                                    LOWER_BOUND=LOWER_BOUND, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    k_row_ptr = k_ptr + b * stride_k_b + hk * stride_k_h
    v_row_ptr = v_ptr + b * stride_v_b + hk * stride_v_h
    if LOWER_BOUND:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_row_ptr, v_row_ptr, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
            kpm_row_ptr, stride_kpm_n, lo, mid, seqlen_k, offs_m, q_pos, lower, offs_d, qk_scale,
            softcap, dropout_threshold, keep_scale, seed, rng_offset, 2 * pid_bh + 1,
            CAUSAL_MASK=False, BOUNDS_MASK=False, HAS_KPM=HAS_KPM, LOWER_MASK=True, SOFTCAP=SOFTCAP,
            DROPOUT=DROPOUT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_row_ptr, v_row_ptr, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
        kpm_row_ptr, stride_kpm_n, mid, full_hi, seqlen_k, offs_m, q_pos, lower, offs_d, qk_scale,
        softcap, dropout_threshold, keep_scale, seed, rng_offset, 2 * pid_bh + 1,
        CAUSAL_MASK=False, BOUNDS_MASK=False, HAS_KPM=HAS_KPM, LOWER_MASK=False, SOFTCAP=SOFTCAP,
        DROPOUT=DROPOUT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_row_ptr, v_row_ptr, stride_k_n, stride_k_d, stride_v_n, stride_v_d,
        kpm_row_ptr, stride_kpm_n, diag_lo, hi, seqlen_k, offs_m, q_pos, lower, offs_d, qk_scale,
        softcap, dropout_threshold, keep_scale, seed, rng_offset, 2 * pid_bh + 1,
        CAUSAL_MASK=CAUSAL, BOUNDS_MASK=True, HAS_KPM=HAS_KPM, LOWER_MASK=LOWER_BOUND, SOFTCAP=SOFTCAP,
        DROPOUT=DROPOUT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)

    acc = acc / l_i[:, None]
    if DROPOUT:
        acc = acc * keep_scale
    if HAS_PIDX:
        acc = tl.where(entry_ok, acc, float("nan"))
    tl.store(lse_ptr + pid_bh * seqlen_q + offs_m, m_i + tl.math.log2(l_i), mask=m_ok)
    o_ptrs = (o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s
              + offs_d[None, :] * stride_o_d)
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# Backward: dQ (and delta), then dK/dV with the prefix-gradient partials, then their reduce
# --------------------------------------------------------------------------------------------

@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, stride_k_n, stride_k_d, stride_v_n,
                  stride_v_d, kpm_ptr, stride_kpm_n, lo, hi, n_limit, offs_m, q_pos, lower, offs_d,
                  qk_scale, softcap, dropout_threshold, keep_scale, seed, rng_offset, stream,
                  CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                  LOWER_MASK: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_HEADDIM: tl.constexpr,
                  PREC: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_limit
        k = _load_tile(k_ptr + offs_n[:, None] * stride_k_n + offs_d[None, :] * stride_k_d,
                       n_ok, d_ok, ROW_MASK=BOUNDS_MASK, COL_MASK=not EVEN_HEADDIM)
        v = _load_tile(v_ptr + offs_n[:, None] * stride_v_n + offs_d[None, :] * stride_v_d,
                       n_ok, d_ok, ROW_MASK=BOUNDS_MASK, COL_MASK=not EVEN_HEADDIM)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if SOFTCAP:
            t = _tanh(s)
            s = t * softcap
        p = tl.math.exp2(s - lse[:, None])
        if BOUNDS_MASK:
            p = tl.where(n_ok[None, :], p, 0.0)
        if CAUSAL_MASK:
            p = tl.where(offs_n[None, :] <= q_pos[:, None], p, 0.0)
        if LOWER_MASK:
            p = tl.where(offs_n[None, :] >= lower[:, None], p, 0.0)
        if HAS_KPM:
            real = tl.load(kpm_ptr + offs_n * stride_kpm_n, mask=n_ok, other=0) != 0
            p = tl.where(real[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        if DROPOUT:
            keep = _dropout_keep(seed, rng_offset, stream, offs_m, start_n, dropout_threshold,
                                 BLOCK_N=BLOCK_N)
            dp = tl.where(keep, dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)           # d tanh
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@_derive
# the schedule ints vary with the batch: unspecialized, one compile for every batch size
@triton.jit(do_not_specialize=["seed", "rng_offset", "num_rows", "l2_rows", "min_programs"])
def prefix_attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, seg_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_kpm_b, stride_kpm_n, stride_seg_b,
    stride_o_b, stride_o_h, stride_o_s, stride_o_d,
    stride_do_b, stride_do_h, stride_do_s, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_s, stride_dq_d,
    num_heads, group, seqlen_q, seqlen_k, prefix_len, num_entries, qk_scale, sm_scale, softcap, window,
    dropout_threshold, keep_scale, seed, rng_offset, seq_bucket, num_rows, l2_rows, min_programs,
    LPT: tl.constexpr, DQ_GRAD: tl.constexpr, HAS_PIDX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_HEADDIM: tl.constexpr, PREC: tl.constexpr, LOWER_BOUND: tl.constexpr,
):
    """dQ of one query block, and delta = rowsum(O * dO) for the dK/dV kernel launched next
    (computed here rather than in a kernel of its own: one launch less per backward).
    With DQ_GRAD False only delta is written."""
    pid_m, pid_bh = _program_tile(tl.cdiv(seqlen_q, BLOCK_M), num_rows, l2_rows, min_programs, LPT=LPT,
                                  LONGEST_LAST=CAUSAL)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    entry, entry_ok = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    q = _load_tile(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
                   + offs_d[None, :] * stride_q_d, m_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
    do = _load_tile(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_s
                    + offs_d[None, :] * stride_do_d, m_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
    o = _load_tile(o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s
                   + offs_d[None, :] * stride_o_d, m_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * seqlen_q + offs_m, delta, mask=m_ok)
    if not DQ_GRAD:
        return
    lse = tl.load(lse_ptr + pid_bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
    q_pos = offs_m + (seqlen_k - seqlen_q)
    kpm_row_ptr = kpm_ptr + b * stride_kpm_b
    lower = _key_lower_bound(seg_ptr + b * stride_seg_b, offs_m, m_ok, q_pos, window,
                             HAS_WINDOW=HAS_WINDOW, HAS_SEGMENTS=HAS_SEGMENTS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # -- prefix blocks --
    dq = _bwd_dq_inner(dq, q, do, lse, delta, pk_ptr + entry * stride_pk_n + hk * stride_pk_h,
                       pv_ptr + entry * stride_pv_n + hk * stride_pv_h, stride_pk_p, stride_pk_d,
                       stride_pv_p, stride_pv_d, kpm_row_ptr, stride_kpm_n, 0, prefix_len, prefix_len,
                       offs_m, q_pos, lower, offs_d, qk_scale, softcap, dropout_threshold, keep_scale,
                       seed, rng_offset, 2 * pid_bh,
                       CAUSAL_MASK=False, BOUNDS_MASK=True, HAS_KPM=False, LOWER_MASK=False,
                       SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, BLOCK_N=BLOCK_P, HEAD_DIM=HEAD_DIM,
                       EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    # -- own keys: the forward's ranges --
    lo, mid, full_hi, diag_lo, hi = _own_key_ranges(start_m, m_ok, lower, seqlen_q, seqlen_k, CAUSAL=CAUSAL,
                                                    LOWER_BOUND=LOWER_BOUND, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    k_row_ptr = k_ptr + b * stride_k_b + hk * stride_k_h
    v_row_ptr = v_ptr + b * stride_v_b + hk * stride_v_h
    if LOWER_BOUND:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, k_row_ptr, v_row_ptr, stride_k_n, stride_k_d, stride_v_n,
                           stride_v_d, kpm_row_ptr, stride_kpm_n, lo, mid, seqlen_k, offs_m, q_pos, lower,
                           offs_d, qk_scale, softcap, dropout_threshold, keep_scale, seed, rng_offset,
                           2 * pid_bh + 1,
                           CAUSAL_MASK=False, BOUNDS_MASK=False, HAS_KPM=HAS_KPM, LOWER_MASK=True,
                           SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                           EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_row_ptr, v_row_ptr, stride_k_n, stride_k_d, stride_v_n,
                       stride_v_d, kpm_row_ptr, stride_kpm_n, mid, full_hi, seqlen_k, offs_m, q_pos, lower,
                       offs_d, qk_scale, softcap, dropout_threshold, keep_scale, seed, rng_offset,
                       2 * pid_bh + 1,
                       CAUSAL_MASK=False, BOUNDS_MASK=False, HAS_KPM=HAS_KPM, LOWER_MASK=False,
                       SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                       EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_row_ptr, v_row_ptr, stride_k_n, stride_k_d, stride_v_n,
                       stride_v_d, kpm_row_ptr, stride_kpm_n, diag_lo, hi, seqlen_k, offs_m, q_pos, lower,
                       offs_d, qk_scale, softcap, dropout_threshold, keep_scale, seed, rng_offset,
                       2 * pid_bh + 1,
                       CAUSAL_MASK=CAUSAL, BOUNDS_MASK=True, HAS_KPM=HAS_KPM, LOWER_MASK=LOWER_BOUND,
                       SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                       EVEN_HEADDIM=EVEN_HEADDIM, PREC=PREC)
    dq_ptrs = (dq_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_s
               + offs_d[None, :] * stride_dq_d)
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _bwd_kv_inner(dk, dv, k, v, keep, q_ptr, do_ptr, lse_ptr, delta_ptr, seg_row_ptr, dq_acc_ptr, dq_desc, bh,
                  stride_q_s, stride_q_d, stride_do_s, stride_do_d, stride_dqa_s, stride_dqa_d, lo, hi,
                  seqlen_q, k_start, k_pos, q_shift, offs_d, qk_scale, sm_scale, softcap, window,
                  dropout_threshold, keep_scale, seed, rng_offset, stream,
                  CAUSAL_MASK: tl.constexpr, KEEP_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  HAS_SEGMENTS: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr,
                  DQ_ATOMIC: tl.constexpr, DQ_TMA: tl.constexpr, HEAD_DIM: tl.constexpr,
                  EVEN_HEADDIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [lo, hi) of one query head; with
    DQ_ATOMIC also add this key block's share of dQ (dS K, scaled) to the fp32 dq_acc by atomics:
    one TMA reduce per tile with DQ_TMA (dq_desc over [B*H, Sq, D], row bh), else per-element
    atomics through dq_acc_ptr.

    Out-of-range query rows load as zeros (q = dO = lse = delta = 0) and contribute nothing.
    """
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < seqlen_q
        q = _load_tile(q_ptr + offs_m[:, None] * stride_q_s + offs_d[None, :] * stride_q_d,
                       m_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
        do = _load_tile(do_ptr + offs_m[:, None] * stride_do_s + offs_d[None, :] * stride_do_d,
                        m_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale       # [BLOCK_N, BLOCK_M]
        if SOFTCAP:
            tt = _tanh(st)
            st = tt * softcap
        pt = tl.math.exp2(st - lse[None, :])
        if CAUSAL_MASK:
            pt = tl.where(k_pos[:, None] <= (offs_m + q_shift)[None, :], pt, 0.0)
        if HAS_WINDOW or HAS_SEGMENTS:
            lower = _key_lower_bound(seg_row_ptr, offs_m, m_ok, offs_m + q_shift, window,
                                     HAS_WINDOW=HAS_WINDOW, HAS_SEGMENTS=HAS_SEGMENTS)
            pt = tl.where(k_pos[:, None] >= lower[None, :], pt, 0.0)
        if KEEP_MASK:
            pt = tl.where(keep[:, None], pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
        if DROPOUT:
            kept = tl.trans(_dropout_keep(seed, rng_offset, stream, offs_m, k_start, dropout_threshold,
                                          BLOCK_N=BLOCK_N))
            dv += tl.dot(tl.where(kept, pt * keep_scale, 0.0).to(do.dtype), do, input_precision=PREC)
            dpt = tl.where(kept, dpt * keep_scale, 0.0)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=PREC) * sm_scale    # [BLOCK_M, BLOCK_D]
            if DQ_TMA:      # rows past Sq and columns past D fall outside the descriptor: dropped
                dq_desc.atomic_add([bh.to(tl.int32), start_m, 0], tl.reshape(dq, [1, BLOCK_M, BLOCK_D]))
            else:
                tl.atomic_add(dq_acc_ptr + offs_m[:, None] * stride_dqa_s + offs_d[None, :] * stride_dqa_d, dq,
                              mask=m_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@_derive
# the schedule ints vary with the batch: unspecialized, one compile for every batch size
@triton.jit(do_not_specialize=["seed", "rng_offset", "num_rows", "l2_rows", "min_programs"])
def prefix_attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, pidx_ptr, kpm_ptr, seg_ptr, seg_last_ptr, do_ptr, lse_ptr,
    delta_ptr, dk_ptr, dv_ptr, part_k_ptr, part_v_ptr, dq_acc_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_k_b, stride_k_h, stride_k_n, stride_k_d,
    stride_v_b, stride_v_h, stride_v_n, stride_v_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_kpm_b, stride_kpm_n, stride_seg_b, stride_seg_last_b,
    stride_do_b, stride_do_h, stride_do_s, stride_do_d,
    stride_dk_b, stride_dk_h, stride_dk_n, stride_dk_d,
    stride_dv_b, stride_dv_h, stride_dv_n, stride_dv_d,
    stride_dqa_b, stride_dqa_h, stride_dqa_s, stride_dqa_d,
    num_kv_heads, group, seqlen_q, seqlen_k, prefix_len, num_entries, qk_scale, sm_scale, softcap,
    window, dropout_threshold, keep_scale, seed, rng_offset, seq_bucket, num_rows, l2_rows, min_programs,
    LPT: tl.constexpr, SPLITS: tl.constexpr, PREFIX_GRAD: tl.constexpr, OWN_GRAD: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    DQ_TMA: tl.constexpr, KEEP_MASK: tl.constexpr, HAS_PIDX: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr, SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr, EVEN_HEADDIM: tl.constexpr, PREC: tl.constexpr, LOWER_BOUND: tl.constexpr,
):
    """One program per key block of one (row, KV head); prefix blocks come first in the grid.

    A prefix program covers one of SPLITS contiguous query ranges and writes its fp32 partial
    dPrefixK/V to part_k/part_v [B, SPLITS, Hkv, P, D]; reduce_prefix_grads then sums them over
    splits and over the rows sharing a bank entry in a fixed order (deterministic: no atomics).
    The GQA group's query heads are looped over inside the program, so nothing is shared
    between programs. DQ_ATOMIC (needs PREFIX_GRAD and OWN_GRAD: every key block must run): dQ
    is accumulated here by fp32 atomics into dq_acc [B, H, Sq, D] (5 matmuls per tile pair
    instead of 7 with the dQ kernel; not bitwise deterministic), and the dQ kernel only writes
    delta.
    """
    if PREFIX_GRAD:
        num_prefix_programs = tl.cdiv(prefix_len, BLOCK_P) * SPLITS
    else:
        num_prefix_programs = 0
    if OWN_GRAD:
        num_own_programs = tl.cdiv(seqlen_k, BLOCK_N)
    else:
        num_own_programs = 0
    # prefix programs (about half a causal own block's work each with 2 splits) first, then own
    # key blocks from the longest (block 0 sees every query)
    pid_n, pid_bh = _program_tile(num_prefix_programs + num_own_programs, num_rows, l2_rows, min_programs, LPT=LPT,
                                  LONGEST_LAST=False)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    num_heads = num_kv_heads * group
    seg_row_ptr = seg_ptr + b * stride_seg_b
    if DQ_TMA:      # dq_acc is contiguous [B, H, Sq, D] fp32 (the launcher allocates it)
        dq_desc = tl.make_tensor_descriptor(dq_acc_ptr, shape=[num_rows * group, seqlen_q, HEAD_DIM],
                                            strides=[seqlen_q * HEAD_DIM, HEAD_DIM, 1],
                                            block_shape=[1, BLOCK_M, BLOCK_D])
    else:
        dq_desc = dq_acc_ptr        # never read
    if pid_n < num_prefix_programs:
        # -- a prefix key block, over one split of the queries --
        entry, entry_ok = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
        split = pid_n % SPLITS
        start_p = (pid_n // SPLITS) * BLOCK_P
        offs_p = start_p + tl.arange(0, BLOCK_P)
        p_ok = offs_p < prefix_len
        # names apart from the own-key branch's: its tiles are BLOCK_N keys, these BLOCK_P slots
        k_p = _load_tile(pk_ptr + entry * stride_pk_n + hk * stride_pk_h + offs_p[:, None] * stride_pk_p
                         + offs_d[None, :] * stride_pk_d, p_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
        v_p = _load_tile(pv_ptr + entry * stride_pv_n + hk * stride_pv_h + offs_p[:, None] * stride_pv_p
                         + offs_d[None, :] * stride_pv_d, p_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
        rows_per_split = tl.cdiv(tl.cdiv(seqlen_q, SPLITS), BLOCK_M) * BLOCK_M
        lo = split * rows_per_split
        hi = tl.minimum(lo + rows_per_split, seqlen_q)
        dk_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        dv_p = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
        for g in range(0, group):
            h = hk * group + g
            bh = b * num_heads + h
            dk_p, dv_p = _bwd_kv_inner(dk_p, dv_p, k_p, v_p, p_ok, q_ptr + b * stride_q_b + h * stride_q_h,
                                       do_ptr + b * stride_do_b + h * stride_do_h, lse_ptr + bh * seqlen_q,
                                       delta_ptr + bh * seqlen_q, seg_row_ptr,
                                       dq_acc_ptr + b * stride_dqa_b + h * stride_dqa_h, dq_desc, bh, stride_q_s,
                                       stride_q_d, stride_do_s, stride_do_d, stride_dqa_s, stride_dqa_d, lo, hi,
                                       seqlen_q, start_p, offs_p, 0, offs_d, qk_scale, sm_scale, softcap, window,
                                       dropout_threshold, keep_scale, seed, rng_offset, 2 * bh,
                                       CAUSAL_MASK=False, KEEP_MASK=True, HAS_WINDOW=False, HAS_SEGMENTS=False,
                                       SOFTCAP=SOFTCAP, DROPOUT=DROPOUT, DQ_ATOMIC=DQ_ATOMIC, DQ_TMA=DQ_TMA,
                                       HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_P,
                                       BLOCK_D=BLOCK_D, PREC=PREC)
        part = (((b * SPLITS + split) * num_kv_heads + hk) * prefix_len + offs_p[:, None]) * HEAD_DIM \
            + offs_d[None, :]
        tile_ok_p = p_ok[:, None] & d_ok[None, :]
        tl.store(part_k_ptr + part, dk_p * sm_scale, mask=tile_ok_p)
        tl.store(part_v_ptr + part, dv_p, mask=tile_ok_p)
    else:
        # -- an own key block: dK, dV are activation gradients --
        start_n = (pid_n - num_prefix_programs) * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seqlen_k
        k = _load_tile(k_ptr + b * stride_k_b + hk * stride_k_h + offs_n[:, None] * stride_k_n
                       + offs_d[None, :] * stride_k_d, n_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
        v = _load_tile(v_ptr + b * stride_v_b + hk * stride_v_h + offs_n[:, None] * stride_v_n
                       + offs_d[None, :] * stride_v_d, n_ok, d_ok, ROW_MASK=True, COL_MASK=not EVEN_HEADDIM)
        if HAS_KPM:
            keep = tl.load(kpm_ptr + b * stride_kpm_b + offs_n * stride_kpm_n, mask=n_ok, other=0) != 0
        else:
            keep = n_ok
        q_shift = seqlen_k - seqlen_q
        if CAUSAL:
            # queries i see key j iff j <= i + q_shift
            lo = (tl.maximum(start_n - q_shift, 0) // BLOCK_M) * BLOCK_M
            full_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - q_shift, 0), BLOCK_M) * BLOCK_M
            full_lo = tl.maximum(tl.minimum(full_lo, seqlen_q), lo)
        else:
            lo = 0
            full_lo = 0
        # -- queries past the last one whose lower bound reaches this block are skipped --
        q_hi = seqlen_q
        if HAS_WINDOW:
            q_hi = tl.minimum(q_hi, start_n + BLOCK_N - 1 + window - q_shift)
        if HAS_SEGMENTS:
            last = tl.load(seg_last_ptr + b * stride_seg_last_b + offs_n, mask=n_ok, other=-1)
            q_hi = tl.minimum(q_hi, tl.max(last, 0) + 1)
        causal_hi = full_lo
        if LOWER_BOUND:
            causal_hi = tl.minimum(full_lo, q_hi)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for g in range(0, group):
            h = hk * group + g
            bh = b * num_heads + h
            q_head_ptr = q_ptr + b * stride_q_b + h * stride_q_h
            do_head_ptr = do_ptr + b * stride_do_b + h * stride_do_h
            dqa_head_ptr = dq_acc_ptr + b * stride_dqa_b + h * stride_dqa_h
            dk, dv = _bwd_kv_inner(dk, dv, k, v, keep, q_head_ptr, do_head_ptr, lse_ptr + bh * seqlen_q,
                                   delta_ptr + bh * seqlen_q, seg_row_ptr, dqa_head_ptr, dq_desc, bh, stride_q_s,
                                   stride_q_d, stride_do_s, stride_do_d, stride_dqa_s, stride_dqa_d,
                                   lo, causal_hi, seqlen_q, start_n, offs_n, q_shift, offs_d, qk_scale,
                                   sm_scale, softcap, window, dropout_threshold, keep_scale, seed,
                                   rng_offset, 2 * bh + 1,
                                   CAUSAL_MASK=CAUSAL, KEEP_MASK=KEEP_MASK, HAS_WINDOW=HAS_WINDOW,
                                   HAS_SEGMENTS=HAS_SEGMENTS, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT,
                                   DQ_ATOMIC=DQ_ATOMIC, DQ_TMA=DQ_TMA, HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, BLOCK_M=BLOCK_M,
                                   BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PREC=PREC)
            dk, dv = _bwd_kv_inner(dk, dv, k, v, keep, q_head_ptr, do_head_ptr, lse_ptr + bh * seqlen_q,
                                   delta_ptr + bh * seqlen_q, seg_row_ptr, dqa_head_ptr, dq_desc, bh, stride_q_s,
                                   stride_q_d, stride_do_s, stride_do_d, stride_dqa_s, stride_dqa_d,
                                   full_lo, q_hi, seqlen_q, start_n, offs_n, q_shift, offs_d, qk_scale,
                                   sm_scale, softcap, window, dropout_threshold, keep_scale, seed,
                                   rng_offset, 2 * bh + 1,
                                   CAUSAL_MASK=False, KEEP_MASK=KEEP_MASK, HAS_WINDOW=HAS_WINDOW,
                                   HAS_SEGMENTS=HAS_SEGMENTS, SOFTCAP=SOFTCAP, DROPOUT=DROPOUT,
                                   DQ_ATOMIC=DQ_ATOMIC, DQ_TMA=DQ_TMA, HEAD_DIM=HEAD_DIM, EVEN_HEADDIM=EVEN_HEADDIM, BLOCK_M=BLOCK_M,
                                   BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, PREC=PREC)
        tile_ok = n_ok[:, None] & d_ok[None, :]
        tl.store(dk_ptr + b * stride_dk_b + hk * stride_dk_h + offs_n[:, None] * stride_dk_n
                 + offs_d[None, :] * stride_dk_d, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dv_ptr + b * stride_dv_b + hk * stride_dv_h + offs_n[:, None] * stride_dv_n
                 + offs_d[None, :] * stride_dv_d, dv.to(dv_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def reduce_prefix_grads(part_k_ptr, part_v_ptr, pidx_ptr, dpk_ptr, dpv_ptr, batch, row, splits,
                        HAS_PIDX: tl.constexpr, BLOCK: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
    """dPrefix[n] = sum over rows b with entry n and over splits of the fp32 partials
    [B, SPLITS, Hkv, P, D] (row = Hkv*P*D), in a fixed order: deterministic, no atomics. One launch
    for K and V replaces ~12 small torch ops, which left the GPU idle for ~0.3 ms per
    backward at B8 S1024 with 4 entries (H200). SPLITS_BLOCK splits are summed per load (a
    [SPLITS_BLOCK, BLOCK] tile): one split per iteration took 91 us at 128 partials (B8 x 16
    splits, H100), latency-bound in a loop of dependent loads."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)      # over [Hkv, P, D] flattened
    n = tl.program_id(1)
    ok = offs < row
    acc_k = tl.zeros([BLOCK], dtype=tl.float32)
    acc_v = tl.zeros([BLOCK], dtype=tl.float32)
    for b in range(0, batch):
        if HAS_PIDX:
            mine = tl.load(pidx_ptr + b) == n
        else:
            mine = n == 0
        if mine:
            for first in range(0, splits, SPLITS_BLOCK):
                offs_s = first + tl.arange(0, SPLITS_BLOCK)
                base = (b * splits + offs_s).to(tl.int64) * row
                tile_ok = (offs_s < splits)[:, None] & ok[None, :]
                acc_k += tl.sum(tl.load(part_k_ptr + base[:, None] + offs[None, :], mask=tile_ok, other=0.0), 0)
                acc_v += tl.sum(tl.load(part_v_ptr + base[:, None] + offs[None, :], mask=tile_ok, other=0.0), 0)
    tl.store(dpk_ptr + n.to(tl.int64) * row + offs, acc_k.to(dpk_ptr.dtype.element_ty), mask=ok)
    tl.store(dpv_ptr + n.to(tl.int64) * row + offs, acc_v.to(dpv_ptr.dtype.element_ty), mask=ok)
