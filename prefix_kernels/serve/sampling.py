"""Sampling parameters and batched sampling on the device.

Each row samples by the Gumbel-max trick with noise from a counter-based hash of
(seed, step, token id): a request's tokens depend only on its own seed and logits, never on the
batch it shares a step with, and the whole batch samples in a handful of kernels (no per-row
generator, no host sync). temperature 0 is greedy (argmax).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 64) - 1


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


@dataclass
class SamplingParams:
    """How one request samples and when it stops.

    temperature: 0 = greedy; top_k: 0 = off; top_p: 1.0 = off; seed: None = drawn at submit.
    max_tokens: generated tokens at most; stop: strings that end the text (not included);
    ignore_eos: keep going past the end-of-sequence token (benchmarks).
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        checks = [(self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
                  (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
                  (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
                  (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.seed is None:
            self.seed = random.getrandbits(63)
        self.seed = int(self.seed) & ((1 << 63) - 1)

    @property
    def greedy(self) -> bool:
        """Temperature 0: the most likely token every step."""
        return self.temperature == 0


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 on int64 tensors (multiplication wraps; shifts made logical by masking)."""
    z = z + _GOLDEN
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX1
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX2
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, vocab] float32 in (0, 1), a pure function of (seed[b], step[b], token id)."""
    base = _splitmix(_splitmix(seeds) ^ steps)
    z = _splitmix(base[:, None] + torch.arange(vocab, device=seeds.device, dtype=torch.int64)[None])
    top24 = (z >> 40) & ((1 << 24) - 1)
    return (top24.to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, steps: torch.Tensor, *, any_sampled: bool, any_filtered: bool) -> torch.Tensor:
    """Next token of each row: [B] int64 on the logits' device.

    logits [B, V]; temperature, top_p [B] float32; top_k, seeds, steps [B] int64 (device tensors).
    any_sampled / any_filtered (known on the host) skip the work when every row is greedy / unfiltered.
    """
    greedy = logits.argmax(dim=-1)
    if not any_sampled:
        return greedy
    scaled = logits.float() / temperature.clamp_min(1e-6)[:, None]
    if any_filtered:
        vocab = scaled.shape[-1]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs          # mass of the tokens ranked above
        rank = torch.arange(vocab, device=logits.device)[None]
        k = torch.where(top_k > 0, top_k, vocab)[:, None]
        drop = (before >= top_p[:, None]) | (rank >= k)
        drop[:, 0] = False                             # the top token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, scaled.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)
