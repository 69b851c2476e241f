"""Where the fused op's host time goes, per part, on the GPU's own host (issue 10).

At a shape whose kernels are short (default B8 H32/4 S1024 D64 P32, bf16) the op's wall time
follows its host time: this times, with no device sync inside the timed loops (so the GPU runs
behind), the forward alone, forward+backward, the backward's launcher called without autograd,
each kernel launch through the launcher, and the building blocks: an allocation, the
specialization key, a bare autograd.Function round trip on CUDA tensors.
For an A/B against an older copy of the package, run this twice, alternating, with
PYTHONPATH pointing at each (the custom ops register under one name: one copy per process).

usage: python benchmarks/probe_host_parts.py [--shape 8,32,4,1024,64,32,1] [--iters 100]
       TRITON_INTERPRET=1 python benchmarks/probe_host_parts.py --cpu-smoke   (the script's own
       check on the CPU: tiny shape, the interpreter's kernels; its times mean nothing)
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time

import torch

DEVICE = "cuda"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _timed(fn, iters, rounds=5):
    """Median over rounds of the host microseconds per call (no sync inside a round)."""
    per_call = []
    for _ in range(rounds):
        _sync()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        per_call.append((time.perf_counter() - start) / iters * 1e6)
    _sync()
    return statistics.median(per_call)


def probe(pk, label, shape, iters):
    from prefix_kernels.bench.attention import make_inputs
    ops = importlib.import_module(pk.__name__ + ".ops.prefix_attention")
    b, h, hkv, s, d, p, n = shape
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    inputs, index = make_inputs(b, h, hkv, s, d, p, n, dtype, DEVICE)
    grad = torch.randn_like(inputs[0])
    detached = [t.detach() for t in inputs]

    def fwd():
        pk.prefix_attention(*detached, prefix_index=index, path="fused")

    def step():
        for t in inputs:
            t.grad = None
        pk.prefix_attention(*inputs, prefix_index=index, path="fused").backward(grad)

    for _ in range(5):
        step()
    out = {"label": label, "fwd_us": _timed(fwd, iters), "fwd_bwd_us": _timed(step, iters)}

    # the backward's launcher without autograd
    q, k, v, bk, bv = detached
    o, lse = ops._launch_forward(q, k, v, bk, bv, index, None, d ** -0.5, True)

    def backward_only():
        ops._launch_backward(grad, q, k, v, bk, bv, index, None, o, lse, d ** -0.5, True, True, True, True)
    out["launch_backward_us"] = _timed(backward_only, iters)

    # each launch through the launcher: wrap the module's _launch and the reduce's launch_direct
    spent: dict = {}
    inner = ops._launch

    def timed_launch(name, *a):
        t0 = time.perf_counter()
        inner(name, *a)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - t0
    ops._launch = timed_launch
    try:
        rounds = 5
        for _ in range(rounds):
            backward_only()
            fwd()
        _sync()
        out["launch_us"] = {name: t / rounds * 1e6 for name, t in spent.items()}
    finally:
        ops._launch = inner

    # building blocks
    launch_mod = importlib.import_module(pk.__name__ + ".ops.launch")
    args = (q,) * 13 + tuple(range(3, 43)) + (0.125, 0.0, 0)
    out["specialization_key_us"] = _timed(lambda: launch_mod.specialization_key(args), 2000)
    out["empty_like_q_us"] = _timed(lambda: torch.empty_like(q), 2000)
    out["empty_small_us"] = _timed(lambda: torch.empty((b, h, s), device=DEVICE), 2000)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g
    leaf = torch.randn(16, device=DEVICE, requires_grad=True)
    ones = torch.ones(16, device=DEVICE)
    out["autograd_roundtrip_us"] = _timed(lambda: Identity.apply(leaf).backward(ones), iters)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,32,4,1024,64,32,1")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--label", default="this")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.environ.get("PREFIX_KERNELS_RESULTS", "."))
    args = parser.parse_args()
    global DEVICE
    shape = tuple(int(x) for x in args.shape.split(","))
    if args.cpu_smoke:
        DEVICE, shape, args.iters = "cpu", (1, 4, 2, 24, 16, 5, 1), 3
        args.out = os.environ.get("TMPDIR", "/tmp")
    import prefix_kernels as pk
    r = probe(pk, args.label, shape, args.iters)
    r.update(shape=shape, gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
             package=os.path.dirname(pk.__file__))
    print(json.dumps(r), flush=True)
    with open(os.path.join(args.out, f"probe_host_parts-{args.label}.json"), "a") as f:
        f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
