"""What every benchmark needs: the environment record, timing, a table, JSON and a plot."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def environment() -> dict:
    """GPU name, versions and git commit, stored beside every figure."""
    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()})",
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
    }
    from importlib.metadata import PackageNotFoundError, version

    for name in ("triton", "transformers", "peft", "nvidia-cudnn-frontend"):
        try:
            env[name] = version(name)         # without importing it (peft alone takes seconds)
        except PackageNotFoundError:
            env[name] = None
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    # the switches that choose what ran (PREFIX_KERNELS_ATTENTION=split, ..._AUTOTUNE=0, ...):
    # a figure without them cannot be traced to the path it measured
    env["settings"] = {k: v for k, v in sorted(os.environ.items())
                       if k.startswith("PREFIX_KERNELS_") and k not in ("PREFIX_KERNELS_GIT_COMMIT",
                                                                         "PREFIX_KERNELS_RESULTS")}
    return env


def git_commit() -> str:
    """The commit measured. PREFIX_KERNELS_GIT_COMMIT wins: the device machine gets a copy of the
    working tree whose .git can be stale (it reported the session's first commit, '-dirty')."""
    if os.environ.get("PREFIX_KERNELS_GIT_COMMIT"):
        return os.environ["PREFIX_KERNELS_GIT_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return "unknown (an installed package, not a checkout)"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_slug(env: dict) -> str:
    name = env["device"].lower()
    for word in ("nvidia", "geforce"):
        name = name.replace(word, "")
    return "-".join(part for part in "".join(c if c.isalnum() else " " for c in name).split()) or "cpu"


def results_dir() -> Path:
    """Where results go: $PREFIX_KERNELS_RESULTS, else the checkout's benchmarks/results/, else
    (an installed package) ./prefix-kernels-results/."""
    checkout = Path(__file__).resolve().parents[2] / "benchmarks"
    here = checkout / "results" if checkout.is_dir() else Path.cwd() / "prefix-kernels-results"
    path = Path(os.environ.get("PREFIX_KERNELS_RESULTS", here))
    path.mkdir(parents=True, exist_ok=True)
    return path


def time_ms(fn, *, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None) -> float:
    """Median milliseconds of fn: CUDA events through do_bench on the GPU, a host clock on CPU."""
    if torch.cuda.is_available():
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                       return_mode="median")
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return sorted(times)[len(times) // 2]


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(name: str, payload: dict) -> Path:
    path = results_dir() / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def tinyllama_config(max_position_embeddings: int):
    """The TinyLlama-1.1B shape (ANCHORS.md), built from a config: random weights, no download."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4,
                       max_position_embeddings=max_position_embeddings)


def tiny_llama_config(max_position_embeddings: int):
    """The --quick runs' model: a 2-layer Llama small enough for a CPU smoke run."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=max_position_embeddings)


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """Every benchmark's argument parser: `prefix-kernels bench NAME`, its docstring as the
    description, defaults shown in --help."""
    from ..cli_common import parser as cli_parser

    return cli_parser(prog, doc)


_BENCH_EXTRA = "(pip install 'prefix-kernels[bench]')"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a one-line note) when it is missing:
    plotting is the `bench` extra, not a dependency of the kernels."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no plot {_BENCH_EXTRA}", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path) -> None:
    """The end of every plot: tight layout, 120 dpi PNG, figure closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class _PlainProgress:
    """What the benchmarks use of tqdm, when tqdm is missing: iterate, a postfix, write a line."""

    def __init__(self, iterable, **_):
        self._iterable = iterable

    def __iter__(self):
        return iter(self._iterable)

    def set_postfix_str(self, _text: str) -> None:
        pass

    @staticmethod
    def write(line: str, file=None) -> None:
        print(line, file=file or sys.stderr)

    def close(self) -> None:
        pass


def progress(iterable, **kwargs):
    """A tqdm progress bar over iterable, or a plain iterator when tqdm (the `bench` extra) is missing."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(f"tqdm is not installed: no progress bar {_BENCH_EXTRA}", file=sys.stderr)
        return _PlainProgress(iterable)
    return tqdm(iterable, **kwargs)
