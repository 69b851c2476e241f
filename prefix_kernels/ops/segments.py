"""Packed sequences: the `segment_start` that prefix_attention takes, from what packers produce.

segment_start[b, i] is the key position where query i's document starts (queries and keys of a
row share positions here: no KV cache). Documents in a row are contiguous and in order.
"""
from __future__ import annotations

import torch


def segment_start_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] position ids that restart at each document (HF's DataCollatorWithFlattening)
    -> segment_start [B, S] int32. A document starts wherever the ids do not continue the
    previous token's (id != previous + 1), so it need not start at 0."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, seq], got {tuple(position_ids.shape)}")
    b, s = position_ids.shape
    starts = torch.ones(b, s, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    index = torch.arange(s, device=position_ids.device, dtype=torch.int32).expand(b, s)
    return torch.where(starts, index, 0).cummax(dim=1).values.to(torch.int32)


def segment_start_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Cumulative document lengths [num_docs + 1] (flash-attention's varlen convention, one
    packed row: cu_seqlens[0] = 0, the last = its token count) -> segment_start [1, seqlen]
    int32. Tokens past the last document (padding) form one more segment."""
    cu = cu_seqlens.reshape(-1).to(torch.int64)
    if cu.numel() < 2:
        raise ValueError(f"cu_seqlens needs at least 2 entries (0 and the total), got {cu.tolist()}")
    tokens = torch.arange(seqlen, device=cu.device)
    doc = torch.searchsorted(cu, tokens, right=True) - 1
    return cu[doc.clamp(max=cu.numel() - 1)].to(torch.int32)[None]
