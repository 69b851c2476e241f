"""Per-kernel GPU time of one forward+backward of the op (torch.profiler), beside wall time.

Tells whether a shape is bound by the kernels or by host-side launch overhead.
usage: python benchmarks/profile_attention.py [B,H,Hkv,S,D,P[,N] ...]
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import prefix_kernels as pk
from prefix_kernels.bench.attention import make_inputs
from prefix_kernels.bench.common import time_ms

shapes = [tuple(int(x) for x in a.split(",")) for a in sys.argv[1:]] or [
    (16, 16, 16, 1024, 64, 16, 1), (8, 32, 8, 1024, 128, 32, 4), (8, 32, 8, 1024, 128, 32, 1)]
for shape in shapes:
    b, h, hkv, s, d, p, n = shape if len(shape) == 7 else shape + (1,)
    inputs, index = make_inputs(b, h, hkv, s, d, p, n, torch.bfloat16, "cuda")
    grad_out = torch.randn_like(inputs[0])
    step = lambda: pk.prefix_attention(*inputs, prefix_index=index).backward(grad_out)
    wall = time_ms(step, grad_to_none=list(inputs))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in events) / 5 / 1000
    print(f"\n{shape}: wall {wall:.3f} ms/step, GPU kernels {total:.3f} ms/step")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:8]:
        print(f"  {e.self_device_time_total / 5 / 1000:8.3f} ms  x{e.count // 5:<3} {e.key[:90]}")
