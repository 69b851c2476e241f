"""Where the training step's time goes: per-kernel GPU time of prefix-kernels vs the floor.

Same step as prefix_kernels/bench/training.py (TinyLlama-1.1B shape, bf16, forward with labels + backward +
AdamW), profiled with torch.profiler after warm-up. Prints, per case, the wall time per step, the
summed GPU kernel time per step (their difference is GPU idle time: host overhead or syncs) and
the heaviest kernels, so a gap to the floor can be placed in a kernel or in the host.
usage: python benchmarks/profile_training.py [B,S,P ...]     (default 2,4096,128 8,1024,32)
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from prefix_kernels.bench import training as bt


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
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / steps / 1000
    print(f"\n{case} B{batch} S{seq} P{prefix_len}: wall {wall:.1f} ms/step, GPU kernels {total:.1f} ms/step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total / steps / 1000:8.2f} ms  x{e.count // steps:<4} {e.key[:100]}")
    del model, optimizer, params
    torch.cuda.empty_cache()


def main():
    shapes = [tuple(int(x) for x in a.split(",")) for a in sys.argv[1:]] or [(2, 4096, 128), (8, 1024, 32)]
    config = bt.model_config(quick=False)
    for batch, seq, prefix_len in shapes:
        for case in ("prefix-kernels", "floor"):
            profile_case(case, config, batch, seq, prefix_len)


if __name__ == "__main__":
    main()
