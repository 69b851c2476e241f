"""Training on mixed-length documents: packed sequences against padding (TinyLlama-1.1B shape).

    python benchmarks/bench_packed.py            # H200: every case
    python benchmarks/bench_packed.py --quick    # a tiny CPU smoke run of the same code

A fixed data set of documents with log-normal lengths (median 300 tokens, clipped to
[16, 2048]) is trained on for whole passes, `--docs-per-step` documents per step. Each step is
forward with labels + backward + AdamW on the trainable parameters. Cases:
  prefix-kernels-packed     one row per step: the documents concatenated, position ids restarting
                            (DataCollatorWithFlattening's layout); each document attends to its own
                            tokens and the prefix only (segment starts in the fused kernel)
  prefix-kernels-padded     one row per document, right-padded to the step's longest, with a mask
  prefix-kernels-grouped    as padded, documents sorted by length first (group_by_length)
  peft-prefix-padded        PEFT prefix tuning, padded (it cannot pack: its prefix is the KV cache)
Throughput counts useful tokens only (document tokens, no padding). The first step's loss of
each case is reported: packed and padded train on the same targets. gpu_run.sh's `packed` step
sets PREFIX_KERNELS_AUTOTUNE=0 (every case on each kernel's default config; no autotune compiles).
"""
from __future__ import annotations

import gc
import sys
import time

import torch

from prefix_kernels.bench import common

CASES = ["prefix-kernels-packed", "prefix-kernels-padded", "prefix-kernels-grouped", "peft-prefix-padded"]


def document_lengths(count: int, longest: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(torch.randn(count, generator=g) * 0.9 + torch.log(torch.tensor(300.0)))
    return lengths.clamp(16, longest).long().tolist()


def documents(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g) for n in lengths]


def packed_batch(docs, device):
    """DataCollatorWithFlattening's layout: one row, restarting position ids, no mask, and each
    document's first label ignored (no prediction across a boundary)."""
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    labels = ids.clone()
    at = 0
    for d in docs:
        labels[0, at] = -100
        at += len(d)
    return dict(input_ids=ids.to(device), position_ids=positions.to(device), labels=labels.to(device))


def padded_batch(docs, device):
    longest = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), longest, dtype=torch.long)
    mask = torch.zeros(len(docs), longest, dtype=torch.long)
    for row, d in enumerate(docs):
        ids[row, :len(d)] = d
        mask[row, :len(d)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


def steps_of(case, docs, per_step, device):
    order = sorted(range(len(docs)), key=lambda i: len(docs[i])) if case.endswith("grouped") else range(len(docs))
    ordered = [docs[i] for i in order]
    make = packed_batch if case.endswith("packed") else padded_batch
    return [make(ordered[i:i + per_step], device) for i in range(0, len(ordered), per_step)]


def build(case, config, prefix_len, device, dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.train()
    if case.startswith("prefix-kernels"):
        import prefix_kernels as pk

        return model, list(pk.patch_model(model, prefix_len).parameters())
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len))
    return model, [p for p in model.parameters() if p.requires_grad]


def run_case(case, config, docs, per_step, prefix_len, device, dtype, warmup_passes, passes) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, params = build(case, config, prefix_len, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batches = steps_of(case, docs, per_step, device)

    def one_pass():
        losses = []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
        return losses

    first_loss = None
    for _ in range(warmup_passes):
        losses = one_pass()
        first_loss = first_loss if first_loss is not None else losses[0].item()
    common_sync(device)
    start = time.perf_counter()
    for _ in range(passes):
        losses = one_pass()
    common_sync(device)
    seconds = (time.perf_counter() - start) / passes
    useful = sum(len(d) for d in docs)
    computed = sum(b["input_ids"].numel() for b in batches)
    result = {"case": case, "ms_per_pass": seconds * 1e3, "steps_per_pass": len(batches),
              "useful_tokens_per_s": useful / seconds, "computed_tokens": computed, "useful_tokens": useful,
              "padding_fraction": 1 - useful / computed, "first_loss": first_loss,
              "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    return result          # the model goes with this frame; the caller collects


def common_sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_table(rows, out=sys.stdout):
    print(f"| {'case':<24} | {'ms/pass':>9} | {'useful tok/s':>12} | {'padding':>7} | {'peak GiB':>8} | "
          f"{'1st loss':>8} |", file=out)
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 14}|{'-' * 9}|{'-' * 10}|{'-' * 10}|", file=out)
    for r in rows:
        if "error" in r:
            print(f"| {r['case']:<24} | failed: {r['error'][:70]} |", file=out)
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['case']:<24} | {r['ms_per_pass']:>9.1f} | {r['useful_tokens_per_s']:>12.0f} | "
              f"{r['padding_fraction']:>7.1%} | {peak:>8} | {r['first_loss']:>8.4f} |", file=out)


def speedups(rows) -> dict:
    by = {r["case"]: r for r in rows if "error" not in r}
    packed = by.get("prefix-kernels-packed")
    if packed is None:
        return {}
    return {f"packed_vs_{name}": packed["useful_tokens_per_s"] / r["useful_tokens_per_s"]
            for name, r in by.items() if name != "prefix-kernels-packed"}


def main(argv=None) -> int:
    parser = common.parser("prefix-kernels bench packed", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: a smoke run")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--docs", type=int, default=None, help="documents in the data set (default 64; quick 8)")
    parser.add_argument("--docs-per-step", type=int, default=8)
    parser.add_argument("--prefix-len", type=int, default=32)
    parser.add_argument("--passes", type=int, default=2, help="timed passes over the data set")
    args = parser.parse_args(argv)

    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        config = common.tiny_llama_config(max_position_embeddings=256)
        lengths = document_lengths(args.docs or 8, longest=64)
        args.docs_per_step, args.prefix_len, args.passes = 4, 4, 1
    else:
        if not torch.cuda.is_available():
            print("bench_packed: no CUDA GPU; run with --quick for a CPU smoke run", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        config = common.tinyllama_config(max_position_embeddings=4096)
        lengths = document_lengths(args.docs or 64, longest=2048)
    docs = documents(lengths, config.vocab_size)
    env = common.environment()
    print(f"bench_packed on {env['device']}: {len(docs)} documents, {sum(lengths)} tokens (median "
          f"{sorted(lengths)[len(lengths) // 2]}, longest {max(lengths)}), {args.docs_per_step} per step, "
          f"P={args.prefix_len}, commit {env['git_commit'][:10]}")
    rows = []
    for case in args.cases:
        try:
            rows.append(run_case(case, config, docs, args.docs_per_step, args.prefix_len, device, dtype,
                                 warmup_passes=1, passes=args.passes))
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"case": case, "error": f"out of memory ({str(e).splitlines()[0][:80]})"})
        except Exception as e:      # reported, never dropped
            rows.append({"case": case, "error": f"{type(e).__name__}: {e}"})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {case}: done", flush=True)
    print()
    print_table(rows)
    ratios = speedups(rows)
    for name, ratio in ratios.items():
        print(f"{name}: {ratio:.2f}x useful tokens/s")
    stem = "packed_quick" if args.quick else f"packed-{common.device_slug(env)}"
    path = common.write_json(f"{stem}.json", {
        "benchmark": "bench_packed", "model": "tiny llama (quick)" if args.quick else
        "TinyLlama-1.1B shape (random weights)", "dtype": str(dtype), "document_lengths": lengths,
        "docs_per_step": args.docs_per_step, "prefix_len": args.prefix_len, "passes": args.passes,
        "environment": env, "results": rows, "speedups": ratios})
    print(f"wrote {path}")
    return 1 if any("error" in r and r["case"].startswith("prefix-kernels") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
