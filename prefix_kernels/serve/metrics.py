"""Prometheus metrics of the server, in the text exposition format (no client library needed).

Updated from the event loop's thread only, so no locks; the engine's gauges (queue depth,
running rows) are read when scraped.
"""
from __future__ import annotations

import bisect
import time
from collections import deque

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
RATE_WINDOW_S = 10.0
PREFIX = "prefix_kernels"


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)     # the last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip(self.buckets + (float("inf"),), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {total}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    """Counters, gauges and histograms of one server."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}        # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self._buckets: deque[list] = deque()         # [start time, tokens] per quarter second
        self._born = time.monotonic()

    def request_done(self, endpoint: str, status: int, latency_s: float, prompt_tokens: int = 0) -> None:
        key = (endpoint, int(status))
        self.requests[key] = self.requests.get(key, 0) + 1
        self.prompt_tokens += prompt_tokens
        if status == 200 and endpoint in ("completions", "chat"):
            self.latency.observe(latency_s)

    def tokens(self, n: int) -> None:
        """n more completion tokens delivered."""
        self.completion_tokens += n
        now = time.monotonic()
        buckets = self._buckets
        if buckets and now - buckets[-1][0] < 0.25:
            buckets[-1][1] += n
        else:
            buckets.append([now, n])
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._buckets and now - self._buckets[0][0] > RATE_WINDOW_S:
            self._buckets.popleft()

    def tokens_per_s(self) -> float:
        """Completion tokens per second over the last RATE_WINDOW_S seconds (or the uptime)."""
        now = time.monotonic()
        self._trim(now)
        span = max(min(RATE_WINDOW_S, now - self._born), 0.25)
        return sum(n for _, n in self._buckets) / span

    def render(self, engine, connections: int, in_flight: int, draining: bool) -> str:
        p = PREFIX
        lines = [
            f"# HELP {p}_queue_depth Requests waiting for a batch slot.", f"# TYPE {p}_queue_depth gauge",
            f"{p}_queue_depth {engine.num_waiting}",
            f"# HELP {p}_running_rows Requests in the running batch.", f"# TYPE {p}_running_rows gauge",
            f"{p}_running_rows {engine.num_active}",
            f"# HELP {p}_max_batch Batch slots.", f"# TYPE {p}_max_batch gauge", f"{p}_max_batch {engine.max_batch}",
            f"# HELP {p}_requests_in_flight Generation requests being served over HTTP.",
            f"# TYPE {p}_requests_in_flight gauge", f"{p}_requests_in_flight {in_flight}",
            f"# HELP {p}_http_connections Open HTTP connections.", f"# TYPE {p}_http_connections gauge",
            f"{p}_http_connections {connections}",
            f"# HELP {p}_draining 1 while the server drains before exiting.", f"# TYPE {p}_draining gauge",
            f"{p}_draining {int(draining)}",
            f"# HELP {p}_prefill_forwards_total Prefill forwards run (each stalls the decoding rows).",
            f"# TYPE {p}_prefill_forwards_total counter",
            f"{p}_prefill_forwards_total {getattr(engine, 'prefill_forwards', 0)}",
            f"# HELP {p}_prompt_tokens_total Prompt tokens of finished requests.",
            f"# TYPE {p}_prompt_tokens_total counter", f"{p}_prompt_tokens_total {self.prompt_tokens}",
            f"# HELP {p}_completion_tokens_total Completion tokens generated for HTTP requests.",
            f"# TYPE {p}_completion_tokens_total counter", f"{p}_completion_tokens_total {self.completion_tokens}",
            f"# HELP {p}_tokens_per_second Completion tokens per second over the last {RATE_WINDOW_S:.0f} s.",
            f"# TYPE {p}_tokens_per_second gauge", f"{p}_tokens_per_second {self.tokens_per_s():.3f}",
            f"# HELP {p}_time_to_first_token_seconds From a request's arrival to its first token.",
            f"# TYPE {p}_time_to_first_token_seconds histogram",
            *self.ttft.lines(f"{p}_time_to_first_token_seconds"),
            f"# HELP {p}_request_latency_seconds From arrival to the last byte, successful generations.",
            f"# TYPE {p}_request_latency_seconds histogram",
            *self.latency.lines(f"{p}_request_latency_seconds"),
            f"# HELP {p}_requests_total HTTP requests by endpoint and status.", f"# TYPE {p}_requests_total counter",
        ]
        for (endpoint, status), n in sorted(self.requests.items()):
            lines.append(f'{p}_requests_total{{endpoint="{endpoint}",status="{status}"}} {n}')
        return "\n".join(lines) + "\n"
