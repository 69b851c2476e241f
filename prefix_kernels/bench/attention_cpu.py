"""`prefix-kernels bench attention` on a machine without a GPU: only what a CPU can say truthfully.

1. Kernel check: the Triton kernels, run by Triton's CPU interpreter, against the float64 PyTorch
   reference on small odd shapes (GQA, padding, mixed prefixes, P > S): the output and all five
   gradients, the largest error of each against the bound the tests use (atol 3e-5 + rtol 1e-4).
2. CPU timings, float32: the op's CPU path (CPU tensors run the PyTorch reference, not the
   kernels), PEFT's concat + bool mask, concat + lower-right causal SDPA, and SDPA with no prefix;
   median and interquartile range (IQR) over repeats. They say nothing about GPU speed; TFLOP/s
   and GPU memory are not measured here, so not shown.
3. The committed GPU results (H200, bf16): the table and the commit and date they were measured at.
Writes attention-cpu.json and a plot of the CPU medians with their IQR under the results folder.
Exit status 1 when a kernel check fails.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from . import common

CHECK_SHAPES = [      # B, H, Hkv, S, D, P, N bank entries, padded rows
    (2, 4, 2, 19, 16, 5, 3, True),
    (1, 2, 1, 9, 32, 12, 1, False),        # MQA, P > S
    (3, 4, 4, 23, 24, 7, 2, True),         # MHA, head dim 24 (padded to the block)
]
CPU_VARIANTS = ["prefix_kernels", "peft_bool_mask", "concat_lower_right", "floor"]
ATOL, RTOL = 3e-5, 1e-4
GPU_RESULTS = "attention-h200.json"


def enable_interpreter() -> str | None:
    """Set TRITON_INTERPRET=1 before Triton loads the kernels; the reason when it is too late."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if "prefix_kernels.ops.prefix_attention" in sys.modules:
        return "the kernels were loaded before TRITON_INTERPRET=1 could be set (run in a fresh process)"
    os.environ["TRITON_INTERPRET"] = "1"
    return None


def check_kernels(shapes=CHECK_SHAPES) -> list[dict]:
    """Per shape: the largest |Triton - float64 reference| of the output and of each gradient,
    and whether every one is within ATOL + RTOL * |reference|."""
    import prefix_kernels as pk
    from prefix_kernels.ops.reference import reference_prefix_attention

    rows = []
    for b, h, hkv, s, d, p, n, padded in shapes:
        row = {"shape": f"{b},{h},{hkv},{s},{d},{p}" + (f" N{n}" if n > 1 else "") + (" padded" if padded else "")}
        gen = torch.Generator().manual_seed(0)
        tensors = [torch.randn(*shape, generator=gen) for shape in
                   ((b, h, s, d), (b, hkv, s, d), (b, hkv, s, d), (n, hkv, p, d), (n, hkv, p, d))]
        index = torch.arange(b) % n if n > 1 else None
        mask = None
        if padded:
            mask = torch.ones(b, s, dtype=torch.bool)
            mask[0, : s // 3] = False           # left padding on one row
        grad_out = torch.randn(b, h, s, d, generator=gen)
        try:
            leaves = [t.clone().requires_grad_() for t in tensors]
            out = pk.prefix_attention(*leaves, prefix_index=index, key_padding_mask=mask, backend="triton")
            got = [out, *torch.autograd.grad(out, leaves, grad_out)]
            ref_leaves = [t.double().requires_grad_() for t in tensors]
            ref = reference_prefix_attention(*ref_leaves, index, mask, None, True)
            want = [ref, *torch.autograd.grad(ref, ref_leaves, grad_out.double())]
        except Exception as e:      # reported, never hidden
            row.update(ok=False, error=f"{type(e).__name__}: {common_first_line(e)}")
            rows.append(row)
            continue
        ok = True
        for name, g, w in zip(["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"], got, want):
            err = (g.detach().double() - w.detach()).abs()
            w = w.detach()
            row[name] = float(err.max())
            ok &= bool((err <= ATOL + RTOL * w.abs()).all())
        row["ok"] = ok
        rows.append(row)
    return rows


def common_first_line(e: BaseException) -> str:
    from ..cli_common import first_line

    return first_line(e)[:160]


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


def _calls_per_sample(call, inputs, sample_ms: float = 10.0) -> int:
    """Calls per timed sample so one sample lasts about sample_ms (after two warm-up calls): a
    single short call is at the mercy of the scheduler on a shared machine."""
    for _ in range(2):
        call()
    start = time.perf_counter()
    call()
    once = (time.perf_counter() - start) * 1e3
    for t in inputs:
        t.grad = None
    return max(1, min(100, round(sample_ms / max(once, 1e-3))))


def time_cpu(shapes, variants, repeats: int) -> list[dict]:
    """Median and IQR (ms) of fwd and fwd+bwd per shape and variant, float32 on the CPU."""
    from .attention import build_variant, make_inputs

    rows = []
    for shape in shapes:
        b, h, hkv, s, d, p, n = shape
        inputs, index = make_inputs(b, h, hkv, s, d, p, n, torch.float32, "cpu")
        grad_out = torch.randn_like(inputs[0])
        for name in variants:
            row = {"shape": f"{b},{h},{hkv},{s},{d},{p}" + (f" N{n}" if n > 1 else ""), "variant": name}
            try:
                fn = build_variant(name, inputs, index, p, "cpu")
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {common_first_line(e)}"
                rows.append(row)
                continue
            for mode, call in (("fwd", fn), ("fwd+bwd", lambda: fn().backward(grad_out))):
                calls = _calls_per_sample(call, inputs)
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    for _ in range(calls):
                        for t in inputs:
                            t.grad = None
                        call()
                    samples.append((time.perf_counter() - start) * 1e3 / calls)
                q1, median, q3 = _quartiles(samples)
                row[f"{mode} ms"] = round(median, 4)
                row[f"{mode} IQR"] = [round(q1, 4), round(q3, 4)]
            rows.append(row)
    return rows


def gpu_results() -> tuple[dict | None, str]:
    """The committed H200 results: the checkout's benchmarks/results/, else the copy in the package."""
    here = Path(__file__).resolve()
    for path in (here.parents[2] / "benchmarks" / "results" / GPU_RESULTS, here.parent / "results" / GPU_RESULTS):
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    return None, GPU_RESULTS


def _cell(r: dict, mode: str) -> str:
    if f"{mode} ms" not in r:
        return ""
    lo, hi = r[f"{mode} IQR"]
    return f"{r[f'{mode} ms']:.3f} [{lo:.3f}-{hi:.3f}]"


def report(checks, timings, gpu, gpu_path, env) -> str:
    lines = [f"No GPU: {env['device']}, torch {env['torch']}, triton {env['triton']}, commit {env['git_commit']}",
             "", "1. Triton kernels (CPU interpreter) vs the float64 reference: max |error| "
             f"(pass: <= {ATOL:g} + {RTOL:g} x |ref|)"]
    names = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]
    cells = [{"shape": r["shape"], "result": "PASS" if r["ok"] else "FAIL",
              **({n: f"{r[n]:.1e}" for n in names} if "error" not in r else {"error": r["error"]})} for r in checks]
    lines.append(common.format_table(cells, ["shape", "result", *names] + (["error"] if any("error" in r for r in checks)
                                                                          else [])))
    lines += ["", "2. CPU timings, float32, ms: median [interquartile range]. CPU tensors run the PyTorch "
              "reference, not the kernels: this says nothing about GPU speed."]
    label = {"prefix_kernels": "prefix_kernels*"}
    cells = [{"shape": r["shape"], "variant": label.get(r["variant"], r["variant"]), "fwd": _cell(r, "fwd"),
              "fwd+bwd": _cell(r, "fwd+bwd"),
              "note": r.get("error", "") or ("noisy: fwd+bwd < fwd" if r.get("fwd+bwd ms", 1e9) < r.get("fwd ms", 0)
                                             else "")} for r in timings]
    lines.append(common.format_table(cells, ["shape", "variant", "fwd", "fwd+bwd", "note"]))
    lines += ["* on CPU tensors the op runs its PyTorch reference (the test oracle), not the Triton kernels", ""]
    if gpu is None:
        lines.append(f"3. No committed GPU results found ({gpu_path}).")
    else:
        e = gpu["environment"]
        lines += [f"3. Committed GPU results: {e['device']}, {gpu['dtype']}, measured {e['date']} at commit "
                  f"{e['git_commit'][:12]} (torch {e['torch']}, triton {e['triton']}); {gpu_path}",
                  "   fwd+bwd; speedup = baseline ms / ours ms; extra MiB = peak memory beyond the inputs"]
        lines.append(common.format_table(gpu["summary"], list(gpu["summary"][0])))
    return "\n".join(lines)


def plot(timings, path) -> bool:
    """Bars of the CPU fwd+bwd medians with IQR error bars; False (nothing written) when there is
    nothing to draw."""
    rows = [r for r in timings if "fwd+bwd ms" in r]
    plt = common.pyplot() if rows else None
    if plt is None:
        return False
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(7, 2.2 * len(shapes)), 4))
    for i, name in enumerate(variants):
        mine = [next((r for r in rows if r["shape"] == s and r["variant"] == name), None) for s in shapes]
        xs = [x + i * width for x, r in zip(range(len(shapes)), mine) if r]
        med = [r["fwd+bwd ms"] for r in mine if r]
        err = [[m - r["fwd+bwd IQR"][0] for m, r in zip(med, filter(None, mine))],
               [r["fwd+bwd IQR"][1] - m for m, r in zip(med, filter(None, mine))]]
        ax.bar(xs, med, width, yerr=err, capsize=3, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))], shapes, fontsize=8)
    ax.set_xlabel("B,H,Hkv,S,D,P")
    ax.set_ylabel("ms, median (bars: IQR)")
    ax.set_title("CPU, float32, forward+backward: the PyTorch paths, not the GPU kernels")
    ax.legend(fontsize=8)
    common.save_figure(fig, path)
    return True


def main(args) -> int:
    """The CPU run of `prefix-kernels bench attention` (its parsed arguments)."""
    from .attention import CPU_SHAPES

    too_late = enable_interpreter()
    env = common.environment()
    shapes = [tuple(int(x) for x in s.split(",")) + ((1,) if len(s.split(",")) == 6 else ())
              for s in args.shape] if args.shape else CPU_SHAPES
    variants = [v for v in args.variants.split(",") if v in CPU_VARIANTS] if args.variants else CPU_VARIANTS
    if too_late:
        checks = [{"shape": "all", "ok": False, "error": too_late}]
    else:
        print("checking the Triton kernels under the CPU interpreter ...", file=sys.stderr, flush=True)
        checks = check_kernels()
    print("timing the CPU paths (float32) ...", file=sys.stderr, flush=True)
    timings = time_cpu(shapes, variants, args.repeats)
    gpu, gpu_path = gpu_results()
    print(report(checks, timings, gpu, gpu_path, env))
    path = common.write_json(args.output or "attention-cpu.json", {
        "benchmark": "attention (no GPU)", "dtype": "float32", "environment": env,
        "kernel_checks": {"atol": ATOL, "rtol": RTOL, "rows": checks},
        "cpu_timings": {"repeats": args.repeats, "statistic": "median, IQR", "rows": timings},
        "gpu_results": {"path": gpu_path, "environment": gpu["environment"] if gpu else None}})
    print(f"\nwrote {path}")
    if not args.no_plot and plot(timings, path.with_suffix(".png")):
        print(f"wrote {path.with_suffix('.png')}")
    return 0 if all(r["ok"] for r in checks) else 1
