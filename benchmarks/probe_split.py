"""Probe for the split attention path (issue 10), everything in one GPU call of < 5 minutes.

1. Vendor facts: which of PyTorch's cuDNN / flash attention ops exist (their schemas), whether
   each takes Hkv < Hq itself (run in a subprocess each: a crash cannot stop the probe), which
   head dims run, the shape/layout/base of the log-sum-exp they return.
2. Correctness: the split path (each vendor, vendor or fused forward, one- and two-pass backward)
   against the fp32 reference on 3 shapes, bf16: out and all 5 gradients within 2x PyTorch's own
   bf16 error (+ a small floor), the rule of tests/test_prefix_attention.py.
3. Timing (triton do_bench, median; fwd with grads off, fwd+bwd with grads for q, k, v and the
   bank) of: cuDNN and flash WITHOUT a prefix (SDPA, enable_gqa), the fused op, and the split
   variants, on the 7 shapes of issue 10; a table with ratios vs cuDNN no-prefix (>1: faster).
Every variant runs in try/except; a time budget skips what is left (said so in the output).
JSON to $PREFIX_KERNELS_RESULTS/probe_split.json (rewritten after every shape).

usage: python3 benchmarks/probe_split.py [--budget-s 270] [--shapes 0,1,...] [--variants a,b]
       TRITON_INTERPRET=1 python3 benchmarks/probe_split.py --cpu-smoke   (the script's own test:
       tiny shapes on the CPU, the PyTorch stand-in for both vendors, fp32)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

ISSUE_SHAPES = [        # (B, Hq, Hkv, S, D, P): issue 10
    (8, 32, 8, 1024, 128, 32),
    (8, 32, 8, 4096, 128, 32),
    (4, 32, 8, 4096, 128, 256),
    (16, 16, 16, 1024, 64, 16),
    (1, 32, 8, 16384, 128, 64),
    (8, 32, 4, 1024, 64, 32),        # TinyLlama, B8 S1024 P32
    (2, 32, 4, 4096, 64, 128),       # TinyLlama, B2 S4096 P128
]
CHECK_SHAPES = [        # (B, Hq, Hkv, S, D, P, N bank entries): odd lengths, GQA, mixed rows
    (2, 8, 2, 203, 64, 32, 3),
    (2, 8, 8, 257, 128, 16, 2),
    (1, 32, 8, 500, 128, 96, 1),
]   # lengths in no timed shape's autotune bucket: the checks run untuned
# name -> SplitConfig fields (vendor, mode, backward), or a baseline; in order of importance (a
# time budget cuts the tail). flash runs at 0.53-0.62x cuDNN without a prefix on the H200
# (call 1, 2026-11-30): only its padded mode is kept, for correctness.
VARIANTS = {
    "cudnn_noprefix": None,
    "split_cudnn_pad": ("cudnn", "pad", "auto"),
    # cuDNN through its frontend package: bottom-right causal over the prefix-prepended keys, q
    # unpadded (ops/cudnn_frontend.py); needs nvidia-cudnn-frontend (gpu_run.sh installs .whl/)
    "split_cudnnfe_pad": ("cudnn_fe", "pad", "auto"),
    "fused": None,
    "split_cudnn_merge": ("cudnn", "merge", "auto"),
    "split_cudnn_fused_forward": ("cudnn", "fused_forward", "auto"),
    "flash_noprefix": None,
    "split_flash_pad": ("flash", "pad", "auto"),
    "split_cudnn_merge_twopass": ("cudnn", "merge", "twopass"),   # not run by default (compiles)
}
# what users get: path="auto" (the fused op, or the split where the measured rule picks it)
VARIANTS["auto"] = None
DEFAULT_VARIANTS = [name for name in VARIANTS if name not in ("split_cudnn_merge_twopass", "auto")]
# the fused op under another program order (ops/prefix_attention.py `_schedule`); not default
FUSED_ORDERS = {"fused_lpt": {"PREFIX_KERNELS_SCHEDULE": "lpt"},
                "fused_lpt_one_section": {"PREFIX_KERNELS_SCHEDULE": "lpt", "PREFIX_KERNELS_LPT_ROWS": "1000000"}}
VARIANTS.update({name: None for name in FUSED_ORDERS})
# path="auto" under a setting: what users get with it (the forward and the backward read it)
AUTO_SETTINGS = {"auto_cudnnfe": {"PREFIX_KERNELS_AUTO_CUDNN_FE": "1"}}
VARIANTS.update({name: None for name in AUTO_SETTINGS})
VARIANT_ENV = {**FUSED_ORDERS, **AUTO_SETTINGS}

DEVICE, DTYPE = "cuda", torch.bfloat16
VENDOR_RUNS = {}        # (vendor, head_dim) -> whether the subprocess probe ran it (expanded K/V)
SMOKE_ISSUE_SHAPES = [(1, 4, 2, 40, 32, 8), (1, 2, 2, 24, 16, 20)]
SMOKE_CHECK_SHAPES = [(2, 4, 2, 19, 32, 7, 3)]

_GQA_CHILD = r"""
import json, sys, torch
vendor, d = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
B, HQ, HKV, S = 2, 8, 2, 256
dev, dt = "cuda", torch.bfloat16
q = torch.randn(B, HQ, S, d, device=dev, dtype=dt)
k = torch.randn(B, HKV, S, d, device=dev, dtype=dt)
v = torch.randn(B, HKV, S, d, device=dev, dtype=dt)
do = torch.randn(B, HQ, S, d, device=dev, dtype=dt)
scale = d ** -0.5
A = torch.ops.aten
def run(k, v):
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    if vendor == "cudnn":
        o, lse = A._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)[:2]
        g = A._scaled_dot_product_cudnn_attention_backward(do, q, k, v, o, lse, zero, zero, None, None, None, S, S, 0.0, True, scale=scale)
    else:
        o, lse = A._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)[:2]
        g = A._scaled_dot_product_flash_attention_backward(do, q, k, v, o, lse, None, None, S, S, 0.0, True, zero, zero, scale=scale)
    torch.cuda.synchronize()
    return o, lse, g
res = {}
ke, ve = (t.repeat_interleave(HQ // HKV, 1) for t in (k, v))
o_e, lse_e, g_e = run(ke, ve)
s = (q.float() @ ke.float().transpose(-1, -2)) * scale
s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=dev).triu(1), float("-inf"))
want = torch.logsumexp(s, -1)
got = lse_e.reshape(want.shape)
res["lse_shape"], res["lse_stride"] = list(lse_e.shape), list(lse_e.stride())
res["lse_base"] = ("natural" if (got - want).abs().max() < 1e-2 else
                   "2" if (got - want / 0.6931471805599453).abs().max() < 1e-2 else "unknown")
res["out_stride_matches_q"] = o_e.stride() == q.stride()
res["runs_expanded"] = True
res["native_gqa_runs"] = "crashed the process"
print("RESULT " + json.dumps(res), flush=True)     # kept if the native GQA call kills the process
try:
    o_n, lse_n, g_n = run(k, v)
    dk_e = g_e[1].view(B, HKV, HQ // HKV, S, d).sum(2)
    res["native_gqa_runs"] = True
    res["native_gqa_correct"] = bool((o_n - o_e).abs().max() < 2e-2 and (g_n[0] - g_e[0]).abs().max() < 5e-2
                                     and tuple(g_n[1].shape) == tuple(k.shape)
                                     and (g_n[1].float() - dk_e.float()).abs().max() < 1e-1)
except Exception as exc:
    res["native_gqa_runs"] = False
    res["native_gqa_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
print("RESULT " + json.dumps(res))
"""


def log(*args):
    print(*args, flush=True)


def vendor_facts():
    """Schemas, and per vendor and head dim a subprocess run: GQA native? LSE layout and base?"""
    facts = {"schemas": {}, "runs": {}}
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"):
        op = getattr(torch.ops.aten, name, None)
        facts["schemas"][name] = str(op.default._schema) if op is not None else "missing"
        log(f"  {facts['schemas'][name]}")
    procs = {}
    for vendor in ("cudnn", "flash"):
        for d in (64, 128, 256):
            procs[(vendor, d)] = subprocess.Popen([sys.executable, "-c", _GQA_CHILD, vendor, str(d)],
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for (vendor, d), proc in procs.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", "timed out"
        line = next((x for x in reversed(out.splitlines()) if x.startswith("RESULT ")), None)
        if line is not None:
            res = json.loads(line[7:])
        else:
            tail = (err.strip().splitlines() or ["no output"])[-1]
            res = {"runs_expanded": False, "error": f"rc={proc.returncode}: {tail[:200]}"}
        facts["runs"][f"{vendor} D{d}"] = res
        log(f"  {vendor} D={d}: {json.dumps(res)}")
    return facts


def make_inputs(b, hq, hkv, s, d, p, n, dtype, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE, dtype=dtype, generator=g).requires_grad_()
    tensors = (leaf(b, hq, s, d), leaf(b, hkv, s, d), leaf(b, hkv, s, d), leaf(n, hkv, p, d), leaf(n, hkv, p, d))
    index = (torch.arange(b, device=DEVICE) * 2 % n) if n > 1 else None
    return tensors, index


def build(name, tensors, index):
    """A zero-argument function running the variant."""
    import prefix_kernels as pk
    from prefix_kernels.ops import split_attention as sa
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v, bk, bv = tensors
    gqa = q.shape[1] != k.shape[1]
    if name in ("cudnn_noprefix", "flash_noprefix"):
        backend = SDPBackend.CUDNN_ATTENTION if name == "cudnn_noprefix" else SDPBackend.FLASH_ATTENTION
        backend = backend if DEVICE == "cuda" else SDPBackend.MATH

        def floor():
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        try:
            floor()
            return floor
        except RuntimeError:
            if not gqa:
                raise
        hq = q.shape[1]

        def floor_expanded():     # the backend refuses enable_gqa: expand as HF's repeat_kv does
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k.repeat_interleave(hq // k.shape[1], 1),
                                                      v.repeat_interleave(hq // v.shape[1], 1), is_causal=True)
        floor_expanded.note = "K/V expanded (enable_gqa refused)"
        return floor_expanded
    if name == "fused" or name in FUSED_ORDERS:
        return lambda: pk.prefix_attention(q, k, v, bk, bv, prefix_index=index, path="fused")
    if name == "auto" or name in AUTO_SETTINGS:
        return lambda: pk.prefix_attention(q, k, v, bk, bv, prefix_index=index, path="auto")
    config = sa.SplitConfig(*VARIANTS[name])
    if DEVICE == "cpu":
        config = config._replace(vendor="math")
    if VENDOR_RUNS.get((config.vendor, q.shape[-1])) is False:     # it may crash this process too
        raise RuntimeError(f"skipped: {config.vendor} failed at D={q.shape[-1]} in the subprocess probe")
    reason = sa.unusable_reason(config, q, k, bk)
    if reason is not None:
        raise RuntimeError(f"ineligible: {reason}")
    scale = q.shape[-1] ** -0.5
    return lambda: sa.split_prefix_attention(q, k, v, bk, bv, index, scale, True, config)


def check(name, shape, dtype):
    """Max errors of out and the 5 grads vs the fp64 reference, against 2x PyTorch's own."""
    from prefix_kernels.ops.reference import reference_prefix_attention
    b, hq, hkv, s, d, p, n = shape
    tensors, index = make_inputs(b, hq, hkv, s, d, p, n, dtype, seed=1)
    grad_out = torch.randn_like(tensors[0])
    fn = build(name, tensors, index)
    out = fn()
    grads = torch.autograd.grad(out, tensors, grad_out)
    ref_in = [t.detach().double().requires_grad_() for t in tensors]
    ref = reference_prefix_attention(*ref_in, index, None, None, True)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    low = [t.detach().clone().requires_grad_() for t in tensors]
    pt = reference_prefix_attention(*low, index, None, None, True, upcast=False)
    pt_grads = torch.autograd.grad(pt, low, grad_out)
    result, ok = {}, True
    for label, got, want, theirs in zip(["out", "dq", "dk", "dv", "dbank_k", "dbank_v"],
                                         (out, *grads), (ref, *ref_grads), (pt, *pt_grads)):
        ours = (got.double() - want).abs().max().item()
        torch_err = (theirs.double() - want).abs().max().item()
        passed = math.isfinite(ours) and ours <= 2 * torch_err + 1e-4 * want.abs().max().item()
        ok &= passed
        result[label] = f"{ours:.2e}/{torch_err:.2e}" + ("" if passed else " FAIL")
    result["pass"] = ok
    return result


def time_ms(fn, grad_to_none=None):
    from prefix_kernels.bench import common
    return common.time_ms(fn, warmup_ms=25, rep_ms=100 if DEVICE == "cuda" else 1, grad_to_none=grad_to_none)


def profile_backward(fn, grad_out, tensors, label, rows=10):
    """The GPU kernels of one backward (after one warm call): where a variant's time goes."""
    from torch.profiler import ProfilerActivity, profile
    out = fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        out.backward(grad_out)
        torch.cuda.synchronize()
    for t in tensors:
        t.grad = None
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / 1e3
    log(f"    backward of {label}: {total:.3f} ms of GPU kernels")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:rows]:
        log(f"      {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<3} {e.key[:110]}")


def kernel_ms(step, tensors, iters=3) -> float:
    """GPU kernel time of one call of `step` (the sum of its kernels' durations, profiler), which
    host launch overhead does not inflate: where it is far below the wall time, the timing is
    host-bound (the fused op's fwd+bwd at B8 H32/4 S1024 D64 read 0.60-0.94 ms across calls)."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            # fresh grads each time, as the wall-clock timing has them: accumulating into the last
            # ones added an add per input (~60 us at B16 H16/16 S1024, cuDNN's kernels then read
            # above its wall time, 0.583 vs 0.491 ms at 46a4328)
            for t in tensors:
                t.grad = None
            step()
        torch.cuda.synchronize()
    for t in tensors:
        t.grad = None
    return sum(e.self_device_time_total for e in prof.key_averages()) / iters / 1e3


def time_shape(shape, names, out_of_time, profile=False):
    """Rows of fwd and fwd+bwd ms per variant on one issue shape, with ratios vs cuDNN."""
    b, hq, hkv, s, d, p = shape
    tensors, index = make_inputs(b, hq, hkv, s, d, p, 1, DTYPE)
    grad_out = torch.randn_like(tensors[0])
    rows = []
    for name in names:
        row = {"shape": ",".join(map(str, shape)), "variant": name}
        rows.append(row)
        if out_of_time():
            row["error"] = "skipped: time budget"
            continue
        saved_env = {key: os.environ.get(key) for key in VARIANT_ENV.get(name, {})}
        os.environ.update(VARIANT_ENV.get(name, {}))      # forward and backward read it
        try:
            fn = build(name, tensors, index)
            if getattr(fn, "note", None):
                row["note"] = fn.note
            fn().backward(grad_out)              # compile / autotune outside the timing
            with torch.no_grad():
                row["fwd"] = round(time_ms(fn), 4)
            row["fwd+bwd"] = round(time_ms(lambda: fn().backward(grad_out), grad_to_none=list(tensors)), 4)
            if DEVICE == "cuda":
                try:
                    row["fwd+bwd kernels"] = round(kernel_ms(lambda: fn().backward(grad_out), tensors), 4)
                except Exception as exc:        # the wall-clock rows stand without it
                    row["kernels error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            if profile and DEVICE == "cuda":
                profile_backward(fn, grad_out, tensors, f"{name} at {row['shape']}")
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if os.environ.get("PROBE_TRACEBACK"):
                traceback.print_exc()
        finally:
            for key, value in saved_env.items():
                os.environ.pop(key) if value is None else os.environ.update({key: value})
        for t in tensors:
            t.grad = None
    base = next((r for r in rows if r["variant"] == "cudnn_noprefix" and "fwd+bwd" in r), None)
    for r in rows:
        if base is not None and "fwd+bwd" in r:
            r["fwd vs cuDNN"] = round(base["fwd"] / r["fwd"], 3)
            r["fwd+bwd vs cuDNN"] = round(base["fwd+bwd"] / r["fwd+bwd"], 3)
            if "fwd+bwd kernels" in r and "fwd+bwd kernels" in base:     # GPU time alone, host excluded
                r["kernels vs cuDNN"] = round(base["fwd+bwd kernels"] / r["fwd+bwd kernels"], 3)
    return rows


def chosen_configs():
    """The config autotune picked per kernel and key, for the fused op and the split kernels."""
    from prefix_kernels.ops import prefix_attention as fused
    from prefix_kernels.ops import split_attention as sa
    hopper = [c for table in fused._HOPPER_CANDIDATES.values() for configs in table.values() for c in configs]
    lines = []
    for module, label in ((fused, "fused"), (sa, "split")):
        for name, _, tuned, bucket, consts, config in module._LAUNCHER.chosen_configs():
            shown = {k: v for k, v in consts.items() if k.startswith(("BLOCK_N", "HAS_PIDX", "DQ", "PREFIX", "OWN"))}
            mark = "*" if any(config is c for c in hopper) else " "
            untuned = "" if tuned else " (untuned default)"
            lines.append(f"{mark} {label}.{name} D={consts.get('HEAD_DIM')} bucket={bucket} {shown} -> "
                         f"{config.kwargs} warps={config.num_warps} stages={config.num_stages}{untuned}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=270)
    parser.add_argument("--shapes", default=None, help="indices into the issue's 7 shapes")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--profile", action="store_true", help="print the GPU kernels of one backward per variant")
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    start = time.time()
    issue_shapes, check_shapes = ISSUE_SHAPES, CHECK_SHAPES
    if args.cpu_smoke:
        DEVICE, DTYPE = "cpu", torch.float32
        issue_shapes, check_shapes = SMOKE_ISSUE_SHAPES, SMOKE_CHECK_SHAPES
        # the smoke run must never overwrite the committed GPU results
        os.environ.setdefault("PREFIX_KERNELS_RESULTS", os.path.join(tempfile.gettempdir(), "probe_split_smoke"))
    elif not torch.cuda.is_available():
        log("probe_split needs a CUDA GPU (or --cpu-smoke under TRITON_INTERPRET=1)")
        return 1
    from prefix_kernels.bench import common
    from prefix_kernels.ops import vendor_attention as va
    env = common.environment()
    log(f"{env['device']}  torch {env['torch']}  triton {env['triton']}  cuDNN "
        f"{torch.backends.cudnn.version()}  commit {env['git_commit']}")
    payload = {"benchmark": "probe_split", "environment": env}

    log("\n== 1. vendor ops")
    facts = vendor_facts() if DEVICE == "cuda" else {"schemas": {}, "runs": {}}
    payload["vendors"] = facts
    for key, run in facts["runs"].items():
        vendor, d = key.split(" D")
        VENDOR_RUNS[(vendor, int(d))] = bool(run.get("runs_expanded"))
    for vendor in ("cudnn", "flash"):
        run = facts["runs"].get(f"{vendor} D128", {})
        if "native_gqa_correct" in run and bool(run["native_gqa_correct"]) != va.NATIVE_GQA[vendor]:
            log(f"  !! {vendor}: native GQA {'works' if run['native_gqa_correct'] else 'FAILS'} here, "
                f"unlike vendor_attention.NATIVE_GQA: using what was measured")
            va.NATIVE_GQA[vendor] = bool(run["native_gqa_correct"])
        dims = len(run.get("lse_shape", [])) or va.LSE_DIMS[vendor]
        if dims != va.LSE_DIMS[vendor]:
            log(f"  !! {vendor}: LSE has {dims} dims here, unlike vendor_attention.LSE_DIMS: using {dims}")
            va.LSE_DIMS[vendor] = dims
    log(f"  -> NATIVE_GQA used here: {va.NATIVE_GQA}; LSE_DIMS: {va.LSE_DIMS}")
    if DEVICE == "cuda":
        from prefix_kernels.ops import cudnn_frontend
        reason = cudnn_frontend.unavailable_reason()
        facts["cudnn_frontend"] = reason or f"cudnn-frontend {getattr(cudnn_frontend._module(), '__version__', '?')}"
        log(f"  cuDNN frontend: {facts['cudnn_frontend']}")
    payload["native_gqa_used"] = dict(va.NATIVE_GQA)
    path = common.write_json("probe_split.json", payload)

    names = [v for v in args.variants.split(",") if v in VARIANTS]
    log(f"\n== 2. correctness vs the fp64 reference, {DTYPE} (max error ours/torch-same-dtype; rule: ours <= 2x torch)")
    payload["checks"] = []
    tune = os.environ.get("PREFIX_KERNELS_AUTOTUNE")
    os.environ["PREFIX_KERNELS_AUTOTUNE"] = "0"          # correctness needs no tuning: save compiles
    for shape in check_shapes:
        for name in names:
            if VARIANTS[name] is None:
                continue
            row = {"shape": shape, "variant": name}
            try:
                row.update(check(name, shape, DTYPE))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            payload["checks"].append(row)
            log(f"  {shape} {name}: {json.dumps({k: v for k, v in row.items() if k not in ('shape', 'variant')})}")
            torch.cuda.empty_cache()
    os.environ.pop("PREFIX_KERNELS_AUTOTUNE") if tune is None else os.environ.update(PREFIX_KERNELS_AUTOTUNE=tune)
    common.write_json("probe_split.json", payload)

    log(f"\n== 3. timing (ms, median), {time.time() - start:.0f} s in")
    shapes = [issue_shapes[int(i)] for i in args.shapes.split(",")] if args.shapes else issue_shapes
    rows = payload["timings"] = []
    shown = 0
    for shape in shapes:
        new = time_shape(shape, names, lambda: time.time() - start > args.budget_s, args.profile)
        rows += new
        torch.cuda.empty_cache()
        # each shape's rows and autotune picks as soon as they exist: a step limit that kills the
        # probe later must not take them with it (cf0371b's probe lost its picks that way)
        payload["chosen_configs"] = chosen_configs()
        common.write_json("probe_split.json", payload)
        for r in new:
            log(f"  {shape} {r['variant']}: " + ", ".join(f"{k} {r[k]}" for k in ("fwd", "fwd+bwd", "fwd+bwd kernels",
                                                                                    "error") if k in r))
        for line in payload["chosen_configs"][shown:]:
            log(f"    picked: {line}")
        shown = len(payload["chosen_configs"])
        log(f"  {shape} done, {time.time() - start:.0f} s")

    log("\nautotune's choices (* = a Hopper candidate appended for issue 10, design 2)")
    for line in payload["chosen_configs"] if shapes else []:
        log(f"  {line}")
    log("\nratio = cuDNN no-prefix ms / variant ms (>= 0.9 required, 1.0 target)")
    cols = ["shape", "variant", "fwd", "fwd+bwd", "fwd+bwd kernels", "fwd vs cuDNN", "fwd+bwd vs cuDNN",
            "kernels vs cuDNN", "note", "error"]
    log(common.format_table(rows, [c for c in cols if any(c in r for r in rows)]))
    best = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        group = [r for r in rows if r["shape"] == shape and "fwd+bwd" in r and r["variant"] not in
                 ("cudnn_noprefix", "flash_noprefix")]
        if group:
            top = min(group, key=lambda r: r["fwd+bwd"])
            fused = next((r for r in group if r["variant"] == "fused"), None)
            best.append({"shape": shape, "fastest with prefix": top["variant"], "ms": top["fwd+bwd"],
                         "vs cuDNN": top.get("fwd+bwd vs cuDNN"),
                         "fused vs cuDNN": fused.get("fwd+bwd vs cuDNN") if fused else None})
    payload["best"] = best
    log("\nfastest prefix variant per shape (fwd+bwd)")
    log(common.format_table(best, ["shape", "fastest with prefix", "ms", "vs cuDNN", "fused vs cuDNN"]))
    path = common.write_json("probe_split.json", payload)
    log(f"\nwrote {path}  ({time.time() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
