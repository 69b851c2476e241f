"""Encoder-decoder models (BART and the families that share its attention) through the fused op.

Up to three prefixes per layer, as in Li & Liang: encoder self-attention (bidirectional: the
op with causal=False), decoder self-attention (causal) and decoder cross-attention (prepended to
the encoder's keys and values: causal=False over the encoder's tokens). Each site is a range of
the bank's layer axis, so every layer reads its [N, Hkv, P, D] view as a decoder-only layer does,
through the same registered attention function. The KV cache (decoder self and cross) holds only
real tokens; the encoder runs once, its keys and values stay in HF's cross-attention cache.

Positions follow PEFT's seq2seq prefix tuning: the decoder's real tokens sit at positions
offset..offset+S-1 (offset = P by default, where PEFT's prefix in the decoder cache puts them;
0 when the decoder's self-attention has no prefix); the encoder's positions are unchanged
(PEFT has no encoder prefix). These families compute the
decoder's positions inside the decoder, from the cache length, so a pre-hook on the decoder's
position embedding shifts them.

T5 and its relatives are refused: their attention adds a learned relative position bias to the
scores, which transformers passes to the attention function as `position_bias` [1, H, Sq, Sk];
the fused op takes no score bias (and what bias a prefix slot should get has no answer from
T5's training: PEFT places the prefix at relative positions 0..P-1).
"""
from __future__ import annotations

import functools
import inspect

from .transformers import (Family, _call_prefix_ids, _inputs_require_grad, _Plan, _set_prefix, _start_forward,
                           check_position_limit, refuse_static_cache)

# model_type -> Family. All take prefixes at the three sites; their decoders number positions
# from the cache length, through `embed_positions(x, past_length, position_ids=...)`.
SEQ2SEQ_FAMILIES = {name: Family(absolute_positions=True) for name in (
    "bart", "mbart", "pegasus", "marian", "blenderbot", "blenderbot-small", "plbart")}

_T5_LIKE = ("t5", "mt5", "umt5", "longt5", "switch_transformers")
SITE_ORDER = ("encoder", "decoder", "cross")


def _check_family(model) -> Family:
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type in _T5_LIKE:
        raise NotImplementedError(
            f"prefix-kernels cannot patch T5 models (model_type {model_type!r}): T5's attention adds a learned "
            "relative position bias to the attention scores (transformers passes it to the attention function "
            "as position_bias [1, heads, q_len, k_len]), and the fused prefix kernels take no score bias. "
            f"Encoder-decoder families supported: {', '.join(sorted(SEQ2SEQ_FAMILIES))}")
    if model_type not in SEQ2SEQ_FAMILIES:
        raise NotImplementedError(f"prefix-kernels cannot patch the encoder-decoder model_type {model_type!r}; "
                                  f"supported: {', '.join(sorted(SEQ2SEQ_FAMILIES))}")
    return SEQ2SEQ_FAMILIES[model_type]


def _site_modules(model) -> dict:
    """site -> the attention module of each layer, in layer order."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    found = {"encoder": [getattr(layer, "self_attn", None) for layer in getattr(encoder, "layers", [])],
             "decoder": [getattr(layer, "self_attn", None) for layer in getattr(decoder, "layers", [])],
             "cross": [getattr(layer, "encoder_attn", None) for layer in getattr(decoder, "layers", [])]}
    for site, modules in found.items():
        if not modules or any(m is None for m in modules):
            raise NotImplementedError(f"{model.config.model_type}: could not find the {site} attention modules "
                                      "(expected encoder.layers[i].self_attn, decoder.layers[i].self_attn and "
                                      "decoder.layers[i].encoder_attn)")
    return found


def _heads(module):
    hkv = getattr(module, "num_key_value_heads", None) or getattr(module, "num_heads", None)
    return hkv, getattr(module, "head_dim", None)


def plan_seq2seq(model, sites=None) -> _Plan:
    """The patch plan of an encoder-decoder model: the chosen sites' attention modules and the
    bank layer each reads (sites in the order encoder, decoder, cross)."""
    family = _check_family(model)
    chosen = SITE_ORDER if sites is None else tuple(sites)
    if isinstance(sites, str) or not chosen or len(set(chosen)) != len(chosen) \
            or any(s not in SITE_ORDER for s in chosen):
        raise ValueError(f"sites must be a non-empty subset of {SITE_ORDER}, got {sites!r}")
    found = _site_modules(model)
    links, layout, geometry = [], {}, set()
    for site in SITE_ORDER:
        if site not in chosen:
            # linked without a bank layer: these fall through to SDPA unless a caller's attention
            # hook (the serving engine's cache) takes every attention of the model
            links.extend((module, None, site == "decoder") for module in found[site])
            continue
        start = sum(layout.values())
        layout[site] = len(found[site])
        for i, module in enumerate(found[site]):
            links.append((module, start + i, site == "decoder"))
            geometry.add(_heads(module))
    if len(geometry) != 1 or None in next(iter(geometry)):
        raise NotImplementedError(f"{model.config.model_type}: the prefixed attention layers differ in (heads, "
                                  f"head_dim) {sorted(geometry, key=str)}; one prefix bank needs one geometry. "
                                  "Choose sites whose layers agree")
    hkv, head_dim = geometry.pop()
    embed = getattr(model.get_decoder(), "embed_positions", None)
    if embed is None or "position_ids" not in inspect.signature(embed.forward).parameters:
        raise NotImplementedError(f"{model.config.model_type}: the decoder's position embedding does not take "
                                  "position_ids; the position offset cannot be applied")
    return _Plan(family, links, layout, hkv, head_dim, "SEQ_2_SEQ_LM", install,
                 offset_by_prefix="decoder" in layout)


# --------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------

def install(model, state) -> list:
    """Hooks of a patched encoder-decoder model; returns their handles."""
    encoder, decoder = model.get_encoder(), model.get_decoder()
    # names of the decoder position embedding's (input, past length, position_ids) parameters
    params = list(inspect.signature(decoder.embed_positions.forward).parameters)
    shift = functools.partial(_shift_positions, state, params[1], params.index("position_ids"))
    handles = [model.register_forward_pre_hook(_before_forward, with_kwargs=True),
               model.register_forward_hook(functools.partial(_after_forward, state), always_call=True),
               encoder.register_forward_pre_hook(functools.partial(_before_encoder, state, model),
                                                  with_kwargs=True),
               decoder.embed_positions.register_forward_pre_hook(shift, with_kwargs=True)]
    embeddings = {id(m): m for m in (model.get_input_embeddings(), getattr(encoder, "embed_tokens", None),
                                     getattr(decoder, "embed_tokens", None)) if m is not None}
    for module in embeddings.values():
        handles.append(module.register_forward_hook(functools.partial(_inputs_require_grad, state, model)))
    return handles


def _first(kwargs, *names):
    for name in names:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def _batch_input(kwargs, what="model"):
    """The input tensor whose first dim is the batch (the encoder's hidden states when only
    encoder_outputs are passed)."""
    x = _first(kwargs, "input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds", "labels")
    if x is None:
        encoder_outputs = kwargs.get("encoder_outputs")
        if encoder_outputs is not None:
            x = encoder_outputs[0]
    if x is None:
        raise ValueError(f"the patched {what} needs input_ids, inputs_embeds, decoder_input_ids or encoder_outputs")
    return x


def _before_forward(model, args, kwargs):
    """The shared start (transformers._start_forward), then the decoder's position limit; the
    decoder's positions are shifted by the position embedding's own hook (_shift_positions)."""
    state, _ = _start_forward(model, args, kwargs, _batch_input)
    _check_positions(state, model, kwargs)
    state.in_forward = True
    return (), kwargs


def _after_forward(state, model, args, kwargs, output=None):
    state.in_forward = False


def _before_encoder(state, model, encoder, args, kwargs):
    """The encoder run on its own (generate does: it encodes once, then calls the model per step)."""
    if state.in_forward:
        kwargs.pop("prefix_ids", None)
        return args, kwargs
    ids, from_generate = _call_prefix_ids(state, kwargs)
    inputs = dict(kwargs, input_ids=args[0]) if args else kwargs     # forward(input_ids, attention_mask, ...)
    x = _batch_input(inputs, "encoder")
    _set_prefix(state, model, ids, from_generate, x.shape[0], x.device)
    return args, kwargs


def _check_positions(state, model, kwargs):
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    refuse_static_cache(cache)
    x = _first(kwargs, "decoder_input_ids", "decoder_inputs_embeds", "labels", "input_ids")
    if x is None or not state.family.absolute_positions:
        return
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    check_position_limit(model.config, past + x.shape[1], state.offset, f"{past + x.shape[1]} decoder tokens",
                         "shorten the target, or patch with a smaller position_offset")


def _shift_positions(state, past_name, positions_at, embed, args, kwargs):
    """Decoder position embedding pre-hook: real tokens at offset + (cache length + i).

    The embedding is called as embed(x, past_length, position_ids=...); `past_name` is the name of
    its past-length parameter and `positions_at` the index of position_ids among its parameters.
    """
    offset = state.offset
    if not offset:
        return None
    args = list(args)
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + offset
    elif len(args) > positions_at and args[positions_at] is not None:
        args[positions_at] = args[positions_at] + offset
    elif len(args) > 1:
        args[1] = args[1] + offset
    else:
        kwargs[past_name] = kwargs.get(past_name, 0) + offset
    return tuple(args), kwargs
