"""What HTTP costs: the real server on loopback against the same engine without HTTP, side by side.

    prefix-kernels bench serve            # GPU: TinyLlama-1.1B shape, bf16, concurrency 1 8 32 64
    prefix-kernels bench serve --quick    # a tiny CPU smoke run of the same code

One process holds the model, the engine and the HTTP server (the engine on the GPU, random
weights, 8 prefixes of 32 tokens, prompts of 230 tokens, 128 new tokens, greedy, EOS ignored). For
each concurrency C:
  engine   engine.generate() of C prompts at once (mixed prefixes), --requests-per-client times:
           the engine's own tokens/s at batch C, no HTTP;
  http     C streaming clients (aiohttp, asyncio) each sending --requests-per-client requests back
           to back to /v1/completions (text prompts, mixed prefixes): completion tokens/s, time to
           first token and inter-token latency (p50/p99, per server-sent chunk), errors.
Each side first runs one warm-up wave (one request per client), then --rounds times (default 3 on
the GPU), interleaved, and the median run counts: one engine run of 32 rows varied from 6.7k to
9.2k tokens/s between two processes on an H100. Each row also gives the prefill forwards the
engine ran per request on each side (a server's requests arrive one by one).
The clients run in a process of their own (--clients process, default) so they take none of the
server's GIL, as real clients would. --rates adds an open-loop sweep (Poisson arrivals). The
verdict is HTTP/engine >= 0.9 at every concurrency with no errors.

Why the http.server version reached 0.46x (issue 9, H200, C=32) with 4 of 96 connections reset:
a thread per connection, each waking per token (and every 50 ms) to poll its request and select()
its socket, then json + write + flush: 33 threads queueing for the GIL that the engine thread
needs between device steps; and a listen backlog of 5. Now: one event loop thread, a pump that
looks at every request once per ~engine step and writes each stream's new text straight to its
socket (one json.dumps, one send; sockets release the GIL), a backlog of 2048.
Results: a table, JSON with the environment (GPU, versions, commit) and a PNG under
benchmarks/results/ (or $PREFIX_KERNELS_RESULTS / --out).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from . import loadgen
from . import common
from ..cli_common import prefill_wait
from .common import environment, format_table, results_dir, write_json

REQUIRED_RATIO = 0.9


def word_tokenizer(vocab_size: int):
    """A fast (Rust) word-level tokenizer, "w0".."w{V-1}", built offline: every token decodes to
    text, so each one is streamed, and detokenizing costs what a real tokenizer's does."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def model_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    from .common import tinyllama_config

    return tinyllama_config(max_position_embeddings=2048)


def build_engine(config, device, dtype, n_prefixes, prefix_len, max_batch, max_seq_len, graphs,
                 compiled_prefill=False, prefill_wait=0.0):
    from transformers import AutoModelForCausalLM

    from ..serve import Engine

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    hkv, d = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    g = torch.Generator().manual_seed(2)
    prefixes = {f"p{i}": torch.randn(config.num_hidden_layers, 2, hkv, prefix_len, d, generator=g)
                for i in range(n_prefixes)}
    engine = Engine(model, prefixes, tokenizer=word_tokenizer(config.vocab_size), max_batch=max_batch,
                    max_seq_len=max_seq_len, max_prefixes=n_prefixes, queue_size=4 * max_batch,
                    cuda_graphs=graphs and device.type == "cuda", compiled_prefill=compiled_prefill,
                    prefill_wait=prefill_wait)
    engine.warmup()
    return engine


def make_prompts(count, prompt_len, vocab, seed):
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(prompt_len)) for _ in range(count)]


def _pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def run_engine(engine, prompts, n_prefixes, new_tokens, concurrency) -> dict:
    """engine.generate in waves of `concurrency` prompts: tokens/s without HTTP (run inside the
    engine's process when it has one of its own)."""
    from ..serve import SamplingParams
    from ..serve.remote import EngineProcess

    if isinstance(engine, EngineProcess):
        return engine.call(run_engine, prompts, n_prefixes, new_tokens, concurrency)

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    names = [f"p{i % n_prefixes}" for i in range(len(prompts))]
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        out = engine.generate(prompts[i:i + concurrency], names[i:i + concurrency], params)
        tokens += sum(len(c.token_ids) for c in out)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "requests": len(prompts)}


def http_jobs(prompts, n_prefixes, new_tokens):
    return [{"model": f"p{i % n_prefixes}", "prompt": p, "max_tokens": new_tokens, "temperature": 0,
             "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            for i, p in enumerate(prompts)]


def run_http(url, jobs, clients: str, **kwargs) -> dict:
    if clients == "process":
        results, wall = loadgen.run_in_subprocess(url, jobs, **kwargs)
    else:
        results = loadgen.run(url, jobs, **kwargs)
        wall = loadgen.wall_seconds(results)
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [gap for r in ok for gap in r.itl]
    chunks = sum(r.chunks for r in ok)
    errors = [r.error for r in results if not r.ok]
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "requests": len(results), "errors": len(errors), "first_error": errors[0][:200] if errors else None,
            "ttft_p50_ms": _ms(_pct(ttft, 0.5)), "ttft_p99_ms": _ms(_pct(ttft, 0.99)),
            "itl_p50_ms": _ms(_pct(itl, 0.5)), "itl_p99_ms": _ms(_pct(itl, 0.99)),
            "tokens_per_chunk": round(tokens / chunks, 3) if chunks else None,
            "mean_latency_s": statistics.fmean(r.latency for r in ok) if ok else None}


def counted(engine, run, *args, **kwargs) -> dict:
    """run(*args, **kwargs) with the engine's prefill forwards, their host ms and its steps
    during it, per request: a server whose requests arrive one by one can run a prefill forward
    per request where engine.generate runs one per prefill_chunk of prompt tokens."""
    before = engine.prefill_forwards, engine.prefill_seconds, engine.steps
    out = run(*args, **kwargs)
    requests = max(out.get("requests", 0), 1)
    out["prefill_forwards_per_request"] = round((engine.prefill_forwards - before[0]) / requests, 3)
    out["prefill_ms_per_request"] = round(1e3 * (engine.prefill_seconds - before[1]) / requests, 3)
    out["steps"] = engine.steps - before[2]
    return out


def _median_run(runs: list) -> dict:
    """The run of median tokens/s (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r["tokens_per_s"])[(len(runs) - 1) // 2]


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 3)


def verdicts(rows) -> list[str]:
    lines = []
    for row in rows:
        if row["mode"] != "concurrency" or "ratio" not in row:
            continue
        ok = row["ratio"] >= REQUIRED_RATIO and row["errors"] == 0
        lines.append(f"required C={row['C']}: HTTP/engine = {row['ratio']:.3f}, {row['errors']} errors "
                     f"({'PASS' if ok else 'FAIL'}: >= {REQUIRED_RATIO}, 0 errors)")
    return lines


def plot(rows, path):
    conc = [r for r in rows if r["mode"] == "concurrency" and "tokens_per_s" in r]
    plt = common.pyplot() if conc else None         # matplotlib is the `bench` extra
    if plt is None:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    cs = [r["C"] for r in conc]
    x = range(len(cs))
    ax1.bar([i - 0.2 for i in x], [r["engine_tokens_per_s"] for r in conc], 0.4, label="engine alone",
            color="tab:gray")
    ax1.bar([i + 0.2 for i in x], [r["tokens_per_s"] for r in conc], 0.4, label="through HTTP", color="tab:green")
    for i, r in zip(x, conc):
        ax1.annotate(f"{r['ratio']:.2f}x", (i + 0.2, r["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(list(x), [f"C={c}" for c in cs])
    ax1.set_title("completion tokens/s (higher is better)")
    ax1.legend(fontsize=8)
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o--"), ("itl_p50_ms", "s-"), ("itl_p99_ms", "s--")):
        ax2.plot(cs, [r[key] or float("nan") for r in conc], style, label=key.replace("_ms", ""))
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("concurrent clients")
    ax2.set_title("latency through HTTP, ms (lower is better)")
    ax2.legend(fontsize=8)
    common.save_figure(fig, path)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prefix-kernels bench serve", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: a smoke run")
    parser.add_argument("--concurrency", type=int, nargs="+", help="clients; default 1 8 32 64 (quick: 1 4)")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--rounds", type=int, help="engine and HTTP runs per concurrency, interleaved; the "
                        "median of each (default 3; quick: 1). One engine run varied by +-30%% on an H100")
    parser.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop request rates (req/s)")
    parser.add_argument("--rate-requests", type=int, default=64, help="requests per rate")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens (default 230; quick: 16)")
    parser.add_argument("--new-tokens", type=int, help="completion tokens (default 128; quick: 8)")
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--clients", choices=["process", "thread"], default="process",
                        help="the load generator in a process of its own, or a thread of this one")
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval for this process (GIL)")
    parser.add_argument("--poll-interval", type=float, default=0.004, help="the server's EventPump period (s)")
    parser.add_argument("--eager", action="store_true", help="engine without CUDA graphs")
    parser.add_argument("--compiled-prefill", action="store_true",
                        help="experimental: the engine's compiled prefill (Engine(compiled_prefill=True), GPU)")
    parser.add_argument("--prefill-wait", type=prefill_wait, default=0.0,
                        help="experimental: Engine(prefill_wait=...), seconds new prompts may wait for others "
                             "while rows decode (0: off; auto: as long as a prefill forward costs)")
    parser.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="the engine in a process of its own (serve/remote.py), as `serve` runs it, so the "
                             "HTTP front shares no GIL with it; the engine row runs in that process too")
    parser.add_argument("--out", help="folder for the JSON and PNG (default: the results dir)")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    from ..serve.server import Server

    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        conc = args.concurrency or [1, 4]
        rounds = args.rounds or 1
        prompt_len, new_tokens, prefix_len = args.prompt_len or 16, args.new_tokens or 8, 4
    else:
        if not torch.cuda.is_available():
            print("bench serve: no CUDA GPU; run with --quick for a CPU smoke run", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        conc = args.concurrency or [1, 8, 32, 64]
        rounds = args.rounds or 3
        prompt_len, new_tokens, prefix_len = args.prompt_len or 230, args.new_tokens or 128, 32
    if args.out:
        os.environ["PREFIX_KERNELS_RESULTS"] = args.out
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    env = environment()
    print(f"bench serve on {env['device']}: torch {env['torch']}, transformers {env['transformers']}, "
          f"commit {env['git_commit'][:10]}", flush=True)
    config = model_config(args.quick)
    max_batch = max(conc)
    build_args = (config, device, dtype, args.prefixes, prefix_len, max_batch, prompt_len + new_tokens + 8)
    build_kwargs = dict(graphs=not args.eager, compiled_prefill=args.compiled_prefill, prefill_wait=args.prefill_wait)
    if args.engine_process:
        from ..serve.remote import EngineProcess

        engine = EngineProcess(build_engine, *build_args, **build_kwargs)
    else:
        engine = build_engine(*build_args, **build_kwargs)
    server = Server(engine, port=0, poll_interval=args.poll_interval, max_tokens_cap=new_tokens,
                    max_connections=4 * max_batch + 64).start()
    rows = []
    try:
        for c in conc:
            n = c * args.requests_per_client
            prompts = make_prompts(n, prompt_len, config.vocab_size, seed=c)
            # warm-ups at this batch, one request per client on each side: the first HTTP round at
            # C=64 ran at 0.49-0.67x the engine where the second ran at 0.70-0.95x (H100, 3b72f6942d /
            # 2291dc0bb8, six variants), with an ITL p99 near 1 s: cold costs not of HTTP's making
            run_engine(engine, prompts[:c], args.prefixes, new_tokens, c)
            run_http(server.url, http_jobs(prompts[:c], args.prefixes, new_tokens), args.clients, concurrency=c)
            engines, https = [], []
            for _ in range(rounds):          # interleaved: a drift of the machine hits both sides
                engines.append(counted(engine, run_engine, engine, prompts, args.prefixes, new_tokens, c))
                https.append(counted(engine, run_http, server.url, http_jobs(prompts, args.prefixes, new_tokens),
                                     args.clients, concurrency=c))
            row = {"mode": "concurrency", "C": c, "requests": n, "rounds": rounds}
            row.update(_median_run(https))
            eng = _median_run(engines)
            row["engine_tokens_per_s"] = eng["tokens_per_s"]
            row["engine_seconds"] = eng["seconds"]
            for key in ("prefill_forwards_per_request", "prefill_ms_per_request", "steps"):
                row[f"engine_{key}"] = eng[key]
            row["engine_rounds_tokens_per_s"] = [round(e["tokens_per_s"], 1) for e in engines]
            row["http_rounds_tokens_per_s"] = [round(h["tokens_per_s"], 1) for h in https]
            row["ratio"] = row["tokens_per_s"] / row["engine_tokens_per_s"]
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
        for rate in args.rates:
            prompts = make_prompts(args.rate_requests, prompt_len, config.vocab_size, seed=int(rate * 1000))
            row = {"mode": "rate", "rate": rate, "C": "-", "requests": len(prompts)}
            row.update(counted(engine, run_http, server.url, http_jobs(prompts, args.prefixes, new_tokens),
                               args.clients, rate=rate))
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
    finally:
        server.close()

    table = [{"mode": r["mode"], "C / rate": r["C"] if r["mode"] == "concurrency" else f"{r['rate']:g}/s",
              "engine tok/s": f"{r['engine_tokens_per_s']:,.0f}" if "engine_tokens_per_s" in r else "",
              "HTTP tok/s": f"{r['tokens_per_s']:,.0f}", "HTTP/engine": f"{r['ratio']:.3f}" if "ratio" in r else "",
              "TTFT p50/p99 ms": f"{r['ttft_p50_ms']}/{r['ttft_p99_ms']}",
              "ITL p50/p99 ms": f"{r['itl_p50_ms']}/{r['itl_p99_ms']}",
              "tok/chunk": r["tokens_per_chunk"],
              "prefill fwd/req (engine)": f"{r['prefill_forwards_per_request']:.2f}" + (
                  f" ({r['engine_prefill_forwards_per_request']:.2f})" if "engine_prefill_forwards_per_request" in r else ""),
              "errors": r["errors"]} for r in rows]
    print("\n" + format_table(table, list(table[0])))
    lines = verdicts(rows)
    print("\n".join(lines))
    stem = "serve_quick" if args.quick else "serve"
    payload = {"benchmark": "bench serve", "model": "tiny llama (quick)" if args.quick else
               "TinyLlama-1.1B shape (random weights)", "dtype": str(dtype), "prompt_len": prompt_len,
               "new_tokens": new_tokens, "prefix_len": prefix_len, "prefixes": args.prefixes,
               "requests_per_client": args.requests_per_client, "clients": args.clients,
               "switch_interval": sys.getswitchinterval(), "poll_interval": args.poll_interval,
               "compiled_prefill": args.compiled_prefill, "prefill_wait": args.prefill_wait,
               "engine_process": args.engine_process,
               "prefill_chunk": getattr(engine, "prefill_chunk", None), "max_batch": max_batch,
               "aiohttp": _version("aiohttp"), "environment": env, "results": rows, "verdicts": lines}
    json_path = write_json(f"{stem}.json", payload)
    png_path = results_dir() / f"{stem}.png"
    drawn = plot(rows, png_path)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if drawn else ""))
    return 1 if any(r["errors"] for r in rows) else 0


def _version(name):
    try:
        return __import__(name).__version__
    except ImportError:
        return None


def _line(row):
    where = f"C={row['C']}" if row["mode"] == "concurrency" else f"rate={row['rate']:g}/s"
    engine = f"engine {row['engine_tokens_per_s']:,.0f} tok/s, " if "engine_tokens_per_s" in row else ""
    ratio = f" ({row['ratio']:.3f}x)" if "ratio" in row else ""
    forwards = f" ({row['engine_prefill_forwards_per_request']:.2f} engine)" if "engine_tokens_per_s" in row else ""
    return (f"{where}: {engine}HTTP {row['tokens_per_s']:,.0f} tok/s{ratio}, TTFT p50 {row['ttft_p50_ms']} ms, "
            f"ITL p50 {row['itl_p50_ms']} ms, prefill forwards per request {row['prefill_forwards_per_request']:.2f}"
            f"{forwards}, errors {row['errors']}")


if __name__ == "__main__":
    sys.exit(main())
