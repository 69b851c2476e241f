"""The prefix bank: every prefix of a patched model in one place.

Storage is one [L, 2, N, Hkv, P, D] tensor (layer, key/value, entry, KV head, slot, head dim);
layer l's keys are the view [l, 0] of shape [N, Hkv, P, D], which the fused op reads directly.
With the MLP reparameterization of Li & Liang, the trainable parameters are per-entry token
embeddings and a two-layer MLP; `materialize()` runs the MLP once for all entries and layers.

Adapters are saved in PEFT's prefix-tuning format: `adapter_model.safetensors` holding
`prompt_embeddings` [P, L*2*Hkv*D] (the MLP folded in) and `adapter_config.json`. This module
knows no model library.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Iterable, Sequence

import torch
from torch import nn

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_flat_to_bank(flat: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int):
    """PEFT's [P, L*2*Hkv*D] (flat index ((l*2 + kv)*Hkv + h)*D + d) -> [L, 2, Hkv, P, D]."""
    p = flat.shape[0]
    return flat.view(p, num_layers, 2, num_kv_heads, head_dim).permute(1, 2, 3, 0, 4)


def bank_to_peft_flat(entry: torch.Tensor) -> torch.Tensor:
    """[L, 2, Hkv, P, D] -> PEFT's [P, L*2*Hkv*D]."""
    num_layers, _, hkv, p, d = entry.shape
    return entry.permute(3, 0, 1, 2, 4).reshape(p, num_layers * 2 * hkv * d)


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


class PrefixBank(nn.Module):
    """N named prefixes for an L-layer model with Hkv KV heads of head_dim D, P slots each.

    Args:
        num_layers, num_kv_heads, head_dim, prefix_len: the geometry (L, Hkv, D, P).
        names: one name per entry (N = len(names)).
        projection_hidden: None for a plain trainable prefix, or the hidden size of Li & Liang's
            MLP (token embedding [P, Hkv*D] -> Linear -> tanh -> Linear -> [P, L*2*Hkv*D]).
        init: "random" (PEFT's default: N(0, 1) prefix, or default nn.Linear init of the MLP),
            "zeros" (a zero prefix; with the MLP its last layer is zeroed, as PEFT's "zero"),
            or a tensor [L, 2, Hkv, P, D] copied into every entry (plain prefix only).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, prefix_len: int,
                 names: Sequence[str] = ("default",), projection_hidden: int | None = None,
                 init="random", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if prefix_len < 1:
            raise ValueError(f"num_prefix_tokens must be >= 1, got {prefix_len}")
        names = [str(n) for n in names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"prefix names must be non-empty and distinct, got {names}")
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.prefix_len, self.projection_hidden = prefix_len, projection_hidden
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
        return len(self.names)

    @property
    def token_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def index_of(self, name) -> int:
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
    def set_entry(self, name_or_index, prefix: torch.Tensor) -> None:
        """Copy a plain prefix [L, 2, Hkv, P, D] into an entry."""
        if self.projection_hidden is not None:
            raise ValueError("this bank is MLP-reparameterized: a plain prefix cannot be loaded into it. "
                             "Patch with projection_hidden=None to load adapters")
        i = self.index_of(name_or_index)
        want = (self.num_layers, 2, self.num_kv_heads, self.prefix_len, self.head_dim)
        if tuple(prefix.shape) != want:
            raise ValueError(f"prefix of shape {tuple(prefix.shape)} does not fit the bank: want "
                             f"[layers, 2, kv_heads, prefix_len, head_dim] = {list(want)}")
        self.prefix[:, :, i].copy_(prefix.to(self.prefix.device, self.prefix.dtype))

    @torch.no_grad()
    def set_projection(self, name_or_index, embedding, in_weight, in_bias, out_weight, out_bias) -> None:
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

    def add_entry(self, name: str, init="zeros") -> int:
        """Append an entry; returns its index. Parameters are re-allocated: build optimizers after."""
        name = str(name)
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
        return out if dtype is None else out.to(dtype)

    @torch.no_grad()
    def folded(self, name_or_index) -> torch.Tensor:
        """One entry as a plain prefix [L, 2, Hkv, P, D] (the MLP folded in), fp32 on the CPU."""
        i = self.index_of(name_or_index)
        return self.materialize()[:, :, i].float().cpu().clone()

    def extra_repr(self) -> str:
        return (f"layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"prefix_len={self.prefix_len}, entries={self.names}, projection_hidden={self.projection_hidden}")

    # -- PEFT-format save / load -----------------------------------------------------------

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        return {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": None,
            "inference_mode": True,
            "num_virtual_tokens": self.prefix_len,
            "token_dim": self.token_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": self.num_kv_heads,
            "num_layers": self.num_layers,
            "encoder_hidden_size": self.projection_hidden or self.token_dim,
            # the saved tensor is always the folded prefix, so the adapter loads as a plain one
            "prefix_projection": False,
            "modules_to_save": None,
            "init_weights": None,
        }

    def save_pretrained(self, save_directory: str, names: Sequence[str] | None = None,
                        base_model_name_or_path: str | None = None) -> list[str]:
        """Write each entry as a PEFT prefix-tuning adapter; returns the folders written.

        One entry goes to `save_directory`; with several, the entry named "default" (if any)
        goes there and every other entry to `save_directory/<name>`, PEFT's multi-adapter layout.
        """
        from safetensors.torch import save_file

        names = list(self.names if names is None else names)
        written = []
        for name in names:
            single = len(names) == 1 or name == "default"
            folder = save_directory if single else os.path.join(save_directory, name)
            os.makedirs(folder, exist_ok=True)
            flat = bank_to_peft_flat(self.folded(name)).contiguous()
            _atomic_write(os.path.join(folder, ADAPTER_WEIGHTS),
                          lambda tmp: save_file({"prompt_embeddings": flat}, tmp, metadata={"format": "pt"}))
            config = json.dumps(self.peft_config(base_model_name_or_path), indent=2, sort_keys=True)
            _atomic_write(os.path.join(folder, ADAPTER_CONFIG), lambda tmp: _write_text(tmp, config))
            written.append(folder)
        return written


def read_peft_prefix(directory: str) -> tuple[dict, torch.Tensor]:
    """(adapter config, prompt_embeddings [P, L*2*token_dim]) of a PEFT prefix-tuning adapter.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for anything
    malformed: unreadable JSON or weights, missing config fields, a wrong shape, weights that
    are not floating point or not finite (NaN, inf)."""
    config_path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory!r} is not a prefix adapter: {ADAPTER_CONFIG} is missing")
    with open(config_path) as f:
        config = json.load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    bad = [k for k in ("num_virtual_tokens", "num_layers", "token_dim")
           if not isinstance(config.get(k), int) or isinstance(config.get(k), bool) or config.get(k) < 1]
    if bad:
        raise ValueError(f"{config_path}: {', '.join(bad)} must be positive integers")
    weights = os.path.join(directory, ADAPTER_WEIGHTS)
    try:
        if os.path.isfile(weights):
            from safetensors.torch import load_file
            state = load_file(weights)
        elif os.path.isfile(os.path.join(directory, "adapter_model.bin")):
            weights = os.path.join(directory, "adapter_model.bin")
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{directory!r}: no {ADAPTER_WEIGHTS} (or adapter_model.bin)")
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as e:          # a truncated or corrupt file: say which, not a raw traceback
        raise ValueError(f"{weights}: cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(state, dict) or "prompt_embeddings" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{directory!r}: the adapter has no 'prompt_embeddings' tensor (keys: {keys})")
    flat = state["prompt_embeddings"]
    p, width = config["num_virtual_tokens"], config["num_layers"] * 2 * config["token_dim"]
    if not isinstance(flat, torch.Tensor) or flat.shape != (p, width):
        shape = tuple(flat.shape) if isinstance(flat, torch.Tensor) else type(flat).__name__
        raise ValueError(f"{directory!r}: prompt_embeddings has shape {shape}, but the config "
                         f"says [num_virtual_tokens, num_layers*2*token_dim] = [{p}, {width}]")
    if not flat.is_floating_point():
        raise ValueError(f"{weights}: prompt_embeddings has dtype {flat.dtype}; a prefix needs floating-point weights")
    finite = torch.isfinite(flat)
    if not bool(finite.all()):
        raise ValueError(f"{weights}: prompt_embeddings has {int((~finite).sum())} non-finite values (NaN or inf)")
    return config, flat
