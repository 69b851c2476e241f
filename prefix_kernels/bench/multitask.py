"""N tasks trained in one run against the same tasks one after another
(`prefix-kernels bench training --multitask`).

Each task has its own data (a Markov chain of its own, as in the loss-curve benchmark) and its own
prefix. Both ways every task takes the same T optimizer steps on the same rows:
  one run        T steps whose batches hold B/N rows of every task (B rows): each row's prefix is
                 picked by prefix_ids, one pass of the frozen model per step
  one by one     N runs of T steps of B/N rows (patch, train, unpatch), one task after another
AdamW without clipping does not see the gradient's scale, so each prefix follows the same path
both ways: the per-task losses should agree; the wall time and tokens/s are what differ (timed:
the T steps after `--warmup` untimed ones of every run, patching excluded). TinyLlama-1.1B shape,
bf16, on the GPU; --quick: a tiny model on the CPU.
Writes multitask[-quick].json and .png.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

from . import common
from .training_curves import markov_batches

LR = 1e-2


def _row_losses(model, ids, prefix_ids=None) -> torch.Tensor:
    """[B] next-token loss of each row (every row has the same length)."""
    extra = {} if prefix_ids is None else {"prefix_ids": prefix_ids}
    logits = model(input_ids=ids, **extra).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2).float(), ids[:, 1:],
                                             reduction="none").mean(1)


def _initial_prefixes(cfg, tasks: int, prefix_len: int) -> list[torch.Tensor]:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    gen = torch.Generator().manual_seed(11)
    return [torch.randn(cfg.num_hidden_layers, 2, cfg.num_key_value_heads, prefix_len, head_dim, generator=gen)
            for _ in range(tasks)]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one_run(model, data, inits, prefix_len, warmup, device) -> dict:
    """Every task in each batch; per-task losses of each step."""
    import prefix_kernels as pk

    n = len(data)
    bank = pk.patch_model(model, prefix_len, names=[f"task{t}" for t in range(n)], init="zeros")
    for t, init in enumerate(inits):
        bank.set_entry(t, init)
    rows_per_task = data[0][0].shape[0]
    prefix_ids = torch.arange(n, device=device).repeat_interleave(rows_per_task)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=LR)
    losses = [[] for _ in range(n)]
    for step in range(len(data[0])):
        if step == warmup:                   # compiled and autotuned: the timed part starts here
            _sync(device)
            start = time.perf_counter()
        ids = torch.cat([task[step] for task in data]).to(device)
        per_row = _row_losses(model, ids, prefix_ids)
        per_row.mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for t, value in enumerate(per_row.detach().view(n, rows_per_task).mean(1).tolist()):
            losses[t].append(value)
    _sync(device)
    seconds = time.perf_counter() - start
    pk.unpatch_model(model)
    return {"way": "one run", "seconds": seconds, "losses": [l[warmup:] for l in losses]}


def one_by_one(model, data, inits, prefix_len, warmup, device) -> dict:
    """Each task in its own run, one after another; each run's first `warmup` steps untimed, as
    in one_run."""
    import prefix_kernels as pk

    losses, seconds = [], 0.0
    for task, init in zip(data, inits):
        bank = pk.patch_model(model, prefix_len, init=init)
        optimizer = torch.optim.AdamW(bank.parameters(), lr=LR)
        mine = []
        for step, ids in enumerate(task):
            if step == warmup:
                _sync(device)
                start = time.perf_counter()
            loss = _row_losses(model, ids.to(device)).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mine.append(loss.item())
        _sync(device)
        seconds += time.perf_counter() - start
        pk.unpatch_model(model)
        losses.append(mine[warmup:])
    return {"way": "one by one", "seconds": seconds, "losses": losses}


def plot(rows, path) -> bool:
    plt = common.pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].bar([r["way"] for r in rows], [r["seconds"] for r in rows], color=["tab:green", "tab:gray"])
    axes[0].set_ylabel("wall-clock seconds (lower is better)")
    axes[0].set_title(f"{len(rows[0]['losses'])} tasks, the same steps and rows per task")
    for r, style in zip(rows, ("-", "--")):
        for t, losses in enumerate(r["losses"]):
            axes[1].plot(losses, style, color=f"C{t}", label=f"task {t}, {r['way']}" if t < 3 else None)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("training loss per task")
    axes[1].set_title("per-task loss: the same both ways")
    axes[1].legend(fontsize=7)
    common.save_figure(fig, path)
    return True


def main(args) -> int:
    """`prefix-kernels bench training --multitask` (the parsed arguments of bench/training.py)."""
    from transformers import AutoModelForCausalLM

    quick = args.quick
    if not quick and not torch.cuda.is_available():
        print("bench training --multitask: no CUDA GPU; add --quick for a CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if quick else "cuda")
    dtype = torch.float32 if quick else torch.bfloat16
    tasks = args.tasks or (2 if quick else 8)
    steps = args.steps or (3 if quick else 30)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    rows_per_task, seq, prefix_len = (2, 32, 4) if quick else (4, 512, 32)
    cfg = common.tiny_llama_config(256) if quick else common.tinyllama_config(2048)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype).train()
    data = [markov_batches(cfg.vocab_size, steps + warmup, rows_per_task, seq, seed=100 + t) for t in range(tasks)]
    inits = _initial_prefixes(cfg, tasks, prefix_len)
    env = common.environment()
    rows = []
    print(f"model and data ready ({tasks} tasks x {steps + warmup} steps)", flush=True)
    for way in (one_run, one_by_one):
        rows.append(way(model, data, inits, prefix_len, warmup, device))
        print(f"{rows[-1]['way']}: {rows[-1]['seconds']:.2f} s timed", flush=True)     # a cut run shows how far it got
        gc.collect()
    tokens = tasks * steps * rows_per_task * seq
    for r in rows:
        r["tokens_per_s"] = tokens / r["seconds"]
        r["final_loss_mean"] = sum(l[-1] for l in r["losses"]) / tasks
    gap = max(abs(a - b) for la, lb in zip(rows[0]["losses"], rows[1]["losses"]) for a, b in zip(la, lb))
    verdict = (f"{tasks} tasks x {steps} steps x {rows_per_task} rows of {seq} tokens: one run {rows[0]['seconds']:.2f} s "
               f"({rows[0]['tokens_per_s']:,.0f} tokens/s), one by one {rows[1]['seconds']:.2f} s "
               f"({rows[1]['tokens_per_s']:,.0f} tokens/s): {rows[1]['seconds'] / rows[0]['seconds']:.2f}x faster in "
               f"one run; per-task losses differ by at most {gap:.2e}")
    print(common.format_table([{"way": r["way"], "seconds": f"{r['seconds']:.2f}", "tokens/s": f"{r['tokens_per_s']:,.0f}",
                                "final loss (mean of tasks)": f"{r['final_loss_mean']:.4f}"} for r in rows],
                              ["way", "seconds", "tokens/s", "final loss (mean of tasks)"]))
    print(verdict)
    out = common.results_dir() if args.out is None else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("multitask-quick.json" if quick else "multitask.json")
    path.write_text(json.dumps({"benchmark": "multitask training", "dtype": str(dtype), "tasks": tasks, "steps": steps,
                                "warmup": warmup, "rows_per_task": rows_per_task, "seq": seq, "prefix_len": prefix_len,
                                "lr": LR, "environment": env, "results": rows, "max_loss_gap": gap,
                                "verdict": verdict}, indent=1))
    print(f"wrote {path}")
    if plot(rows, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return 0
