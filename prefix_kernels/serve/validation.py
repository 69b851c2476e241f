"""Bounds of a request (its prompt ids and sampling parameters), checked at submit so that one
bad request fails alone, with a message naming the field, instead of failing the batch it would
join. The engine and its process's front (serve/remote.py) check with the same function."""
from __future__ import annotations

import math
from numbers import Integral, Real

from .request import PromptTooLong

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _integer(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_sampling_params(params, vocab_size: int) -> None:
    """Raise ValueError unless every field of `params` (a SamplingParams) is in range:
    temperature finite >= 0, top_p finite in (0, 1], top_k an integer in 0..vocab_size,
    max_tokens an integer >= 1, seed an int64, stop a list of strings."""
    t = params.temperature
    if not (_real(t) and math.isfinite(t) and t >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
    p = params.top_p
    if not (_real(p) and math.isfinite(p) and 0 < p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    k = params.top_k
    if not (_integer(k) and 0 <= k <= vocab_size):
        raise ValueError(f"top_k must be an integer in 0..{vocab_size} (the vocabulary; 0 = off), "
                         f"got {_short(k)}")
    n = params.max_tokens
    if not (_integer(n) and n >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {_short(n)}")
    seed = params.seed
    if not (_integer(seed) and INT64_MIN <= seed <= INT64_MAX):
        raise ValueError(f"seed must be an integer in [-2**63, 2**63), got {_short(seed)}")
    stop = params.stop
    if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)):
        raise ValueError(f"stop must be a list of strings, got {type(stop).__name__}")


def check_request(ids, params, vocab_size: int, max_prompt_len: int, has_tokenizer: bool,
                  bound: str = "max_seq_len") -> None:
    """Raise ValueError (PromptTooLong, naming the engine's `bound`, for a prompt over
    max_prompt_len tokens) unless `ids` is a prompt the engine can take and `params` are in range
    (check_sampling_params)."""
    if not ids:
        raise ValueError("the prompt is empty")
    bad = [i for i in ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {vocab_size}")
    if len(ids) > max_prompt_len:
        raise PromptTooLong(len(ids), max_prompt_len, bound)
    check_sampling_params(params, vocab_size)
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need a tokenizer")


def _short(value) -> str:
    if _integer(value) and abs(value) >= 1 << 64:      # repr of a huge int can itself raise
        return f"an integer of {int(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
