"""Padded prefix attention: the whole problem through the vendor's causal kernel, no Triton.

Prepend the row's P prefix keys/values to its own keys and P zero rows to q: on the square
(P+S) x (P+S) problem the vendor's causal mask (top-left and bottom-right agree when square)
lets query row P+i see the P prefix keys and own keys 0..i, exactly this op's mask. The P dummy
rows see only prefix keys; their queries are zero (nothing flows into dK) and their output
gradients are zero (nothing flows into dV); they are dropped. Not causal: the prefix keys are
prepended and no dummy rows are needed.

Cost over the vendor without a prefix: the prefix's S*P (+ P^2/2 dummy) scores at the vendor's
speed, one copy of q into the padded buffer (forward) and one of dO (backward), and the K/V
concatenation (B*Hkv*(P+S)*D: small under GQA). Bank gradients are the prefix rows of the
vendor's dK/dV, summed per entry by a one-hot matmul (a fixed order).
"""
from __future__ import annotations

import torch

from .vendor_attention import lse_bhs, vendor_backward, vendor_forward


def _empty_rows(t, rows):
    """An uninitialized [B, H, rows, D] tensor with the dim order of t (HF hands [B, S, H, D]
    transposed: the vendor's output then keeps that layout, and so does what callers make of it)."""
    order = sorted(range(4), key=lambda i: -t.stride(i))
    shape = list(t.shape)
    shape[2] = rows
    return t.new_empty([shape[i] for i in order]).permute([order.index(i) for i in range(4)])


def _bank_rows(banks, index, valid, b):
    """[B, Hkv, P, D] per bank: each row's entry. A row whose entry is out of range (a CUDA index
    is not checked on the host) gets NaN keys and values, so its output is NaN as with the fused op."""
    if index is None:
        return [bank[:1].expand(b, *bank.shape[1:]) for bank in banks]
    safe = index.clamp(0, banks[0].shape[0] - 1)
    return [torch.where(valid[:, None, None, None], bank.index_select(0, safe), float("nan")) for bank in banks]


def _padded_inputs(q, k, v, rows_k, rows_v, causal):
    p = rows_k.shape[2]
    qp = q
    if causal:
        qp = _empty_rows(q, p + q.shape[2])
        qp[:, :, :p].zero_()
        qp[:, :, p:].copy_(q)
    return qp, torch.cat([rows_k, k], dim=2), torch.cat([rows_v, v], dim=2)


def _entry_sum(rows_grad, index, valid, n):
    """[N, Hkv, P, D] from per-row [B, Hkv, P, D]: summed over the rows of each entry by a one-hot
    matmul (fp32 accumulation, one fixed order; out-of-range rows count nowhere)."""
    b = rows_grad.shape[0]
    flat = rows_grad.reshape(b, -1)
    if index is None:
        onehot = torch.zeros(n, b, device=flat.device, dtype=flat.dtype)
        onehot[0] = 1
    else:
        entries = torch.arange(n, device=flat.device)
        onehot = ((index[None, :] == entries[:, None]) & valid[None, :]).to(flat.dtype)
    return (onehot @ flat).view(n, *rows_grad.shape[1:])


class _PaddedAttention(torch.autograd.Function):
    """Eager path: the padded inputs are built once and saved; the backward pads dO itself in
    O's layout (the vendors want dO laid out as O) and calls the vendor's backward directly."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor):
        n, p = prefix_k.shape[0], prefix_k.shape[2]
        valid = None if prefix_index is None else (prefix_index >= 0) & (prefix_index < n)
        rows_k, rows_v = _bank_rows((prefix_k, prefix_v), prefix_index, valid, q.shape[0])
        qp, kp, vp = _padded_inputs(q, k, v, rows_k, rows_v, causal)
        out_p, lse_p = vendor_forward(vendor, qp, kp, vp, scale, causal)
        ctx.save_for_backward(qp, kp, vp, out_p, lse_p, prefix_index, valid)
        ctx.scale, ctx.causal, ctx.vendor, ctx.n, ctx.p = scale, causal, vendor, n, p
        return out_p[:, :, p:] if causal else out_p

    @staticmethod
    def backward(ctx, grad_out):
        qp, kp, vp, out_p, lse_p, prefix_index, valid = ctx.saved_tensors
        p, causal = ctx.p, ctx.causal
        do = grad_out
        if causal:
            do = torch.empty_like(out_p)
            do[:, :, :p].zero_()
            do[:, :, p:].copy_(grad_out)
        b, h, sq, _ = qp.shape
        dqp, dkp, dvp = vendor_backward(ctx.vendor, do, qp, kp, vp, out_p, lse_bhs(lse_p, b, h, sq),
                                        ctx.scale, causal)
        need = ctx.needs_input_grad
        dq = (dqp[:, :, p:] if causal else dqp) if need[0] else None
        dk = dkp[:, :, p:] if need[1] else None
        dv = dvp[:, :, p:] if need[2] else None
        dpk = _entry_sum(dkp[:, :, :p], prefix_index, valid, ctx.n) if need[3] else None
        dpv = _entry_sum(dvp[:, :, :p], prefix_index, valid, ctx.n) if need[4] else None
        return dq, dk, dv, dpk, dpv, None, None, None, None


def _padded_traced(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor):
    """The same in plain differentiable ops, for torch.compile: the vendor ops' own autograd
    formulas run the backward, a one-hot matmul gathers the rows (its backward sums them)."""
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    b = q.shape[0]
    if prefix_index is None:
        onehot = torch.zeros(b, n, device=q.device, dtype=q.dtype)
        onehot[:, 0] = 1
        poison = None
    else:
        valid = (prefix_index >= 0) & (prefix_index < n)
        onehot = (prefix_index[:, None] == torch.arange(n, device=q.device)[None, :]).to(q.dtype)
        poison = torch.where(valid, 0.0, float("nan")).to(q.dtype)[:, None, None, None]
    rows_k = (onehot @ prefix_k.reshape(n, -1)).view(b, *prefix_k.shape[1:])
    rows_v = (onehot @ prefix_v.reshape(n, -1)).view(b, *prefix_v.shape[1:])
    if poison is not None:
        rows_k, rows_v = rows_k + poison, rows_v + poison
    kp, vp = torch.cat([rows_k, k], dim=2), torch.cat([rows_v, v], dim=2)
    qp = torch.cat([q.new_zeros(b, q.shape[1], p, q.shape[3]), q], dim=2) if causal else q
    out_p, _ = vendor_forward(vendor, qp, kp, vp, scale, causal)
    return out_p[:, :, p:] if causal else out_p


def padded_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor):
    """Prefix attention through the vendor kernel alone (inputs checked by `prefix_attention`,
    prefix_k [N, Hkv, P, D], causal only with Sq == Sk). Returns (batch, heads_q, seqlen_q,
    head_dim) in q's dtype; gradients flow to q, k, v and the bank."""
    if torch.compiler.is_compiling():
        return _padded_traced(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor)
    return _PaddedAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor)
