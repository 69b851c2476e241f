"""The engine's KV cache: fixed buffers that store each slot's keys and values, nothing more.

k, v: [layers, slots, Hkv, max_seq_len, D] (after rotary, before any GQA repeat). The engine
tells the cache what the next forward is, and where its tokens go, by one explicit call:

    with cache.decoding(batch, positions, seqlens):     # one new token in slots 0..batch-1
        model(...)
    with cache.prefilling(slots, starts, lengths):      # a chunk of prompt per listed slot
        model(...)

and every layer's attention (serve/attention.py) calls `update(layer, key, value)`, which stores
the new tokens and returns the keys and values to attend over. Positions reach the cache only
through those calls. The decode inputs are the caller's device tensors, read by the kernels
without a host sync, so a captured CUDA graph replays them: pass the same tensors every step.
The cache also owns the decode kernel's workspace (made once here, before any capture).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.decode import DecodeWorkspace


@dataclass
class Decode:
    """One new token per slot 0..batch-1: slot b's goes to positions[b]; it sees seqlens[b] keys."""
    batch: int
    positions: torch.Tensor      # [>= batch] int64, device
    seqlens: torch.Tensor        # [>= batch] int, device


@dataclass
class Prefill:
    """A chunk of prompt per row: row i holds lengths[i] tokens of slot slots[i] from position
    starts[i] on, right-padded to the forward's width (padding is never stored)."""
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    # device index tensors, made once per forward and shared by every layer
    slot_index: torch.Tensor = None     # [n, 1] slots[i], for gathering windows
    rows: torch.Tensor = None           # [T] row of each real token in the forward's batch
    cols: torch.Tensor = None           # [T] its column in the chunk
    token_slots: torch.Tensor = None    # [T] its slot
    token_pos: torch.Tensor = None      # [T] its position
    window: Optional[torch.Tensor] = None      # [n, K] cache positions each row attends over
    key_mask: Optional[torch.Tensor] = None    # [n, K] uint8, 1 = position >= 0 (a real key)


class KVCache:
    """K and V of `slots` rows of up to `max_seq_len` tokens for each of `num_layers` layers."""

    def __init__(self, num_layers, slots, num_kv_heads, max_seq_len, head_dim, *, num_q_heads, dtype,
                 device):
        shape = (num_layers, slots, num_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_seq_len = slots, max_seq_len
        self.device = self.k.device
        self._slot_ids = torch.arange(slots, device=device)
        # the decode kernel's scratch: made here once, so captured graphs read its fixed address
        self.workspace = DecodeWorkspace(device, slots, num_q_heads, num_kv_heads)
        self.mode: Decode | Prefill | None = None

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # -- modes ---------------------------------------------------------------------------------

    def begin_decode(self, batch: int, positions: torch.Tensor, seqlens: torch.Tensor) -> None:
        """The next forward decodes one token in each of slots 0..batch-1 (device inputs)."""
        if not 1 <= batch <= self.slots:
            raise ValueError(f"decode batch {batch} outside 1..{self.slots} slots")
        for name, t in (("positions", positions), ("seqlens", seqlens)):
            if t.device != self.device or t.dim() != 1 or t.shape[0] < batch:
                raise ValueError(f"{name} must be a 1-D tensor of >= {batch} entries on {self.device}, got "
                                 f"{tuple(t.shape)} on {t.device}")
        self._begin(Decode(batch, positions, seqlens))

    def begin_prefill(self, slots, starts, lengths) -> None:
        """The next forward holds, in row i, lengths[i] prompt tokens of slot slots[i] at positions
        starts[i].. (right-padded to the forward's width). Lists of ints, known on the host."""
        slots, starts, lengths = [int(s) for s in slots], [int(s) for s in starts], [int(n) for n in lengths]
        if not slots or not len(slots) == len(starts) == len(lengths):
            raise ValueError("begin_prefill needs one start and one length per slot")
        for s, a, n in zip(slots, starts, lengths):
            if not (0 <= s < self.slots and a >= 0 and n >= 1 and a + n <= self.max_seq_len):
                raise ValueError(f"prefill of slot {s}, positions {a}..{a + n - 1}: outside the cache "
                                 f"({self.slots} slots of {self.max_seq_len} positions)")
        mode = Prefill(slots, starts, lengths)
        rows = [i for i, n in enumerate(lengths) for _ in range(n)]
        cols = [c for n in lengths for c in range(n)]
        dev = lambda x: torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)  # noqa: E731
        mode.slot_index = dev(slots)[:, None]
        mode.rows, mode.cols = dev(rows), dev(cols)
        mode.token_slots = dev([slots[i] for i in rows])
        mode.token_pos = dev([starts[i] + c for i, c in zip(rows, cols)])
        if any(starts):
            # rows continue earlier chunks: row i attends over the cache positions that put its
            # query c at key index K - width + c (the kernels' bottom-right causal alignment)
            width, ahead = max(lengths), max(starts)
            pos = torch.tensor(starts, dtype=torch.long)[:, None] - ahead + torch.arange(ahead + width)[None]
            # uint8: the form prefix_attention's kernels read (no conversion per layer)
            mode.key_mask = (pos >= 0).to(torch.uint8).to(self.device, non_blocking=True)
            mode.window = pos.clamp(0, self.max_seq_len - 1).to(self.device, non_blocking=True)
        self._begin(mode)

    def end(self) -> None:
        self.mode = None

    @contextlib.contextmanager
    def decoding(self, batch, positions, seqlens):
        self.begin_decode(batch, positions, seqlens)
        try:
            yield self
        finally:
            self.end()

    @contextlib.contextmanager
    def prefilling(self, slots, starts, lengths):
        self.begin_prefill(slots, starts, lengths)
        try:
            yield self
        finally:
            self.end()

    def _begin(self, mode):
        if self.mode is not None:
            raise RuntimeError(f"the KV cache is already in a {type(self.mode).__name__.lower()} forward")
        self.mode = mode

    # -- storing -------------------------------------------------------------------------------

    def update(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Store one layer's new keys/values [B, Hkv, S, D]; return what the layer attends over.

        Decode: (k, v) [batch, Hkv, max_seq_len, D], the slots' whole buffers (the valid length
        of each is the mode's seqlens). Prefill: (k, v) [n, Hkv, K, D] with K >= the chunk's width,
        aligned so that the chunk's query c of row i sits at key index K - width + c; keys where
        the mode's key_mask is 0 are not the row's.
        """
        mode = self.mode
        k_layer, v_layer = self.k[layer], self.v[layer]
        key, value = key.to(k_layer.dtype), value.to(k_layer.dtype)
        if isinstance(mode, Decode):
            slots, pos = self._slot_ids[:mode.batch], mode.positions[:mode.batch]
            k_layer[slots, :, pos] = key[:, :, 0]         # [B, Hkv, D] at (slot, :, position)
            v_layer[slots, :, pos] = value[:, :, 0]
            return k_layer[:mode.batch], v_layer[:mode.batch]
        if isinstance(mode, Prefill):
            # [T, Hkv, D] real tokens only: the padding of short rows is never stored
            k_layer[mode.token_slots, :, mode.token_pos] = key[mode.rows, :, mode.cols]
            v_layer[mode.token_slots, :, mode.token_pos] = value[mode.rows, :, mode.cols]
            if mode.window is None:
                # every row starts its prompt here: its own new keys are all it sees
                return key, value
            slots = mode.slot_index
            return (k_layer[slots, :, mode.window].transpose(1, 2),    # [n, K, Hkv, D] -> [n, Hkv, K, D]
                    v_layer[slots, :, mode.window].transpose(1, 2))
        raise RuntimeError("the KV cache was called outside an engine forward (begin_decode / "
                           "begin_prefill first)")
