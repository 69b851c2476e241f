"""`prefix-kernels train`: prefix-tune a causal LM on prompt/completion pairs.

    prefix-kernels train --model PATH --data FILE.jsonl --prefix-len 32 --out DIR

Each JSONL line is {"prompt": str, "completion": str}; the loss covers the completion only.
Training shows a progress bar (loss, tokens/s), evaluates on a held-out split, checkpoints to
DIR/checkpoint.pt (resumed automatically), and saves the adapter atomically in PEFT's format.
With no --model/--data it runs a built-in demo on the CPU: a small model built from a config, a
byte tokenizer, and a tiny classification task, in well under two minutes.

Several devices: `--nproc N` relaunches this module under torchrun (or start it with torchrun /
accelerate launch yourself). Each rank takes a strided share of every global batch
(--batch-size rows per rank); the loss is the token mean over the whole global batch, so N ranks
train exactly what one process does on the same global batch. DDP or FSDP2 (--strategy), see
prefix_kernels/distributed.py. Rank 0 alone writes checkpoints and the adapter; a checkpoint
resumes under any number of ranks.

The CLI (prefix_kernels/cli.py) calls `add_arguments(parser)` and `run(args)`; `main(argv)` is
the same as a standalone entry point.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

import torch

from . import distributed as pd

CHECKPOINT = "checkpoint.pt"


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then pad and eos: a tokenizer that needs no download."""
    pad_token_id, eos_token_id, vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _HFTokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            self.pad_token_id = 0

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]


# -- the built-in demo -------------------------------------------------------------------------

_WORDS = {"positive": ["great", "lovely", "superb", "fun", "moving", "brilliant", "sharp", "warm"],
          "negative": ["dull", "awful", "boring", "flat", "clumsy", "tedious", "cold", "weak"]}


def demo_examples(n: int = 400, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(_WORDS))
        words = rng.sample(_WORDS[label], 2)
        rows.append({"prompt": f"review: a {words[0]}, {words[1]} film. sentiment:", "completion": f" {label}"})
    return rows


def demo_model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, pad_token_id=ByteTokenizer.pad_token_id,
                         eos_token_id=ByteTokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


# -- data ---------------------------------------------------------------------------------------

def read_jsonl(path: str) -> list[dict]:
    """Prompt/completion rows; a clear error names the file and line of any bad one."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data {path!r}: no such file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected an object with 'prompt' and 'completion'")
            for field in ("prompt", "completion"):
                if field not in row:
                    raise ValueError(f"{path}:{number}: missing field {field!r}")
                if not isinstance(row[field], str):
                    raise ValueError(f"{path}:{number}: field {field!r} must be a string")
            if not row["completion"]:
                raise ValueError(f"{path}:{number}: 'completion' is empty (nothing to learn)")
            row["_line"] = number
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return rows


def tokenize(rows, tokenizer, max_tokens: int, source: str) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per row; labels are -100 on the prompt."""
    examples = []
    for i, row in enumerate(rows):
        prompt = tokenizer.encode(row["prompt"])
        completion = tokenizer.encode(row["completion"])
        if tokenizer.eos_token_id is not None:     # learn to stop after the completion
            completion.append(tokenizer.eos_token_id)
        ids = prompt + completion
        if len(ids) > max_tokens:
            where = f"{source}:{row.get('_line', i + 1)}"
            raise ValueError(f"{where}: {len(ids)} tokens, but the model allows {max_tokens} with the prefix "
                             "offset; shorten the example or pass --max-length")
        examples.append((ids, [-100] * len(prompt) + completion))
    return examples


def collate(batch, pad_id: int):
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):     # right padding: training needs no left padding
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return input_ids, mask, labels


def label_tokens(batch) -> int:
    """Tokens the loss covers (labels shifted by one, -100 ignored), counted on the host."""
    return sum(sum(1 for t in lab[1:] if t != -100) for _, lab in batch)


def masked_row(row):
    """The same input with no label: it runs forward/backward but adds nothing to the loss."""
    ids, lab = row
    return ids, [-100] * len(lab)


def loss_sum(model, ids, mask, labels) -> torch.Tensor:
    """Sum of the next-token cross entropy over the labelled tokens (fp32), as HF's causal-LM
    loss before its mean: the caller divides by the token count of the whole (global) batch."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")


# -- the loop -----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="local model folder (default: the built-in demo model)")
    parser.add_argument("--data", help="JSONL of {'prompt', 'completion'} (default: the built-in demo task)")
    parser.add_argument("--out", default="prefix-out", help="output folder: adapter + checkpoint")
    parser.add_argument("--prefix-len", type=int, default=None, help="prefix slots P (default 32; demo 16)")
    parser.add_argument("--projection-hidden", type=int, default=None, help="MLP reparameterization size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1 epoch; demo 300)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step and process")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-3; demo 5e-2)")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=None, help="longest example in tokens")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="processes (GPUs) to train on; > 1 relaunches under torchrun")
    parser.add_argument("--strategy", default="auto", choices=pd.STRATEGIES,
                        help="several processes: DDP (the base replicated) or FSDP2 (the base sharded); "
                             "auto = DDP when the frozen weights fit one GPU")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_adapter(bank, out: str, base: str | None) -> None:
    """Write into a temporary folder, then move each file into place."""
    tmp = os.path.join(out, ".adapter.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bank.save_pretrained(tmp, base_model_name_or_path=base)
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, ctx) -> float:
    """Token-mean loss over `examples`, each rank taking its share of every global batch."""
    was_training = model.training
    model.eval()
    total, count, size = 0.0, 0, batch_size * ctx.world
    for start in range(0, len(examples), size):
        rows = pd.shard(examples[start:start + size], ctx, masked_row)
        ids, mask, labels = (t.to(ctx.device) for t in collate(rows, pad_id))
        total += loss_sum(model, ids, mask, labels).item()
        count += label_tokens(rows)
    model.train(was_training)
    total, count = pd.all_sum([total, count], ctx)
    return total / max(count, 1)


def run(args) -> dict:
    """Train; returns {'train_losses', 'eval_loss_before', 'eval_loss', 'adapter', 'steps'}.

    With --nproc N > 1 outside a launcher this relaunches under torchrun and returns what the
    ranks left in the checkpoint (the eval losses are printed by rank 0 and returned as None)."""
    if (args.model is None) != (args.data is None):
        raise ValueError("pass both --model and --data, or neither for the built-in demo")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and not pd.under_launcher():
        return _launch(args)
    ctx = pd.setup(args.device, default_cuda=not (args.model is None and args.data is None))
    try:
        result = _train(args, ctx)
    except BaseException:
        pd.teardown(ctx, failed=True)
        raise
    pd.teardown(ctx)      # after _train's frame (and the wrapper in it) is gone
    return result


def _launch(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() and args.model is not None else "cpu")
    if torch.device(device).type == "cuda" and args.nproc > torch.cuda.device_count():
        raise ValueError(f"--nproc {args.nproc} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    pd.launch(args.nproc, "prefix_kernels.train", _to_argv(args, drop=("nproc",)))
    ckpt = torch.load(os.path.join(args.out, CHECKPOINT), map_location="cpu", weights_only=False)
    return {"train_losses": ckpt["losses"], "eval_loss_before": None, "eval_loss": None,
            "adapter": args.out, "steps": ckpt["step"]}


def _to_argv(args, drop=()) -> list[str]:
    """The command line that gives `args` back (options left at their defaults omitted)."""
    argv = []
    for action in add_arguments(argparse.ArgumentParser())._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def _train(args, ctx: pd.Context) -> dict:
    import prefix_kernels as pk

    demo = args.model is None
    device = ctx.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)     # the same on every rank: the same bank init
    if demo:
        tokenizer, model, rows, source = ByteTokenizer(), demo_model(), demo_examples(), "demo"
        prefix_len, lr, steps = args.prefix_len or 16, args.lr or 5e-2, args.steps or 300
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rows, source = read_jsonl(args.data), args.data
        tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(args.model))
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        prefix_len, lr, steps = args.prefix_len or 32, args.lr or 5e-3, args.steps
    model.to(dtype=dtype)
    # patched where it was loaded (the CPU); wrap() then moves it, or shards it onto the devices
    bank = pk.patch_model(model, prefix_len, projection_hidden=args.projection_hidden, backend=args.backend)
    step_model = pd.wrap(model, ctx, args.strategy)
    if ctx.distributed:
        pd.print_main(ctx, f"{ctx.world} processes on {device.type}, strategy {ctx.strategy}")

    limit = getattr(model.config, "max_position_embeddings", None)
    max_tokens = args.max_length or (limit - prefix_len if limit else 4096)
    examples = tokenize(rows, tokenizer, max_tokens, source)
    random.Random(args.seed).shuffle(examples)
    n_eval = max(1, int(len(examples) * args.eval_fraction)) if len(examples) > 1 and args.eval_fraction > 0 else 0
    eval_set, train_set = examples[:n_eval], examples[n_eval:]
    if not train_set:
        raise ValueError(f"{source}: {len(examples)} example(s) leave nothing to train on after the eval split")
    global_batch = args.batch_size * ctx.world
    steps = steps or math.ceil(len(train_set) / global_batch)

    optimizer = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, start_step, losses = os.path.join(args.out, CHECKPOINT), 0, []
    if os.path.isfile(ckpt_path) and not args.no_resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        bank.load_state_dict(ckpt["bank"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, losses = ckpt["step"], ckpt["losses"]
        pd.print_main(ctx, f"resuming from {ckpt_path} at step {start_step}")
        saved = ckpt.get("global_batch", global_batch)
        if saved != global_batch:
            pd.print_main(ctx, f"warning: the checkpoint was trained with a global batch of {saved} rows, this "
                               f"run uses {global_batch} ({args.batch_size} x {ctx.world} processes): later "
                               "steps see other batches than an uninterrupted run would")

    eval_before = evaluate(model, eval_set, args.batch_size, tokenizer.pad_token_id, ctx) if eval_set else None
    batches = [train_set[i:i + global_batch] for i in range(0, len(train_set), global_batch)]
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc="train",
               disable=args.quiet or not ctx.main)
    tokens, started, scale = 0, time.perf_counter(), pd.loss_scale(ctx)
    for step in bar:
        # the global batch depends on the step alone, so a resumed run (under any number of
        # ranks) sees what an uninterrupted one would
        batch = batches[step % len(batches)] if step < len(batches) else \
            batches[random.Random(args.seed * 1_000_003 + step).randrange(len(batches))]
        count = label_tokens(batch)      # the global batch's, known to every rank without a collective
        ids, mask, labels = (t.to(device) for t in collate(pd.shard(batch, ctx, masked_row), tokenizer.pad_token_id))
        local = loss_sum(step_model, ids, mask, labels)
        (local * (scale / max(count, 1))).backward()
        pd.sync_gradients(bank, ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(pd.all_sum([local.item()], ctx)[0] / max(count, 1))
        tokens += sum(len(ids) for ids, _ in batch)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            if ctx.main:
                _atomic_torch_save({"bank": bank.state_dict(), "optimizer": optimizer.state_dict(),
                                    "step": step + 1, "losses": losses, "global_batch": global_batch,
                                    "world_size": ctx.world}, ckpt_path)
            pd.barrier(ctx)
    bar.close()

    eval_loss = evaluate(model, eval_set, args.batch_size, tokenizer.pad_token_id, ctx) if eval_set else None
    if ctx.main:
        _save_adapter(bank, args.out, None if demo else args.model)
    pd.barrier(ctx)
    if losses:
        head, tail = losses[:10], losses[-10:]
        pd.print_main(ctx, f"train loss {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} over "
                           f"{len(losses)} steps")
    if eval_loss is not None:
        pd.print_main(ctx, f"eval loss {eval_before:.3f} -> {eval_loss:.3f} on {len(eval_set)} held-out examples")
    pd.print_main(ctx, f"adapter saved to {args.out}")
    return {"train_losses": losses, "eval_loss_before": eval_before, "eval_loss": eval_loss,
            "adapter": args.out, "steps": steps}


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="prefix-kernels train", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, pd.LaunchError) as e:
        print(f"prefix-kernels train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
