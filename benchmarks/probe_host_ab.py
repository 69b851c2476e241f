"""A/B of the host-side changes on host-bound training steps, against PEFT's prefix in the same
process: GPT-2 small with attention dropout 0.1 and BART's decoder site (bench training --curves'
shapes: B8 S512 P32, bf16). Variants of ours: direct kernel launches on/off
(PREFIX_KERNELS_DIRECT_LAUNCH) and, for GPT-2, the marked all-True mask of a training forward
on/off. Rounds are interleaved so that a drift of the host hits every variant; reports the
median step time of each run and ours' speed relative to PEFT's in the same round.
usage: python benchmarks/probe_host_ab.py [--rounds 2] [--steps 60] [--archs gpt2,bart]
"""
import argparse
import json
import os
import statistics

import torch

import prefix_kernels.integrations.transformers as hf
from prefix_kernels.bench import common
from prefix_kernels.bench import training_curves as tc

VARIANTS = ["peft", "ours", "ours-no-direct", "ours-no-mask"]


def run(arch, variant, cfg, batches, warm):
    os.environ["PREFIX_KERNELS_DIRECT_LAUNCH"] = "0" if variant == "ours-no-direct" else "1"
    hf._no_padding_mask = (lambda x: None) if variant == "ours-no-mask" else _MASK
    method = "peft-prefix" if variant == "peft" else ("prefix-kernels" if arch == "gpt2" else "prefix-kernels-decoder")
    record = tc.run(arch, method, cfg, batches, warm, 32 if CUDA else 4, DEVICE, torch.bfloat16 if CUDA else torch.float32)
    seconds = record["seconds"]
    steps = [b - a for a, b in zip([0.0] + seconds[:-1], seconds)]
    return {"median_ms": statistics.median(steps) * 1e3, "tokens_per_s": record["tokens_per_s"],
            "final_loss": record["loss"][-1]}


_MASK = hf._no_padding_mask
CUDA = torch.cuda.is_available()          # without a GPU: tiny models on the CPU, a smoke run
DEVICE = torch.device("cuda" if CUDA else "cpu")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--archs", default="gpt2,bart")
    parser.add_argument("--out", default=os.environ.get("PREFIX_KERNELS_RESULTS", "."))
    args = parser.parse_args()
    results = []
    for arch in args.archs.split(","):
        cfg = tc.config(arch, quick=not CUDA)
        batches = tc.markov_batches(cfg.vocab_size, args.steps + 3, 8 if CUDA else 2, tc.SEQ[arch] if CUDA else 32)
        variants = [v for v in VARIANTS if not (arch == "bart" and v == "ours-no-mask")]   # decoder-only change
        for rnd in range(args.rounds):
            peft = None
            for variant in variants:
                row = {"arch": arch, "round": rnd, "variant": variant, **run(arch, variant, cfg, batches[3:], batches[:3])}
                peft = row["median_ms"] if variant == "peft" else peft
                row["speed_vs_peft"] = peft / row["median_ms"]
                results.append(row)
                print(f"{arch} round {rnd} {variant:15s} median {row['median_ms']:6.2f} ms/step "
                      f"({row['tokens_per_s']:,.0f} tokens/s overall) speed vs PEFT {row['speed_vs_peft']:.3f}x "
                      f"final loss {row['final_loss']:.3f}", flush=True)
                torch.cuda.empty_cache()
    path = os.path.join(args.out, "probe_host_ab.json")
    with open(path, "w") as f:
        json.dump({"benchmark": "probe_host_ab", "environment": common.environment(), "steps": args.steps,
                   "results": results}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
