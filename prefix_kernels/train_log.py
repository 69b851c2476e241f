"""What `prefix-kernels train` reports: the learning-rate schedule, JSON-lines and TensorBoard logs,
and the progress bar. Only the main process writes."""
from __future__ import annotations

import json
import math
import os
import sys
import time

SCHEDULES = ("cosine", "linear", "constant")


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based): linear warm-up
    over `warmup` steps from 1/(warmup+1) to 1, then `schedule` down to 0 at `total` (or flat)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class RunLog:
    """Scalars per step to out/log.jsonl (appended: a resumed run continues the file) and, when
    the `tensorboard` package is present, to out/tb/ through torch.utils.tensorboard."""

    def __init__(self, out: str, enabled: bool = True, tensorboard: bool = True, note=None):
        self.enabled = enabled
        self.path = os.path.join(out, "log.jsonl")
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(out, "tb"))
            except ImportError:        # torch's writer needs the tensorboard package
                (note or _note)("TensorBoard logs off: the `tensorboard` package is not installed "
                                "(pip install tensorboard); JSON lines go to " + self.path)
        self._start = time.time()

    def write(self, step: int, **scalars) -> None:
        """One JSON line {"step", "time", **scalars}; nested dicts (per-task losses) are flattened
        as name/key in TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._start, 3), **scalars}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                if isinstance(value, dict):
                    for sub, v in value.items():
                        if isinstance(v, (int, float)):
                            self._tb.add_scalar(f"{key}/{sub}", v, step)
                elif isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class _LinePrinter:
    """The progress bar's stand-in without tqdm: a line every `every` steps (0: silent)."""

    def __init__(self, total: int, initial: int, every: int = 25):
        self.n, self.total, self.every = initial, total, every
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every and (self.n % self.every == 0 or self.n == self.total):
            print(f"train {self.n}/{self.total} {self._postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **values) -> None:
        self._postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int, enabled: bool, note=None):
    """A tqdm bar over the optimizer steps, a line every 25 steps without tqdm, or nothing."""
    if not enabled:
        return _LinePrinter(total, initial, every=0)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        (note or _note)("tqdm is not installed: progress as plain lines (pip install 'prefix-kernels[bench]')")
        return _LinePrinter(total, initial)
    return tqdm(total=total, initial=initial, desc="train", file=sys.stderr)
