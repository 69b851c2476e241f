"""Host-side cost of one forward+backward of the op: cProfile, and the launch cost alone.

A small shape keeps the GPU idle so the host is what gets measured.
"""
import cProfile
import pstats
import sys
import time

import torch

import prefix_kernels as pk
from prefix_kernels.bench.attention import make_inputs

shape = tuple(int(x) for x in sys.argv[1].split(",")) if len(sys.argv) > 1 else (16, 16, 16, 1024, 64, 16, 1)
inputs, index = make_inputs(*shape, torch.bfloat16, "cuda")
grad_out = torch.randn_like(inputs[0])


def step():
    for t in inputs:
        t.grad = None
    pk.prefix_attention(*inputs, prefix_index=index).backward(grad_out)


for _ in range(5):
    step()
torch.cuda.synchronize()
for label, fn in [("fwd only (no grad)", lambda: pk.prefix_attention(*[t.detach() for t in inputs], prefix_index=index)),
                  ("fwd+bwd", step)]:
    start = time.perf_counter()
    for _ in range(50):
        fn()
    host = (time.perf_counter() - start) / 50 * 1e3
    torch.cuda.synchronize()
    total = (time.perf_counter() - start) / 50 * 1e3
    print(f"{label}: host {host:.3f} ms/call, host+drain {total:.3f} ms/call")

prof = cProfile.Profile()
prof.enable()
for _ in range(30):
    step()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
