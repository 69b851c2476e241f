"""An encoder-decoder engine's attention: the encoder's, the decoder's over its KV cache, and the
cross-attention over each slot's encoder keys, stored once per request.

Installed with `integrations.transformers.set_attention_hook` on a patched encoder-decoder model,
it takes every attention of the model (sites without a prefix too: they call it with no bank
view). Two kinds of forward reach it (serve/seq2seq_engine.py):
  prefill: the whole model over a group of sources and the decoder's first tokens. The encoder
           attends within each source (key padding); the decoder's self-attention stores its
           keys in the KV cache (`KVCache`, prefill mode); each cross-attention layer stores the
           projected encoder keys and values of every row in its slot (`CrossCache`), then
           attends over them.
  decode:  the decoder alone, one token per slot (KV cache in decode mode). Cross-attention
           reads the slot's stored encoder keys; the keys and values the layer projected from
           the stand-in encoder output it was given are ignored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.decode import decode_attention
from ..ops.prefix_attention import prefix_attention
from .cache import Decode, KVCache


class CrossCache:
    """The cross-attention keys and values of each slot's source: [layers, slots, Hkv, max_source_len, D],
    and the source's length per slot (`lengths`, a device tensor a captured graph reads)."""

    def __init__(self, num_layers, slots, num_kv_heads, max_source_len, head_dim, *, dtype, device):
        shape = (num_layers, slots, num_kv_heads, max_source_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_source_len = max_source_len
        # 1, not 0, for a slot never filled: a parked slot's (discarded) decode step sees one key
        self.lengths = torch.ones(slots, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def store(self, layer: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Keys/values [n, Hkv, S, D] of n sources (right-padded to S) into slots [n]."""
        width = key.shape[2]
        self.k[layer, slots, :, :width] = key.to(self.k.dtype)
        self.v[layer, slots, :, :width] = value.to(self.v.dtype)

    def read(self, layer: int, batch: int):
        """Slots 0..batch-1 of a layer: ([batch, Hkv, max_source_len, D] x 2)."""
        return self.k[layer, :batch], self.v[layer, :batch]


class Seq2SeqAttention:
    """hook(module, layer, query, key, value, prefix_k, prefix_v, prefix_index, scale) -> [B, Hq, S, D].

    sites: id(attention module) -> (site, index of its layer within the site), for every attention
    of the model. The engine sets `source_mask` ([n, S] bool, or None when no source is padded)
    and `slots` ([n] device) before each prefill forward.
    """

    def __init__(self, cache: KVCache, cross: CrossCache, sites: dict, backend: str = "auto"):
        if backend == "auto" and cache.device.type == "cpu":
            backend = "reference"
        self.cache, self.cross, self.sites, self.backend = cache, cross, sites, backend
        self.prefill_backend = "auto" if backend in ("auto", "cuda") else backend
        self.source_mask: torch.Tensor | None = None
        self.slots: torch.Tensor | None = None

    def __call__(self, module, layer, query, key, value, prefix_k, prefix_v, prefix_index, scale):
        site, i = self.sites[id(module)]
        if prefix_k is not None and prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
        mode = self.cache.mode
        decoding = isinstance(mode, Decode)
        if site == "encoder":
            if decoding:
                raise RuntimeError("the encoder ran in a decode forward")
            return self._attend(query, key, value, prefix_k, prefix_v, prefix_index, scale, self.source_mask,
                                causal=False)
        if site == "decoder":
            k, v = self.cache.update(i, key, value)       # raises outside an engine forward
            if decoding:
                return self._decode(query, k, v, mode.seqlens[:mode.batch], prefix_k, prefix_v, prefix_index,
                                    scale, self.cache.max_seq_len)
            return self._attend(query, k, v, prefix_k, prefix_v, prefix_index, scale, mode.key_mask, causal=True)
        if decoding:                                       # cross: the slot's stored source
            k, v = self.cross.read(i, mode.batch)
            return self._decode(query, k, v, self.cross.lengths[:mode.batch], prefix_k, prefix_v, prefix_index,
                                scale, self.cross.max_source_len)
        if mode is None:
            raise RuntimeError("the engine's attention was called outside an engine forward")
        self.cross.store(i, self.slots, key, value)
        return self._attend(query, key, value, prefix_k, prefix_v, prefix_index, scale, self.source_mask,
                            causal=False)

    def _attend(self, q, k, v, prefix_k, prefix_v, prefix_index, scale, key_mask, causal):
        """A prefill's attention over a block of keys (bottom-right causal or not; key_mask [n, K])."""
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        if prefix_k is not None:
            return prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index=prefix_index,
                                    key_padding_mask=key_mask, scale=scale, causal=causal,
                                    backend=self.prefill_backend)
        return plain_attention(q, k, v, scale, key_mask, causal)

    def _decode(self, q, k, v, seqlens, prefix_k, prefix_v, prefix_index, scale, max_seqlen):
        """One query per row over the first seqlens[b] keys of row b (and its prefix)."""
        if prefix_k is not None:
            return decode_attention(q, k, v, seqlens, prefix_k, prefix_v, prefix_index=prefix_index, scale=scale,
                                    backend=self.backend, max_seqlen=max_seqlen, workspace=self.cache.workspace)
        visible = torch.arange(k.shape[2], device=k.device)[None, :] < seqlens[:, None]
        return plain_attention(q, k, v, scale, visible, causal=False)


def plain_attention(q, k, v, scale, key_mask=None, causal=False):
    """SDPA for a site without a prefix: q [B, Hq, Sq, D], k/v [B, Hkv, K, D], key_mask [B, K]
    (True = a key of the row) and, when causal, query i at key K - Sq + i (bottom-right)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if key_mask is not None:
        mask = key_mask.to(torch.bool)[:, None, None, :]
    if causal and sq > 1:
        tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        mask = tri[None, None] if mask is None else mask & tri
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale)
