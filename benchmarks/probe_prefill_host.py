"""Why one eager prefill forward of the serving engine costs ~35 ms of host time on an H100
whatever its size (probe_serve_host, 55e333b: groups of 8 x 230 and of 1 x 22 tokens alike).

TinyLlama shape, bf16, the engine with the model's own modules (no graphs, eager decode: only the
prefill is looked at). For prefill groups of several sizes: wall time of `_prefill_forward`, its
host time up to the end of the launches (before the first-token read), and the GPU time (events);
then a torch.profiler table of one small group: host time per op and the GPU kernels.
usage: python3 benchmarks/probe_prefill_host.py [--quick]     (--quick: tiny model on the CPU, a smoke run)
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from prefix_kernels.bench import serve as bs
from prefix_kernels.serve import SamplingParams
from prefix_kernels.serve.engine import _Chunk


def main():
    quick = "--quick" in sys.argv
    config = bs.model_config(quick)
    dev = torch.device("cpu" if quick else "cuda")
    dtype = torch.float32 if quick else torch.bfloat16
    sync = torch.cuda.synchronize if not quick else (lambda: None)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from prefix_kernels.serve import Engine
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).eval()
    hkv, d = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    prefixes = {f"p{i}": torch.randn(config.num_hidden_layers, 2, hkv, 32, d) for i in range(8)}
    engine = Engine(model, prefixes, max_batch=32, max_seq_len=400, max_prefixes=8, cuda_graphs=False,
                    decode_step="eager")
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = [[3 + i % 100 for i in range(230)]] * 32
    reqs = [engine.submit(p, f"p{i % 8}", params) for i, p in enumerate(prompts)]
    engine._admit()
    orig_sample = engine._sample
    marks = {}

    def sample_mark(*a):
        marks["launched"] = time.perf_counter()
        return orig_sample(*a)
    engine._sample = sample_mark

    def group(n, width, start=0):
        return [_Chunk(reqs[i], start, width) for i in range(n)]

    cases = [(8, 230, 0), (1, 208, 0), (1, 22, 208), (1, 22, 0), (32, 230, 0)]
    for rnd in range(3):
        for n, width, start in cases:
            g = group(n, width, start)
            for c in g:
                c.req.prefilled = start
            sync()
            if not quick:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            t0 = time.perf_counter()
            with torch.no_grad():
                engine._prefill_forward(g)
            t1 = time.perf_counter()
            if not quick:
                e1.record()
            sync()
            if rnd == 2:
                gpu = f"{e0.elapsed_time(e1):6.1f}" if not quick else "-"
                print(f"group {n:2d} x {width:3d} (start {start:3d}): wall {1e3 * (t1 - t0):6.1f} ms, host to launch "
                      f"{1e3 * (marks['launched'] - t0):6.1f} ms, GPU {gpu} ms", flush=True)
    for n, width, start in ((1, 22, 208), (8, 230, 0)):
        g = group(n, width, start)
        for c in g:
            c.req.prefilled = start
        sync()
        acts = [ProfilerActivity.CPU] + ([] if quick else [ProfilerActivity.CUDA])
        with profile(activities=acts) as prof, torch.no_grad():
            engine._prefill_forward(g)
            sync()
        print(f"\n== profile of one group {n} x {width} (start {start}) ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=28, max_name_column_width=60))
        if not quick:
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
