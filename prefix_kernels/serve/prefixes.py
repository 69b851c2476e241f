"""The prefixes given to the engine: tensors [L, 2, Hkv, P, D], or adapter folders, read here
(`read_adapter`, the engine's one reader of adapter files) and loaded by the bank."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..adapter import Adapter, read_adapter
from ..bank import PrefixBank


@dataclass
class PrefixSource:
    """A prefix given to the engine: a tensor or an adapter read from its folder (read once)."""
    prefix_len: int
    tensor: torch.Tensor | None = None
    adapter: Adapter | None = None

    def check(self, bank: PrefixBank) -> None:
        """ValueError naming what does not fit `bank` (before any bank row is taken)."""
        if self.adapter is not None:
            bank.check_adapter(self.adapter)
            return
        want = (bank.num_layers, 2, bank.num_kv_heads, bank.prefix_len, bank.head_dim)
        if tuple(self.tensor.shape) != want:
            raise ValueError(f"a prefix of shape {list(self.tensor.shape)} does not fit this model's bank: want "
                             f"[layers, 2, kv_heads, prefix_len, head_dim] = {list(want)}")

    def write(self, bank: PrefixBank, row: int) -> None:
        """Copy the prefix into bank row `row`, in place (captured graphs read the same storage)."""
        if self.adapter is not None:
            bank.load_adapter(row, self.adapter)
        else:
            bank.set_entry(row, self.tensor)


def read_prefix(value) -> PrefixSource:
    """An adapter folder (str or path) or a tensor [layers, 2, kv_heads, prefix_len, head_dim]."""
    if isinstance(value, (str, os.PathLike)):
        adapter = read_adapter(os.fspath(value))
        return PrefixSource(adapter.config.num_virtual_tokens, adapter=adapter)
    if isinstance(value, torch.Tensor):
        if value.dim() != 5 or value.shape[1] != 2:
            raise ValueError(f"a prefix tensor must be [layers, 2, kv_heads, prefix_len, head_dim], got "
                             f"{list(value.shape)}")
        return PrefixSource(value.shape[3], tensor=value)
    raise TypeError(f"a prefix is an adapter folder or a tensor, got {type(value).__name__}")


def read_prefixes(source) -> dict[str, PrefixSource]:
    """name -> PrefixSource of a PrefixBank (every entry) or a dict name -> folder/tensor."""
    if source is None:
        return {}
    if isinstance(source, PrefixBank):
        return {name: PrefixSource(source.prefix_len, tensor=source.folded(name)) for name in source.names}
    if isinstance(source, dict):
        out = {str(name): read_prefix(value) for name, value in source.items()}
        lengths = {entry.prefix_len for entry in out.values()}
        if len(lengths) > 1:
            raise ValueError(f"every prefix of one engine needs the same length; got {sorted(lengths)}")
        return out
    raise TypeError(f"prefixes must be a PrefixBank or a dict name -> folder/tensor, got {type(source).__name__}")
