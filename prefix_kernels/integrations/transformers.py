"""Prefix-tune a Hugging Face causal LM through the fused op, with nothing copied from its code.

`patch_model` registers one attention function and one mask function with transformers'
`AttentionInterface` / `AttentionMaskInterface` under ATTENTION_NAME and switches only the given
instance's config to that name. Per forward, a pre-hook on the model resolves `prefix_ids`,
runs the bank (its MLP, if any) once, and shifts the position ids by the prefix offset; every
attention layer then reads its [N, Hkv, P, D] view of the bank inside the fused op. The KV cache
holds only real tokens.

Semantics follow PEFT's prefix tuning: prefix keys carry no rotary embedding, and real tokens
sit at positions offset..offset+S-1 (offset = P by default, where PEFT's forward puts them).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..adapter import read_adapter
from ..bank import PrefixBank
from .saving import save_patched_model

ATTENTION_NAME = "prefix_kernels"   # must not contain flash/sdpa/flex/paged: transformers special-cases those
_STATE_ATTR = "_prefix_kernels_state"
_LINK_ATTR = "_prefix_kernels_link"


@dataclass(frozen=True)
class Family:
    """What differs between supported model families."""
    positions: str = "arange"           # how the model derives position ids when none are passed
    absolute_positions: bool = False    # a learned position table: bounded length


FAMILIES = {
    "llama": Family(), "mistral": Family(), "qwen2": Family(), "qwen3": Family(),
    "gemma": Family(), "gemma2": Family(), "gemma3_text": Family(), "phi3": Family(),
    "gpt_neox": Family(),
    "gpt2": Family(absolute_positions=True),
    # OPT numbers positions by the cumulative attention mask (left padding aware)
    "opt": Family(positions="mask_cumsum", absolute_positions=True),
}

_OUTSIDE_REGISTRY = ("falcon", "bloom", "mpt", "gpt_bigcode", "gptj", "codegen", "rwkv", "mamba")


class _PatchState:
    """Everything a patched model owns; lives on the model instance, never globally."""

    def __init__(self, model, bank, family, offset, backend):
        self.bank, self.family, self.offset, self.backend = bank, family, offset, backend
        self.original_attn = model.config._attn_implementation
        # by name, not the tensors: holding them would keep FSDP2's unsharded originals alive
        self.requires_grad = [(n, p.requires_grad) for n, p in model.named_parameters()]
        self.handles, self.linked = [], []
        parameters = inspect.signature(model.forward).parameters
        self.forward_args = [n for n, p in parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.takes_use_cache = "use_cache" in parameters
        # set by each forward's pre-hook and read by every layer (also when gradient
        # checkpointing recomputes a layer during backward, before the next forward)
        self.index = None
        self.prefix = None
        self.segments = None        # segment_start [B, S] of a packed batch
        self.generate_ids = None
        # set_attention_hook: a caller-owned attention (a serving engine's static KV cache)
        self.attention_hook = None
        # inside the patched model's own forward (encoder-decoder: the encoder may also run alone)
        self.in_forward = False
        self.checkpointing_owners = _checkpointing_owners(model)


@dataclass
class _LayerLink:
    state: _PatchState
    layer_idx: int | None   # the layer's index on the bank's layer axis; None: a site without a prefix
    causal: bool = True     # False: encoder self-attention, decoder cross-attention


# --------------------------------------------------------------------------------------------
# The registered attention and mask functions
# --------------------------------------------------------------------------------------------

def _padding_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """Mask function: the 2-D key padding mask [B, kv_length] (True = real token), or None.

    Causality, the prefix and the bottom-right alignment are the kernel's; sliding windows are
    checked in the attention function.
    """
    if attention_mask is None or _marked_no_padding(attention_mask):
        return None
    mask = attention_mask[:, kv_offset:kv_offset + kv_length].to(torch.bool)
    if mask.shape[-1] < kv_length:
        mask = torch.nn.functional.pad(mask, (0, kv_length - mask.shape[-1]), value=False)
    if not torch.compiler.is_compiling() and not _capturing(mask) and bool(mask.all()):
        return None     # no padding: the kernel skips the mask loads
    return mask


# Set on the all-True mask a training forward passes in place of None (see _no_padding_mask).
_NO_PADDING_ATTR = "_prefix_kernels_no_padding"


def _marked_no_padding(mask) -> bool:
    """The mask is one of no_padding_mask's, or a view of one (GPT-2 reshapes the mask it gets)."""
    return getattr(mask, _NO_PADDING_ATTR, False) or getattr(mask._base, _NO_PADDING_ATTR, False)


def no_padding_mask(batch: int, seq: int, device) -> torch.Tensor:
    """An all-True [batch, seq] attention mask marked as holding no padding, for a caller whose
    attention masks by other means (the serving KV cache): the patched layers then skip the
    check that would read the mask on the host, a device sync per forward."""
    mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
    setattr(mask, _NO_PADDING_ATTR, True)
    return mask


def _no_padding_mask(x) -> torch.Tensor:
    """An all-True [B, S] mask marked as such, for a training forward called without one: with no
    mask and no cache, HF scans the position ids for packed sequences on every forward (~0.9 ms
    of host time and a device sync per GPT-2 step, H100), which the kernels never need (packed
    batches are found by the pre-hook); the mark lets _padding_mask skip its own check."""
    return no_padding_mask(x.shape[0], x.shape[1], x.device)


def _capturing(t) -> bool:
    """A CUDA graph is being captured: reading a tensor on the host is not allowed."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _fall_through(module, query, key, value, attention_mask, **kwargs):
    """SDPA for layers without a prefix (cross-attention): our 2-D mask becomes SDPA's 4-D one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..ops.reference import visible_keys_mask

    causal = getattr(module, "is_causal", True) and not getattr(module, "is_cross_attention", False)
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = (visible_keys_mask(query.shape[2], key.shape[2], attention_mask, causal, query.device)
                          if causal else attention_mask[:, None, None, :].to(torch.bool))
    elif attention_mask is None and causal and query.shape[2] != key.shape[2]:
        attention_mask = visible_keys_mask(query.shape[2], key.shape[2], None, True, query.device)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def prefix_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                             sliding_window=None, softcap=None, **kwargs):
    """Attention function: query [B, Hq, Sq, D], key/value [B, Hkv, Sk, D] (after the cache
    update, before any GQA repeat) -> ([B, Sq, Hq, D], None).

    The model's attention dropout (its p in training, 0 in eval), logit softcap and sliding
    window go to the fused op; the prefix stays visible through any window. A packed batch
    (segments found by the pre-hook) attends within its documents."""
    link = module.__dict__.get(_LINK_ATTR)
    unprefixed = link is not None and link.layer_idx is None
    if (link is None or getattr(module, "is_cross_attention", False)
            or (unprefixed and link.state.attention_hook is None)):
        return _fall_through(module, query, key, value, attention_mask, dropout=dropout,
                             scaling=scaling, softcap=softcap, **kwargs)
    state, name = link.state, type(module).__name__
    if unprefixed:      # an encoder-decoder site without a prefix, under a caller's hook (its cache)
        out = state.attention_hook(module, None, query, key, value, None, None, state.index, scaling)
        return out.transpose(1, 2).contiguous(), None
    if state.prefix is None:
        raise RuntimeError(f"{name} runs the prefix attention outside the patched model's forward; "
                           "call the patched model itself (model(...) or model.generate(...))")
    if state.attention_hook is not None:
        if softcap is not None or dropout:
            raise NotImplementedError(f"{name}: the attention hook ({state.attention_hook!r}) takes no logit "
                                      f"softcap ({softcap}) or dropout ({dropout}); run the model in eval mode "
                                      "and without softcapping")
        layer = state.prefix[link.layer_idx]
        out = state.attention_hook(module, link.layer_idx, query, key, value, layer[0], layer[1], state.index,
                                   scaling)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"{name} got a {attention_mask.dim()}-D attention mask: the patched model takes "
                             "a 2-D [batch, seq] padding mask (1 = real token); 4-D masks are not supported")
        if attention_mask.shape[-1] != key.shape[2]:
            raise ValueError(f"{name}: padding mask covers {attention_mask.shape[-1]} keys but the layer has "
                             f"{key.shape[2]}; static/offloaded caches are not supported, use the default "
                             "dynamic cache")
    layer = state.prefix[link.layer_idx]
    prefix_k, prefix_v = layer[0], layer[1]
    if prefix_k.dtype != query.dtype:     # autocast: q in the compute dtype, bank in the model dtype
        prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
    if key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    from ..ops.prefix_attention import prefix_attention

    out = prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=state.index,
                           key_padding_mask=attention_mask, scale=scaling, causal=link.causal,
                           backend=state.backend, dropout_p=dropout, softcap=softcap, window=sliding_window,
                           segment_start=state.segments if link.causal else None)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    # both registries must know the name: with no mask function the model passes mask=None
    AttentionInterface.register(ATTENTION_NAME, prefix_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, _padding_mask)


# --------------------------------------------------------------------------------------------
# Per-forward state: prefix ids, the materialized bank, shifted positions
# --------------------------------------------------------------------------------------------

def _resolve_index(state, ids, batch, from_generate):
    bank = state.bank
    if ids is None:
        if bank.num_entries > 1:
            raise ValueError(f"the prefix bank has {bank.num_entries} entries {bank.names}: pass "
                             "prefix_ids=[...] (one name or index per row) to model(...) or generate(...)")
        return None     # entry 0 for every row
    if isinstance(ids, (str, int)):
        ids = [ids] * batch
    if isinstance(ids, torch.Tensor):
        index = ids.reshape(-1).long()
        if index.numel() == 1 and batch > 1:
            index = index.expand(batch)
    else:
        index = bank.indices(list(ids))
    if index.shape[0] != batch:
        # generate repeats each row for beams / num_return_sequences (repeat_interleave)
        if from_generate and batch % index.shape[0] == 0:
            index = index.repeat_interleave(batch // index.shape[0])
        else:
            raise ValueError(f"prefix_ids has {index.shape[0]} entries but the batch has {batch} rows")
    return index


def _index_on_device(index, bank, device):
    """Check the row -> entry index on the host and move it to the device once per forward, so
    the layers neither copy it nor sync on it."""
    if index is None:
        return None
    if index.device.type == "cpu" and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= bank.num_entries:
            raise ValueError(f"prefix_ids has entries in [{lo}, {hi}], out of range: the bank has "
                             f"{bank.num_entries} entries {bank.names}")
    return index.to(device, non_blocking=True)


def _packed_segments(kwargs, batch, seq, past, device):
    """segment_start [B, S] of a packed batch, else None: from transformers' cu_seq_lens_q (one
    packed row), or from position ids that restart inside a row with no attention mask (HF's
    DataCollatorWithFlattening). Each document then attends to its own tokens and the prefix."""
    from ..ops.segments import segment_start_from_cu_seqlens, segment_start_from_position_ids

    cu, position_ids = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    if cu is not None:
        if batch != 1:
            raise ValueError(f"cu_seq_lens_q describes one packed row, but the batch has {batch} rows")
        segments = segment_start_from_cu_seqlens(cu.to(device), seq)
    elif (position_ids is not None and kwargs.get("attention_mask") is None and seq > 1
          and position_ids.dim() == 2):
        segments = segment_start_from_position_ids(position_ids).expand(batch, seq)
        # one sync to skip the segment path for unpacked rows (compiled: always take it, exact anyway)
        if not torch.compiler.is_compiling() and not bool(segments.any()):
            return None
    else:
        return None
    if past:
        raise ValueError("packed sequences (restarting position_ids / cu_seq_lens_q) with a KV cache are not "
                         "supported: pack only for training or single forwards, without past_key_values")
    return segments


def refuse_static_cache(cache) -> None:
    """A static cache holds max_cache_len slots, filled or not: the kernel's bottom-right causal
    alignment needs the keys to end at the last query."""
    if getattr(cache, "is_compileable", False):
        raise NotImplementedError(f"{type(cache).__name__} (a static/preallocated cache) is not supported by the "
                                  "patched model; use the default dynamic cache")


def check_position_limit(config, tokens: int, offset: int, what: str, remedy: str) -> None:
    """A model with absolute position embeddings has max_position_embeddings positions: `tokens`
    tokens from position `offset` must fit (the patched forward, the seq2seq decoder, the engine)."""
    limit = config.max_position_embeddings
    if tokens + offset > limit:
        raise ValueError(f"{what} at position offset {offset} need {tokens + offset} positions but "
                         f"{config.model_type} has {limit}; {remedy}")


def _positions(state, model, kwargs, batch, seq, device):
    """Position ids shifted by the prefix offset, and the segment starts of a packed batch."""
    offset = state.offset
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    refuse_static_cache(cache)
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    segments = _packed_segments(kwargs, batch, seq, past, device)
    position_ids = kwargs.get("position_ids")
    if segments is not None and position_ids is None:       # cu_seq_lens only: restart per document
        position_ids = torch.arange(seq, device=device)[None] - segments
    if state.family.absolute_positions:
        # a packed row needs positions for its longest document only
        longest = past + seq if segments is None or torch.compiler.is_compiling() else int(position_ids.max()) + 1
        check_position_limit(model.config, longest, offset, f"{longest} tokens",
                             "shorten the input, or patch with a smaller position_offset")
    mask = kwargs.get("attention_mask")
    if position_ids is not None:
        return position_ids + offset, segments
    if state.family.positions == "mask_cumsum" and mask is not None and mask.dim() == 2:
        real = mask.long()
        pos = (real.cumsum(-1) * real - 1)[:, past:]
        return torch.where(real[:, past:] > 0, pos + offset, pos), None   # padding keeps -1, as PEFT's
    return torch.arange(past, past + seq, device=device)[None] + offset, None


def _call_prefix_ids(state, kwargs):
    """Pops the call's prefix_ids; generate's (see _generate_with_prefix) when it passed none.
    Returns (ids, from_generate)."""
    ids = kwargs.pop("prefix_ids", None)
    from_generate = ids is None and state.generate_ids is not None
    return (state.generate_ids if from_generate else ids), from_generate


def _set_prefix(state, model, ids, from_generate, batch, device):
    """This forward's row -> entry index (checked, on the device) and the materialized bank,
    which every patched layer reads."""
    state.index = _index_on_device(_resolve_index(state, ids, batch, from_generate), state.bank, device)
    state.prefix = state.bank.materialize(model.get_input_embeddings().weight.dtype)


def _start_forward(model, args, kwargs, batch_input):
    """What the forward pre-hook of every patched model does first: positional arguments become
    keywords, the call's prefix ids are resolved and the bank materialized (`_set_prefix`), and
    reentrant checkpointing is refused where the prefix has a graph. batch_input(kwargs) gives
    the input tensor whose first dim is the batch. Returns (state, that tensor)."""
    state = model.__dict__[_STATE_ATTR]
    for name, value in zip(state.forward_args, args):
        kwargs[name] = value
    ids, from_generate = _call_prefix_ids(state, kwargs)
    if (state.takes_use_cache and "use_cache" not in kwargs and kwargs.get("past_key_values") is None
            and model.training and torch.is_grad_enabled()):
        # nothing reads a KV cache in a training step, but HF builds one by default and
        # concatenates every layer's K and V into it (2 copies + 2 allocations per layer)
        kwargs["use_cache"] = False
    x = batch_input(kwargs)
    _set_prefix(state, model, ids, from_generate, x.shape[0], x.device)
    if state.prefix.grad_fn is not None and _reentrant_checkpointing(state, model):
        raise ValueError("gradient checkpointing with use_reentrant=True runs each layer's backward on its "
                         "own, which cannot share the prefix computed once per step (MLP "
                         "reparameterization or a dtype cast of the bank); use the default "
                         "gradient_checkpointing_enable() (use_reentrant=False)")
    return state, x


def _checkpointing_owners(model) -> list:
    """The outermost modules with HF's `gradient_checkpointing` flag: the base model of most
    decoder-only models, OPT's decoder, an encoder-decoder model's encoder and decoder.
    gradient_checkpointing_enable() sets the flag and the checkpoint function on them (and on
    their layers). Found once at patch time: scanning every module per forward cost ~0.8 ms of
    host time at 417 modules (a 32-layer stack, on the 2-core CPU dev box)."""
    owners = []
    for name, module in model.named_modules():
        if hasattr(module, "gradient_checkpointing") and not any(name.startswith(o) for o, _ in owners):
            owners.append((name + "." if name else "", module))
    return [module for _, module in owners]


def _checkpointing(state, model):
    """The module whose gradient checkpointing is on, while the model trains with gradients; else None."""
    if not (torch.is_grad_enabled() and model.training):
        return None
    return next((m for m in state.checkpointing_owners if getattr(m, "gradient_checkpointing", False)), None)


def _reentrant_checkpointing(state, model) -> bool:
    owner = _checkpointing(state, model)
    if owner is None:
        return False
    func = getattr(owner, "_gradient_checkpointing_func", None)
    return bool(getattr(func, "keywords", {}).get("use_reentrant", False))


def _inputs_require_grad(state, model, module, inputs, output):
    """Embedding forward hook: with gradient checkpointing the layers' inputs must require grad,
    or no prefix gradient flows through the checkpointed layers (the reentrant variant drops them)."""
    if _checkpointing(state, model) is not None:
        output.requires_grad_(True)


def _decoder_only_input(kwargs):
    x = kwargs.get("input_ids")
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        raise ValueError("the patched model needs input_ids or inputs_embeds")
    return x


def _before_forward(model, args, kwargs):
    """Decoder-only: the shared start, then position ids shifted by the offset (and packed segments)."""
    state, x = _start_forward(model, args, kwargs, _decoder_only_input)
    kwargs["position_ids"], state.segments = _positions(state, model, kwargs, x.shape[0], x.shape[1], x.device)
    if (kwargs.get("attention_mask") is None and kwargs.get("use_cache") is False
            and kwargs.get("past_key_values") is None and not torch.compiler.is_compiling()):
        kwargs["attention_mask"] = _no_padding_mask(x)
    return (), kwargs


def _generate_with_prefix(state, original, *args, prefix_ids=None, **kwargs):
    if prefix_ids is not None and not isinstance(prefix_ids, torch.Tensor):
        prefix_ids = [prefix_ids] if isinstance(prefix_ids, (str, int)) else list(prefix_ids)
        prefix_ids = state.bank.indices(prefix_ids)
    state.generate_ids = prefix_ids
    try:
        return original(*args, **kwargs)
    finally:
        state.generate_ids = None


# --------------------------------------------------------------------------------------------
# patch / unpatch / load
# --------------------------------------------------------------------------------------------

def _check_supported(model) -> Family:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        why = (" (its attention does not go through transformers' attention registry)"
               if model_type in _OUTSIDE_REGISTRY else "")
        raise NotImplementedError(f"prefix-kernels cannot patch model_type {model_type!r}{why}; supported: "
                                  f"{', '.join(sorted(FAMILIES))}")
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        raise NotImplementedError(f"{model_type}: only causal decoder-only models are supported")
    return FAMILIES[model_type]


@dataclass
class _Plan:
    """What patch_model needs from a model: which attention module reads which bank layer
    (and whether causally), the bank's geometry and sites, and the hooks to install."""
    family: Family
    links: list                 # (attention module, bank layer or None for a site without a prefix, causal)
    sites: dict                 # site -> layer count, in bank order
    num_kv_heads: int
    head_dim: int
    task_type: str
    install: Callable           # (model, state) -> hook handles
    # by default the first real token sits at position P: where PEFT's prefix in the (decoder's)
    # KV cache puts it; an encoder-decoder model without a decoder prefix keeps its positions
    offset_by_prefix: bool = True

    @property
    def num_layers(self) -> int:
        return sum(self.sites.values())


def _plan_decoder_only(model, sites) -> _Plan:
    if sites is not None and tuple(sites) != ("decoder",):
        raise ValueError(f"sites={tuple(sites)}: a decoder-only model has one prefix site, 'decoder' "
                         "(its self-attention); leave sites=None")
    family = _check_supported(model)
    modules = _attention_modules(model)
    num_layers, hkv, head_dim = _geometry(model, modules)
    return _Plan(family, [(m, m.layer_idx, True) for m in modules], {"decoder": num_layers}, hkv, head_dim,
                 "CAUSAL_LM", _install_decoder_only)


def _install_decoder_only(model, state) -> list:
    return [model.register_forward_pre_hook(_before_forward, with_kwargs=True),
            model.get_input_embeddings().register_forward_hook(functools.partial(_inputs_require_grad, state, model))]


def _attention_modules(model):
    modules = [m for m in model.modules()
               if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)
               and not getattr(m, "is_cross_attention", False)]
    num_layers = model.config.num_hidden_layers
    if sorted(m.layer_idx for m in modules) != list(range(num_layers)):
        raise NotImplementedError(f"{model.config.model_type}: found self-attention modules for layers "
                                  f"{sorted(m.layer_idx for m in modules)}, expected 0..{num_layers - 1}")
    return modules


def _geometry(model, modules):
    config = model.config
    hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(modules[0], "head_dim", None) or getattr(modules[0], "head_size", None)
    if head_dim is None:
        head_dim = config.hidden_size // config.num_attention_heads
    return config.num_hidden_layers, hkv, head_dim


@torch.no_grad()
def _prefix_from_text(model, init, tokenizer, prefix_len, num_layers):
    """Li & Liang's init from real words: the unpatched model's keys/values of a text, [L, 2, Hkv, P, D]."""
    if isinstance(init, str):
        if tokenizer is None:
            raise ValueError("init from text needs tokenizer=...; or pass init as a list of token ids")
        ids = tokenizer(init, add_special_tokens=False)["input_ids"]
    else:
        ids = list(init)
    if not ids:
        raise ValueError("init text is empty after tokenization")
    ids = (ids * prefix_len)[:prefix_len]    # repeat short texts to fill every slot
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=torch.tensor([ids], device=device), use_cache=True)
    cache = out.past_key_values
    return torch.stack([torch.stack([cache.layers[i].keys[0], cache.layers[i].values[0]])
                        for i in range(num_layers)]).float()


def patch_model(model: torch.nn.Module, num_prefix_tokens: int = 32, *, projection_hidden: int | None = None,
                init: str | torch.Tensor | list[int] = "random", position_offset: int | None = None,
                num_prefixes: int = 1, names: list[str] | None = None, tokenizer: Any = None,
                backend: str = "auto", sites: list[str] | None = None) -> PrefixBank:
    """Freeze `model` and prefix-tune it through the fused op; returns the trainable PrefixBank.

    Args:
        model: a transformers causal LM of a supported family (see FAMILIES), or an
            encoder-decoder model of SEQ2SEQ_FAMILIES (BART, mBART, Pegasus, Marian, ...).
        num_prefix_tokens: P, prefix slots per layer.
        projection_hidden: None, or the hidden size of Li & Liang's MLP reparameterization.
        init: "random", "zeros", or a text (with tokenizer=...) / list of token ids whose keys and
            values (from the unpatched model) initialize the prefix (decoder-only models).
        position_offset: position of the first real (decoder) token; None = P (PEFT's convention;
            0 for an encoder-decoder model without a decoder self-attention prefix), 0 = none.
        num_prefixes / names: a bank of several prefixes (names default to "default" for one,
            "0".."N-1" for several); choose per row with model(..., prefix_ids=[...]).
        backend: the op's backend ("auto", "triton", "reference").
        sites: encoder-decoder models only: which attention gets a prefix, a subset of
            ("encoder", "decoder", "cross"); None = all three, as in Li & Liang. ("decoder",)
            is what PEFT's seq2seq prefix tuning has.
    """
    if _STATE_ATTR in model.__dict__:
        raise ValueError("the model is already patched; call unpatch_model(model) first")
    if getattr(model.config, "is_encoder_decoder", False):
        from .seq2seq import plan_seq2seq
        plan = plan_seq2seq(model, sites)
    else:
        plan = _plan_decoder_only(model, sites)
    num_layers, hkv, head_dim = plan.num_layers, plan.num_kv_heads, plan.head_dim
    if names is None:
        names = ["default"] if num_prefixes == 1 else [str(i) for i in range(num_prefixes)]
    elif num_prefixes not in (1, len(names)):
        raise ValueError(f"num_prefixes={num_prefixes} but {len(names)} names were given")
    if not (isinstance(init, str) and init in ("random", "zeros")) and not isinstance(init, torch.Tensor):
        if plan.task_type != "CAUSAL_LM":
            raise NotImplementedError(f"{model.config.model_type}: init from text is implemented for decoder-only "
                                      "models; use init='random' or 'zeros'")
        init = _prefix_from_text(model, init, tokenizer, num_prefix_tokens, num_layers)
    device = model.get_input_embeddings().weight.device
    bank = PrefixBank(num_layers, hkv, head_dim, num_prefix_tokens, names=names,
                      projection_hidden=projection_hidden, init=init, device=device,
                      sites=plan.sites, task_type=plan.task_type)
    if position_offset is None:
        position_offset = num_prefix_tokens if plan.offset_by_prefix else 0
    offset = int(position_offset)

    _register()
    state = _PatchState(model, bank, plan.family, offset, backend)
    for p in model.parameters():
        p.requires_grad_(False)
    model.prefix_bank = bank      # a submodule: optimizers, .to() and Trainer see it
    for module, layer, causal in plan.links:
        module.__dict__[_LINK_ATTR] = _LayerLink(state, layer, causal)
        state.linked.append(module)
    model.__dict__[_STATE_ATTR] = state
    state.handles.extend(plan.install(model, state))
    model.__dict__["generate"] = functools.partial(_generate_with_prefix, state, model.generate)
    # saving the patched model (Trainer.save_model, its checkpoints) writes the adapters: saving.py
    model.__dict__["save_pretrained"] = functools.partial(save_patched_model, model)
    model.config._attn_implementation = ATTENTION_NAME
    return bank


def unpatch_model(model: torch.nn.Module) -> torch.nn.Module:
    """Undo patch_model: the original attention, trainability, methods; the bank is detached."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("the model is not patched by prefix-kernels")
    for handle in state.handles:
        handle.remove()
    for module in state.linked:
        module.__dict__.pop(_LINK_ATTR, None)
    del model.prefix_bank
    model.__dict__.pop("generate", None)
    model.__dict__.pop("save_pretrained", None)
    model.config._attn_implementation = state.original_attn
    params = dict(model.named_parameters())
    for name, requires_grad in state.requires_grad:
        params[name].requires_grad_(requires_grad)
    del model.__dict__[_STATE_ATTR]
    return model


def set_attention_hook(model, hook) -> None:
    """Route every patched layer's attention through `hook` (None: back to the fused op).

    hook(module, layer_idx, query, key, value, prefix_k, prefix_v, prefix_index, scale) gets the
    layer's new query [B, Hq, Sq, D] and key/value [B, Hkv, Sq, D] (after rotary, before any GQA
    repeat), its bank view [N, Hkv, P, D] and the per-row entry index ([B] or None), and returns
    [B, Hq, Sq, D]. An encoder-decoder model's attention at a site without a prefix calls it too,
    with layer_idx, prefix_k and prefix_v None. The attention mask is not passed: the hook owns
    its keys (a serving engine's static KV cache, say). Prefix ids and position offsets are
    resolved as for any forward.
    """
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("the model is not patched by prefix-kernels")
    state.attention_hook = hook


def position_offset(model) -> int:
    """Position of the first real token of a patched model (P by PEFT's convention, or as patched)."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("the model is not patched by prefix-kernels")
    return state.offset


def is_patched(model: torch.nn.Module) -> bool:
    """Whether `patch_model` has patched this model instance (and `unpatch_model` has not undone it)."""
    return _STATE_ATTR in getattr(model, "__dict__", {})


def get_prefix_bank(model: torch.nn.Module) -> PrefixBank:
    """The prefix bank of a patched model; ValueError if the model is not patched."""
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        raise ValueError("the model is not patched by prefix-kernels")
    return state.bank


def load_prefix(model: torch.nn.Module, directory: str, name: str | None = None, **patch_kwargs: Any) -> PrefixBank:
    """Load a prefix-tuning adapter (ours or PEFT's) into bank entry `name` (default "default").

    An unpatched model is patched first (P and, for encoder-decoder models, the sites from the
    adapter; `patch_kwargs` go to patch_model). An existing entry of that name is overwritten,
    otherwise a new entry is added.
    """
    adapter = read_adapter(directory)
    name = name or "default"
    patched_here = not is_patched(model)
    if patched_here:
        if getattr(model.config, "is_encoder_decoder", False):
            patch_kwargs.setdefault("sites", adapter.sites)
        patch_model(model, adapter.config.num_virtual_tokens, init="zeros", names=[name], **patch_kwargs)
    bank = get_prefix_bank(model)
    try:
        bank.load_adapter(name, adapter)
    except Exception:
        if patched_here:        # leave the model as it came
            unpatch_model(model)
        raise
    return bank
