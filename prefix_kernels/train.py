"""`prefix-kernels train`: prefix-tune a causal LM on prompt/completion pairs.

    prefix-kernels train --model PATH --data FILE.jsonl --prefix-len 32 --out DIR

Each JSONL line is {"prompt": str, "completion": str}; the loss covers the completion only.
Training shows a progress bar (loss, tokens/s), evaluates on a held-out split, checkpoints to
DIR/checkpoint.pt (resumed automatically), and saves the adapter atomically in PEFT's format.
With no --model/--data it runs a built-in demo on the CPU: a small model built from a config, a
byte tokenizer, and a tiny classification task, in well under two minutes.

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


# -- the loop -----------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="local model folder (default: the built-in demo model)")
    parser.add_argument("--data", help="JSONL of {'prompt', 'completion'} (default: the built-in demo task)")
    parser.add_argument("--out", default="prefix-out", help="output folder: adapter + checkpoint")
    parser.add_argument("--prefix-len", type=int, default=None, help="prefix slots P (default 32; demo 16)")
    parser.add_argument("--projection-hidden", type=int, default=None, help="MLP reparameterization size")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 1 epoch; demo 300)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 5e-3; demo 5e-2)")
    parser.add_argument("--eval-fraction", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=None, help="longest example in tokens")
    parser.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
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
def evaluate(model, examples, batch_size, pad_id, device) -> float:
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = (t.to(device) for t in collate(examples[start:start + batch_size], pad_id))
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def run(args) -> dict:
    """Train; returns {'train_losses', 'eval_loss_before', 'eval_loss', 'adapter', 'steps'}."""
    import prefix_kernels as pk

    demo = args.model is None and args.data is None
    if (args.model is None) != (args.data is None):
        raise ValueError("pass both --model and --data, or neither for the built-in demo")
    # the demo is a CPU demo; a real run takes the GPU when there is one
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not demo else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    if demo:
        tokenizer, model, rows, source = ByteTokenizer(), demo_model(), demo_examples(), "demo"
        prefix_len, lr, steps = args.prefix_len or 16, args.lr or 5e-2, args.steps or 300
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        rows, source = read_jsonl(args.data), args.data
        tokenizer = _HFTokenizer(AutoTokenizer.from_pretrained(args.model))
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        prefix_len, lr, steps = args.prefix_len or 32, args.lr or 5e-3, args.steps
    model.to(device=device, dtype=dtype)
    bank = pk.patch_model(model, prefix_len, projection_hidden=args.projection_hidden, backend=args.backend)

    limit = getattr(model.config, "max_position_embeddings", None)
    max_tokens = args.max_length or (limit - prefix_len if limit else 4096)
    examples = tokenize(rows, tokenizer, max_tokens, source)
    random.Random(args.seed).shuffle(examples)
    n_eval = max(1, int(len(examples) * args.eval_fraction)) if len(examples) > 1 and args.eval_fraction > 0 else 0
    eval_set, train_set = examples[:n_eval], examples[n_eval:]
    if not train_set:
        raise ValueError(f"{source}: {len(examples)} example(s) leave nothing to train on after the eval split")
    steps = steps or math.ceil(len(train_set) / args.batch_size)

    optimizer = torch.optim.AdamW([p for p in bank.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path, start_step, losses = os.path.join(args.out, CHECKPOINT), 0, []
    if os.path.isfile(ckpt_path) and not args.no_resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        bank.load_state_dict(ckpt["bank"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step, losses = ckpt["step"], ckpt["losses"]
        print(f"resuming from {ckpt_path} at step {start_step}", file=sys.stderr)

    eval_before = evaluate(model, eval_set, args.batch_size, tokenizer.pad_token_id, device) if eval_set else None
    batches = [train_set[i:i + args.batch_size] for i in range(0, len(train_set), args.batch_size)]
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, desc="train", disable=args.quiet)
    tokens, started = 0, time.perf_counter()
    for step in bar:
        # the batch depends on the step alone, so a resumed run sees what an uninterrupted one would
        batch = batches[step % len(batches)] if step < len(batches) else \
            batches[random.Random(args.seed * 1_000_003 + step).randrange(len(batches))]
        ids, mask, labels = (t.to(device) for t in collate(batch, tokenizer.pad_token_id))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        tokens += int(mask.sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens / (time.perf_counter() - started):.0f}")
        if (step + 1) % args.save_every == 0 or step + 1 == steps:
            _atomic_torch_save({"bank": bank.state_dict(), "optimizer": optimizer.state_dict(),
                                "step": step + 1, "losses": losses}, ckpt_path)
    bar.close()

    eval_loss = evaluate(model, eval_set, args.batch_size, tokenizer.pad_token_id, device) if eval_set else None
    _save_adapter(bank, args.out, None if demo else args.model)
    if losses:
        head, tail = losses[:10], losses[-10:]
        print(f"train loss {sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f} over {len(losses)} steps",
              file=sys.stderr)
    if eval_loss is not None:
        print(f"eval loss {eval_before:.3f} -> {eval_loss:.3f} on {len(eval_set)} held-out examples", file=sys.stderr)
    print(f"adapter saved to {args.out}", file=sys.stderr)
    return {"train_losses": losses, "eval_loss_before": eval_before, "eval_loss": eval_loss,
            "adapter": args.out, "steps": steps}


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="prefix-kernels train", description=__doc__.split("\n")[0]))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"prefix-kernels train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
