"""Side-by-side benchmark of the prefix-attention op against what users run today.

Variants, all computing attention over [prefix ; own causal keys] with gradients for q, k, v and
the prefix, in one process run:
  floor           SDPA flash (FA2), causal, no prefix at all (the cost of attention without a prefix)
  floor_cudnn     the same through cuDNN's fused attention (what SDPA runs inside HF models on H200)
  peft_bool_mask  concat prefix onto K/V + [B,1,S,P+S] bool mask -> SDPA (PEFT's path)
  concat_lower_right  concat + SDPA with a bottom-right causal bias
  concat_flex     concat + compiled FlexAttention with a block mask
  prefix_kernels  this package (path "auto": the op's own choice)
  prefix_kernels_fused  this package, our kernels for all keys (path="fused")
  prefix_kernels_split  this package, path="split": the vendor's cuDNN kernel does the attention, the
                  prefix padded into the same call (mode from PREFIX_KERNELS_SPLIT_MODE, default
                  "pad"); an error row where the split cannot run

Without a GPU: a check of the Triton kernels under the CPU interpreter, CPU timings (float32,
median and IQR) and the committed H200 table instead (bench/attention_cpu.py).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from ..cli_common import HelpFormatter
from . import common

# (B, H, Hkv, S, D, P, N bank entries used by the B rows): the 7 shapes of issue 10
GPU_SHAPES = [
    (8, 32, 8, 1024, 128, 32, 1),
    (8, 32, 8, 4096, 128, 32, 1),
    (4, 32, 8, 4096, 128, 256, 1),
    (16, 16, 16, 1024, 64, 16, 1),
    (1, 32, 8, 16384, 128, 64, 1),
    (8, 32, 4, 1024, 64, 32, 1),       # TinyLlama, B8 S1024 P32
    (2, 32, 4, 4096, 64, 128, 1),      # TinyLlama, B2 S4096 P128
]
CPU_SHAPES = [(2, 4, 2, 128, 64, 16, 1), (2, 4, 2, 96, 64, 8, 2)]
VARIANTS = ["floor", "floor_cudnn", "peft_bool_mask", "concat_lower_right", "concat_flex", "prefix_kernels",
            "prefix_kernels_fused", "prefix_kernels_split", "prefix_kernels_cudnn_fe"]
# prefix_kernels_cudnn_fe: the split path through cuDNN's frontend (bottom-right causal over the
# prefix-prepended keys; needs `pip install -e ".[cudnn]"`, else the row says why it did not run)
OURS = ("prefix_kernels", "prefix_kernels_fused", "prefix_kernels_split", "prefix_kernels_cudnn_fe")
PATH_COLUMNS = {"prefix_kernels_fused": "fused", "prefix_kernels_split": "split",
                "prefix_kernels_cudnn_fe": "cudnn_fe"}
# No prefix: what the same attention costs without one. SDPA's FLASH backend (FA2) and cuDNN's
# fused attention, which torch 2.11 picks for SDPA inside HF models on the H200.
FLOORS = ("floor", "floor_cudnn")
MODES = ["fwd", "bwd", "fwd+bwd"]


def useful_flops(b, h, s, d, p, mode):
    fwd = 4 * d * b * h * (s * (s + 1) / 2 + s * p)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def make_inputs(b, h, hkv, s, d, p, n, dtype, device):
    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()
    q, k, v = leaf(b, h, s, d), leaf(b, hkv, s, d), leaf(b, hkv, s, d)
    bank_k, bank_v = leaf(n, hkv, p, d), leaf(n, hkv, p, d)
    index = (torch.arange(b, device=device) % n) if n > 1 else None
    return (q, k, v, bank_k, bank_v), index


def _rows_prefix(bank, index, b):
    return bank[index] if index is not None else bank.expand(b, *bank.shape[1:])


def _concat_kv(q, k, v, bank_k, bank_v, index, expand_gqa):
    b, h = q.shape[:2]
    keys = torch.cat([_rows_prefix(bank_k, index, b), k], dim=2)
    values = torch.cat([_rows_prefix(bank_v, index, b), v], dim=2)
    if expand_gqa and h != k.shape[1]:
        keys = keys.repeat_interleave(h // k.shape[1], dim=1)
        values = values.repeat_interleave(h // k.shape[1], dim=1)
    return keys, values


def build_variant(name, inputs, index, p, device):
    """A zero-argument function computing the variant's output, or raise with the reason."""
    q, k, v, bank_k, bank_v = inputs
    b, h, s, d = q.shape
    if name == "prefix_kernels_cudnn_fe":
        from prefix_kernels.ops import split_attention
        config = split_attention.SplitConfig("cudnn_fe", "pad")
        reason = split_attention.unusable_reason(config, q, k, bank_k)
        if reason is not None:
            raise RuntimeError(f"the cuDNN frontend path cannot run this: {reason}")
        scale = d ** -0.5
        return lambda: split_attention.split_prefix_attention(q, k, v, bank_k, bank_v, index, scale, True, config)
    if name in OURS:
        import prefix_kernels as pk
        path = {"prefix_kernels": None, "prefix_kernels_fused": "fused", "prefix_kernels_split": "split"}[name]
        if path == "split":
            from prefix_kernels.ops import split_attention
            reason = split_attention.unusable_reason(split_attention.default_config(q), q, k, bank_k)
            if reason is not None:
                raise RuntimeError(f"the split path cannot run this: {reason}")
        return lambda: pk.prefix_attention(q, k, v, bank_k, bank_v, prefix_index=index, path=path)
    if name in FLOORS:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        if name == "floor_cudnn" and device != "cuda":
            raise RuntimeError("cuDNN attention is measured on the GPU only")
        fast = SDPBackend.FLASH_ATTENTION if name == "floor" else SDPBackend.CUDNN_ATTENTION
        backends = [fast] if device == "cuda" else [SDPBackend.MATH]
        gqa = h != k.shape[1]

        def floor():
            with sdpa_kernel(backends):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if not gqa:
            return floor
        try:
            floor()
            return floor
        except RuntimeError:     # the backend refuses enable_gqa: expand K/V as HF's repeat_kv does
            def floor_expanded():
                with sdpa_kernel(backends):
                    return F.scaled_dot_product_attention(q, k.repeat_interleave(h // k.shape[1], 1),
                                                          v.repeat_interleave(h // k.shape[1], 1), is_causal=True)
            return floor_expanded
    if name == "peft_bool_mask":
        def peft():
            keys, values = _concat_kv(q, k, v, bank_k, bank_v, index, expand_gqa=True)   # HF's repeat_kv
            causal = torch.ones(s, s, dtype=torch.bool, device=device).tril()
            mask = torch.cat([torch.ones(s, p, dtype=torch.bool, device=device), causal], dim=1)
            mask = mask[None, None].expand(b, 1, s, p + s)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return peft
    if name == "concat_lower_right":
        from torch.nn.attention.bias import causal_lower_right
        bias = causal_lower_right(s, p + s)

        def lower_right():
            keys, values = _concat_kv(q, k, v, bank_k, bank_v, index, expand_gqa=True)
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias)
        return lower_right
    if name == "concat_flex":
        if device != "cuda":
            raise RuntimeError("compiled FlexAttention is measured on the GPU only")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)

        def prefix_causal(b_, h_, q_idx, kv_idx):
            return (kv_idx < p) | (kv_idx - p <= q_idx)
        block_mask = create_block_mask(prefix_causal, None, None, s, p + s, device=device)

        def concat_flex():
            keys, values = _concat_kv(q, k, v, bank_k, bank_v, index, expand_gqa=False)
            return flex(q, keys, values, block_mask=block_mask, enable_gqa=h != k.shape[1])
        return concat_flex
    raise ValueError(f"unknown variant {name}")


def extra_peak_memory_mb(fn, inputs, grad_out) -> float | None:
    if not torch.cuda.is_available():
        return None
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn().backward(grad_out)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in inputs:
        t.grad = None
    return peak / 2**20


def bench_shape(shape, dtype, device, variants, modes, rep_ms):
    b, h, hkv, s, d, p, n = shape
    inputs, index = make_inputs(b, h, hkv, s, d, p, n, dtype, device)
    grad_out = torch.randn_like(inputs[0])
    rows, reference_out = [], None
    for name in variants:
        row = {"shape": f"{b},{h},{hkv},{s},{d},{p}" + (f" N{n}" if n > 1 else ""), "variant": name}
        try:
            fn = build_variant(name, inputs, index, p, device)
            out = fn()
            if name == "prefix_kernels":
                reference_out = out.detach()
        except Exception as exc:   # a baseline that cannot run this shape is reported, not hidden
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            continue
        for mode in modes:
            if mode == "fwd":
                ms = common.time_ms(fn, rep_ms=rep_ms)
            elif mode == "bwd":
                out = fn()
                ms = common.time_ms(lambda: out.backward(grad_out, retain_graph=True), rep_ms=rep_ms,
                                    grad_to_none=list(inputs))
            else:
                ms = common.time_ms(lambda: fn().backward(grad_out), rep_ms=rep_ms, grad_to_none=list(inputs))
            row[f"{mode} ms"] = round(ms, 4)
            row[f"{mode} TFLOP/s"] = round(useful_flops(b, h, s, d, p, mode) / ms / 1e9, 1)
        row["extra peak MiB"] = extra_peak_memory_mb(fn, inputs, grad_out)
        row["_out"] = out.detach()
        rows.append(row)
    # every variant that includes the prefix must agree with ours (the floor has no prefix)
    for row in rows:
        out = row.pop("_out", None)
        if out is not None and reference_out is not None and row["variant"] not in (*FLOORS, "prefix_kernels"):
            row["max |diff| vs ours"] = float((out.float() - reference_out.float()).abs().max())
    return rows


def add_ratios(rows, mode="fwd+bwd"):
    """Speed of prefix_kernels over each baseline and over the best baseline, per shape."""
    by_shape = {}
    for row in rows:
        by_shape.setdefault(row["shape"], []).append(row)
    summary = []
    for shape, group in by_shape.items():
        ours = next((r for r in group if r["variant"] == "prefix_kernels" and f"{mode} ms" in r), None)
        if ours is None:
            continue
        baselines = [r for r in group if r["variant"] not in (*OURS, *FLOORS) and f"{mode} ms" in r]
        floor = next((r for r in group if r["variant"] == "floor" and f"{mode} ms" in r), None)
        cudnn = next((r for r in group if r["variant"] == "floor_cudnn" and f"{mode} ms" in r), None)
        paths = {name: next((r for r in group if r["variant"] == name and f"{mode} ms" in r), None)
                 for name in PATH_COLUMNS}
        for r in group:
            if f"{mode} ms" in r:
                r[f"ours speedup ({mode})"] = round(r[f"{mode} ms"] / ours[f"{mode} ms"], 3)
                if cudnn is not None:       # issue 10's yardstick: >= 0.9 required, 1.0 target
                    r[f"vs cuDNN ({mode})"] = round(cudnn[f"{mode} ms"] / r[f"{mode} ms"], 3)
        best = min(baselines, key=lambda r: r[f"{mode} ms"]) if baselines else None
        summary.append({
            "shape": shape,
            "ours ms": ours[f"{mode} ms"], "ours TFLOP/s": ours[f"{mode} TFLOP/s"],
            "best baseline": best["variant"] if best else None,
            "speedup vs best": round(best[f"{mode} ms"] / ours[f"{mode} ms"], 3) if best else None,
            "speedup vs floor": round(floor[f"{mode} ms"] / ours[f"{mode} ms"], 3) if floor else None,
            "speedup vs cuDNN floor": round(cudnn[f"{mode} ms"] / ours[f"{mode} ms"], 3) if cudnn else None,
            **{f"{PATH_COLUMNS[name]} vs cuDNN floor": round(cudnn[f"{mode} ms"] / r[f"{mode} ms"], 3)
               if cudnn and r else None for name, r in paths.items()},
            "ours extra MiB": ours.get("extra peak MiB"),
            "floor extra MiB": floor.get("extra peak MiB") if floor else None,
        })
    return summary


def plot(rows, path, mode="fwd+bwd"):
    plt = common.pyplot()
    if plt is None:
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(shapes)), 4.5))
    for i, name in enumerate(variants):
        vals = [next((r.get(f"{mode} TFLOP/s", 0) for r in rows if r["shape"] == s and r["variant"] == name), 0)
                for s in shapes]
        ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=name)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
    ax.set_xticklabels(shapes, rotation=15, fontsize=8)
    ax.set_ylabel(f"{mode} TFLOP/s (useful work)")
    ax.set_xlabel("B,H,Hkv,S,D,P")
    ax.legend(fontsize=8)
    ax.set_title("prefix attention, forward+backward")
    common.save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="prefix-kernels bench attention", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--shape", action="append", default=None,
                        help="B,H,Hkv,S,D,P[,N] (repeatable); default: the issue's shapes")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--rep-ms", type=float, default=200)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--output", default=None, help="JSON file name under benchmarks/results/")
    parser.add_argument("--repeats", type=int, default=15, help="no GPU: timed calls per CPU timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        from .attention_cpu import main as cpu_main
        return cpu_main(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if device == "cpu":
        dtype = torch.float32
        print("No GPU: a small CPU run (float32, the reference path). These are CPU timings; they say "
              "nothing about GPU speed.", file=sys.stderr)
    shapes = [tuple(int(x) for x in s.split(",")) + ((1,) if len(s.split(",")) == 6 else ())
              for s in args.shape] if args.shape else (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    variants = args.variants.split(",")
    modes = args.modes.split(",")
    env = common.environment()

    rows = []
    for shape in common.progress(shapes, desc="shapes", file=sys.stderr):
        rows += bench_shape(shape, dtype, device, variants, modes, args.rep_ms)
        torch.cuda.empty_cache() if device == "cuda" else None
    summary = add_ratios(rows)

    columns = ["shape", "variant"] + [f"{m} {u}" for m in modes for u in ("ms", "TFLOP/s")] + \
              ["extra peak MiB", "ours speedup (fwd+bwd)", "vs cuDNN (fwd+bwd)", "max |diff| vs ours", "error"]
    print(f"\n{env['device']}  torch {env['torch']}  triton {env['triton']}  {args.dtype}  commit {env['git_commit']}")
    print(common.format_table(rows, [c for c in columns if any(c in r for r in rows)]))
    print("\nSummary (fwd+bwd): speedup = baseline ms / ours ms")
    print(common.format_table(summary, list(summary[0]) if summary else ["shape"]))

    slug = common.device_slug(env)
    name = args.output or f"attention-{slug}.json"
    path = common.write_json(name, {"benchmark": "attention", "dtype": args.dtype, "environment": env,
                                    "flops_formula": "4*D*B*H*(S*(S+1)/2 + S*P); bwd x2.5; fwd+bwd x3.5",
                                    "rows": rows, "summary": summary})
    print(f"\nwrote {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(rows, png)
        print(f"wrote {png}")
    return 0
