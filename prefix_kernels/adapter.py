"""The prefix-adapter format on disk: a typed config, one reader, one writer, PEFT's layouts.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or PEFT's older
`adapter_model.bin`). Three layouts share the config fields of PEFT's `PrefixTuningConfig`:

- "causal": PEFT's decoder-only prefix tuning. One tensor `prompt_embeddings` [P, L*2*Hkv*D],
  flat index ((l*2 + kv)*Hkv + h)*D + d; layer l of the model reads layer l.
- "peft_seq2seq": PEFT's encoder-decoder prefix tuning (task_type SEQ_2_SEQ_LM,
  num_transformer_submodules 2). The same one tensor, but PEFT 0.21 repeats it, splits the
  repeat into chunks of 4 (self k, self v, cross k, cross v) and then discards the cross part:
  only the decoder's self-attention gets a prefix, and decoder layer l reads flat layer
  (2*l) mod L. With L even, layers l and l + L/2 read the same slot, and odd slots go unused.
- "sites": ours, for prefixes PEFT has no place for (encoder self-attention, decoder
  cross-attention). `prefix_sites` in the config maps each site to its layer count, and the
  weights hold one tensor `prefix.<site>` [P, L_site*2*Hkv*D] per site, in the "causal" flat
  layout. It has no `prompt_embeddings`, so PEFT refuses it instead of loading part of it.

This module knows no model library and no bank; `prefix_kernels.bank` builds on it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_TYPE = "PREFIX_TUNING"
PEFT_TENSOR = "prompt_embeddings"
SITE_TENSOR = "prefix.{site}"
# decoder: causal self-attention (decoder-only models, and the decoder of an encoder-decoder);
# encoder: bidirectional self-attention; cross: the decoder's attention over the encoder's output
SITES = ("encoder", "decoder", "cross")
LAYOUTS = ("causal", "peft_seq2seq", "sites")


# --------------------------------------------------------------------------------------------
# Flat layouts
# --------------------------------------------------------------------------------------------

def peft_flat_to_bank(flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int):
    """PEFT's [P, L*2*Hkv*D] (flat index ((l*2 + kv)*Hkv + h)*D + d) -> [L, 2, Hkv, P, D]."""
    p = flat.shape[0]
    return flat.view(p, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)


def bank_to_peft_flat(entry: torch.Tensor) -> torch.Tensor:
    """[L, 2, Hkv, P, D] -> PEFT's [P, L*2*Hkv*D]."""
    num_layers, _, hkv, p, d = entry.shape
    return entry.permute(3, 0, 1, 2, 4).reshape(p, num_layers * 2 * hkv * d)


def peft_seq2seq_slots(num_decoder_layers: int, peft_layers: int) -> list[int]:
    """The flat layer of PEFT's seq2seq tensor that each decoder layer's self-attention reads."""
    return [(2 * layer) % peft_layers for layer in range(num_decoder_layers)]


def peft_seq2seq_to_layers(flat: torch.Tensor, peft_layers: int, num_decoder_layers: int,
                           num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """PEFT's seq2seq [P, L*2*Hkv*D] -> the decoder's self-attention prefixes [Ld, 2, Hkv, P, D]."""
    if num_decoder_layers > peft_layers:
        raise ValueError(f"a PEFT seq2seq prefix with num_layers={peft_layers} has no prefix for decoder layers "
                         f"{peft_layers}..{num_decoder_layers - 1}")
    layers = peft_flat_to_bank(flat, peft_layers, num_kv_heads, head_dim)
    return layers[peft_seq2seq_slots(num_decoder_layers, peft_layers)]


def layers_to_peft_seq2seq(prefix: torch.Tensor) -> torch.Tensor | None:
    """[Ld, 2, Hkv, P, D] decoder prefixes -> PEFT's seq2seq [P, Ld*2*Hkv*D], or None when PEFT's
    layout cannot hold them (two decoder layers that share a slot differ). Unused slots are 0."""
    num_layers = prefix.shape[0]
    slots = peft_seq2seq_slots(num_layers, num_layers)
    out = prefix.new_zeros(prefix.shape)
    for layer, slot in enumerate(slots):
        first = slots.index(slot)
        if first != layer and not torch.equal(prefix[first], prefix[layer]):
            return None
        out[slot] = prefix[layer]
    return bank_to_peft_flat(out)


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------

def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"adapter config: {name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json of a prefix-tuning adapter: PEFT's PrefixTuningConfig fields, checked.

    num_attention_heads is the number of KV heads (Hkv) and token_dim = Hkv * head_dim, as in
    PEFT. prefix_sites is ours (None in PEFT's layouts): {site: layer count} for "sites" adapters.
    """
    num_virtual_tokens: int
    num_layers: int
    token_dim: int
    num_attention_heads: int
    task_type: str | None = "CAUSAL_LM"
    num_transformer_submodules: int = 1
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = True
    init_weights: Any = None
    prefix_sites: Mapping[str, int] | None = field(default=None)

    def __post_init__(self):
        for name in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
            _positive_int(name, getattr(self, name))
        if self.token_dim % self.num_attention_heads:
            raise ValueError(f"adapter config: token_dim {self.token_dim} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads} (token_dim = heads * head_dim)")
        if self.num_transformer_submodules not in (1, 2):
            raise ValueError(f"adapter config: num_transformer_submodules must be 1 (decoder-only) or 2 "
                             f"(encoder-decoder), got {self.num_transformer_submodules!r}")
        if self.prefix_sites is not None:
            sites = dict(self.prefix_sites)
            unknown = [s for s in sites if s not in SITES]
            if not sites or unknown:
                raise ValueError(f"adapter config: prefix_sites must name some of {list(SITES)}, got {list(sites)}")
            for site, count in sites.items():
                _positive_int(f"prefix_sites[{site!r}]", count)
            if sum(sites.values()) != self.num_layers:
                raise ValueError(f"adapter config: num_layers {self.num_layers} is not the sum of prefix_sites "
                                 f"{sites}")
            object.__setattr__(self, "prefix_sites", {s: sites[s] for s in SITES if s in sites})

    @property
    def head_dim(self) -> int:
        """D: token_dim over the number of (KV) heads."""
        return self.token_dim // self.num_attention_heads

    @property
    def layout(self) -> str:
        """"causal", "peft_seq2seq" or "sites" (see the module docstring)."""
        if self.prefix_sites is not None:
            return "sites"
        return "peft_seq2seq" if self.num_transformer_submodules == 2 else "causal"

    @property
    def sites(self) -> tuple[str, ...]:
        """The attention sites the adapter has prefixes for."""
        return tuple(self.prefix_sites) if self.prefix_sites is not None else ("decoder",)

    @classmethod
    def from_dict(cls, raw: Mapping, source: str = "adapter config") -> "AdapterConfig":
        """Validate a parsed adapter_config.json; unknown keys (PEFT adds some per version) are ignored."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        peft_type = raw.get("peft_type")
        if peft_type != PEFT_TYPE:
            raise ValueError(f"{source}: peft_type is {peft_type!r}, expected {PEFT_TYPE!r} (a prefix-tuning adapter)")
        missing = [k for k in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")
                   if raw.get(k) is None]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        submodules = kwargs.get("num_transformer_submodules")
        if submodules is None:      # PEFT's rule when the field was left unset
            kwargs["num_transformer_submodules"] = 2 if raw.get("task_type") == "SEQ_2_SEQ_LM" else 1
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    def to_dict(self) -> dict:
        """PEFT's adapter_config.json fields (plus prefix_sites for our "sites" layout)."""
        out = {"peft_type": PEFT_TYPE, "auto_mapping": None, "modules_to_save": None}
        out.update(dataclasses.asdict(self))
        if self.prefix_sites is None:
            del out["prefix_sites"]
        else:
            out["prefix_sites"] = dict(self.prefix_sites)
        return out


# --------------------------------------------------------------------------------------------
# Reading and writing adapter folders
# --------------------------------------------------------------------------------------------

@dataclass
class Adapter:
    """A prefix adapter read from a folder: its config and its stored tensors.

    tensors maps each site to its flat tensor as stored: [P, L_site*2*Hkv*D] ("causal" and "sites"
    layouts), or PEFT's seq2seq tensor [P, L*2*Hkv*D] under "decoder" ("peft_seq2seq").
    """
    config: AdapterConfig
    tensors: dict[str, torch.Tensor]
    source: str = "adapter"

    @property
    def sites(self) -> tuple[str, ...]:
        return self.config.sites

    def layers(self, site: str) -> int:
        """Layers the adapter holds a prefix for at `site` (PEFT seq2seq: at most num_layers)."""
        if site not in self.sites:
            raise ValueError(f"{self.source} has no prefix for the {site!r} site (it has {list(self.sites)})")
        if self.config.prefix_sites is not None:
            return self.config.prefix_sites[site]
        return self.config.num_layers

    def prefix(self, site: str, num_layers: int | None = None) -> torch.Tensor:
        """The prefix of `site` as [num_layers, 2, Hkv, P, D] (PEFT's seq2seq slots resolved)."""
        cfg = self.config
        stored = self.layers(site)
        num_layers = stored if num_layers is None else num_layers
        flat = self.tensors[site]
        if cfg.layout == "peft_seq2seq":
            return peft_seq2seq_to_layers(flat, stored, num_layers, cfg.num_attention_heads, cfg.head_dim)
        if num_layers != stored:
            raise ValueError(f"{self.source}: num_layers is {stored} in the adapter but {num_layers} here "
                             f"(site {site!r})")
        return peft_flat_to_bank(flat, stored, cfg.num_attention_heads, cfg.head_dim)


def read_adapter(directory: str) -> Adapter:
    """Read and check a prefix-adapter folder (ours or PEFT's): config, tensor names and shapes,
    and that every value is finite. Tensors come back as stored (dtype, CPU)."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} is not a prefix adapter: {ADAPTER_CONFIG} is missing")
    try:
        with open(config_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    config = AdapterConfig.from_dict(raw, source=config_path)
    state = _read_weights(directory)
    if config.layout == "sites":
        names = {site: SITE_TENSOR.format(site=site) for site in config.sites}
        widths = {site: config.prefix_sites[site] * 2 * config.token_dim for site in config.sites}
    else:
        names = {"decoder": PEFT_TENSOR}
        widths = {"decoder": config.num_layers * 2 * config.token_dim}
    tensors = {}
    for site, key in names.items():
        if key not in state:
            raise ValueError(f"{directory!r}: the adapter has no {key!r} tensor (keys: {sorted(state)})")
        flat = state[key]
        want = (config.num_virtual_tokens, widths[site])
        if tuple(flat.shape) != want:
            raise ValueError(f"{directory!r}: {key} has shape {tuple(flat.shape)}, but the config says "
                             f"[num_virtual_tokens, layers*2*token_dim] = {list(want)}")
        if not flat.is_floating_point():
            raise ValueError(f"{directory!r}: {key} has dtype {flat.dtype}, expected a floating-point tensor")
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"{directory!r}: {key} holds non-finite values (NaN or inf); the adapter is corrupt")
        tensors[site] = flat
    return Adapter(config, tensors, source=f"adapter {directory!r}")


def _read_weights(directory: str) -> dict:
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    legacy = os.path.join(directory, ADAPTER_WEIGHTS_BIN)
    if not os.path.isfile(weights) and not os.path.isfile(legacy):
        raise FileNotFoundError(f"{directory!r}: no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_BIN})")
    try:
        if os.path.isfile(weights):
            from safetensors.torch import load_file
            state = load_file(weights)
        else:
            weights = legacy
            state = torch.load(legacy, map_location="cpu", weights_only=True)
    except MemoryError:
        raise
    except Exception as e:          # a truncated or corrupt file: say which, not a raw traceback
        raise ValueError(f"{weights}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{weights}: expected a mapping of names to tensors, got {type(state).__name__}")
    return state


def _atomic_write(path: str, write) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_adapter(directory: str, config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write an adapter folder (weights, then config; each file atomically). `tensors` maps each
    of config.sites to its flat tensor in config.layout, as `Adapter.tensors` holds them."""
    from safetensors.torch import save_file

    if set(tensors) != set(config.sites):
        raise ValueError(f"write_adapter: tensors for sites {sorted(tensors)} but the config has {list(config.sites)}")
    key = (lambda site: SITE_TENSOR.format(site=site)) if config.layout == "sites" else (lambda site: PEFT_TENSOR)
    state = {key(site): t.detach().float().cpu().contiguous() for site, t in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, ADAPTER_WEIGHTS),
                  lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    _atomic_write(os.path.join(directory, ADAPTER_CONFIG), lambda tmp: _write_text(tmp, text))
