"""Plain PyTorch semantics of prefix attention: the test oracle and the CPU path.

It materializes the concatenated keys, the repeated GQA heads and the mask on purpose: it is
meant to be obviously right, not fast.
"""
from __future__ import annotations

import math

import torch


def visible_keys_mask(sq: int, sk: int, key_padding_mask: torch.Tensor | None, causal: bool,
                      device: torch.device, window: int | None = None,
                      segment_start: torch.Tensor | None = None) -> torch.Tensor:
    """[B or 1, 1, Sq, Sk] bool: may query i see own key j (the prefix is always visible).

    Query i sits at key position Sk - Sq + i (bottom-right causal alignment). A sliding window
    keeps keys j > i - window; segment_start [B, Sq] keeps keys j >= segment_start[b, i].
    """
    qpos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    keys = torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        allowed = keys <= qpos
    if window is not None:
        allowed = allowed & (keys > qpos - window)
    allowed = allowed[None, None]
    if segment_start is not None:
        allowed = allowed & (keys >= segment_start[:, :, None].to(device))[:, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].to(torch.bool)
    return allowed


def reference_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                               prefix_v: torch.Tensor, prefix_index: torch.Tensor | None = None,
                               key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                               causal: bool = True, upcast: bool = True, *, dropout_p: float = 0.0,
                               dropout_mask: torch.Tensor | None = None, softcap: float | None = None,
                               window: int | None = None, segment_start: torch.Tensor | None = None
                               ) -> torch.Tensor:
    """Same arguments as `prefix_kernels.prefix_attention`.

    upcast=True computes half-precision inputs in float32 and casts the result back (the CPU
    path); upcast=False computes in the input dtype (PyTorch's own same-dtype error, which the
    tests use as the yardstick for the kernels).
    Dropout acts on the probabilities over all P + Sk keys (prefix slots first), as PEFT's eager
    path does: dropout_mask [B, Hq, Sq, P + Sk] bool says which survive (scaled by 1/(1-p));
    with dropout_p > 0 and no mask, one is drawn from torch's generator.
    softcap: every scaled score s becomes softcap * tanh(s / softcap) (Gemma 2).
    """
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if prefix_index is None:
        prefix_index = torch.zeros(b, dtype=torch.long, device=q.device)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out_dtype = q.dtype
    compute_dtype = torch.float32 if (upcast and q.dtype in (torch.float16, torch.bfloat16)) else q.dtype

    pk = prefix_k[prefix_index.to(q.device).long()]          # [B, Hkv, P, D]; backward sums rows
    pv = prefix_v[prefix_index.to(q.device).long()]
    keys = torch.cat([pk, k], dim=2).to(compute_dtype)
    values = torch.cat([pv, v], dim=2).to(compute_dtype)
    group = hq // hkv
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)

    scores = torch.matmul(q.to(compute_dtype), keys.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    own_visible = visible_keys_mask(sq, sk, key_padding_mask, causal, q.device, window, segment_start)
    p = prefix_k.shape[2]
    prefix_visible = torch.ones(own_visible.shape[:-1] + (p,), dtype=torch.bool, device=q.device)
    visible = torch.cat([prefix_visible, own_visible], dim=-1)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        if dropout_mask is None:
            dropout_mask = torch.rand(probs.shape, device=probs.device) >= dropout_p
        probs = probs * dropout_mask.to(probs.dtype) / (1.0 - dropout_p)
    return torch.matmul(probs, values).to(out_dtype)
