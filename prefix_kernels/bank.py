"""The prefix bank: every prefix of a patched model in one place.

Storage is one [L, 2, N, Hkv, P, D] tensor (prefixed attention layer, key/value, entry, KV head,
slot, head dim); layer l's keys are the view [l, 0] of shape [N, Hkv, P, D], which the fused op
reads directly. The layer axis is split into sites, in order: a decoder-only model has one,
"decoder" (its L self-attention layers); an encoder-decoder model may have "encoder" (Le layers of
bidirectional self-attention), "decoder" (Ld causal self-attention layers) and "cross" (Ld
cross-attention layers), so L = Le + 2*Ld and each site is a contiguous view of the one tensor.
With the MLP reparameterization of Li & Liang, the trainable parameters are per-entry token
embeddings and a two-layer MLP; `materialize()` runs the MLP once for all entries and layers.

Entries have names ([A-Za-z0-9._-], at most 64 characters: they become folder names). The bank
reads and writes adapters through `prefix_kernels.adapter` (PEFT's prefix-tuning format where
PEFT has a place for the prefix, ours otherwise). This module knows no model library.
"""
from __future__ import annotations

import math
import os
import re
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from .adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SITES, Adapter, AdapterConfig,  # noqa: F401
                      bank_to_peft_flat, layers_to_peft_seq2seq, peft_flat_to_bank, read_adapter,
                      write_adapter)

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
TASK_TYPES = ("CAUSAL_LM", "SEQ_2_SEQ_LM")
SAVE_FORMATS = ("auto", "peft", "prefix_kernels")


def validate_name(name) -> str:
    """An entry name: 1-64 of [A-Za-z0-9._-], not only dots (names become folder names when
    saved and URL path segments when served)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or set(name) == {"."}:
        raise ValueError(f"invalid prefix name {name!r}: use 1-64 characters from A-Z a-z 0-9 . _ - "
                         "(not only dots); names become folder names when saved")
    return name


class PrefixBank(nn.Module):
    """N named prefixes for L prefixed attention layers with Hkv KV heads of head_dim D, P slots each.

    Args:
        num_layers, num_kv_heads, head_dim, prefix_len: the geometry (L, Hkv, D, P).
        names: one name per entry (N = len(names)).
        projection_hidden: None for a plain trainable prefix, or the hidden size of Li & Liang's
            MLP (token embedding [P, Hkv*D] -> Linear -> tanh -> Linear -> [P, L*2*Hkv*D]).
        init: "random" (PEFT's default: N(0, 1) prefix, or default nn.Linear init of the MLP),
            "zeros" (a zero prefix; with the MLP its last layer is zeroed, as PEFT's "zero"),
            or a tensor [L, 2, Hkv, P, D] copied into every entry (plain prefix only).
        sites: {site: layer count} in the order of the layer axis (sites from
            `prefix_kernels.adapter.SITES`, counts summing to L); None means {"decoder": L}.
        task_type: "CAUSAL_LM" or "SEQ_2_SEQ_LM": the model kind, written into saved adapters.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, prefix_len: int,
                 names: Sequence[str] = ("default",), projection_hidden: int | None = None,
                 init="random", dtype: torch.dtype = torch.float32, device=None, *,
                 sites: Mapping[str, int] | None = None, task_type: str = "CAUSAL_LM"):
        super().__init__()
        if prefix_len < 1:
            raise ValueError(f"num_prefix_tokens must be >= 1, got {prefix_len}")
        names = [str(n) for n in names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"prefix names must be non-empty and distinct, got {names}")
        sites = {"decoder": num_layers} if sites is None else dict(sites)
        if not sites or any(s not in SITES for s in sites) or any(int(c) < 1 for c in sites.values()):
            raise ValueError(f"sites must map some of {list(SITES)} to positive layer counts, got {sites}")
        if sum(sites.values()) != num_layers:
            raise ValueError(f"num_layers={num_layers} but the sites {sites} have {sum(sites.values())} layers")
        if task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_len, self.projection_hidden = prefix_len, projection_hidden
        self._cast = None           # (key, tensor): the last cast of a frozen bank, see materialize
        self.sites, self.task_type = sites, task_type
        self.names = names
        n, token_dim = len(names), num_kv_heads * head_dim
        factory = dict(dtype=dtype, device=device)
        if projection_hidden is None:
            self.prefix = nn.Parameter(torch.empty(num_layers, 2, n, num_kv_heads, prefix_len, head_dim, **factory))
        else:
            out_dim = num_layers * 2 * token_dim
            self.embedding = nn.Parameter(torch.empty(n, prefix_len, token_dim, **factory))
            self.proj_in_weight = nn.Parameter(torch.empty(n, projection_hidden, token_dim, **factory))
            self.proj_in_bias = nn.Parameter(torch.empty(n, projection_hidden, **factory))
            self.proj_out_weight = nn.Parameter(torch.empty(n, out_dim, projection_hidden, **factory))
            self.proj_out_bias = nn.Parameter(torch.empty(n, out_dim, **factory))
        for i in range(n):
            self._init_entry(i, init)

    # -- geometry and names ----------------------------------------------------------------

    @property
    def num_entries(self) -> int:
        """N, the number of prefixes (entries) in the bank."""
        return len(self.names)

    @property
    def token_dim(self) -> int:
        """Hkv * D: the width of one prefix slot of one layer's keys (PEFT's token_dim)."""
        return self.num_kv_heads * self.head_dim

    def site_slice(self, site: str) -> slice:
        """The layers of `site` on the bank's layer axis."""
        if site not in self.sites:
            raise ValueError(f"the bank has no {site!r} prefixes (its sites: {list(self.sites)})")
        start = 0
        for name, count in self.sites.items():
            if name == site:
                return slice(start, start + count)
            start += count
        raise AssertionError(site)

    def index_of(self, name: str | int) -> int:
        """Entry index of a name (an int is taken as an index and range-checked)."""
        if isinstance(name, int) and not isinstance(name, bool):
            if not 0 <= name < self.num_entries:
                raise ValueError(f"prefix id {name} is out of range: the bank has {self.num_entries} "
                                 f"entries {self.names}")
            return name
        try:
            return self.names.index(str(name))
        except ValueError:
            raise ValueError(f"no prefix named {name!r}; the bank has {self.names}") from None

    def indices(self, ids: Iterable) -> torch.Tensor:
        """[B] int64 CPU tensor from a list of names or ints."""
        return torch.tensor([self.index_of(i) for i in ids], dtype=torch.long)

    # -- initialization and entries --------------------------------------------------------

    @torch.no_grad()
    def _init_entry(self, i: int, init) -> None:
        if self.projection_hidden is None:
            if isinstance(init, torch.Tensor):
                self.set_entry(i, init)
            elif init == "random":
                self.prefix[:, :, i].normal_()
            elif init == "zeros":
                self.prefix[:, :, i].zero_()
            else:
                raise ValueError(f"init must be 'random', 'zeros' or a tensor, got {init!r}")
            return
        if isinstance(init, torch.Tensor):
            raise ValueError("a prefix tensor cannot initialize an MLP-reparameterized bank: "
                             "use init='random' or 'zeros', or projection_hidden=None")
        if init not in ("random", "zeros"):
            raise ValueError(f"init must be 'random' or 'zeros', got {init!r}")
        self.embedding[i].normal_()
        for weight, bias in ((self.proj_in_weight, self.proj_in_bias), (self.proj_out_weight, self.proj_out_bias)):
            # nn.Linear's default init, so a fresh entry matches a fresh PEFT PrefixEncoder
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.kaiming_uniform_(weight[i], a=math.sqrt(5))
            bias[i].uniform_(-bound, bound)
        if init == "zeros":
            self.proj_out_weight[i].zero_()
            self.proj_out_bias[i].zero_()

    @torch.no_grad()
    def set_entry(self, name_or_index: str | int, prefix: torch.Tensor, site: str | None = None) -> None:
        """Copy a plain prefix [L, 2, Hkv, P, D] into an entry, in place (or, with `site`, the
        [L_site, 2, Hkv, P, D] prefix of that site only)."""
        if self.projection_hidden is not None:
            raise ValueError("this bank is MLP-reparameterized: a plain prefix cannot be loaded into it. "
                             "Patch with projection_hidden=None to load adapters")
        i = self.index_of(name_or_index)
        layers = slice(None) if site is None else self.site_slice(site)
        target = self.prefix[layers, :, i]
        want = (target.shape[0], 2, self.num_kv_heads, self.prefix_len, self.head_dim)
        if tuple(prefix.shape) != want:
            where = "" if site is None else f" at site {site!r}"
            raise ValueError(f"prefix of shape {tuple(prefix.shape)} does not fit the bank{where}: want "
                             f"[layers, 2, kv_heads, prefix_len, head_dim] = {list(want)}")
        target.copy_(prefix.to(self.prefix.device, self.prefix.dtype))

    @torch.no_grad()
    def set_projection(self, name_or_index: str | int, embedding: torch.Tensor, in_weight: torch.Tensor,
                       in_bias: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor) -> None:
        """Copy MLP-reparameterization weights (PEFT PrefixEncoder layout) into an entry."""
        if self.projection_hidden is None:
            raise ValueError("this bank has no MLP reparameterization (projection_hidden=None)")
        i = self.index_of(name_or_index)
        for dst, src in ((self.embedding, embedding), (self.proj_in_weight, in_weight),
                         (self.proj_in_bias, in_bias), (self.proj_out_weight, out_weight),
                         (self.proj_out_bias, out_bias)):
            if tuple(src.shape) != tuple(dst.shape[1:]):
                raise ValueError(f"projection weight of shape {tuple(src.shape)}, want {tuple(dst.shape[1:])}")
            dst[i].copy_(src)

    def add_entry(self, name: str, init: str | torch.Tensor = "zeros") -> int:
        """Append an entry; returns its index. Parameters are re-allocated: build optimizers after."""
        name = validate_name(name)
        if name in self.names:
            raise ValueError(f"a prefix named {name!r} already exists")
        grow_dim = {"prefix": 2}
        for pname, param in list(self.named_parameters(recurse=False)):
            dim = grow_dim.get(pname, 0)
            shape = list(param.shape)
            shape[dim] = 1
            grown = torch.cat([param.data, param.data.new_zeros(shape)], dim=dim)
            setattr(self, pname, nn.Parameter(grown, requires_grad=param.requires_grad))
        self.names.append(name)
        self._init_entry(len(self.names) - 1, init)
        return len(self.names) - 1

    def rename(self, old: str | int, new: str) -> int:
        """Give entry `old` (a name or an index) the name `new`; returns its index. The storage
        is untouched (a serving engine's captured graphs keep reading the same row)."""
        i = self.index_of(old)
        new = validate_name(new)
        if new in self.names and self.names.index(new) != i:
            raise ValueError(f"a prefix named {new!r} already exists (entry {self.names.index(new)})")
        self.names[i] = new
        return i

    def load_adapter(self, entry: str | int, adapter: str | Adapter) -> int:
        """Load an adapter (a folder, or an `Adapter` from `read_adapter`) into `entry`; returns its index.

        `entry` is a name or an index. An existing entry is overwritten in place (its storage is
        kept); a new name is appended first (parameters are re-allocated: build optimizers after).
        The adapter must have a prefix for exactly the bank's sites, with its geometry.
        """
        if isinstance(adapter, (str, os.PathLike)):
            adapter = read_adapter(os.fspath(adapter))
        self.check_adapter(adapter)
        prefixes = {site: adapter.prefix(site, count) for site, count in self.sites.items()}
        if isinstance(entry, str) and entry not in self.names:
            self.add_entry(entry)
        i = self.index_of(entry)
        for site, prefix in prefixes.items():
            self.set_entry(i, prefix, site=site)
        return i

    def check_adapter(self, adapter: Adapter) -> None:
        """ValueError naming every way the adapter's geometry differs from the bank's."""
        cfg = adapter.config
        if self.projection_hidden is not None:
            raise ValueError("this bank is MLP-reparameterized: an adapter (a plain prefix) cannot be loaded into "
                             "it. Patch with projection_hidden=None to load adapters")
        adapter_seq2seq = cfg.num_transformer_submodules == 2
        if adapter_seq2seq != (self.task_type == "SEQ_2_SEQ_LM"):
            kinds = ("a decoder-only", "an encoder-decoder")
            raise ValueError(f"{adapter.source} is for {kinds[adapter_seq2seq]} model, but this bank belongs to "
                             f"{kinds[not adapter_seq2seq]} model")
        if set(adapter.sites) != set(self.sites):
            raise ValueError(f"{adapter.source} has prefixes for the sites {list(adapter.sites)} but this bank has "
                             f"{list(self.sites)}; patch the model with sites={tuple(adapter.sites)} to load it")
        want = {"num_virtual_tokens": self.prefix_len, "token_dim": self.token_dim,
                "num_attention_heads": self.num_kv_heads}
        wrong = [f"{k} is {getattr(cfg, k)} in the adapter but {v} here" for k, v in want.items()
                 if getattr(cfg, k) != v]
        for site, count in self.sites.items():
            stored = adapter.layers(site)
            # PEFT's seq2seq layout may hold more slots than the decoder has layers (PEFT's own rule)
            fits = stored >= count if cfg.layout == "peft_seq2seq" else stored == count
            if not fits:
                at = "" if self.sites.keys() == {"decoder"} else f" (site {site!r})"
                wrong.append(f"num_layers is {stored} in the adapter but {count} here{at}")
        if wrong:
            raise ValueError(f"{adapter.source} does not fit this model's prefix bank: " + ", ".join(wrong))

    # -- the prefix the kernels read -------------------------------------------------------

    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The bank as [L, 2, N, Hkv, P, D], in `dtype` (default: the storage dtype).

        With the MLP this runs it once for every entry: call once per forward, not per layer.
        """
        if self.projection_hidden is None:
            out = self.prefix
        else:
            hidden = torch.tanh(torch.einsum("npt,nht->nph", self.embedding, self.proj_in_weight)
                                + self.proj_in_bias[:, None])
            flat = torch.einsum("nph,noh->npo", hidden, self.proj_out_weight) + self.proj_out_bias[:, None]
            n, p = flat.shape[:2]
            out = flat.view(n, p, self.num_layers, 2, self.num_kv_heads, self.head_dim).permute(2, 3, 0, 4, 1, 5)
        if dtype is None or out.dtype == dtype:
            return out
        if out.requires_grad and torch.is_grad_enabled() or torch.compiler.is_compiling():
            return out.to(dtype)        # part of the step's graph (training, or traced by dynamo)
        # Frozen (serving, generate): cast once, not every forward: `generate` would otherwise copy
        # the whole bank each token (1,000 entries of the DESIGN.md shape: 1.4 GB read per token).
        key = (dtype, out.device, out.data_ptr(), out._version)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, out.detach().to(dtype))
        return self._cast[1]

    @torch.no_grad()
    def folded(self, name_or_index: str | int) -> torch.Tensor:
        """One entry as a plain prefix [L, 2, Hkv, P, D] (the MLP folded in), fp32 on the CPU."""
        i = self.index_of(name_or_index)
        return self.materialize()[:, :, i].float().cpu().clone()

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_len={self.prefix_len}, entries={self.names}, projection_hidden={self.projection_hidden}, "
                f"sites={self.sites}")

    # -- saving adapters ------------------------------------------------------------------

    def adapter_config(self, layout: str = "causal", base_model_name_or_path: str | None = None) -> AdapterConfig:
        """The AdapterConfig of one entry saved in `layout` ("causal", "peft_seq2seq" or "sites")."""
        seq2seq = self.task_type == "SEQ_2_SEQ_LM"
        return AdapterConfig(
            num_virtual_tokens=self.prefix_len, num_layers=self.num_layers, token_dim=self.token_dim,
            num_attention_heads=self.num_kv_heads, task_type=self.task_type,
            num_transformer_submodules=2 if seq2seq else 1,
            # the saved tensor is always the folded prefix, so the adapter loads as a plain one
            prefix_projection=False, encoder_hidden_size=self.projection_hidden or self.token_dim,
            base_model_name_or_path=base_model_name_or_path, inference_mode=True,
            prefix_sites=dict(self.sites) if layout == "sites" else None)

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        """adapter_config.json of an entry in PEFT's layout for this bank's task (a dict)."""
        layout = "peft_seq2seq" if self.task_type == "SEQ_2_SEQ_LM" else "causal"
        return self.adapter_config(layout, base_model_name_or_path).to_dict()

    def _entry_tensors(self, name, format: str):
        """(layout, {site: flat tensor}) of one entry, in PEFT's layout where it can hold the prefix."""
        folded = self.folded(name)
        decoder_only = list(self.sites) == ["decoder"]
        if format != "prefix_kernels" and decoder_only:
            if self.task_type == "CAUSAL_LM":
                return "causal", {"decoder": bank_to_peft_flat(folded)}
            flat = layers_to_peft_seq2seq(folded)
            if flat is not None:
                return "peft_seq2seq", {"decoder": flat}
            why = ("PEFT 0.21's seq2seq prefix feeds decoder layers l and l+L/2 one shared prefix, and this "
                   "entry's differ")
        else:
            why = f"PEFT prefixes only the decoder's self-attention, and this bank has the sites {list(self.sites)}"
        if format == "peft":
            raise ValueError(f"prefix {name!r} cannot be saved in PEFT's format: {why}. Save with "
                             "format='prefix_kernels' (or 'auto'); prefix_kernels.load_prefix reads it")
        if format == "auto" and decoder_only:
            from .ops.utils import warn_once
            warn_once(f"saving in prefix-kernels' own adapter layout, which PEFT cannot load: {why}")
        return "sites", {site: bank_to_peft_flat(folded[self.site_slice(site)]) for site in self.sites}

    def save_pretrained(self, save_directory: str, names: Sequence[str] | None = None,
                        base_model_name_or_path: str | None = None, format: str = "auto") -> list[str]:
        """Write each entry as a prefix adapter; returns the folders written.

        One entry goes to `save_directory`; with several, the entry named "default" (if any)
        goes there and every other entry to `save_directory/<name>`, PEFT's multi-adapter layout.
        format: "auto" (PEFT's layout where PEFT can hold the prefix, else ours), "peft" (PEFT's
        or a ValueError), "prefix_kernels" (ours: one tensor per site; see prefix_kernels.adapter).
        """
        if format not in SAVE_FORMATS:
            raise ValueError(f"format must be one of {SAVE_FORMATS}, got {format!r}")
        names = list(self.names if names is None else names)
        for name in names:
            validate_name(name)
            self.index_of(name)
        written = []
        for name in names:
            single = len(names) == 1 or name == "default"
            folder = save_directory if single else os.path.join(save_directory, name)
            layout, tensors = self._entry_tensors(name, format)
            write_adapter(folder, self.adapter_config(layout, base_model_name_or_path), tensors)
            written.append(folder)
        return written


def read_peft_prefix(directory: str) -> tuple[dict, torch.Tensor]:
    """(adapter config dict, prompt_embeddings [P, L*2*token_dim]) of a decoder-only prefix adapter.

    Kept for callers of the dict-based API; `read_adapter` / `PrefixBank.load_adapter` read every
    layout (this one refuses encoder-decoder adapters, whose tensors are not one layer per slot).
    """
    adapter = read_adapter(directory)
    if adapter.config.layout != "causal":
        raise ValueError(f"{directory!r} is an encoder-decoder prefix adapter ({adapter.config.layout} layout); "
                         "load it with PrefixBank.load_adapter or prefix_kernels.load_prefix")
    return adapter.config.to_dict(), adapter.tensors["decoder"]
