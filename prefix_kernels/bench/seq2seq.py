"""Summarization-style generation on the BART-large shape: the encoder-decoder engine against the
patched model's generate, PEFT and the bare model.

    prefix-kernels bench seq2seq            # GPU: B in {8, 32, 128}, N in {1, 8}
    prefix-kernels bench seq2seq --quick    # a tiny CPU smoke run of the same code

Every row has a 512-token source and generates exactly 64 tokens (greedy, EOS ignored) with a
P=32 prefix, N distinct prefixes spread over the B rows (row r uses prefix r mod N). Time runs
from submitting the batch to its last token, the encoder included. Cases, on one model built
from the config (random weights, bf16, SDPA), side by side in one process:
  engine         prefix_kernels.serve.Seq2SeqEngine, prefixes on all three sites (Li & Liang):
                 the encoder once per request, each slot's cross keys stored, the decoder's step
                 in a CUDA graph
  engine-eager   the same without CUDA graphs
  hf-generate    the model patched with the same prefixes, HF's `generate` (its loop and caches,
                 the fused op), all B rows in one call with per-row prefixes
  peft           PEFT's seq2seq prefix tuning (the decoder's self-attention, its one site): one
                 `generate` per group of rows sharing a prefix, the groups one after another
  bare-generate  the bare model's `generate`, no prefix: what prefixes cost against nothing
The engine rows also give the decode step (ms) and its memory limit: the decoder's weights, the
output layer and the rows' self- and cross-attention keys and values read once per step at the
GPU's measured copy bandwidth.
Results: a table on stdout, JSON and a PNG under benchmarks/results/ (or $PREFIX_KERNELS_RESULTS)
with the GPU name, versions and git commit.
"""
from __future__ import annotations

import os
import sys
import time

import torch

from prefix_kernels.bench import common
from prefix_kernels.bench.common import environment, format_table, results_dir, write_json
from prefix_kernels.bench.decode import _drop_engine, _sync, run_engine

CASES = ["engine", "engine-eager", "hf-generate", "peft", "bare-generate"]
SITES = ("encoder", "decoder", "cross")


def model_config(quick: bool):
    from transformers import BartConfig

    common_args = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, forced_eos_token_id=None)
    if quick:
        return BartConfig(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                          max_position_embeddings=128, **common_args)
    return BartConfig(**common_args)        # BartConfig's defaults are bart-large's shape


def build_model(config, device, dtype):
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForSeq2SeqLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    gen = model.generation_config          # every case decodes the same way: greedy, one beam
    gen.num_beams, gen.no_repeat_ngram_size, gen.forced_bos_token_id, gen.forced_eos_token_id = 1, 0, None, None
    gen.early_stopping, gen.length_penalty = False, 1.0
    return model.eval()


def make_prefixes(config, count, prefix_len):
    """name -> [Le + 2*Ld, 2, H, P, D]: the three sites' layers, in bank order."""
    layers = config.encoder_layers + 2 * config.decoder_layers
    heads, d = config.decoder_attention_heads, config.d_model // config.decoder_attention_heads
    g = torch.Generator().manual_seed(2)
    return {f"p{i}": 0.5 * torch.randn(layers, 2, heads, prefix_len, d, generator=g) for i in range(count)}


def make_sources(config, batch, source_len):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, config.vocab_size, (batch, source_len), generator=g)


def _generate(model, ids, new_tokens, **kwargs):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, num_beams=1, **kwargs)


def _timed_generate(model, ids, new_tokens, device, **kwargs) -> float:
    _generate(model, ids[:1, :8], 2, **{k: (v[:1] if isinstance(v, list) else v) for k, v in kwargs.items()})
    _sync(device)
    start = time.perf_counter()
    out = _generate(model, ids, new_tokens, **kwargs)
    _sync(device)
    seconds = time.perf_counter() - start
    assert out.shape[1] >= new_tokens, out.shape
    return seconds


def run_hf(model, prefixes, sources, n, prefix_len, new_tokens, device) -> dict:
    from prefix_kernels.integrations.transformers import patch_model, unpatch_model

    names = [f"p{i}" for i in range(n)]
    bank = patch_model(model, prefix_len, names=names, sites=SITES)
    try:
        for name in names:
            bank.set_entry(name, prefixes[name].to(device))
        ids = sources.to(device)
        rows = [names[r % n] for r in range(ids.shape[0])]
        seconds = _timed_generate(model, ids, new_tokens, device, prefix_ids=rows)
    finally:
        unpatch_model(model)
    return {"seconds": seconds, "tokens_per_s": ids.shape[0] * new_tokens / seconds}


def run_bare(model, sources, new_tokens, device) -> dict:
    ids = sources.to(device)
    seconds = _timed_generate(model, ids, new_tokens, device)
    return {"seconds": seconds, "tokens_per_s": ids.shape[0] * new_tokens / seconds}


def run_peft(model, sources, n, prefix_len, new_tokens, device) -> dict:
    """One PEFT generate per prefix group (PEFT serves one prefix per call); the prefixes' values
    do not change its speed, so one random prompt encoder stands for each."""
    from peft import PrefixTuningConfig, get_peft_model

    # prompt learning leaves the base model's modules as they are: dropping the wrapper undoes it
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prefix_len))
    peft_model.to(device, model.dtype)
    ids = sources.to(device)
    groups = [ids[g::n] for g in range(n)]
    seconds = sum(_timed_generate(peft_model, group, new_tokens, device) for group in groups)
    return {"seconds": seconds, "tokens_per_s": ids.shape[0] * new_tokens / seconds}


def memory_limit_ms(model, batch: int, source_len: int, context: int, prefix_tokens: int, bandwidth: float) -> float:
    """Milliseconds to read one decode step's bytes: the decoder's layers, the output layer, each
    row's cross keys/values over its source and self keys/values over its context (+ prefix)."""
    config, decoder = model.config, model.get_decoder()
    weights = sum(p.numel() * p.element_size() for p in decoder.layers.parameters())
    weights += model.get_output_embeddings().weight.numel() * model.get_output_embeddings().weight.element_size()
    width = config.d_model * model.dtype.itemsize
    kv = 2 * config.decoder_layers * width * batch * (source_len + context + 2 * prefix_tokens)
    return (weights + kv) / bandwidth * 1e3


def plot(rows, batches, path):
    """One panel per batch size: each case's end-to-end tokens/s, side by side from 0."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 3.6), squeeze=False)
    colors = {"engine": "tab:green", "engine-eager": "tab:cyan", "hf-generate": "tab:blue", "peft": "tab:gray",
              "bare-generate": "tab:orange"}
    for ax, b in zip(axes[0], batches):
        mine = [r for r in rows if r["B"] == b and "tokens_per_s" in r]
        labels = [r["case"] + (f" N={r['N']}" if isinstance(r.get("N"), int) else "") for r in mine]
        values = [r["tokens_per_s"] for r in mine]
        bars = ax.barh(range(len(mine)), values, color=[colors.get(r["case"], "tab:red") for r in mine])
        ax.bar_label(bars, [f"{v:,.0f}" for v in values], fontsize=7, padding=2)
        ax.set_yticks(range(len(mine)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.2 * max(values, default=1))
        ax.set_xlabel("generated tokens/s, end to end (higher is better)")
        ax.set_title(f"B={b}")
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.parser("prefix-kernels bench seq2seq", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: a smoke run")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--batches", type=int, nargs="+", help="default 8 32 128 (quick: 1 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed engine runs (median)")
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG (default: the results dir)")
    args = parser.parse_args(argv)
    if args.out:
        os.environ["PREFIX_KERNELS_RESULTS"] = args.out

    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        batches, source_len, new_tokens, prefix_len, counts = args.batches or [1, 4], 16, 8, 4, (1, 2)
    else:
        if not torch.cuda.is_available():
            print("bench seq2seq: no CUDA GPU; run with --quick for a CPU smoke run", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        batches, source_len, new_tokens, prefix_len, counts = args.batches or [8, 32, 128], 512, 64, 32, (1, 8)
    config = model_config(args.quick)
    env = environment()
    print(f"bench seq2seq on {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"peft {env['peft']}, commit {env['git_commit'][:10]}", flush=True)
    model = build_model(config, device, dtype)
    prefixes = make_prefixes(config, max(counts), prefix_len)
    from prefix_kernels.bench.decode_baselines import copy_bytes_per_s
    bandwidth = copy_bytes_per_s()
    plan = [(b, n, case) for b in batches for case in args.cases
            for n in ([None] if case == "bare-generate" else [c for c in counts if c <= b])]
    rows = []
    bar = common.progress(plan, desc="bench seq2seq", file=sys.stderr, mininterval=1)
    for b, n, case in bar:
        bar.set_postfix_str(f"B={b} N={n} {case}")
        sources = make_sources(config, b, source_len)
        row = {"B": b, "N": n if n is not None else "-", "case": case}
        engine = None
        try:
            if case.startswith("engine"):
                from prefix_kernels.serve import Seq2SeqEngine

                engine = Seq2SeqEngine(model, {f"p{i}": prefixes[f"p{i}"] for i in range(n)}, max_batch=b,
                                       max_seq_len=new_tokens + 2, max_source_len=source_len,
                                       prefill_chunk=b * source_len,
                                       cuda_graphs=case == "engine" and device.type == "cuda")
                engine.warmup(sampling=("greedy",))
                row.update(run_engine(engine, sources, n, new_tokens, args.repeats, device))
                row["graphs"] = engine.cuda_graphs
                row["limit_ms"] = memory_limit_ms(model, b, source_len, new_tokens // 2, prefix_len, bandwidth)
            elif case == "hf-generate":
                row.update(run_hf(model, prefixes, sources, n, prefix_len, new_tokens, device))
            elif case == "peft":
                row.update(run_peft(model, sources, n, prefix_len, new_tokens, device))
            else:
                row.update(run_bare(model, sources, new_tokens, device))
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = f"out of memory ({str(e).splitlines()[0][:80]})"
        except Exception as e:     # reported in the table and JSON, never dropped
            row["error"] = f"{type(e).__name__}: {e}"
        _drop_engine(engine, model, device)
        rows.append(row)
        bar.write(f"B={b} N={row['N']} {case}: " + (f"{row['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in row
                                                    else f"failed: {row['error'][:200]}"), file=sys.stderr)

    def ratio(r):
        engine = next((e for e in rows if e["B"] == r["B"] and e["case"] == "engine" and e["N"] == max(
            c for c in counts if c <= r["B"]) and "tokens_per_s" in e), None)
        return f"{r['tokens_per_s'] / engine['tokens_per_s']:.2f}" if engine and "tokens_per_s" in r else ""

    table = [{"B": r["B"], "N": r["N"], "case": r["case"],
              "tok/s": f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else "failed",
              "seconds": f"{r['seconds']:.3f}" if "seconds" in r else "", "vs engine": ratio(r),
              "step ms": f"{r['decode_step_ms']:.2f}" if "decode_step_ms" in r else "",
              "limit ms": f"{r['limit_ms']:.3f}" if "limit_ms" in r else "",
              "note": r.get("error", "")[:70]} for r in rows]
    print("\n" + format_table(table, ["B", "N", "case", "tok/s", "seconds", "vs engine", "step ms", "limit ms",
                                      "note"]))
    stem = "seq2seq_quick" if args.quick else "seq2seq"
    payload = {"benchmark": "bench_seq2seq", "model": "tiny bart (quick)" if args.quick else
               "BART-large shape (random weights)", "dtype": str(dtype), "source_len": source_len,
               "new_tokens": new_tokens, "prefix_len": prefix_len, "environment": env, "results": rows,
               "copy_bandwidth_tb_s": bandwidth / 1e12}
    json_path = write_json(f"{stem}.json", payload)
    png_path = results_dir() / f"{stem}.png"
    plot(rows, batches, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    return 1 if any("error" in r and r["case"].startswith("engine") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
