"""The bank gradient from per-row partials: one deterministic launch that sums the fp32
partials [B, SPLITS, Hkv, P, D] of the rows that share a bank entry, in a fixed order.

Shared by the fused op's backward (prefix_attention.py) and the split path's (split_attention.py).
"""
from __future__ import annotations

import torch

from . import prefix_attention_kernels as kernels
from .launch import launch_direct
from .utils import cdiv, interpreting, next_power_of_2

_LAUNCHES: dict = {}        # launch_direct's compiled kernels


def reduce_prefix_grads(part_k: torch.Tensor, part_v: torch.Tensor, prefix_index, prefix_k: torch.Tensor,
                        prefix_v: torch.Tensor, batch: int, splits: int):
    """(dprefix_k, dprefix_v) shaped as the bank [N, Hkv, P, D], in its dtype. prefix_index None
    means every row reads entry 0."""
    n, hkv, p, d = prefix_k.shape
    dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
    row = hkv * p * d
    # [SPLITS_BLOCK, 256] fp32 tiles of at most 16 KB, row / 256 programs per entry (32 at
    # Hkv=4, P=32, D=64); under the interpreter at most 4 splits per tile, so that tests with
    # more splits cover the loop over them
    splits_block = min(4 if interpreting() else 16, next_power_of_2(splits))
    block = 256
    launch_direct(_LAUNCHES, kernels.reduce_prefix_grads, (cdiv(row, block), n),
                  (part_k, part_v, prefix_index if prefix_index is not None else part_k, dpk, dpv, batch, row,
                   splits),
                  dict(HAS_PIDX=prefix_index is not None, BLOCK=block, SPLITS_BLOCK=splits_block))
    return dpk, dpv
