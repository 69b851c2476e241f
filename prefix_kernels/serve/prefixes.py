"""The prefixes given to the engine: tensors, or PEFT adapter folders read here (the engine's one
reader of adapter files; it becomes `PrefixBank.load_adapter` once the bank has it)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..bank import PrefixBank, peft_flat_to_bank, read_peft_prefix


@dataclass
class PrefixSource:
    """A prefix given to the engine: a tensor [L, 2, Hkv, P, D] or an adapter folder, read once."""
    prefix_len: int
    tensor: torch.Tensor | None = None
    folder: str | None = None
    config: dict | None = None
    flat: torch.Tensor | None = None            # PEFT's prompt_embeddings [P, L * 2 * Hkv * D]

    def bank_tensor(self, bank: PrefixBank) -> torch.Tensor:
        """The prefix as [L, 2, Hkv, P, D] for `bank`, or ValueError naming what does not fit."""
        if self.tensor is not None:
            return self.tensor
        config = self.config
        if config["num_virtual_tokens"] != bank.prefix_len or self.flat.shape[1] != bank.num_layers * 2 * bank.token_dim:
            raise ValueError(f"adapter {self.folder!r} ({config['num_virtual_tokens']} virtual tokens, "
                             f"{config['num_layers']} layers, token_dim {config['token_dim']}) does not fit this "
                             f"bank ({bank.prefix_len} tokens, {bank.num_layers} layers, token_dim {bank.token_dim})")
        return peft_flat_to_bank(self.flat, bank.num_layers, bank.num_kv_heads, bank.head_dim)


def read_prefix(value) -> PrefixSource:
    """An adapter folder (read here: the engine's one reader of adapter files) or a tensor."""
    if isinstance(value, str):
        config, flat = read_peft_prefix(value)
        return PrefixSource(config["num_virtual_tokens"], folder=value, config=config, flat=flat)
    if isinstance(value, torch.Tensor):
        if value.dim() != 5 or value.shape[1] != 2:
            raise ValueError(f"a prefix tensor must be [layers, 2, kv_heads, prefix_len, head_dim], got "
                             f"{list(value.shape)}")
        return PrefixSource(value.shape[3], tensor=value)
    raise TypeError(f"a prefix is an adapter folder or a tensor, got {type(value).__name__}")


def read_prefixes(source) -> dict[str, PrefixSource]:
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
