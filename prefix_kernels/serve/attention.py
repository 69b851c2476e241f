"""The engine's attention: each patched layer stores its new keys in the KV cache, then attends
over its row's prefix and the cached keys.

Installed on the patched model with `integrations.transformers.set_attention_hook`. Decode runs
the decode kernel (`decode_attention`, one query per row over the slot's buffer, the cache's
workspace); a prefill chunk runs the fused op (`prefix_attention`, bottom-right causal, Sq <= Sk).
"""
from __future__ import annotations

from ..ops.decode import decode_attention
from ..ops.prefix_attention import prefix_attention
from .cache import Decode, KVCache


class CacheAttention:
    """hook(module, layer, query, key, value, prefix_k, prefix_v, prefix_index, scale) -> [B, Hq, S, D].

    backend: the decode kernel's ("auto", "cuda", "triton", "reference"); "auto" on a CPU cache is
    the reference, without the warning that `decode_attention` gives when it falls back.
    """

    def __init__(self, cache: KVCache, backend: str = "auto"):
        if backend == "auto" and cache.device.type == "cpu":
            backend = "reference"
        self.cache, self.backend = cache, backend
        self.prefill_backend = "auto" if backend in ("auto", "cuda") else backend

    def __call__(self, module, layer, query, key, value, prefix_k, prefix_v, prefix_index, scale):
        cache = self.cache
        mode = cache.mode
        k, v = cache.update(layer, key, value)      # raises outside a decode / prefill forward
        if prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
        if isinstance(mode, Decode):
            return decode_attention(query, k, v, mode.seqlens[:mode.batch], prefix_k, prefix_v,
                                    prefix_index=prefix_index, scale=scale, backend=self.backend,
                                    max_seqlen=cache.max_seq_len, workspace=cache.workspace)
        if k.dtype != query.dtype:
            k, v = k.to(query.dtype), v.to(query.dtype)
        return prefix_attention(query, k, v, prefix_k, prefix_v, prefix_index=prefix_index,
                                key_padding_mask=mode.key_mask, scale=scale, causal=True,
                                backend=self.prefill_backend)
