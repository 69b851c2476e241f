"""Every candidate config of each fused kernel, timed alone, against cuDNN's own kernels (issue 10).

Autotune picks one config per kernel; this shows the whole spread: for each shape (issue 10's,
bf16, grads for q, k, v and the bank) the forward, dQ and dK/dV kernels are recorded from one
op call and re-launched with every candidate of their config class (triton do_bench, median,
L2 flushed between reps), with cuDNN's forward and forward+backward (SDPA, enable_gqa) timed in
the same process. The table says how far the best config of each kernel sits from the pick and
from cuDNN.

usage: python benchmarks/probe_kernel_configs.py [--shapes 5,0,6] [--budget-s 200]
       [--kernels fwd,dq,dkdv]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.dirname(__file__))
from probe_split import ISSUE_SHAPES  # noqa: E402


def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# configs outside the autotune candidates, to see whether the candidate lists miss a better one
EXTRA = {
    "fwd": {64: [_config(128, 128, 8, 2), _config(64, 128, 4, 3), _config(64, 64, 4, 4), _config(64, 32, 4, 3)],
            128: [_config(128, 128, 8, 2), _config(64, 128, 4, 3), _config(64, 64, 4, 4), _config(128, 32, 4, 3)]},
    "dq": {64: [_config(64, 64, 4, 4), _config(64, 128, 4, 3), _config(128, 128, 8, 2), _config(64, 32, 4, 3)],
           128: [_config(64, 64, 4, 4), _config(64, 128, 8, 3), _config(128, 128, 8, 2), _config(32, 64, 4, 3)]},
    "dkdv": {64: [_config(64, 64, 4, 4), _config(128, 64, 8, 3), _config(64, 64, 8, 3), _config(32, 64, 4, 3)],
             128: [_config(64, 64, 4, 4), _config(128, 64, 8, 3), _config(64, 64, 8, 3), _config(32, 64, 4, 3)]},
}


def record_launches(ops, shape):
    """(name, grid, args, constexprs) of each kernel launch of one fused fwd+bwd."""
    import prefix_kernels as pk
    b, h, hkv, s, d, p = shape
    gen = torch.Generator(device="cuda").manual_seed(0)

    def leaf(*dims):
        return torch.randn(*dims, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    q, k, v, bk, bv = leaf(b, h, s, d), leaf(b, hkv, s, d), leaf(b, hkv, s, d), leaf(1, hkv, p, d), leaf(1, hkv, p, d)
    recorded = []
    inner = ops._launch

    def recording(name, grid, args, constexprs, dtype, bucket):
        recorded.append((name, grid, args, dict(constexprs)))
        inner(name, grid, args, constexprs, dtype, bucket)
    ops._launch = recording
    try:
        out = pk.prefix_attention(q, k, v, bk, bv, path="fused")
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
    finally:
        ops._launch = inner
    return recorded, (q, k, v)


def time_config(ops, name, grid, args, constexprs, config):
    from prefix_kernels.ops.launch import derived_constexprs
    kernel = ops._KERNELS[name]
    jit = kernel.fn if hasattr(kernel, "values") else kernel
    derived = derived_constexprs(kernel, args, constexprs)
    kwargs = dict(**constexprs, **derived, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    launch_grid = grid(config.kwargs) if callable(grid) else grid

    def run():
        jit[launch_grid](*args, **kwargs)
    run()
    torch.cuda.synchronize()
    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median")


def cudnn_times(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    grad = torch.randn_like(qd)

    def fwd():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, enable_gqa=gqa)

    def fwd_bwd():
        fwd().backward(grad)
    with torch.no_grad():
        t_fwd = triton.testing.do_bench(fwd, warmup=10, rep=40, return_mode="median")
    t_all = triton.testing.do_bench(fwd_bwd, warmup=10, rep=40, return_mode="median",
                                    grad_to_none=[qd, kd, vd])
    return t_fwd, t_all


def op_time(q, k, v, shape):
    """The op's fwd+bwd (default configs, autotune off), grads for q, k, v and the bank."""
    import prefix_kernels as pk
    b, h, hkv, s, d, p = shape
    torch.manual_seed(1)        # the same bank and output gradient for every dQ mode
    bk = torch.randn(1, hkv, p, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bv = torch.randn_like(bk, requires_grad=True)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)] + [bk, bv]
    grad = torch.randn_like(q)

    def run():
        pk.prefix_attention(*leaves, path="fused").backward(grad)
    for t in leaves:
        t.grad = None
    out = pk.prefix_attention(*leaves, path="fused")
    out.backward(grad)
    results = [out.detach().float()] + [t.grad.float() for t in leaves]
    return triton.testing.do_bench(run, warmup=10, rep=40, return_mode="median", grad_to_none=leaves), results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="5,0,6")
    parser.add_argument("--kernels", default="fwd,dq,dkdv")
    parser.add_argument("--budget-s", type=float, default=200)
    parser.add_argument("--dq-modes", default="separate",
                        help="PREFIX_KERNELS_BWD_DQ values to compare (separate,atomic,tma)")
    parser.add_argument("--out", default=os.environ.get("PREFIX_KERNELS_RESULTS", "."))
    args = parser.parse_args()
    os.environ["PREFIX_KERNELS_AUTOTUNE"] = "0"         # the recording call takes the defaults
    from prefix_kernels.ops import prefix_attention as ops
    from prefix_kernels.ops.utils import head_dim_class
    start = time.time()
    rows = []
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"commit {os.environ.get('PREFIX_KERNELS_GIT_COMMIT', '?')}", flush=True)
    if hasattr(ops, "_scratch"):            # TMA descriptors built on the device (dQ by TMA)
        triton.set_allocator(ops._scratch)
    for index, mode in ((int(i), m) for i in args.shapes.split(",") for m in args.dq_modes.split(",")):
        shape = ISSUE_SHAPES[index]
        os.environ["PREFIX_KERNELS_BWD_DQ"] = mode
        try:
            recorded, (q, k, v) = record_launches(ops, shape)
            t_fwd, t_all = cudnn_times(q, k, v)
            t_op, results = op_time(q, k, v, shape)
        except Exception as exc:        # a mode that fails to compile or run: said, then the next
            print(f"\n== {','.join(map(str, shape))} dQ {mode}: FAILED {type(exc).__name__}: "
                  f"{str(exc)[-300:]}", flush=True)
            rows.append(dict(shape=shape, dq_mode=mode, error=f"{type(exc).__name__}: {str(exc)[-300:]}"))
            continue
        if mode == args.dq_modes.split(",")[0]:
            first = results
        else:       # max |difference| / max |first mode's value|, out and each gradient
            diffs = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(results, first)]
            print(f"   dQ {mode} vs {args.dq_modes.split(',')[0]}: relative max differences (out, dq, dk, dv, "
                  f"dbank_k, dbank_v) {', '.join(f'{x:.2e}' for x in diffs)}", flush=True)
            rows.append(dict(shape=shape, dq_mode=mode, relative_max_differences=diffs))
        print(f"\n== {','.join(map(str, shape))} dQ {mode}: cuDNN fwd {t_fwd:.4f} ms, fwd+bwd {t_all:.4f} ms "
              f"(bwd {t_all - t_fwd:.4f}); the op (default configs) fwd+bwd {t_op:.4f} ms", flush=True)
        rows.append(dict(shape=shape, kernel="op", dq_mode=mode, fwd_bwd_ms=t_op))
        best_sum = 0.0
        for name, grid, launch_args, constexprs in recorded:
            if name not in args.kernels.split(",") or (mode != "separate" and name == "fwd"):
                continue
            cls = head_dim_class(constexprs["HEAD_DIM"])
            configs = ops._CANDIDATES[name][cls] + EXTRA[name].get(cls, [])
            times = []
            for config in configs:
                if time.time() - start > args.budget_s:
                    print("   (budget spent: the rest skipped)", flush=True)
                    break
                label = f"{config.kwargs} w{config.num_warps} s{config.num_stages}"
                try:
                    ms = time_config(ops, name, grid, launch_args, constexprs, config)
                except Exception as exc:     # over the shared memory, or a compile failure
                    print(f"   {name:5s} {label:44s} failed: {type(exc).__name__} {str(exc)[:80]}", flush=True)
                    continue
                times.append(ms)
                print(f"   {name:5s} {label:44s} {ms:.4f} ms", flush=True)
                rows.append(dict(shape=shape, kernel=name, dq_mode=mode, config=label, ms=ms,
                                 default=config is configs[0]))
            if times:
                best_sum += min(times)
                print(f"   {name:5s} best {min(times):.4f} ms, default {times[0]:.4f}", flush=True)
        print(f"   sum of best kernels (dQ {mode}{', without fwd' if mode != 'separate' else ''}) "
              f"{best_sum:.4f} ms vs cuDNN fwd+bwd {t_all:.4f}: "
              f"ratio {t_all / best_sum if best_sum else float('nan'):.3f}", flush=True)
        rows.append(dict(shape=shape, kernel="cudnn", fwd_ms=t_fwd, fwd_bwd_ms=t_all, best_sum_ms=best_sum))
        with open(os.path.join(args.out, "probe_kernel_configs.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": triton.__version__, "commit": os.environ.get("PREFIX_KERNELS_GIT_COMMIT"),
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
