"""The decode step alone, variant by variant: correctness, replay time, kernels per layer.

TinyLlama-1.1B shape (bf16, random weights), P=32 prefixes from a bank of 8 (row r uses entry
r % 8), rows at cache positions 200..255 (each row its own). Each variant is one CUDA graph per
batch size, replayed with the next tokens fed back inside the graph:
  eager-graph               the patched HF modules through the engine's KV cache, argmax in the
                            graph (today's engine decode)
  compiled                  serve/step.py under torch.compile (inductor, per layer), q/k/v and
                            gate/up as separate GEMMs, greedy
  compiled+fused            the same with one q/k/v and one gate/up GEMM per layer, greedy
  compiled+fused/sampled    + temperature sampling (Gumbel noise) in the graph
  compiled+fused/filtered   + top-k/top-p (a sort over the vocabulary): the general graph
  --extra static            compiled+fused with one compile per batch size instead of a dynamic one
  --extra whole             compiled+fused as one graph of all layers instead of one per layer
  --extra autotune          compiled+fused with mode="max-autotune-no-cudagraphs" (Triton GEMMs
                            autotuned against cuBLAS; long compile)
Correctness: 16 greedy steps of compiled+fused against eager-graph from the same cache (bf16:
first-step logits error and the share of rows whose 16 tokens agree), and exact tokens on a
2-layer fp32 model of the same width. Prints a table, writes decode_step_profile.json.

    python benchmarks/profile_decode_step.py [--batches 1 32 128] [--variants ...] [--extra static whole autotune]
    python benchmarks/profile_decode_step.py --quick      # CPU smoke run: tiny model, aot_eager, no graphs
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from prefix_kernels.bench.common import environment, format_table, write_json  # noqa: E402

PREFIX_LEN, NUM_PREFIXES, CHECK_STEPS = 32, 8, 16
BASE_VARIANTS = ["eager-graph", "compiled", "compiled+fused", "compiled+fused/sampled", "compiled+fused/filtered"]


def build(config, device, dtype, max_batch, max_seq_len, backend):
    """A patched model with a bank of NUM_PREFIXES random prefixes, the engine's KV cache (random
    contents) and the per-row input buffers of a step."""
    from transformers import AutoModelForCausalLM

    from prefix_kernels.integrations import transformers as hf

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    bank = hf.patch_model(model, PREFIX_LEN, names=[f"p{i}" for i in range(NUM_PREFIXES)], init="random",
                          backend=backend)
    bank.requires_grad_(False).to(dtype)
    cache = engine_cache(model, bank, max_batch, max_seq_len, dtype, device, backend)
    cache.k.normal_()
    cache.v.normal_()
    n = max_batch
    g = torch.Generator().manual_seed(1)
    buf = dict(
        tokens=torch.randint(3, config.vocab_size, (n,), generator=g).to(device),
        positions=torch.zeros(n, dtype=torch.long, device=device),
        seqlens=torch.zeros(n, dtype=torch.long, device=device),
        rows=(torch.arange(n) % NUM_PREFIXES).to(device),
        temperature=torch.full((n,), 0.8, device=device),
        top_k=torch.full((n,), 50, dtype=torch.long, device=device),
        top_p=torch.full((n,), 0.9, device=device),
        seeds=torch.arange(n, dtype=torch.long, device=device) * 7919,
        steps=torch.zeros(n, dtype=torch.long, device=device))
    return model, bank, cache, buf


def start_positions(n, max_seq_len):
    """Cache positions of the first step: 228..283 (mean 256, as ANCHORS 3b), every row its own."""
    base = min(228, max_seq_len - CHECK_STEPS - 57)
    return base + (torch.arange(n) * 7) % 56


def engine_cache(model, bank, slots, max_seq_len, dtype, device, backend):
    """The engine's KV cache, hooked into the patched model's attention; `cache.decoding(batch,
    positions, seqlens)` is the context of a decode forward."""
    from prefix_kernels.integrations import transformers as hf
    from prefix_kernels.serve.attention import CacheAttention
    from prefix_kernels.serve.cache import KVCache

    cache = KVCache(bank.num_layers, slots, bank.num_kv_heads, max_seq_len, bank.head_dim,
                    num_q_heads=model.config.num_attention_heads, dtype=dtype, device=device)
    hf.set_attention_hook(model, CacheAttention(cache, backend))
    return cache


def reset(buf, first_tokens, max_seq_len):
    start = start_positions(buf["positions"].shape[0], max_seq_len)
    buf["positions"].copy_(start)
    buf["seqlens"].copy_(start + 1)
    buf["steps"].zero_()
    buf["tokens"].copy_(first_tokens)


def hf_step(model, cache, buf, batch):
    """Today's engine decode: the patched HF modules, the cache in decode mode, argmax."""
    def fn():
        logits = hf_logits(model, cache, buf, batch)
        buf["tokens"][:batch].copy_(logits.argmax(-1))
        return logits
    return fn


def compiled_step(step, buf, batch, sampling):
    def fn():
        b = {k: v[:batch] for k, v in buf.items()}
        return step(b["tokens"], b["positions"], b["seqlens"], b["rows"], b["temperature"], b["top_k"], b["top_p"],
                    b["seeds"], b["steps"], out=b["tokens"], sampling=sampling)
    return fn


def logits_of(step, buf, batch):
    b = {k: v[:batch] for k, v in buf.items()}
    return step.logits(b["tokens"], b["positions"], b["seqlens"], b["rows"])


def advance(buf):
    buf["positions"] += 1
    buf["seqlens"] += 1
    buf["steps"] += 1


def run_tokens(run, buf, batch, first_tokens, max_seq_len, steps=CHECK_STEPS):
    """[steps, batch] tokens of `run` (one step per call) from the reset state."""
    reset(buf, first_tokens, max_seq_len)
    out = []
    for _ in range(steps):
        run()
        out.append(buf["tokens"][:batch].clone())
        advance(buf)
    return torch.stack(out)


def time_replays(run, device, n=50) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(3):
            run()
        return (time.perf_counter() - start) * 1e3 / 3
    for _ in range(5):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(n):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / n


def count_kernels(run, device, n=5) -> tuple[float, list]:
    """(kernels per step, the step's GPU time by kernel: [name, launches/step, us/step], the
    largest first), from the profiler over n steps."""
    if device.type != "cuda":
        return float("nan"), []
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run()
        torch.cuda.synchronize(device)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and "memcpy" not in e.key.lower()
              and "memset" not in e.key.lower()]
    by_time = sorted(events, key=lambda e: -getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)))
    top = [[e.key[:90], e.count / n, getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / n]
           for e in by_time[:12]]
    return sum(e.count for e in events) / n, top


def memory_limit_ms(model, bank, batch, mean_len) -> float:
    """Bytes one step must read (weights but the embedding table, the rows' keys/values, the
    distinct prefixes) at the GPU's copy bandwidth."""
    emb = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb and p.dim() > 0)
    if model.get_output_embeddings().weight is emb:
        weights += emb.numel() * emb.element_size()
    per_token = bank.num_layers * 2 * bank.num_kv_heads * bank.head_dim * emb.element_size()
    kv = batch * mean_len * per_token + min(batch, NUM_PREFIXES) * PREFIX_LEN * per_token
    from prefix_kernels.bench.decode_baselines import copy_bytes_per_s

    return (weights + kv) / copy_bytes_per_s() * 1e3


def variant_options(name, compiler):
    from prefix_kernels.serve.step import StepOptions

    fuse = "fused" in name
    return StepOptions(compiler=compiler, fuse=fuse, dynamic="static" not in name, per_layer="whole" not in name,
                       mode="max-autotune-no-cudagraphs" if "autotune" in name and compiler == "inductor" else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--variants", nargs="*", default=BASE_VARIANTS, choices=BASE_VARIANTS,
                        help="base variants to run (default: all)")
    parser.add_argument("--extra", nargs="*", default=[], choices=["static", "whole", "autotune"])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny model, aot_eager, no graphs")
    parser.add_argument("--no-fp32-check", action="store_true")
    args = parser.parse_args(argv)
    from prefix_kernels.bench.common import tinyllama_config
    from prefix_kernels.serve.graphs import GraphCache
    from prefix_kernels.serve.step import DecodeStep

    if args.quick:
        from transformers import LlamaConfig
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        device, dtype, compiler, backend, batches, max_seq_len = (torch.device("cpu"), torch.float32, "aot_eager",
                                                                  "reference", args.batches or [1, 4], 96)
    else:
        if not torch.cuda.is_available():
            print("profile_decode_step: no CUDA GPU; --quick runs a CPU smoke test", file=sys.stderr)
            return 2
        config = tinyllama_config(max_position_embeddings=2048)
        device, dtype, compiler, backend, batches, max_seq_len = (torch.device("cuda"), torch.bfloat16, "inductor",
                                                                  "auto", args.batches or [1, 32, 128], 512)
    env = environment()
    print(f"profile_decode_step on {env['device']}: torch {env['torch']}, triton {env['triton']}, transformers "
          f"{env['transformers']}, commit {env['git_commit'][:10]}", flush=True)
    model, bank, cache, buf = build(config, device, dtype, max(batches), max_seq_len, backend)
    first_tokens = buf["tokens"].clone()
    from prefix_kernels.integrations.transformers import position_offset
    offset = position_offset(model)
    graphs = GraphCache(device) if device.type == "cuda" else None
    variants = list(args.variants) + [f"compiled+fused/{e}" for e in args.extra]
    steps, rows, checks = {}, [], {}
    payload = {"benchmark": "profile_decode_step", "model": "TinyLlama-1.1B shape (random weights)" if not args.quick
               else "tiny llama (quick)", "dtype": str(dtype), "prefix_len": PREFIX_LEN, "max_seq_len": max_seq_len,
               "environment": env, "results": rows, "checks": checks}

    def runner(name, batch):
        """(a callable running one step of `name` at `batch`, seconds spent compiling/capturing)."""
        if name == "eager-graph":
            fn = hf_step(model, cache, buf, batch)
        else:
            sampling = name.split("/")[1] if name.split("/")[-1] in ("sampled", "filtered") else "greedy"
            key = variant_options(name, compiler)
            if key not in steps:
                steps[key] = DecodeStep(model, cache.k, cache.v, bank.prefix, offset=offset, backend=backend,
                                        options=key, workspace=cache.workspace)
            fn = compiled_step(steps[key], buf, batch, sampling)
        start = time.perf_counter()
        if graphs is None:
            with torch.no_grad():
                fn()
            return (lambda: fn()), time.perf_counter() - start
        reset(buf, first_tokens, max_seq_len)
        with torch.no_grad():
            graphs.capture((name, batch), fn, preserve=[buf["tokens"]])
        torch.cuda.synchronize(device)
        return (lambda: graphs.replay((name, batch))), time.perf_counter() - start

    for batch in sorted(batches, reverse=True):          # largest first: the graphs share one pool
        limit = memory_limit_ms(model, bank, batch, float(start_positions(batch, max_seq_len).float().mean()) + 1)
        for name in variants:
            row = {"variant": name, "B": batch}
            try:
                with torch.no_grad():
                    run, setup_s = runner(name, batch)
                    reset(buf, first_tokens, max_seq_len)
                    ms = time_replays(run, device)
                    kernels, top = count_kernels(run, device)
                row.update(replay_ms=ms, tokens_per_s=batch / ms * 1e3, setup_s=setup_s, kernels_per_step=kernels,
                           kernels_per_layer=kernels / bank.num_layers, limit_ms=limit, limit_ratio=ms / limit,
                           top_kernels=top)
                if name in ("eager-graph", "compiled+fused"):
                    with torch.no_grad():
                        row["tokens"] = run_tokens(run, buf, batch, first_tokens, max_seq_len)
            except Exception as e:          # reported, never dropped
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            rows.append(row)
            print(_line(row), flush=True)
            for name_, launches, us in row.get("top_kernels", []):
                print(f"    {us:8.1f} us/step {launches:6.1f}x  {name_}", flush=True)
        # -- correctness at this batch: compiled+fused against eager-graph --------------------
        ref = next((r for r in rows if r["B"] == batch and r["variant"] == "eager-graph" and "tokens" in r), None)
        got = next((r for r in rows if r["B"] == batch and r["variant"] == "compiled+fused" and "tokens" in r), None)
        if ref is not None and got is not None:
            with torch.no_grad():
                reset(buf, first_tokens, max_seq_len)
                fused = next(s for k, s in steps.items() if k.fuse and k.per_layer and k.dynamic)
                want = hf_logits(model, cache, buf, batch).float()
                reset(buf, first_tokens, max_seq_len)
                have = logits_of(fused, buf, batch).float()
            agree = (ref["tokens"] == got["tokens"]).all(0).float().mean().item()
            checks[f"B={batch}"] = {"first_step_logits_max_abs_err": (have - want).abs().max().item(),
                                    "logits_max_abs": want.abs().max().item(),
                                    "first_step_tokens_equal": bool((ref["tokens"][0] == got["tokens"][0]).all()),
                                    f"rows_with_all_{CHECK_STEPS}_tokens_equal": agree}
            print(f"check B={batch}: {checks[f'B={batch}']}", flush=True)
        for r in rows:
            r.pop("tokens", None)
        write_json("decode_step_profile.json" if not args.quick else "decode_step_profile_quick.json", payload)

    if not args.no_fp32_check:
        checks["fp32_exact"] = fp32_check(config, device, compiler, backend, max_seq_len, args.quick)
        print(f"check fp32 (2 layers): {checks['fp32_exact']}", flush=True)

    table = [{"variant": r["variant"], "B": r["B"],
              "ms/step": f"{r['replay_ms']:.3f}" if "replay_ms" in r else "failed",
              "tok/s": f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "",
              "x limit": f"{r['limit_ratio']:.2f}" if "limit_ratio" in r else "",
              "kernels/layer": f"{r['kernels_per_layer']:.1f}" if "kernels_per_layer" in r else "",
              "setup s": f"{r['setup_s']:.1f}" if "setup_s" in r else "",
              "note": r.get("error", "")[:60]} for r in rows]
    print("\n" + format_table(table, ["variant", "B", "ms/step", "tok/s", "x limit", "kernels/layer", "setup s",
                                      "note"]))
    path = write_json("decode_step_profile.json" if not args.quick else "decode_step_profile_quick.json", payload)
    print(f"\nwrote {path}")
    ok = all("error" not in r for r in rows) and checks.get("fp32_exact", {}).get("tokens_equal", True)
    return 0 if ok else 1


def hf_logits(model, cache, buf, batch):
    with cache.decoding(batch, buf["positions"], buf["seqlens"]):
        return model(input_ids=buf["tokens"][:batch, None], position_ids=buf["positions"][:batch, None],
                     attention_mask=torch.ones_like(buf["tokens"][:batch, None]), use_cache=False,
                     prefix_ids=buf["rows"][:batch]).logits[:, -1]


def fp32_check(config, device, compiler, backend, max_seq_len, quick) -> dict:
    """Exact greedy tokens, compiled step (in graphs on CUDA) against the eager HF modules, fp32."""
    from prefix_kernels.serve.graphs import GraphCache
    from prefix_kernels.serve.step import DecodeStep, StepOptions

    small = copy.deepcopy(config)
    small.num_hidden_layers = 2
    batch = 8 if not quick else 4
    model, bank, cache, buf = build(small, device, torch.float32, batch, max_seq_len, backend)
    first = buf["tokens"].clone()
    from prefix_kernels.integrations.transformers import position_offset
    step = DecodeStep(model, cache.k, cache.v, bank.prefix, offset=position_offset(model), backend=backend,
                      options=StepOptions(compiler=compiler), workspace=cache.workspace)
    with torch.no_grad():
        want = run_tokens(hf_step(model, cache, buf, batch), buf, batch, first, max_seq_len)
        fn = compiled_step(step, buf, batch, "greedy")
        if device.type == "cuda":
            graphs = GraphCache(device)
            reset(buf, first, max_seq_len)
            graphs.capture("fp32", fn, preserve=[buf["tokens"]])
            fn = lambda: graphs.replay("fp32")  # noqa: E731
        have = run_tokens(fn, buf, batch, first, max_seq_len)
    return {"B": batch, "steps": CHECK_STEPS, "tokens_equal": bool((want == have).all()),
            "rows_equal": float((want == have).all(0).float().mean())}


def _line(row):
    if "error" in row:
        return f"{row['variant']} B={row['B']}: failed: {row['error']}"
    return (f"{row['variant']} B={row['B']}: {row['replay_ms']:.3f} ms/step, {row['tokens_per_s']:,.0f} tok/s, "
            f"{row['limit_ratio']:.2f}x the memory limit, {row['kernels_per_layer']:.1f} kernels/layer, "
            f"setup {row['setup_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
