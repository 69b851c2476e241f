"""The decode kernel alone: CUDA vs Triton vs SDPA on concatenated KV, in GB/s and % of copy BW.

TinyLlama-1.1B attention shape (Hq=32, Hkv=4, D=64, P=32), bf16, one new token per row, every
row at the full context, B = 1 and 32, contexts 1k, 4k, 16k. Run with no arguments on the GPU:

    python benchmarks/bench_decode_kernel.py

Bytes moved (the useful traffic, the same formula for every variant):
    K and V cache bytes of the valid lengths   2 * sum_b(len_b) * Hkv * D * elem
  + the distinct prefix entries of the batch   2 * n_distinct * Hkv * P * D * elem
  + q and out                                  2 * B * Hq * Sq * D * elem
The SDPA baseline reads a KV cache with the prefix already concatenated in front of each row
(PEFT's layout; the concatenation itself is not timed) through torch's SDPA with enable_gqa.

Timing: `triton.testing.do_bench` median (it flushes L2 before each run) of a CUDA graph that
replays the call over enough copies of the inputs to exceed L2 (so small cases are not served
from cache), divided by the number of calls: the kernel's own time, without Python or launch
gaps. The eager column is do_bench of one plain call (host overhead included, what an unfused
decode loop pays). The ceiling is a device-to-device copy (read + write bytes) measured first.

Writes benchmarks/results/decode-kernel-<gpu>.json (or $PREFIX_KERNELS_RESULTS/...) and a PNG.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from prefix_kernels.bench import common
from prefix_kernels.ops import decode as dec
from prefix_kernels.ops.reference import reference_prefix_attention

HQ, HKV, D, P, SQ = 32, 4, 64, 32, 1
DTYPE = torch.bfloat16
CONTEXTS = (1024, 4096, 16384)
BATCHES = (1, 32)
BANK_ENTRIES = 8
L2_BUSTING_BYTES = 512 << 20


# --------------------------------------------------------------------------------------------
# Environment, timing
# --------------------------------------------------------------------------------------------

def environment() -> dict:
    return common.environment()


def slug(name: str) -> str:
    return common.device_slug({"device": name})


def results_dir() -> Path:
    return common.results_dir()


def bench_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def graph_ms_per_call(calls) -> float:
    """Median ms per call of one CUDA graph replaying every call in `calls` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:          # warm-up on the capture stream (compiles, allocates)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for fn in calls:
            fn()
    torch.cuda.synchronize()
    return bench_ms(graph.replay) / len(calls)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: bytes read + bytes written per second."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").fill_(1)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / ms / 1e6


# --------------------------------------------------------------------------------------------
# Inputs, variants
# --------------------------------------------------------------------------------------------

def make_inputs(batch: int, context: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=DTYPE, generator=gen)
    q = rnd(batch, HQ, SQ, D)
    k, v = rnd(batch, HKV, context, D), rnd(batch, HKV, context, D)
    pk, pv = rnd(BANK_ENTRIES, HKV, P, D), rnd(BANK_ENTRIES, HKV, P, D)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    pidx = (torch.arange(batch, device="cuda", dtype=torch.int32) * 3) % BANK_ENTRIES
    return dict(q=q, k=k, v=v, pk=pk, pv=pv, lens=lens, pidx=pidx)


def bytes_moved(batch: int, context: int) -> int:
    elem = torch.tensor([], dtype=DTYPE).element_size()
    distinct = len({(3 * b) % BANK_ENTRIES for b in range(batch)})
    kv = 2 * batch * context * HKV * D * elem
    prefix = 2 * distinct * HKV * P * D * elem
    q_out = 2 * batch * HQ * SQ * D * elem
    return kv + prefix + q_out


def variant_calls(name: str, x: dict, context: int, ext, splits: int | None = None):
    """A zero-argument callable computing the decode output for inputs x, and what it runs.
    splits: force the key-split count of the CUDA/Triton kernels (None or 0 = their heuristic)."""
    scale = 1.0 / math.sqrt(D)
    if name == "cuda":
        counters = dec.DecodeWorkspace("cuda", x["q"].shape[0], HQ, HKV, SQ).counters
        return lambda: ext.decode_attention_fwd(x["q"], x["k"], x["v"], x["lens"], x["pk"], x["pv"],
                                                x["pidx"], scale, splits or 0, context, counters)
    if name == "triton":
        return lambda: dec._launch_triton(x["q"], x["k"], x["v"], x["lens"], x["pk"], x["pv"],
                                          x["pidx"], scale, P + context, splits or None)
    if name == "sdpa_concat":
        # PEFT's layout: the row's prefix sits in front of its cache; the copy is not timed
        pidx = x["pidx"].long()
        kc = torch.cat([x["pk"][pidx], x["k"]], dim=2)
        vc = torch.cat([x["pv"][pidx], x["v"]], dim=2)
        return lambda: F.scaled_dot_product_attention(x["q"], kc, vc, scale=scale, enable_gqa=True)
    raise ValueError(name)


def oracle(x: dict) -> torch.Tensor:
    pidx = x["pidx"].long()
    return reference_prefix_attention(x["q"].float(), x["k"].float(), x["v"].float(),
                                      x["pk"].float(), x["pv"].float(), pidx, causal=True)


def check(out: torch.Tensor, x: dict) -> tuple[bool, float]:
    """Flash-attention's rule against the fp32 reference: <= 2x PyTorch's bf16 error + eps."""
    ref = oracle(x)
    pt = reference_prefix_attention(x["q"], x["k"], x["v"], x["pk"], x["pv"], x["pidx"].long(),
                                    causal=True, upcast=False).float()
    err = (out.float() - ref).abs().max().item()
    err_pt = (pt - ref).abs().max().item()
    ok = err <= 2 * err_pt + torch.finfo(DTYPE).eps * ref.abs().max().item()
    return ok, err


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`prefix-kernels bench decode-kernel [--sweep-splits]`: 0 when every kernel result is
    correct, 1 when one is not, 2 without a CUDA GPU."""
    parser = common.parser("prefix-kernels bench decode-kernel", __doc__)
    parser.add_argument("--sweep-splits", action="store_true",
                        help="%% of copy bandwidth against a forced split count (B=32, 4k and 16k)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32],
                        help="--sweep-splits: batch sizes (default: 32)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384],
                        help="--sweep-splits: cached keys per row (default: 4096 16384; the decode step of "
                             "the serving benchmark sees ~260)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench decode-kernel: needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.sweep_splits:
        return sweep_splits(args.contexts, args.batches)
    env = environment()
    ext, how = dec._extension()
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['git_commit']}")
    print(f"# CUDA extension: {how}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"# device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    variants = (["cuda"] if ext is not None else []) + ["triton", "sdpa_concat"]

    rows = []
    for batch in BATCHES:
        for context in CONTEXTS:
            moved = bytes_moved(batch, context)
            sets = max(1, min(200, math.ceil(L2_BUSTING_BYTES / moved)))
            inputs = [make_inputs(batch, context, seed) for seed in range(sets)]
            for name in variants:
                row = dict(variant=name, batch=batch, context=context, bytes=moved)
                try:
                    calls = [variant_calls(name, x, context, ext) for x in inputs]
                    ok, err = check(calls[0](), inputs[0])
                    row.update(correct=ok, max_err=err)
                    ms = graph_ms_per_call(calls)
                    eager_ms = bench_ms(calls[0])
                    row.update(ms=ms, eager_ms=eager_ms, gbs=moved / ms / 1e6,
                               frac_copy=moved / ms / 1e6 / copy_gbs)
                except Exception as exc:      # a failing variant must not hide the others
                    row.update(error=f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
                rows.append(row)
                torch.cuda.empty_cache()
            del inputs
            torch.cuda.empty_cache()

    print_table(rows)
    payload = dict(env=env, extension=how, copy_gbs=copy_gbs,
                   shape=dict(Hq=HQ, Hkv=HKV, D=D, P=P, Sq=SQ, dtype=str(DTYPE),
                              bank_entries=BANK_ENTRIES),
                   bytes_formula="2*sum(len)*Hkv*D*elem + 2*distinct_entries*Hkv*P*D*elem"
                                 " + 2*B*Hq*Sq*D*elem",
                   timing="do_bench median of a CUDA graph over L2-busting input copies, per call",
                   rows=rows)
    path = results_dir() / f"decode-kernel-{slug(env['device'])}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"# wrote {path}")
    plot(rows, copy_gbs, env, path.with_suffix(".png"))
    return 0 if all(r.get("correct", False) for r in rows if r["variant"] != "sdpa_concat") else 1


def print_table(rows: list[dict]) -> None:
    cols = ["variant", "batch", "context", "MB", "ok", "us", "eager_us", "GB/s", "%copy"]
    lines = []
    for r in rows:
        if "error" in r:
            lines.append([r["variant"], r["batch"], r["context"], f"{r['bytes'] / 1e6:.1f}",
                          "ERR", r["error"], "", "", ""])
            continue
        lines.append([r["variant"], r["batch"], r["context"], f"{r['bytes'] / 1e6:.1f}",
                      "yes" if r["correct"] else f"NO ({r['max_err']:.2g})", f"{r['ms'] * 1e3:.1f}",
                      f"{r['eager_ms'] * 1e3:.1f}", f"{r['gbs']:.0f}", f"{100 * r['frac_copy']:.0f}%"])
    widths = [max(len(str(c)), *(len(str(l[i])) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda vals: "  ".join(str(v).rjust(w) for v, w in zip(vals, widths))
    print(fmt(cols))
    print(fmt(["-" * w for w in widths]))
    for l in lines:
        print(fmt(l))


def plot(rows: list[dict], copy_gbs: float, env: dict, path: Path) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    cases = sorted({(r["batch"], r["context"]) for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        values = []
        for case in cases:
            match = [r for r in rows if r["variant"] == name and (r["batch"], r["context"]) == case]
            values.append(100 * match[0].get("frac_copy", 0.0) if match else 0.0)
        ax.bar([c + i * width for c in range(len(cases))], values, width, label=name)
    ax.axhline(80, color="gray", linestyle="--", linewidth=1, label="target 80%")
    ax.set_xticks([c + width * (len(variants) - 1) / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"B={b}\n{s // 1024}k" for b, s in cases])
    ax.set_ylabel(f"% of copy bandwidth ({copy_gbs / 1000:.2f} TB/s)")
    ax.set_title(f"Decode attention kernel, TinyLlama shape, bf16 - {env['device']}")
    ax.set_ylim(0, 115)
    ax.legend(loc="upper center", ncol=len(variants) + 1, frameon=False)
    common.save_figure(fig, path)
    print(f"# wrote {path}")


def sweep_splits(contexts=(4096, 16384), batches=(32,)) -> int:
    """--sweep-splits: % of copy bandwidth against the forced split count (each batch and context;
    splits 0 = the kernel's own choice), to see whether the split heuristics leave bandwidth
    unused. At B=32 and ~260 keys (the serving benchmark's decode step) the CUDA kernel took
    9.9 us per layer on an H100 for 8.6 MB, ~3x its copy time (results/decode_step_variants-h100.json)."""
    ext, how = dec._extension()
    env = environment()
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for batch, context in itertools.product(batches, contexts):
        moved = bytes_moved(batch, context)
        inputs = [make_inputs(batch, context, seed) for seed in range(max(1, math.ceil(L2_BUSTING_BYTES / moved)))]
        for name in (["cuda"] if ext is not None else []) + ["triton"]:
            for splits in (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
                ms = graph_ms_per_call([variant_calls(name, x, context, ext, splits) for x in inputs])
                rows.append(dict(variant=name, batch=batch, context=context, splits=splits, ms=ms,
                                 frac_copy=moved / ms / 1e6 / copy_gbs))
                print(f"{name:>7} B {batch:>3} ctx {context:>6} splits {splits:>3}: {ms * 1e3:7.1f} us "
                      f"{100 * rows[-1]['frac_copy']:5.1f}% of copy")
        del inputs
        torch.cuda.empty_cache()
    path = results_dir() / f"decode-kernel-splits-{slug(env['device'])}.json"
    path.write_text(json.dumps(dict(env=env, extension=how, copy_gbs=copy_gbs, rows=rows), indent=2) + "\n")
    print(f"# wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
