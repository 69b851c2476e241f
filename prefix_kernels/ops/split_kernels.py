"""Triton kernels of the split prefix attention (ops/split_attention.py has the launchers).

The own keys are the vendor kernel's; these handle only the P prefix keys of each row's bank
entry: the forward merge of the prefix part into the vendor's output by log-sum-exp, and the
backward's prefix share of dQ (added in place) and the fp32 bank-gradient partials.
Softmax runs in base 2 like the fused kernels; the LSE that comes and goes is natural log.
Naming as in prefix_attention_kernels.py: pointers end in `_ptr`, strides are
`stride_<tensor>_<dim>` with dims b, h, s (query), n (bank entry), p (prefix slot), d; sizes are
num_heads, num_kv_heads, group, seqlen_q, prefix_len, num_entries.
"""
import triton
import triton.language as tl

from .prefix_attention_kernels import _bank_entry, _block_d

# BLOCK_D, the head dim's power-of-two tile, derived from HEAD_DIM as in the fused kernels
_derive = triton.heuristics({"BLOCK_D": _block_d})

# Inside @triton.jit code a global must be a tl.constexpr: a plain float passes the interpreter but
# fails compilation on the GPU ("CompilationError at 53:46", H200 probe, 2026-11-30).
KERNEL_LOG2E = tl.constexpr(1.4426950408889634)
KERNEL_LN2 = tl.constexpr(0.6931471805599453)


@_derive
@triton.jit
def _split_fwd_merge(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, o_ptr, lse_own_ptr, lse_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_o_b, stride_o_h, stride_o_s, stride_o_d,
    stride_lo_b, stride_lo_h, stride_lo_s,
    num_heads, group, seqlen_q, prefix_len, num_entries, qk_scale, seq_bucket,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Prefix part of one query block, merged by log-sum-exp into the vendor's (o, lse_own).

    O is overwritten in place; lse_ptr [B*H, SQ] gets the merged natural-log LSE."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    entry, entry_ok = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
                + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)

    # -- the prefix: an online softmax over P always-visible keys --
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pk_base = pk_ptr + entry * stride_pk_n + hk * stride_pk_h
    pv_base = pv_ptr + entry * stride_pv_n + hk * stride_pv_h
    for start_n in range(0, prefix_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        nd_ok = (offs_n < prefix_len)[:, None] & d_ok[None, :]
        pk = tl.load(pk_base + offs_n[:, None] * stride_pk_p + offs_d[None, :] * stride_pk_d,
                     mask=nd_ok, other=0.0)
        s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
        s = tl.where((offs_n < prefix_len)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.load(pv_base + offs_n[:, None] * stride_pv_p + offs_d[None, :] * stride_pv_d,
                     mask=nd_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(pv.dtype), pv, input_precision=PREC)
        m_i = m_new

    # -- merge: lse = logaddexp(own, prefix); O = O_own*e^(own-lse) + acc/l*e^(prefix-lse) --
    lse_own = tl.load(lse_own_ptr + b * stride_lo_b + h * stride_lo_h + offs_m * stride_lo_s,
                      mask=m_ok, other=0.0) * KERNEL_LOG2E
    lse_pre = m_i + tl.math.log2(l_i)
    top = tl.maximum(lse_own, lse_pre)
    lse = top + tl.math.log2(tl.math.exp2(lse_own - top) + tl.math.exp2(lse_pre - top))
    o_ptrs = o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s + offs_d[None, :] * stride_o_d
    o_own = tl.load(o_ptrs, mask=md_ok, other=0.0).to(tl.float32)
    out = o_own * tl.math.exp2(lse_own - lse)[:, None] + acc * tl.math.exp2(m_i - lse)[:, None]
    if HAS_PIDX:
        out = tl.where(entry_ok, out, float("nan"))
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=md_ok)
    tl.store(lse_ptr + pid_bh * seqlen_q + offs_m, lse * KERNEL_LN2, mask=m_ok)


@_derive
@triton.jit
def _split_bwd_dq(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_o_b, stride_o_h, stride_o_s, stride_o_d,
    stride_do_b, stride_do_h, stride_do_s, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_s, stride_dq_d,
    num_heads, group, seqlen_q, prefix_len, num_entries, qk_scale, sm_scale, seq_bucket,
    DQ_GRAD: tl.constexpr, HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """delta = rowsum(dO*O) of one query block (for the bank-gradient kernel), and with DQ_GRAD
    the prefix keys' share of dQ added in place to the vendor's dQ."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    entry, _ = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen_q
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]
    do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_s
                 + offs_d[None, :] * stride_do_d, mask=md_ok, other=0.0)
    o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s
                + offs_d[None, :] * stride_o_d, mask=md_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh * seqlen_q + offs_m, delta, mask=m_ok)
    if DQ_GRAD:
        q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
                    + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)
        lse = tl.load(lse_ptr + pid_bh * seqlen_q + offs_m, mask=m_ok, other=0.0) * KERNEL_LOG2E
        pk_base = pk_ptr + entry * stride_pk_n + hk * stride_pk_h
        pv_base = pv_ptr + entry * stride_pv_n + hk * stride_pv_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, prefix_len, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < prefix_len
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
        dq_ptrs = dq_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_s + offs_d[None, :] * stride_dq_d
        total = tl.load(dq_ptrs, mask=md_ok, other=0.0).to(tl.float32) + dq * sm_scale
        tl.store(dq_ptrs, total.to(dq_ptr.dtype.element_ty), mask=md_ok)


@_derive
@triton.jit
def _split_bwd_dprefix(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, do_ptr, lse_ptr, delta_ptr, part_k_ptr, part_v_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_do_b, stride_do_h, stride_do_s, stride_do_d,
    num_kv_heads, group, seqlen_q, prefix_len, num_entries, splits, qk_scale, sm_scale, seq_bucket,
    HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """fp32 partial dPrefixK/V [B, SPLITS, HKV, P, D] of one prefix key block over one query
    split of one (row, KV head), the GQA group's query heads looped over inside."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    entry, _ = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    split = pid_n % splits
    offs_n = (pid_n // splits) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < prefix_len
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    pk = tl.load(pk_ptr + entry * stride_pk_n + hk * stride_pk_h + offs_n[:, None] * stride_pk_p
                 + offs_d[None, :] * stride_pk_d, mask=nd_ok, other=0.0)
    pv = tl.load(pv_ptr + entry * stride_pv_n + hk * stride_pv_h + offs_n[:, None] * stride_pv_p
                 + offs_d[None, :] * stride_pv_d, mask=nd_ok, other=0.0)
    rows_per_split = tl.cdiv(tl.cdiv(seqlen_q, splits), BLOCK_M) * BLOCK_M
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, seqlen_q)
    num_heads = num_kv_heads * group
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        for start_m in range(lo, hi, BLOCK_M):
            # rows past SQ load as zeros (q = dO = lse = delta = 0) and add nothing
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen_q
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
                        + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)
            do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_s
                         + offs_d[None, :] * stride_do_d, mask=md_ok, other=0.0)
            lse = tl.load(lse_ptr + bh * seqlen_q + offs_m, mask=m_ok, other=0.0) * KERNEL_LOG2E
            delta = tl.load(delta_ptr + bh * seqlen_q + offs_m, mask=m_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(pk, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(pv, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    part = (((b * splits + split) * num_kv_heads + hk) * prefix_len + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(part_k_ptr + part, dk * sm_scale, mask=nd_ok)
    tl.store(part_v_ptr + part, dv, mask=nd_ok)


@_derive
@triton.jit
def _split_bwd_onepass(
    q_ptr, pk_ptr, pv_ptr, pidx_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, part_k_ptr, part_v_ptr,
    stride_q_b, stride_q_h, stride_q_s, stride_q_d,
    stride_pk_n, stride_pk_h, stride_pk_p, stride_pk_d,
    stride_pv_n, stride_pv_h, stride_pv_p, stride_pv_d,
    stride_o_b, stride_o_h, stride_o_s, stride_o_d,
    stride_do_b, stride_do_h, stride_do_s, stride_do_d,
    stride_dq_b, stride_dq_h, stride_dq_s, stride_dq_d,
    num_kv_heads, group, seqlen_q, prefix_len, num_entries, splits, qk_scale, sm_scale, seq_bucket,
    DQ_GRAD: tl.constexpr, HAS_PIDX: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The whole prefix backward of one query split of one (row, KV head) when all P keys fit
    one block (P <= BLOCK_N): q, dO, O are read once; dQ gets the prefix share in place; the
    bank partials [B, SPLITS, HKV, P, D] accumulate over the GQA group's heads in registers."""
    split = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_kv_heads
    hk = pid_bh % num_kv_heads
    entry, _ = _bank_entry(pidx_ptr, b, num_entries, HAS_PIDX=HAS_PIDX)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < prefix_len
    d_ok = offs_d < HEAD_DIM
    nd_ok = n_ok[:, None] & d_ok[None, :]
    pk = tl.load(pk_ptr + entry * stride_pk_n + hk * stride_pk_h + offs_n[:, None] * stride_pk_p
                 + offs_d[None, :] * stride_pk_d, mask=nd_ok, other=0.0)
    pv = tl.load(pv_ptr + entry * stride_pv_n + hk * stride_pv_h + offs_n[:, None] * stride_pv_p
                 + offs_d[None, :] * stride_pv_d, mask=nd_ok, other=0.0)
    rows_per_split = tl.cdiv(tl.cdiv(seqlen_q, splits), BLOCK_M) * BLOCK_M
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, seqlen_q)
    num_heads = num_kv_heads * group
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):
        h = hk * group + g
        bh = b * num_heads + h
        for start_m in range(lo, hi, BLOCK_M):
            # rows past SQ load as zeros (q = dO = O = lse = 0) and add nothing
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < seqlen_q
            md_ok = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + b * stride_q_b + h * stride_q_h + offs_m[:, None] * stride_q_s
                        + offs_d[None, :] * stride_q_d, mask=md_ok, other=0.0)
            do = tl.load(do_ptr + b * stride_do_b + h * stride_do_h + offs_m[:, None] * stride_do_s
                         + offs_d[None, :] * stride_do_d, mask=md_ok, other=0.0)
            o = tl.load(o_ptr + b * stride_o_b + h * stride_o_h + offs_m[:, None] * stride_o_s
                        + offs_d[None, :] * stride_o_d, mask=md_ok, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
            lse = tl.load(lse_ptr + bh * seqlen_q + offs_m, mask=m_ok, other=0.0) * KERNEL_LOG2E
            s = tl.dot(q, tl.trans(pk), input_precision=PREC) * qk_scale
            p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(pv), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
            if DQ_GRAD:
                dq_ptrs = (dq_ptr + b * stride_dq_b + h * stride_dq_h + offs_m[:, None] * stride_dq_s
                           + offs_d[None, :] * stride_dq_d)
                dq = tl.dot(ds.to(pk.dtype), pk, input_precision=PREC) * sm_scale
                total = tl.load(dq_ptrs, mask=md_ok, other=0.0).to(tl.float32) + dq
                tl.store(dq_ptrs, total.to(dq_ptr.dtype.element_ty), mask=md_ok)
    part = (((b * splits + split) * num_kv_heads + hk) * prefix_len + offs_n[:, None]) * HEAD_DIM + offs_d[None, :]
    tl.store(part_k_ptr + part, dk * sm_scale, mask=nd_ok)
    tl.store(part_v_ptr + part, dv, mask=nd_ok)

