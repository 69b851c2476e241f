"""CUDA graphs of a decode step, one per key (batch bucket, sampling variant), one memory pool.

The recipe: warm the function up on a side stream (compiles kernels, creates per-stream state such
as the decode kernel's counters), capture one call on that stream, then replay it with its
inputs written in place into the tensors it was captured with. Capture the largest batch first:
later graphs reuse the pool's blocks.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable

import torch


class GraphCache:
    """Captured graphs of zero-argument callables, keyed by the caller (say (batch, sampling))."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, Any]] = {}
        self._pool = None
        self._stream = None

    def __contains__(self, key) -> bool:
        return key in self._graphs

    def __len__(self) -> int:
        return len(self._graphs)

    def capture(self, key, fn: Callable[[], Any], *, preserve=(), warmups: int = 2) -> Any:
        """Capture fn() under `key`; returns its output tensors (rewritten by every replay).

        preserve: tensors fn() overwrites that are also its inputs (a step writing its next
        tokens into its token buffer): their contents are restored after the warm-up calls, so
        the first replay reads what the caller wrote. Warm-ups must otherwise be harmless to
        repeat (a decode step rewrites the same cache slots with the same values).
        """
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
            self._stream = torch.cuda.Stream(self.device)
        saved = [t.clone() for t in preserve]
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            for _ in range(warmups):
                fn()
            for t, s in zip(preserve, saved):
                t.copy_(s)
        current.wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads doing CPU work (an HTTP server tokenizing) must not
        # invalidate the capture
        with torch.cuda.graph(graph, pool=self._pool, stream=self._stream, capture_error_mode="thread_local"):
            out = fn()
        self._graphs[key] = (graph, out)
        return out

    def replay(self, key, fn: Callable[[], Any] | None = None, *, preserve=()) -> Any:
        """Replay the graph of `key` (capturing fn first if there is none yet); its outputs."""
        if key not in self._graphs:
            if fn is None:
                raise KeyError(f"no CUDA graph captured for {key!r}")
            self.capture(key, fn, preserve=preserve)
        graph, out = self._graphs[key]
        graph.replay()
        return out

    def clear(self) -> None:
        self._graphs.clear()
