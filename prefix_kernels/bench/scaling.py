"""Prefix training on several GPUs: DDP on 1 and 2 GPUs, FSDP2 against DDP at the same batch.

    NCCL_NVLS_ENABLE=0 python benchmarks/bench_scaling.py     # a machine with 2+ GPUs: every case
    python benchmarks/bench_scaling.py --quick                # tiny models, 2 gloo processes on the CPU

Each case runs in its own processes, started through torchrun's API (this script with --worker),
on a freshly built model (random weights from the config, bf16) patched with prefix-kernels. A
step is what `prefix-kernels train` does: forward, the token-mean loss of the global batch,
backward, the prefix gradients summed over GPUs (DDP's reducer, or an all-reduce of the bank
with FSDP2), AdamW on the bank. Per GPU: B8 S1024 P32, so N GPUs process N x 8 x 1024 tokens a step.
  tinyllama-1.1b  1 GPU: one process, no wrapper (what one GPU runs today)
                  2 GPUs: DDP
  llama-13b       2 GPUs: DDP (the 26 GB frozen base on each GPU) and FSDP2 (sharded: 13 GB each)
Tokens/s: global tokens over the mean step time (warm-up excluded, CUDA-synchronized; the
slowest rank). Per-GPU memory (the largest rank): 'weights' is what is allocated after setup (the
frozen base or its shard, the bank, buffers), 'peak' the max allocated over the timed steps.
Verdicts (the issue's): required 2-GPU DDP >= 1.8x one GPU (target 1.95x); FSDP2's weights per GPU
at most 0.55x DDP's (half, plus the replicated bank and buffers). Results: a table, JSON with the GPU
count, versions and commit, and a PNG under benchmarks/results/ (or $PREFIX_KERNELS_RESULTS).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

from prefix_kernels.bench import common

SHAPES = {"tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=8192),
          "llama-13b": dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                            num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)}
QUICK_SHAPES = {"tinyllama-1.1b": dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
                "llama-13b": dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)}
# (name, shape, GPUs, strategy); "none" = one process, nothing wrapped
CASES = [("1.1b-1gpu", "tinyllama-1.1b", 1, "none"), ("1.1b-2gpu-ddp", "tinyllama-1.1b", 2, "ddp"),
         ("13b-2gpu-ddp", "llama-13b", 2, "ddp"), ("13b-2gpu-fsdp", "llama-13b", 2, "fsdp")]
EXTRA = [("1.1b-2gpu-fsdp", "tinyllama-1.1b", 2, "fsdp")]


# -- one case, inside each torchrun process ----------------------------------------------------

def worker(args) -> None:
    from prefix_kernels import distributed as pd

    ctx = pd.setup("cpu" if args.quick else "cuda")
    try:
        row = measure(args, ctx)
    except BaseException:
        pd.teardown(ctx, failed=True)
        raise
    if ctx.main:
        with open(args.result, "w") as f:
            json.dump(row, f)
    pd.teardown(ctx)      # after measure's frame (and the DDP/FSDP wrapper in it) is gone


def measure(args, ctx) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import prefix_kernels as pk
    from prefix_kernels import distributed as pd
    from prefix_kernels.train import loss_sum

    cuda = ctx.device.type == "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    config = LlamaConfig(**(QUICK_SHAPES if args.quick else SHAPES)[args.shape])
    torch.manual_seed(0)
    with torch.device(ctx.device):      # build on the GPU: a CPU init of 13B weights takes minutes
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    bank = pk.patch_model(model, args.prefix_len)
    step_model = pd.wrap(model, ctx, "ddp" if args.strategy == "none" else args.strategy)
    optimizer = torch.optim.AdamW(list(bank.parameters()), lr=1e-4)
    model.train()
    gen = torch.Generator().manual_seed(1 + ctx.rank)           # each rank its own rows
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(ctx.device)
    count, scale = ctx.world * args.batch * (args.seq - 1), pd.loss_scale(ctx)

    def step():
        loss = loss_sum(step_model, ids, None, ids)
        (loss * (scale / count)).backward()
        pd.sync_gradients(bank, ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize(ctx.device)
        pd.barrier(ctx)

    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(ctx.device) / 2**30
        torch.cuda.reset_peak_memory_stats(ctx.device)
    for _ in range(args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = pd.all_max((time.perf_counter() - start) / args.steps, ctx)
    return {"case": args.case, "shape": args.shape, "gpus": ctx.world, "strategy": ctx.strategy,
           "batch_per_gpu": args.batch, "seq": args.seq, "prefix_len": args.prefix_len,
           "ms_per_step": seconds * 1e3, "tokens_per_s": ctx.world * args.batch * args.seq / seconds,
           "weights_gib": pd.all_max(weights, ctx) if cuda else None,
           "peak_gib": pd.all_max(torch.cuda.max_memory_allocated(ctx.device) / 2**30, ctx) if cuda else None,
           "frozen_gib_total": pd.frozen_bytes(model) / 2**30,     # a DTensor counts its global size
           "loss": pd.all_sum([loss.item()], ctx)[0] / count}


# -- the driver: one torchrun launch per case ---------------------------------------------------

def run_case(name, shape, gpus, strategy, args) -> dict:
    from torch.distributed.run import main as torchrun

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        argv = ["--worker", "--case", name, "--shape", shape, "--strategy", strategy, "--result", result,
                "--batch", str(args.batch), "--seq", str(args.seq), "--prefix-len", str(args.prefix_len),
                "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--quick"] if args.quick else [])
        try:
            torchrun(["--standalone", f"--nproc-per-node={gpus}", "-m", "prefix_kernels.bench.scaling", *argv])
        except Exception as e:        # a failed case (out of memory, say) is reported, never dropped
            return {"case": name, "shape": shape, "gpus": gpus, "strategy": strategy,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} "
                             "(the ranks' errors are in the log above)"}
        finally:
            gc.collect()
        with open(result) as f:
            return json.load(f)


def verdicts(rows) -> list[str]:
    by = {r["case"]: r for r in rows if "error" not in r}
    lines = []
    one, two = by.get("1.1b-1gpu"), by.get("1.1b-2gpu-ddp")
    if one and two:
        ratio = two["tokens_per_s"] / one["tokens_per_s"]
        lines.append(f"required (2-GPU DDP >= 1.8x one GPU): {'PASS' if ratio >= 1.8 else 'FAIL'} ({ratio:.3f}x); "
                     f"target 1.95x: {'MET' if ratio >= 1.95 else 'NOT MET'}")
    ddp, fsdp = by.get("13b-2gpu-ddp"), by.get("13b-2gpu-fsdp")
    if ddp and fsdp and ddp["weights_gib"]:
        share = fsdp["weights_gib"] / ddp["weights_gib"]
        lines.append(f"required (FSDP2 halves the per-GPU weights): {'PASS' if share <= 0.55 else 'FAIL'} "
                     f"({fsdp['weights_gib']:.2f} vs {ddp['weights_gib']:.2f} GiB = {share:.3f}x; peak "
                     f"{fsdp['peak_gib']:.1f} vs {ddp['peak_gib']:.1f} GiB; tokens/s "
                     f"{fsdp['tokens_per_s'] / ddp['tokens_per_s']:.3f}x DDP's)")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']} failed: {r['error']}")
    return lines


def table(rows) -> str:
    from prefix_kernels.bench.common import format_table

    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    cells = [{"case": r["case"], "gpus": r["gpus"], "strategy": r["strategy"],
              "ms/step": fmt(r.get("ms_per_step"), ".1f"), "tokens/s": fmt(r.get("tokens_per_s"), ",.0f"),
              "weights GiB/GPU": fmt(r.get("weights_gib"), ".2f"), "peak GiB/GPU": fmt(r.get("peak_gib"), ".2f"),
              "loss": fmt(r.get("loss"), ".3f")} if "error" not in r else
             {"case": r["case"], "gpus": r["gpus"], "strategy": r["strategy"], "ms/step": "failed"}
             for r in rows]
    return format_table(cells, ["case", "gpus", "strategy", "ms/step", "tokens/s", "weights GiB/GPU",
                                "peak GiB/GPU", "loss"])


def plot(rows, path) -> None:
    plt = common.pyplot()
    if plt is None:
        return

    rows = [r for r in rows if "error" not in r]
    names = [r["case"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].bar(names, [r["tokens_per_s"] for r in rows],
                color=["tab:gray" if r["gpus"] == 1 else "tab:green" for r in rows])
    axes[0].set_title("tokens/s, all GPUs (higher is better)")
    one = next((r for r in rows if r["case"] == "1.1b-1gpu"), None)
    if one is not None:        # the ideal 2-GPU line for the 1.1B shape
        axes[0].axhline(2 * one["tokens_per_s"], color="k", ls="--", lw=1, label="2x one GPU (1.1B)")
        axes[0].legend()
    if any(r["weights_gib"] for r in rows):
        x = range(len(rows))
        axes[1].bar([i - 0.2 for i in x], [r["weights_gib"] for r in rows], width=0.4, label="weights")
        axes[1].bar([i + 0.2 for i in x], [r["peak_gib"] for r in rows], width=0.4, label="peak")
        axes[1].set_xticks(list(x), names)
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "not measured (no CUDA)", ha="center", transform=axes[1].transAxes)
    axes[1].set_title("GiB per GPU (lower is better)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.parser("prefix-kernels bench scaling", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 gloo processes on the CPU")
    parser.add_argument("--cases", nargs="+", default=[c[0] for c in CASES],
                        choices=[c[0] for c in CASES + EXTRA])
    parser.add_argument("--batch", type=int, default=None, help="rows per GPU (default 8; quick 2)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 1024; quick 32)")
    parser.add_argument("--prefix-len", type=int, default=None, help="P (default 32; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 2)")
    # inside the torchrun processes
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.batch = args.batch or (2 if quick else 8)
    args.seq = args.seq or (32 if quick else 1024)
    args.prefix_len = args.prefix_len or (4 if quick else 32)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.steps = args.steps or (2 if quick else 10)
    if args.worker:
        worker(args)
        return 0

    from prefix_kernels.bench.common import (
        device_slug,
        environment,
        results_dir,
        write_json,
    )

    gpus = torch.cuda.device_count()
    if not quick and gpus < 2:
        print(f"bench_scaling: needs 2 CUDA GPUs, found {gpus}; run with --quick for a CPU smoke run",
              file=sys.stderr)
        return 2
    if not quick and os.environ.get("NCCL_NVLS_ENABLE") != "0":
        print("bench_scaling: note: NCCL_NVLS_ENABLE is not 0 (NVLink multicast on)", file=sys.stderr)
    env = environment()
    env["gpus"] = gpus
    print(f"bench_scaling on {gpus} x {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"commit {env['git_commit'][:10]}", flush=True)
    stem = "scaling-quick" if quick else f"scaling-{device_slug(env)}"

    def save(rows, lines):
        payload = {"benchmark": "bench_scaling", "dtype": "float32" if quick else "bfloat16",
                   "per_gpu": {"batch": args.batch, "seq": args.seq, "prefix_len": args.prefix_len},
                   "warmup": args.warmup, "steps": args.steps, "gpus": gpus, "environment": env,
                   "shapes": QUICK_SHAPES if quick else SHAPES, "results": rows, "verdicts": lines}
        return write_json(f"{stem}.json", payload)

    rows = []
    for name, shape, n, strategy in CASES + EXTRA:
        if name in args.cases:
            print(f"=== {name}: {shape}, {n} GPU(s), {strategy}", flush=True)
            rows.append(run_case(name, shape, n, strategy, args))
            print(json.dumps(rows[-1]), flush=True)
            save(rows, verdicts(rows))       # what is measured survives a timeout of the next case
    print("\n" + table(rows))
    lines = verdicts(rows)
    if quick:
        lines = ["CPU smoke run (tiny models, gloo): the verdicts below measure nothing"] + lines
    for line in lines:
        print(line)
    json_path = save(rows, lines)
    png_path = results_dir() / f"{stem}.png"
    plot(rows, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
