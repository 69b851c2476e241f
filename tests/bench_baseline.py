"""Compare a pytest-benchmark result with the saved baseline (tests/benchmarks/host-baseline.json).

Host-side costs (Python dispatch, per-step bookkeeping) regress silently: a test fails when the
fastest round of a benchmark is more than TOLERANCE times its baseline. In-process work is timed
in CPU time of this process (`use_cpu_time`): on a shared 2-core machine, wall time waiting for a
core said nothing (37x between two runs of the same code here); the fastest round, not the mean,
because other processes only ever add time. The default tolerance (4x) is wide for what noise is
left; PREFIX_KERNELS_BENCH_TOLERANCE overrides it.
Record a baseline (each recording keeps the lower of the saved and the new figure; =reset
replaces them) with:
    PREFIX_KERNELS_BENCH_UPDATE=1 TRITON_INTERPRET=1 python3 -m pytest -q tests/test_host_overhead.py
With --benchmark-disable (or --benchmark-skip) nothing is measured and nothing compared.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

BASELINE = Path(__file__).with_name("benchmarks") / "host-baseline.json"
TOLERANCE = float(os.environ.get("PREFIX_KERNELS_BENCH_TOLERANCE", "4"))


def use_cpu_time(benchmark) -> None:
    """Time the benchmark in this process's CPU time (threads included) instead of wall time."""
    benchmark._timer = time.process_time          # pytest-benchmark's timer (private, stable since 3.x)
    benchmark.extra_info["timer"] = "process_time"


def _load() -> dict:
    return json.loads(BASELINE.read_text()) if BASELINE.is_file() else {"benchmarks": {}}


def check_against_baseline(benchmark, name: str) -> None:
    """Fail when benchmark `name` got slower than TOLERANCE x its saved fastest round."""
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return
    fastest_us = benchmark.stats.stats.min * 1e6
    benchmark.extra_info["fastest_us"] = round(fastest_us, 2)
    update = os.environ.get("PREFIX_KERNELS_BENCH_UPDATE")
    if update in ("1", "reset"):
        data = _load()
        saved = data["benchmarks"].get(name)
        if update == "1" and saved is not None:
            fastest_us = min(fastest_us, saved)
        data["recorded"] = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
                            "cpus": os.cpu_count(), "python": platform.python_version()}
        data["statistic"] = "fastest round, microseconds per call"
        data["benchmarks"][name] = round(fastest_us, 2)
        BASELINE.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    base = _load()["benchmarks"].get(name)
    if base is None:
        pytest.fail(f"no baseline for {name!r} in {BASELINE.name}: record it with PREFIX_KERNELS_BENCH_UPDATE=1")
    benchmark.extra_info["baseline_us"] = base
    assert fastest_us <= TOLERANCE * base, (
        f"{name}: {fastest_us:.1f} us per call, over {TOLERANCE:g}x its baseline of {base:.1f} us "
        f"({BASELINE.name}): a host-side regression, or a much slower machine")
