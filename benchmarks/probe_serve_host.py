"""Where the serving benchmark's engine row loses to bench decode's (H100, 97fb89d: 7.7k vs 16.4k
tokens/s at 32 rows, same model and step): the engine of `bench serve` (word tokenizer, text
prompts, max_batch 64) run four ways, one wave of 32 prompts x 128 tokens each, tokens/s:
  main       engine.generate stepping on the caller's thread (no server)
  main-ids   the same with token-id prompts (the detokenizer still runs: the engine has a tokenizer)
  thread     the engine's own scheduler thread (engine.start())
  server     the HTTP server started too (its event loop idle: no HTTP request)
and, between the caller's-thread and the thread runs, a cProfile of one `main` wave (host time by
function: what the step's Python costs and how long it blocks on the device).
usage: python3 benchmarks/probe_serve_host.py [--quick]
"""
import cProfile
import io
import pstats
import sys
import time

import torch

from prefix_kernels.bench import serve as bs
from prefix_kernels.serve import SamplingParams


class StepClock:
    """Host time of each engine.step() and of the device wait inside it (_collect), per wave."""

    def __init__(self, engine):
        self.steps, self.waits, self.prefills = [], [], []
        step, collect, prefill = engine.step, engine._collect, engine._prefill_forward

        def timed_step():
            t = time.perf_counter()
            step()
            self.steps.append(time.perf_counter() - t)

        def timed_collect(*a):
            t = time.perf_counter()
            collect(*a)
            self.waits.append(time.perf_counter() - t)

        def timed_prefill(group):
            t = time.perf_counter()
            out = prefill(group)
            self.prefills.append((len(group), max(c.length for c in group), time.perf_counter() - t))
            return out
        engine.step, engine._collect, engine._prefill_forward = timed_step, timed_collect, timed_prefill

    def report(self):
        def ms(xs):
            if not xs:
                return "-"
            xs = sorted(xs)
            return f"n={len(xs)} sum {sum(xs) * 1e3:.1f} p50 {xs[len(xs) // 2] * 1e3:.3f} max {xs[-1] * 1e3:.2f} ms"
        print(f"           steps: {ms(self.steps)}\n           collect: {ms(self.waits)}\n"
              f"           prefill groups (n, width, host ms): "
              f"{[(n, w, round(t * 1e3, 1)) for n, w, t in self.prefills]}", flush=True)
        self.steps.clear(), self.waits.clear(), self.prefills.clear()


def wave(engine, prompts, params):
    names = [f"p{i % 8}" for i in range(len(prompts))]
    start = time.perf_counter()
    out = engine.generate(prompts, names, params)
    seconds = time.perf_counter() - start
    ttft = sorted(c.ttft for c in out)
    return sum(len(c.token_ids) for c in out) / seconds, seconds, ttft[len(ttft) // 2], ttft[-1]


def main():
    quick = "--quick" in sys.argv
    config = bs.model_config(quick)
    device = torch.device("cpu" if quick else "cuda")
    dtype = torch.float32 if quick else torch.bfloat16
    rows, prompt_len, new = (8, 32, 8) if quick else (32, 230, 128)
    engine = bs.build_engine(config, device, dtype, 8, 4 if quick else 32, 2 * rows, prompt_len + new + 8,
                             graphs=not quick)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    prompts = bs.make_prompts(rows, prompt_len, config.vocab_size, seed=1)
    ids = [engine.tokenizer.encode(p) for p in prompts]
    wave(engine, prompts, params)
    clock = StepClock(engine)
    for name in ("main", "main-ids", "profiled", "thread", "server"):
        if name == "thread":
            engine.start()
        server = None
        if name == "server":
            from prefix_kernels.serve.server import Server
            server = Server(engine, port=0).start()
        prof = cProfile.Profile() if name == "profiled" else None
        if prof is not None:
            prof.enable()
        tps, seconds, ttft50, ttft_max = wave(engine, ids if name == "main-ids" else prompts, params)
        if prof is not None:
            prof.disable()
        print(f"{name:>9}: {tps:9,.0f} tok/s  wave {seconds * 1e3:7.1f} ms  TTFT p50 {ttft50 * 1e3:6.1f} ms, "
              f"max {ttft_max * 1e3:6.1f} ms", flush=True)
        clock.report()
        if prof is not None:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
            print("\n".join(line[:150] for line in text.getvalue().splitlines()[6:]))
        if server is not None:
            server.close()
    engine.close()

if __name__ == "__main__":
    main()
