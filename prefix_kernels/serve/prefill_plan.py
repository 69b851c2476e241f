"""Which prompt tokens an engine step prefills, and how they are batched into forwards.

Pure functions of the requests being prefilled (each with `prompt_ids`, `prefilled` and
`submitted_at`) and the engine's settings; the engine (serve/engine.py) runs what they plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

# a prefill forward may pad its chunks to this many times their real tokens (and the prefill_chunk)
PREFILL_PADDING = 1.25


@dataclass
class Chunk:
    """`length` prompt tokens of `req` from position `start` on, prefilled in one forward."""
    req: Any
    start: int
    length: int


def plan_chunks(prefilling: Iterable, budget: int, hold_new: bool) -> list[Chunk]:
    """This step's chunks: prompts in admission order, `budget` tokens in all, a long prompt cut
    where the budget ends (it goes on next step); prompts not begun are skipped while hold_new."""
    chunks = []
    for req in prefilling:
        if budget == 0:
            break
        if hold_new and req.prefilled == 0:
            continue
        n = min(len(req.prompt_ids) - req.prefilled, budget)
        chunks.append(Chunk(req, req.prefilled, n))
        budget -= n
    return chunks


def plan_whole_prompts(prefilling: Iterable, budget: int, hold_new: bool) -> list[Chunk]:
    """As plan_chunks, for prompts that cannot be cut (an encoder attends over all of its input):
    whole prompts in admission order while they fit the budget, at least one (a longer prompt
    runs alone); none while hold_new (every prompt here is new)."""
    chunks = []
    if hold_new:
        return chunks
    for req in prefilling:
        n = len(req.prompt_ids)
        if chunks and n > budget:
            break
        chunks.append(Chunk(req, 0, n))
        budget -= n
    return chunks


def hold_new_prompts(prefilling: Iterable, decoding: bool, wait: float, prefill_chunk: int, now: float) -> bool:
    """Whether new prompts wait for more (an engine's prefill_wait): rows are decoding, the new
    prompts hold under prefill_chunk / 2 tokens and the oldest has waited less than `wait` seconds."""
    if wait <= 0 or not decoding:
        return False
    new = [r for r in prefilling if r.prefilled == 0]
    if not new or sum(len(r.prompt_ids) for r in new) >= prefill_chunk // 2:
        return False
    return now - min(r.submitted_at for r in new) < wait


def group_chunks(chunks: list[Chunk], prefill_chunk: int) -> list[list[Chunk]]:
    """Chunks batched per forward, longest first, right-padded to the longest of each forward:
    a chunk joins a forward while its padded tokens stay within the prefill_chunk, or within
    PREFILL_PADDING x its real tokens (at most PREFILL_PADDING x the prefill_chunk). Prompt starts
    and continuations share a forward (the cache then gives every row a window over its cached
    keys): each forward through the model's eager modules costs ~20-35 ms of host time on an H100
    whatever its size (probe_serve_host at 55e333b: 10 forwards per wave of 32 x 230 tokens, by
    kind and by width, took 350 of its 550 ms)."""
    groups: list[list[Chunk]] = []
    for chunk in sorted(chunks, key=lambda c: -c.length):
        group = groups[-1] if groups else None
        if group is not None:
            width, n = group[0].length, len(group) + 1
            real = sum(c.length for c in group) + chunk.length
            limit = max(prefill_chunk, PREFILL_PADDING * min(prefill_chunk, real))
            if n * width <= limit:
                group.append(chunk)
                continue
        groups.append([chunk])
    return groups
