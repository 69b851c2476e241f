"""The vendors' attention kernels: PyTorch's cuDNN and flash aten ops, cuDNN through NVIDIA's
frontend package ("cudnn_fe", optional: ops/cudnn_frontend.py), and a plain PyTorch stand-in with
the same contract ("math") so the CPU tests can run the split path.

Contract (PyTorch's ring attention calls them the same way): forward (q, k, v) -> (o, lse), lse
natural log in the vendor's layout; backward (dO, q, k, v, o, lse) -> (dq, dk, dv), where o and
lse may be the MERGED ones of a larger softmax: the backward then uses their softmax and
rowsum(dO*O), so its gradients are exact for these keys.
Measured on the H200 (torch 2.11, cuDNN 9.19, benchmarks/probe_split.py, 2026-11-30): both take
Hkv < Hq natively and D up to 256; LSE [B, H, S, 1] (cuDNN) or [B, H, S] (flash), natural log.
"""
from __future__ import annotations

import functools
import os

import torch

# Largest head dim each vendor takes here (D % 8 == 0 too); cudnn_fe: what cuDNN builds decides.
VENDOR_MAX_HEAD_DIM = {"cudnn": 256, "flash": 256, "math": 256, "cudnn_fe": 256}
# Whether the vendor op takes Hkv < Hq itself (else K/V are expanded to the query heads and dK/dV
# summed over the group). PREFIX_KERNELS_SPLIT_NATIVE_GQA=cudnn,flash overrides.
NATIVE_GQA = {"cudnn": True, "flash": True, "math": True, "cudnn_fe": True}
# LSE layout each vendor returns and wants back: [B, H, S, 1] (cuDNN) or [B, H, S].
LSE_DIMS = {"cudnn": 4, "flash": 3, "math": 4, "cudnn_fe": 4}
# Where the vendor's causal mask sits when Sq < Sk: bottom-right (query i sees keys up to
# i + Sk - Sq, this op's alignment: FlashAttention 2 and the frontend's cuDNN graphs) or top-left
# (PyTorch's cuDNN op). With the prefix prepended to the keys, a bottom-right vendor computes
# prefix attention as it is; a top-left one needs P padded query rows.
BOTTOM_RIGHT = {"cudnn": False, "flash": True, "math": True, "cudnn_fe": True}


def native_gqa(vendor: str) -> bool:
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


def vendor_forward(vendor, q, k, v, scale, causal):
    """o [B, H, Sq, D] and its LSE (natural log, the vendor's own layout) over the own keys."""
    hq = q.shape[1]
    if k.shape[1] != hq and not native_gqa(vendor):
        k, v = _expand_heads(k, hq), _expand_heads(v, hq)
    if vendor == "cudnn_fe":
        from . import cudnn_frontend
        return cudnn_frontend.forward(q, k, v, scale, causal)
    if vendor == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal,
                                                                 False, scale=scale)
    elif vendor == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        res = _math_forward(q, k, v, scale, causal)
    return res[0], res[1]


def vendor_backward(vendor, do, q, k, v, out, lse, scale, causal):
    """dq, dk, dv of the own keys given the MERGED out and lse (natural log, [B, H, Sq])."""
    if vendor == "cudnn_fe":
        from . import cudnn_frontend
        return cudnn_frontend.backward(do, q, k, v, out, lse, scale, causal)
    b, hq, sq, _ = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    expand = hkv != hq and not native_gqa(vendor)
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


def in_layout_of(t, like):
    """t laid out as torch.empty_like(like), which is what the custom ops' fakes promise."""
    if t.stride() == like.stride():
        return t
    target = torch.empty_like(like)
    return t if t.stride() == target.stride() else target.copy_(t)


def lse_bhs(lse, b, h, sq):
    """The vendor's LSE as a [B, H, Sq] view ([B, H, S, 1] from cuDNN, [B, H, S] from flash)."""
    if lse.dim() == 4 and lse.shape[-1] == 1:
        lse = lse[..., 0]
    if tuple(lse.shape) != (b, h, sq):
        raise RuntimeError(f"split attention: the vendor returned a log-sum-exp of shape "
                           f"{tuple(lse.shape)}, expected [{b}, {h}, {sq}] (or with a trailing 1); "
                           f"use path='fused'")
    return lse

