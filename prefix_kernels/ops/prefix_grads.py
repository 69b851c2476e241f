"""The bank gradient from per-row partials: one deterministic launch that sums the fp32
partials [B, SPLITS, Hkv, P, D] of the rows that share a bank entry, in a fixed order.

Shared by the fused op's backward (prefix_attention.py) and the split path's (split_attention.py).
"""
from __future__ import annotations

import torch

from . import prefix_attention_kernels as kernels
from .launch import launch_direct
from .utils import cdiv, interpreting

_LAUNCHES: dict = {}        # launch_direct's compiled kernels


def reduce_prefix_grads(part_k: torch.Tensor, part_v: torch.Tensor, prefix_index, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, batch: int, splits: int):
    """(dprefix_k, dprefix_v) shaped as the bank [N, Hkv, P, D], in its dtype. prefix_index None
    means every row reads entry 0."""
    n, hkv, p, d = prefix_k.shape
    dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    row = hkv * p * d
    block = 1024 if not interpreting() else 256
    launch_direct(_LAUNCHES, kernels.reduce_prefix_grads, (cdiv(row, block), n),
                  (part_k, part_v, prefix_index if prefix_index is not None else part_k, dpk, dpv, batch, row,
                   splits),
                  dict(HAS_PIDX=prefix_index is not None, BLOCK=block))
    return dpk, dpv
