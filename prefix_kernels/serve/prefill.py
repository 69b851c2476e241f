"""The prefill forward as pure functions of tensors: the decode step's math over a chunk of prompt.

The engine prefills through the Hugging Face modules by default, and eager HF modules spend a
large share of a prefill on elementwise passes over [tokens, hidden] tensors: the RMSNorm alone is
~7 kernels and ~600 MB of traffic per call at 8192 tokens of the TinyLlama shape, the rotary and
SiLU*mul a few more. gpt-fast compiles its prefill for this reason. `PrefillStep` runs the same
layers as `step.DecodeStep` (its weights, the fused q/k/v and gate/up views, its geometry) with a
sequence dimension, compiled by inductor with dynamic shapes, so the norms, rotary, activation and
residual adds fuse into a few kernels between the GEMMs. Attention is the fused prefix-attention op
(`prefix_kernels::prefix_attention_fwd` under compile), bottom-right causal, over the chunk's own
keys or, for rows continuing earlier chunks, over the cache window the KV cache describes
(`cache.Prefill`: the same index tensors the HF path's `KVCache.update` uses).

Experimental (`Engine(compiled_prefill=True)`, off by default): the expected gain (~10 ms of the
~50 ms prefill of 32 x 256 tokens on an H100, ~4x that at B=128, from the byte counts above) is
not measured yet; `prefix-kernels bench decode --cases engine engine-compiled-prefill` measures it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ops.prefix_attention import prefix_attention
from .cache import Prefill
from .step import DecodeStep, Geometry, _act, _linear, _mlp, _qkv, _rms_norm, _rotate, compile_limits


def make_prefill_embed(g: Geometry):
    def embed(ids, positions, weight, inv_freq):
        """ids, positions [n, W] -> hidden [n, W, H], cos, sin [n, 1, W, rotary_dim]."""
        h = F.embedding(ids, weight)
        if g.embed_scale is not None:
            h = h * g.embed_scale
        freqs = (positions + g.offset).float()[..., None] * inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        cos = (angles.cos() * g.rotary_scaling).to(h.dtype)
        sin = (angles.sin() * g.rotary_scaling).to(h.dtype)
        return h, cos, sin
    return embed


def make_prefill_layer(g: Geometry, act, attention_backend: str):
    hq, d = g.num_heads, g.head_dim

    def layer(h, delta, w, k_cache, v_cache, prefix_k, prefix_v, rows, cos, sin, token_slots, token_pos,
              token_rows, token_cols, slot_index, window, key_mask):
        """One decoder layer over n rows of W tokens (right-padded). Stores the real tokens' keys
        and values at (token_slots, token_pos) of this layer's cache [slots, Hkv, Smax, D]; with a
        window (rows continuing earlier chunks) attends over the cache positions `window` [n, K]
        of each row's slot, else over the chunk's own keys. Returns (h, this layer's delta)."""
        if delta is not None:
            h = h + delta
        n, width = h.shape[0], h.shape[1]
        q, k, v = _qkv(g, _rms_norm(h, w["input_norm"], g.eps, g.gemma_norm), w)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # [n, H, W, D]
        q, k = _rotate(q, cos, sin, g.rotary_dim), _rotate(k, cos, sin, g.rotary_dim)
        # the padding of short rows is never stored
        k_cache[token_slots, :, token_pos] = k[token_rows, :, token_cols].to(k_cache.dtype)
        v_cache[token_slots, :, token_pos] = v[token_rows, :, token_cols].to(v_cache.dtype)
        if window is None:
            keys, values = k, v
        else:      # [n, K, Hkv, D] -> [n, Hkv, K, D]: query c of row i sits at key K - W + c
            keys = k_cache[slot_index, :, window].transpose(1, 2).to(q.dtype)
            values = v_cache[slot_index, :, window].transpose(1, 2).to(q.dtype)
        o = prefix_attention(q, keys, values, prefix_k, prefix_v, prefix_index=rows, key_padding_mask=key_mask,
                             scale=g.scale, causal=True, backend=attention_backend)
        h = h + _linear(o.transpose(1, 2).reshape(n, width, hq * d), w, "o")
        return h, _mlp(g, act, h, w)
    return layer


def make_prefill_head(g: Geometry):
    def head(h, delta, final_rows, final_cols, norm_w, lm_w, lm_b):
        """Logits [F, V] of the tokens (final_rows[f], final_cols[f]) only."""
        x = (h + delta)[final_rows, final_cols]
        return F.linear(_rms_norm(x, norm_w, g.eps, g.gemma_norm), lm_w, lm_b)
    return head


class PrefillStep:
    """The prefill forward of a DecodeStep's model, over its weights, bank and KV cache, compiled
    as the step is (its StepOptions: compiler, mode), with dynamic shapes.

    Call it inside `KVCache.prefilling(...)` (its mode holds the chunk's index tensors):
    `logits = prefill(ids, positions, rows, cache.mode, final_rows, final_cols)`.
    """

    def __init__(self, step: DecodeStep, compiler: Optional[str] = None):
        """compiler: a torch.compile backend overriding the step's (None: the step's own)."""
        self.step = step
        g = step.geometry
        attention_backend = "auto" if g.backend in ("auto", "cuda") else g.backend
        base = step.model.model
        fns = (make_prefill_embed(g), make_prefill_layer(g, _act(base.layers[0].mlp), attention_backend),
               make_prefill_head(g))
        o = step.options
        self.compiler = compiler or o.compiler
        if self.compiler is not None:
            fns = tuple(torch.compile(fn, fullgraph=True, dynamic=True, backend=self.compiler, mode=o.mode)
                        for fn in fns)
        self._embed, self._layer, self._head = fns

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor, mode: Prefill,
                 final_rows: torch.Tensor, final_cols: torch.Tensor) -> Optional[torch.Tensor]:
        """ids, positions [n, W] int64 (cache positions, right-padded rows), rows [n] int64 bank
        rows, final_rows / final_cols [F] int64: the tokens whose logits are wanted. Writes the
        cache; returns logits [F, V] (None when F == 0)."""
        step = self.step
        if not isinstance(mode, Prefill):
            raise RuntimeError("PrefillStep: call it inside KVCache.prefilling(...)")
        if ids.shape != positions.shape or ids.dim() != 2 or rows.shape != ids.shape[:1]:
            raise ValueError(f"PrefillStep: ids and positions [n, W] and rows [n], got {tuple(ids.shape)}, "
                             f"{tuple(positions.shape)}, {tuple(rows.shape)}")
        with compile_limits(self.compiler is not None):
            h, cos, sin = self._embed(ids, positions, step.embed_weight, step.inv_freq)
            delta = None
            for i, w in enumerate(step.layers):
                h, delta = self._layer(h, delta, w, step.k_cache[i], step.v_cache[i], step.bank[i, 0],
                                       step.bank[i, 1], rows, cos, sin, mode.token_slots, mode.token_pos,
                                       mode.rows, mode.cols, mode.slot_index, mode.window, mode.key_mask)
            if final_rows.numel() == 0:
                return None
            return self._head(h, delta, final_rows, final_cols, step.norm_weight, step.lm_weight, step.lm_bias)
