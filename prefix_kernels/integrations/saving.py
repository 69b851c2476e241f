"""Saving a patched model writes its prefix adapters, not the frozen model (what PEFT users expect).

`patch_model` makes `model.save_pretrained(dir)` of the patched instance call `save_patched_model`:
so `Trainer.save_model`, Trainer's checkpoints and `accelerator.unwrap_model(model).save_pretrained`
write PEFT prefix-tuning adapters (the bank entry "default", or the only entry, in `dir`; every other
entry in `dir/<name>`, PEFT's multi-adapter layout). `load_adapters` reads that layout back into the
bank (what `PrefixTrainer` does to resume). Unpatching restores the model's own save_pretrained.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..bank import ADAPTER_CONFIG, PrefixBank


def _bank_for_saving(bank: PrefixBank, state_dict: dict | None) -> PrefixBank:
    """The bank itself, or (when the caller passes the model's gathered state dict, as Trainer does
    under DeepSpeed or FSDP where this process may hold only a shard) a CPU copy holding those values."""
    prefix = "prefix_bank."
    values = {k[len(prefix):]: v for k, v in (state_dict or {}).items() if k.startswith(prefix)}
    if not values:
        return bank
    copy = PrefixBank(bank.num_layers, bank.num_kv_heads, bank.head_dim, bank.prefix_len, names=list(bank.names),
                      projection_hidden=bank.projection_hidden, init="zeros", device="cpu",
                      sites=getattr(bank, "sites", None), task_type=getattr(bank, "task_type", "CAUSAL_LM"))
    copy.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in values.items()})
    return copy


def save_patched_model(model: torch.nn.Module, save_directory: str, state_dict: dict | None = None,
                       is_main_process: bool = True, **_ignored: Any) -> list[str]:
    """`save_pretrained` of a patched model: the prefix adapters in PEFT's layout; returns the
    folders written (none on a process that is not the main one). Other keyword arguments of
    transformers' save_pretrained (safe_serialization, max_shard_size, ...) do not apply."""
    from .transformers import get_prefix_bank

    if not is_main_process:
        return []
    bank = _bank_for_saving(get_prefix_bank(model), state_dict)
    base = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None
    return bank.save_pretrained(save_directory, base_model_name_or_path=base)


def adapter_folders(directory: str, names: list[str]) -> dict[str, str]:
    """{entry name: folder} of the layout save_patched_model writes for a bank with `names`."""
    if len(names) == 1:
        return {names[0]: directory}
    return {name: directory if name == "default" else os.path.join(directory, name) for name in names}


def load_adapters(model: torch.nn.Module, directory: str) -> None:
    """Load what save_patched_model wrote in `directory` back into the patched model's bank entries
    (in place: an optimizer holding the bank's parameters keeps them)."""
    from .transformers import get_prefix_bank, load_prefix

    bank = get_prefix_bank(model)
    if bank.projection_hidden is not None:
        raise ValueError(f"{directory}: the adapters hold the folded prefix, which cannot restore an "
                         "MLP-reparameterized bank (projection_hidden); resume from a checkpoint of the bank's "
                         "state_dict instead, or patch with projection_hidden=None")
    for name, folder in adapter_folders(directory, list(bank.names)).items():
        if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            raise FileNotFoundError(f"{folder}: no {ADAPTER_CONFIG} for the prefix {name!r}")
        load_prefix(model, folder, name=name)
