"""Where the engine's decode step goes: the captured graph's GPU time vs the whole step.

TinyLlama-1.1B shape (prefix_kernels/bench/decode.py's model and prefixes), B rows decoding after a 256-token
prompt. Prints the wall time of a full engine step, the time of replaying the captured decode
graph alone, the kernels per step and the heaviest ones (torch.profiler sees graph kernels).
usage: python benchmarks/profile_decode.py [B ...]      (default 32)
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from prefix_kernels.bench import decode as bd


def main():
    from prefix_kernels.serve import SamplingParams

    batches = [int(a) for a in sys.argv[1:]] or [32]
    device = torch.device("cuda")
    config = bd.model_config(quick=False)
    model = bd.build_model(config, device, torch.bfloat16)
    prefixes = bd.make_prefixes(config, 8, 32)
    for batch in batches:
        engine = bd._new_engine(None, model, prefixes, batch, 256 + 128 + 8, device)
        params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
        reqs = [engine.submit(ids, f"p{r % 8}", params) for r, ids in enumerate(bd.make_prompts(config, batch, 256).tolist())]
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
        steps = 30
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - start) * 1e3 / steps
        key = (min(b for b in engine.buckets if b >= batch), "greedy")
        start = time.perf_counter()
        for _ in range(steps):
            engine._graphs.replay(key)
        torch.cuda.synchronize()
        replay_ms = (time.perf_counter() - start) * 1e3 / steps
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine._graphs.replay(key)
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        gpu_ms = sum(e.self_device_time_total for e in events) / 10 / 1000
        kernels = sum(e.count for e in events) / 10
        print(f"\nB={batch}: engine step {step_ms:.2f} ms, graph replay {replay_ms:.2f} ms, "
              f"GPU kernel time {gpu_ms:.2f} ms in {kernels:.0f} kernels per step")
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]:
            print(f"  {e.self_device_time_total / 10 / 1000:7.3f} ms  x{e.count // 10:<4} {e.key[:100]}")
        for r in reqs:
            r.cancel()
        bd._drop_engine(engine, model, device)


if __name__ == "__main__":
    main()
