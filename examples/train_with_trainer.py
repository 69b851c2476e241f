"""Prefix-tune with Hugging Face `Trainer`: two tasks in one run, adapters saved in PEFT's layout.

    python examples/train_with_trainer.py --out trainer-out           # the demo model, on the CPU
    python examples/train_with_trainer.py --model PATH --out trainer-out

Each row of the dataset carries `prefix_ids` (its task); `PrefixTrainer` keeps that column, and
saving (checkpoints, save_model) writes one adapter per task, not the frozen model. A plain
`Trainer` saves the same way (pass remove_unused_columns=False to keep `prefix_ids`);
`PrefixTrainer` can also resume_from_checkpoint.
"""
from __future__ import annotations

import argparse
import os
import random

import torch

import prefix_kernels as pk
from prefix_kernels.integrations.trainer import PrefixTrainer

TASKS = ["sentiment", "topic"]


def rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["great", "lovely", "superb"], ["dull", "awful", "boring"]
    topics = {"sport": ["goal", "match", "team"], "food": ["soup", "bread", "cake"]}
    out = []
    for i in range(n):
        if i % 2 == 0:
            label = rng.choice(["positive", "negative"])
            prompt = f"review: a {rng.choice(good if label == 'positive' else bad)} film. sentiment:"
        else:
            label = rng.choice(sorted(topics))
            prompt = f"text: the {rng.choice(topics[label])} was late. topic:"
        out.append({"prompt": prompt, "completion": f" {label}", "task": i % 2})
    return out


def encode(tokenizer, row: dict) -> dict:
    """Input ids, labels on the completion (and eos) only, and the row's task as its prefix id."""
    from prefix_kernels.serve.text import ByteTokenizer

    special = {} if isinstance(tokenizer, ByteTokenizer) else {"add_special_tokens": False}
    prompt = tokenizer.encode(row["prompt"], **special)
    completion = tokenizer.encode(row["completion"], **special)
    if tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    return {"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion, "prefix_ids": row["task"]}


def collate(batch: list[dict], pad_id: int) -> dict:
    width = max(len(r["input_ids"]) for r in batch)
    pad = lambda seq, value: seq + [value] * (width - len(seq))      # noqa: E731
    return {"input_ids": torch.tensor([pad(r["input_ids"], pad_id) for r in batch]),
            "attention_mask": torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in batch]),
            "labels": torch.tensor([pad(r["labels"], -100) for r in batch]),
            "prefix_ids": torch.tensor([r["prefix_ids"] for r in batch])}


def main(argv=None) -> int:
    from transformers import TrainingArguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a causal LM folder or hub id (default: the demo model)")
    parser.add_argument("--out", default="trainer-out")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prefix-len", type=int, default=16)
    args = parser.parse_args(argv)

    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    else:
        from prefix_kernels.demo import PAD_ID, demo_model, demo_tokenizer

        model, tokenizer, pad_id = demo_model(), demo_tokenizer(), PAD_ID
    pk.patch_model(model, args.prefix_len, names=TASKS)       # freezes the model; one bank entry per task
    data = [encode(tokenizer, r) for r in rows(400)]
    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=8,
                                 learning_rate=3e-2, warmup_steps=min(10, args.steps // 10),
                                 lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 10),
                                 save_steps=max(1, args.steps // 2), report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = PrefixTrainer(model=model, args=training, train_dataset=data, data_collator=lambda b: collate(b, pad_id))
    trainer.train()
    trainer.save_model(os.path.join(args.out, "adapters"))
    for task in TASKS:
        print(f"{task}: {os.path.join(args.out, 'adapters', task)} "
              f"({sorted(os.listdir(os.path.join(args.out, 'adapters', task)))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
