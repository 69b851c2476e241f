"""Padded prefix attention: the whole problem through the vendor's causal kernel, no attention
kernel of ours.

Prepend the row's P prefix keys/values to its own keys. A vendor whose causal mask aligns
bottom-right (vendor_attention.BOTTOM_RIGHT: the cuDNN frontend, flash) then computes this op's
mask as it is: query i sits at key position P + i and sees the P prefix keys and own keys 0..i.
A top-left vendor (PyTorch's cuDNN op) gets P zero rows prepended to q too: on the square
(P+S) x (P+S) problem both alignments agree; the dummy rows see only prefix keys, their queries
are zero (nothing flows into dK) and their output gradients are zero (nothing flows into dV);
they are dropped. Not causal: the prefix keys are prepended and no dummy rows are needed.

Cost over the vendor without a prefix: the prefix's S*P scores at the vendor's speed (+ P^2/2
dummy ones and one copy of q and of dO when q is padded), and one launch that builds the
concatenated K/V (B*Hkv*(P+S)*D: small under GQA). Bank gradients are the prefix rows of the
vendor's dK/dV, summed per entry in row order by one launch (ops/prefix_rows.py).
"""
from __future__ import annotations

import torch

from .prefix_rows import concat_prefix_kv, sum_prefix_rows
from .vendor_attention import BOTTOM_RIGHT, lse_bhs, vendor_backward, vendor_forward


def _empty_rows(t, rows):
    """An uninitialized [B, H, rows, D] tensor with the dim order of t (HF hands [B, S, H, D]
    transposed: the vendor's output then keeps that layout, and so does what callers make of it)."""
    order = sorted(range(4), key=lambda i: -t.stride(i))
    shape = list(t.shape)
    shape[2] = rows
    return t.new_empty([shape[i] for i in order]).permute([order.index(i) for i in range(4)])


def pads_queries(vendor: str, causal: bool) -> bool:
    """Whether the vendor needs P dummy query rows (a top-left causal mask)."""
    return causal and not BOTTOM_RIGHT[vendor]


def _padded_q(q, p):
    qp = _empty_rows(q, p + q.shape[2])
    qp[:, :, :p].zero_()
    qp[:, :, p:].copy_(q)
    return qp


class _PaddedAttention(torch.autograd.Function):
    """Eager path: the concatenated K/V (and padded q) are built once and saved; the backward
    pads dO itself in O's layout when q was padded (the vendors want dO laid out as O) and calls
    the vendor's backward directly."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor):
        p = prefix_k.shape[2]
        pad = pads_queries(vendor, causal)
        kp, vp = concat_prefix_kv(k, v, prefix_k, prefix_v, prefix_index)
        qp = _padded_q(q, p) if pad else q
        out_p, lse_p = vendor_forward(vendor, qp, kp, vp, scale, causal)
        ctx.save_for_backward(qp, kp, vp, out_p, lse_p, prefix_index, prefix_k, prefix_v)
        ctx.scale, ctx.causal, ctx.vendor, ctx.pad = scale, causal, vendor, pad
        return out_p[:, :, p:] if pad else out_p

    @staticmethod
    def backward(ctx, grad_out):
        qp, kp, vp, out_p, lse_p, prefix_index, prefix_k, prefix_v = ctx.saved_tensors
        p = prefix_k.shape[2]
        do = grad_out
        if ctx.pad:
            do = torch.empty_like(out_p)
            do[:, :, :p].zero_()
            do[:, :, p:].copy_(grad_out)
        b, h, sq, _ = qp.shape
        dqp, dkp, dvp = vendor_backward(ctx.vendor, do, qp, kp, vp, out_p, lse_bhs(lse_p, b, h, sq),
                                        ctx.scale, ctx.causal)
        need = ctx.needs_input_grad
        dq = (dqp[:, :, p:] if ctx.pad else dqp) if need[0] else None
        dk = dkp[:, :, p:] if need[1] else None
        dv = dvp[:, :, p:] if need[2] else None
        dpk = dpv = None
        if need[3] or need[4]:
            dpk, dpv = sum_prefix_rows(dkp, dvp, prefix_index, prefix_k, prefix_v)
        return dq, dk, dv, dpk if need[3] else None, dpv if need[4] else None, None, None, None, None


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
    pad = pads_queries(vendor, causal)
    qp = torch.cat([q.new_zeros(b, q.shape[1], p, q.shape[3]), q], dim=2) if pad else q
    out_p, _ = vendor_forward(vendor, qp, kp, vp, scale, causal)
    return out_p[:, :, p:] if pad else out_p


def padded_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor):
    """Prefix attention through the vendor kernel alone (inputs checked by `prefix_attention`,
    prefix_k [N, Hkv, P, D]; causal with Sq != Sk only for a bottom-right vendor). Returns
    (batch, heads_q, seqlen_q, head_dim) in q's dtype; gradients flow to q, k, v and the bank."""
    if torch.compiler.is_compiling():
        return _padded_traced(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor)
    return _PaddedAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor)
