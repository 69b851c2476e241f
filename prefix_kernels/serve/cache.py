"""The engine's static KV cache: fixed per-layer buffers and the attention hook that fills them.

Installed with `set_attention_hook`, it replaces the patched model's attention: every layer
writes its new keys/values (after rotary, before GQA repeat) into [slots, Hkv, Smax, D] buffers
at per-row positions and attends over the row's prefix + cached keys. Every input of a decode
step lives in a tensor at a fixed address (positions, lengths, the rows' bank entries), so a
captured CUDA graph replays it; the prefill writes whole prompts into their slots eagerly.
"""
from __future__ import annotations

import torch

from ..ops.decode import DecodeWorkspace, decode_attention
from ..ops.prefix_attention import prefix_attention


class StaticKVCache:
    """K and V of `slots` rows of up to `max_seq_len` tokens for each of `num_layers` layers.

    Modes (set by the engine before a forward):
      "decode": one new token per row for rows 0..B-1; `positions[b]` is where row b's token
          goes, `seqlens[b]` = positions[b] + 1 the keys it sees (both device tensors, read by
          the kernels: no host sync, graph-capturable).
      "prefill": right-padded prompts [B, S] into the slots `prefill_slots` ([B] device tensor),
          positions 0..S-1 (padding lands past the prompt, where decode overwrites it).
    """

    def __init__(self, num_layers, slots, num_kv_heads, max_seq_len, head_dim, *, num_q_heads, dtype,
                 device, backend="auto"):
        shape = (num_layers, slots, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        if backend == "auto" and torch.device(device).type == "cpu":
            backend = "reference"       # what "auto" picks on the CPU, without its warning
        self.max_seq_len, self.backend = max_seq_len, backend
        self.rows = torch.arange(slots, device=device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=device)
        self.seqlens = torch.ones(slots, dtype=torch.long, device=device)
        self.prefill_slots = None
        self.mode = None
        # the decode kernel's scratch, made here once: captured graphs read its fixed address
        self.workspace = DecodeWorkspace(device, slots, num_q_heads, num_kv_heads)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def __call__(self, module, layer, query, key, value, prefix_k, prefix_v, prefix_index, scale):
        k_cache, v_cache = self.k[layer], self.v[layer]
        key, value = key.to(k_cache.dtype), value.to(k_cache.dtype)
        if prefix_k.dtype != query.dtype:
            prefix_k, prefix_v = prefix_k.to(query.dtype), prefix_v.to(query.dtype)
        if self.mode == "decode":
            batch = query.shape[0]
            rows, pos = self.rows[:batch], self.positions[:batch]
            k_cache[rows, :, pos] = key[:, :, 0]         # [B, Hkv, D] at (row, :, position)
            v_cache[rows, :, pos] = value[:, :, 0]
            return decode_attention(query, k_cache[:batch], v_cache[:batch], self.seqlens[:batch], prefix_k,
                                    prefix_v, prefix_index=prefix_index, scale=scale, backend=self.backend,
                                    max_seqlen=self.max_seq_len, workspace=self.workspace)
        if self.mode == "prefill":
            seq = key.shape[2]
            k_cache[self.prefill_slots, :, :seq] = key
            v_cache[self.prefill_slots, :, :seq] = value
            # right padding: a real query never sees the padding after it (causal), so no mask
            return prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index=prefix_index,
                                    scale=scale, causal=True,
                                    backend="auto" if self.backend in ("auto", "cuda") else self.backend)
        raise RuntimeError("the engine's KV cache was called outside an engine step (mode not set)")
