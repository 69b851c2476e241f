"""Where the training step's time goes, on the GPU and on the host: per-kernel GPU time of prefix-kernels vs the floor.

Same step as prefix_kernels/bench/training.py (TinyLlama-1.1B shape, bf16, forward with labels + backward +
AdamW), profiled with torch.profiler after warm-up. Prints, per case, the wall time per step, the
summed GPU kernel time per step (their difference is GPU idle time: host overhead or syncs) and
the heaviest kernels, so a gap to the floor can be placed in a kernel or in the host.
It also times the host: `launch` is how long step() takes to return (the CPU's share when the
GPU queue never fills), `sync/step` the wall time with a synchronize after every step (as a
training loop that logs loss.item() runs), lists the CPU-side syncs of one step, and splits the
Python host time by package (our op, Triton's launcher, transformers, torch).
usage: python benchmarks/profile_training.py [--arch tinyllama|gpt2|gpt2-nodrop] [B,S,P ...] [--cases CASE ...]
       (default tinyllama, 2,4096,128 8,1024,32; cases prefix-kernels floor; gpt2: GPT-2 small with
       its attention dropout 0.1 as in bench training --curves, gpt2-nodrop: the same without it)
"""
import cProfile
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from prefix_kernels.bench import training as bt


def host_breakdown(step, steps):
    """Python host time per step by package (cProfile's own time, so no double counting) and the
    heaviest functions: whether a host-bound step spends its time in our op, Triton's launcher,
    transformers or torch."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stats = pstats.Stats(profiler).stats
    by_package, rows = {}, []
    for (path, line, name), (_, calls, own, _, _) in stats.items():
        package = next((p for p in ("prefix_kernels", "triton", "transformers", "peft", "torch") if f"/{p}/" in path),
                       "builtin/C" if path == "~" else "other")
        by_package[package] = by_package.get(package, 0.0) + own
        rows.append((own, calls, f"{path.split('site-packages/')[-1]}:{line}({name})"))
    print("  host ms/step by package (cProfile, own time): " + ", ".join(
        f"{k} {v * 1e3 / steps:.2f}" for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])))
    for own, calls, where in sorted(rows, reverse=True)[:10]:
        print(f"    {own * 1e3 / steps:7.3f} ms  x{calls // steps:<5} {where[-110:]}")


def profile_case(case, config, batch, seq, prefix_len, steps=3):
    model, params, embeds = bt.build_case(case, config, prefix_len, torch.device("cuda"), torch.bfloat16)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, config.vocab_size, (batch, seq), device="cuda")
    step = bt.make_step(model, optimizer, embeds, ids)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1e3 / steps
    launch, synced = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        launch.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        synced.append(time.perf_counter() - start)
    launch_ms, synced_ms = 1e3 * min(launch), 1e3 * min(synced)
    with profile(activities=[ProfilerActivity.CPU]) as cpu_prof:
        step()
        torch.cuda.synchronize()
    syncs = {e.key: e.count for e in cpu_prof.key_averages()
             if e.key in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize",
                          "cudaDeviceSynchronize", "cudaMemcpyAsync", "aten::nonzero")}
    host_breakdown(step, steps)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / steps / 1000
    print(f"\n{case} B{batch} S{seq} P{prefix_len}: wall {wall:.1f} ms/step, GPU kernels {total:.1f} ms/step, "
          f"launch {launch_ms:.1f} ms, sync/step {synced_ms:.1f} ms; host calls/step {syncs}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total / steps / 1000:8.2f} ms  x{e.count // steps:<4} {e.key[:100]}")
    del model, optimizer, params
    torch.cuda.empty_cache()


def main():
    args = sys.argv[1:]
    cases = ["prefix-kernels", "floor"]
    if "--cases" in args:
        at = args.index("--cases")
        args, cases = args[:at], args[at + 1:]
    arch = "tinyllama"
    if "--arch" in args:
        at = args.index("--arch")
        arch = args[at + 1]
        args = args[:at] + args[at + 2:]
    shapes = [tuple(int(x) for x in a.split(",")) for a in args] or [(2, 4096, 128), (8, 1024, 32)]
    if arch == "tinyllama":
        config = bt.model_config(quick=False)
    else:
        from transformers import GPT2Config
        config = GPT2Config(attn_pdrop=0.1 if arch == "gpt2" else 0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    print(f"== {arch}")
    for batch, seq, prefix_len in shapes:
        for case in cases:
            profile_case(case, config, batch, seq, prefix_len)


if __name__ == "__main__":
    main()
