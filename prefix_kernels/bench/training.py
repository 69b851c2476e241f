"""One full training step of the TinyLlama-1.1B shape: prefix-kernels against what users run today.

    python benchmarks/bench_training.py            # H200: both shapes, every case
    python benchmarks/bench_training.py --quick    # a tiny CPU smoke run of the same code
    prefix-kernels bench training --curves         # loss vs wall-clock time (bench/training_curves.py)
    prefix-kernels bench training --multitask      # N tasks in one run vs one after another

A step is forward with labels + backward + AdamW on the trainable parameters (none for the
floor). Cases, each on a freshly built model (random weights from the config, bf16, SDPA):
  prefix-kernels      patch_model(model, P): the fused op, prefix from the bank
  prefix-kernels-cudnn-fe  the same, attention by cuDNN through its frontend package (the split
                      path's cudnn_fe vendor; fails with the reason where it is not installed)
  peft-prefix         PEFT PrefixTuningConfig(num_virtual_tokens=P): prefix in the KV cache
  floor               frozen model, no prefix, activation grads only (inputs_embeds.requires_grad)
  peft-lora-r8        PEFT LoRA r=8 on q_proj, v_proj
  full-finetune       every weight trained, AdamW
Warm-up steps, then the mean over timed steps (CUDA-synchronized). Peak memory is
torch.cuda.max_memory_allocated over the case, weights included. A case that fails (out of
memory, say) is reported with its error, never dropped. Results: a table on stdout, JSON and a PNG
under benchmarks/results/ with the GPU name, versions and git commit.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import torch

from prefix_kernels.bench import common

CASES = ["prefix-kernels", "prefix-kernels-cudnn-fe", "peft-prefix", "floor", "peft-lora-r8", "full-finetune"]
# settings a case runs under (the op reads them at every call)
CASE_SETTINGS = {"prefix-kernels-cudnn-fe": {"PREFIX_KERNELS_ATTENTION": "split",
                                             "PREFIX_KERNELS_SPLIT_VENDOR": "cudnn_fe",
                                             "PREFIX_KERNELS_SPLIT_MODE": "pad"}}


def model_config(quick: bool):
    if quick:
        return common.tiny_llama_config(max_position_embeddings=256)
    return common.tinyllama_config(max_position_embeddings=8192)      # ANCHORS.md section 2


def build_case(case: str, config, prefix_len: int, device, dtype):
    """(model, trainable parameters, uses_inputs_embeds) for one case."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):     # initialize on the GPU: a CPU init of 1.1B weights takes tens of seconds
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.train()
    if case == "prefix-kernels-cudnn-fe":
        from prefix_kernels.ops import cudnn_frontend
        if device.type != "cuda" or cudnn_frontend.unavailable_reason() is not None:
            raise RuntimeError(cudnn_frontend.unavailable_reason() or "the cuDNN frontend runs on CUDA tensors")
    if case in ("prefix-kernels", "prefix-kernels-cudnn-fe"):
        import prefix_kernels as pk

        bank = pk.patch_model(model, prefix_len)
        return model, list(bank.parameters()), False
    if case == "peft-prefix":
        from peft import PrefixTuningConfig, get_peft_model

        model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=prefix_len))
    elif case == "peft-lora-r8":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"]))
    elif case == "floor":
        model.requires_grad_(False)
        return model, [], True
    elif case != "full-finetune":
        raise ValueError(case)
    return model, [p for p in model.parameters() if p.requires_grad], False


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(model, optimizer, embeds: bool, ids):
    """One training step: forward with labels, backward, the optimizer (None for the floor)."""
    def step():
        if embeds:
            inputs = model.get_input_embeddings()(ids).detach().requires_grad_(True)
            loss = model(inputs_embeds=inputs, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def run_case(case, config, batch, seq, prefix_len, device, dtype, warmup, steps) -> dict:
    settings = CASE_SETTINGS.get(case, {})
    saved = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        result = _run_case(case, config, batch, seq, prefix_len, device, dtype, warmup, steps)
        if case == "prefix-kernels-cudnn-fe":       # the split path falls back to the fused op, said once
            from prefix_kernels.ops import cudnn_frontend
            counts = cudnn_frontend.graph_counts()
            if not counts["built"]:
                raise RuntimeError("the cuDNN frontend path did not run: " + ("; ".join(counts["refused"])
                                                                            or "no call reached it"))
            result["cudnn_graphs"] = counts
        return result
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})


def _run_case(case, config, batch, seq, prefix_len, device, dtype, warmup, steps) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, params, embeds = build_case(case, config, prefix_len, device, dtype)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=g).to(device)
    step = make_step(model, optimizer, embeds, ids)

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    result = {"case": case, "ms_per_step": ms, "tokens_per_s": batch * seq / (ms / 1e3), "peak_gib": peak,
              "trainable_params": sum(p.numel() for p in params), "final_loss": loss.item()}
    del model, optimizer, params
    gc.collect()
    return result


def environment(device) -> dict:
    env = common.environment()
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else env["device"]
    return env


def verdicts(rows) -> list[str]:
    """The issue's bar: faster than PEFT prefix with less memory (required); floor speed and
    memory within 1% (target)."""
    by = {r["case"]: r for r in rows if "error" not in r}
    ours, peft, floor = by.get("prefix-kernels"), by.get("peft-prefix"), by.get("floor")
    if ours is None:
        return ["prefix-kernels failed: " + next(r["error"] for r in rows if r["case"] == "prefix-kernels")]
    lines = []
    if peft is not None:
        faster = ours["tokens_per_s"] > peft["tokens_per_s"]
        leaner = ours["peak_gib"] is None or ours["peak_gib"] < peft["peak_gib"]
        lines.append(f"required (vs peft-prefix): {'PASS' if faster and leaner else 'FAIL'} "
                     f"({ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x tokens/s"
                     + (f", {ours['peak_gib']:.2f} vs {peft['peak_gib']:.2f} GiB)" if ours["peak_gib"] else ")"))
    cudnn_fe = by.get("prefix-kernels-cudnn-fe")
    if floor is not None and cudnn_fe is not None:
        lines.append(f"prefix-kernels-cudnn-fe vs floor: {cudnn_fe['tokens_per_s'] / floor['tokens_per_s']:.3f}x "
                     f"tokens/s" + (f", {cudnn_fe['peak_gib'] / floor['peak_gib']:.4f}x peak"
                                    if cudnn_fe["peak_gib"] else ""))
    if floor is not None:
        speed = ours["tokens_per_s"] >= floor["tokens_per_s"]
        memory = ours["peak_gib"] is None or ours["peak_gib"] <= 1.01 * floor["peak_gib"]
        lines.append(f"target (vs floor): {'MET' if speed and memory else 'NOT MET'} "
                     f"({ours['tokens_per_s'] / floor['tokens_per_s']:.3f}x tokens/s"
                     + (f", {ours['peak_gib'] / floor['peak_gib']:.4f}x peak)" if ours["peak_gib"] else ")"))
    return lines


def print_table(shape, rows, out=sys.stdout):
    print(f"\n## {shape}", file=out)
    w = max(15, *(len(r["case"]) for r in rows))
    print(f"| {'case':<{w}} | {'ms/step':>9} | {'tokens/s':>10} | {'peak GiB':>9} | {'trainable':>12} |", file=out)
    print(f"|{'-' * (w + 2)}|{'-' * 11}|{'-' * 12}|{'-' * 11}|{'-' * 14}|", file=out)
    for r in rows:
        if "error" in r:
            print(f"| {r['case']:<{w}} | {'failed: ' + r['error'][:60]} |", file=out)
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(f"| {r['case']:<{w}} | {r['ms_per_step']:>9.1f} | {r['tokens_per_s']:>10.0f} | {peak:>9} | "
              f"{r['trainable_params']:>12,} |", file=out)
    for line in verdicts(rows):
        print(line, file=out)


def plot(results, path):
    plt = common.pyplot()
    if plt is None:
        return

    shapes = list(results)
    fig, axes = plt.subplots(2, len(shapes), figsize=(6 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        rows = [r for r in results[shape] if "error" not in r]
        names = [r["case"] for r in rows]
        colors = ["tab:green" if n == "prefix-kernels" else "tab:gray" for n in names]
        floor = next((r for r in rows if r["case"] == "floor"), None)
        axes[0][col].bar(names, [r["tokens_per_s"] for r in rows], color=colors)
        axes[0][col].set_title(f"{shape}: tokens/s (higher is better)")
        peaks = [r["peak_gib"] or 0.0 for r in rows]
        axes[1][col].bar(names, peaks, color=colors)
        axes[1][col].set_title(f"{shape}: peak GiB (lower is better)")
        if floor is not None:      # the target: the floor's speed and memory
            axes[0][col].axhline(floor["tokens_per_s"], color="k", ls="--", lw=1)
            if floor["peak_gib"]:
                axes[1][col].axhline(floor["peak_gib"], color="k", ls="--", lw=1)
        if not any(peaks):
            axes[1][col].text(0.5, 0.5, "not measured (no CUDA)", ha="center", transform=axes[1][col].transAxes)
        for ax in (axes[0][col], axes[1][col]):
            ax.tick_params(axis="x", rotation=30)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    parser = common.parser("prefix-kernels bench training", __doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model on the CPU: a smoke run")
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick 2)")
    parser.add_argument("--out", default=None, help="folder for the JSON and PNG (default: the results dir)")
    parser.add_argument("--curves", action="store_true", help="loss vs wall-clock time instead: ours, PEFT prefix, "
                        "LoRA, full fine-tuning on the same data and steps (bench/training_curves.py)")
    parser.add_argument("--archs", default=None, help="--curves: comma-separated of llama, gpt2 (attention "
                        "dropout 0.1), bart (encoder-decoder) (default: all on the GPU; quick: llama)")
    parser.add_argument("--rounds", type=int, default=None, help="--curves: interleaved rounds of ours and PEFT's "
                        "prefix for the speed verdict, a median over rounds (default 2; quick 1)")
    parser.add_argument("--multitask", action="store_true", help="N tasks in one run vs one after another "
                        "instead (bench/multitask.py)")
    parser.add_argument("--tasks", type=int, default=None, help="--multitask: N (default 8; quick 2)")
    args = parser.parse_args(argv)
    if args.curves or args.multitask:
        if args.curves and args.multitask:
            parser.error("--curves and --multitask are two runs: pass one")
        from . import multitask, training_curves
        return (training_curves if args.curves else multitask).main(args)

    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = [(2, 32, 4), (1, 64, 8)]
    else:
        if not torch.cuda.is_available():
            print("bench_training: no CUDA GPU; run with --quick for a CPU smoke run", file=sys.stderr)
            return 2
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = [(8, 1024, 32), (2, 4096, 128)]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    steps = args.steps if args.steps is not None else (2 if args.quick else 10)
    config = model_config(args.quick)

    env = environment(device)
    print(f"bench_training on {env['gpu']}: torch {env['torch']}, triton {env['triton']}, transformers "
          f"{env['transformers']}, peft {env['peft']}, commit {env['git_commit'][:10]}")
    results = {}
    for batch, seq, prefix_len in shapes:
        shape = f"B{batch} S{seq} P{prefix_len}"
        rows = []
        for case in args.cases:
            try:
                rows.append(run_case(case, config, batch, seq, prefix_len, device, dtype, warmup, steps))
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"case": case, "error": f"out of memory ({str(e).splitlines()[0][:80]})"})
            except Exception as e:      # reported in the table and JSON, never dropped
                rows.append({"case": case, "error": f"{type(e).__name__}: {e}"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[shape] = rows
        print_table(shape, rows)

    args.out = args.out or str(common.results_dir())
    os.makedirs(args.out, exist_ok=True)
    stem = "training_quick" if args.quick else "training"
    payload = {"benchmark": "bench_training", "model": "TinyLlama-1.1B shape (random weights)" if not args.quick
               else "tiny llama (quick)", "dtype": str(dtype), "warmup": warmup, "steps": steps,
               "environment": env, "results": results,
               "verdicts": {shape: verdicts(rows) for shape, rows in results.items()}}
    json_path = os.path.join(args.out, f"{stem}.json")
    with open(json_path, "w") as f:
        json.dump(payload, f, indent=2)
    png_path = os.path.join(args.out, f"{stem}.png")
    plot(results, png_path)
    print(f"\nwrote {json_path} and {png_path}")
    failed = [f"{shape} {r['case']}" for shape, rows in results.items() for r in rows
              if "error" in r and r["case"] == "prefix-kernels"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
