"""What each optional feature of the fused op costs: forward and forward+backward time with
dropout, softcap, a sliding window, packed documents, and all of them, against the plain op.

    python benchmarks/bench_features.py            # H200, bf16, two training shapes
    python benchmarks/bench_features.py --quick    # tiny, on the CPU under TRITON_INTERPRET=1

Time: prefix_kernels.bench.common.time_ms (do_bench median on the GPU). The window and packing
rows also do less work than the plain op (skipped key blocks): their TFLOP/s column counts the
plain causal work, so it reads as "effective" throughput. JSON under $PREFIX_KERNELS_RESULTS.
"""
import argparse
import sys

import torch

import prefix_kernels as pk
from prefix_kernels.bench import common
from prefix_kernels.ops.segments import segment_start_from_position_ids


def variants(b, s, device):
    docs = [s // 8, s // 4, s // 8, s // 2]                     # 4 documents per row
    pos = torch.cat([torch.arange(n) for n in docs])[None].expand(b, s)
    segments = segment_start_from_position_ids(pos).to(device)
    return {"plain": {}, "dropout 0.1": dict(dropout_p=0.1), "softcap 50": dict(softcap=50.0),
            f"window {s // 4}": dict(window=s // 4), "packed 4 docs": dict(segment_start=segments),
            "all": dict(dropout_p=0.1, softcap=50.0, window=s // 4, segment_start=segments)}


def run_shape(b, hq, hkv, s, d, p, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()
    q, k, v = make(b, hq, s, d), make(b, hkv, s, d), make(b, hkv, s, d)
    bank_k, bank_v = make(1, hkv, p, d), make(1, hkv, p, d)
    grad = torch.randn(b, hq, s, d, generator=g).to(device, dtype)
    flops = 4 * d * b * hq * (s * (s + 1) / 2 + s * p)
    rows = []
    for name, features in variants(b, s, device).items():
        def fwd():
            return pk.prefix_attention(q, k, v, bank_k, bank_v, backend="triton", **features)

        def fwd_bwd():
            fwd().backward(grad)

        try:
            with torch.no_grad():
                ms_fwd = common.time_ms(fwd)
            ms_all = common.time_ms(fwd_bwd, grad_to_none=[q, k, v, bank_k, bank_v])
            rows.append({"variant": name, "fwd_ms": round(ms_fwd, 4), "fwd_bwd_ms": round(ms_all, 4),
                         "fwd_bwd_tflops": round(flops * 3.5 / ms_all / 1e9, 1)})
        except Exception as e:       # reported, never dropped
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    plain = rows[0].get("fwd_bwd_ms")
    for r in rows:
        if plain and "fwd_bwd_ms" in r:
            r["vs_plain"] = round(r["fwd_bwd_ms"] / plain, 3)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    if args.quick:
        device, dtype, shapes = "cpu", torch.float32, [(1, 2, 1, 64, 32, 8)]
    elif torch.cuda.is_available():
        device, dtype = "cuda", torch.bfloat16
        shapes = [(8, 32, 4, 1024, 64, 32), (2, 32, 8, 4096, 128, 32)]
    else:
        print("bench_features: no CUDA GPU; --quick runs a tiny CPU version", file=sys.stderr)
        return 2
    env = common.environment()
    results = {}
    for shape in shapes:
        key = "B{},Hq{},Hkv{},S{},D{},P{}".format(*shape)
        results[key] = run_shape(*shape, device, dtype)
        print(f"\n## {key}")
        print(common.format_table(results[key], ["variant", "fwd_ms", "fwd_bwd_ms", "fwd_bwd_tflops", "vs_plain",
                                                 "error"]))
    name = "features_quick.json" if args.quick else f"features-{common.device_slug(env)}.json"
    print("wrote", common.write_json(name, {"benchmark": "bench_features", "dtype": str(dtype),
                                            "environment": env, "results": results}))
    return 1 if any("error" in r for rows in results.values() for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
