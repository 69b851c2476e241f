"""Data of `prefix-kernels train`: tasks of prompt/completion JSONL, tokenized rows, batches.

Each task is its own entry of the prefix bank; a row carries the index of its task, and a batch
mixes the rows of every task (each row's prefix is chosen by `prefix_ids` in one pass of the
frozen model). A decoder-only row is prompt + completion with labels on the completion; an
encoder-decoder row (`seq2seq`) is the prompt as the encoder's input and the completion as the
decoder's target, every target token labelled.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Example:
    """One tokenized row: input ids, labels (-100 where no loss), the row's task (bank entry).
    Encoder-decoder rows: ids are the source, labels the target (its own length)."""
    ids: list[int]
    labels: list[int]
    task: int = 0


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


def tokenize(rows: list[dict], tokenizer, max_tokens: int, source: str, task: int = 0,
             truncate: bool = False, truncated: list | None = None) -> list[Example]:
    """Examples of `rows`; labels are -100 on the prompt, and an eos (when the tokenizer has one)
    ends the completion so the model learns to stop. A row over max_tokens is an error, or with
    `truncate` loses the start of its prompt (the tokens nearest the completion stay; its place
    is appended to `truncated`); a completion that cannot fit alone is an error either way."""
    examples = []
    for i, row in enumerate(rows):
        prompt = tokenizer.encode(row["prompt"])
        completion = tokenizer.encode(row["completion"])
        if tokenizer.eos_token_id is not None:
            completion.append(tokenizer.eos_token_id)
        ids = prompt + completion
        if len(ids) > max_tokens:
            where = f"{source}:{row.get('_line', i + 1)}"
            if not truncate or len(completion) >= max_tokens:
                what = "" if not truncate else f" (its completion alone has {len(completion)})"
                raise ValueError(f"{where}: {len(ids)} tokens{what}, but the model allows {max_tokens} with the prefix "
                                 "offset; shorten the example or pass --max-length" +
                                 ("" if truncate else " (or --truncate)"))
            prompt = prompt[len(ids) - max_tokens:]
            ids = prompt + completion
            if truncated is not None:
                truncated.append(where)
        examples.append(Example(ids, [-100] * len(prompt) + completion, task))
    return examples


def tokenize_seq2seq(rows: list[dict], tokenizer, max_source: int, max_target: int, source: str,
                     task: int = 0, truncate: bool = False, truncated: list | None = None) -> list[Example]:
    """Encoder-decoder examples of `rows`: the prompt as the source, the completion as the target,
    each with the tokenizer's special tokens (BART's <s> ... </s>: what its generate produces
    after the decoder's start token), the target ending in eos so the model learns to stop.
    A source or target over its limit is an error, or with `truncate` keeps its beginning (and
    its end-of-sequence token, when it ends in one), as the summarization scripts of transformers
    truncate (its place is appended to `truncated`)."""
    examples = []
    for i, row in enumerate(rows):
        ids, target = tokenizer.encode_special(row["prompt"]), tokenizer.encode_special(row["completion"])
        if tokenizer.eos_token_id is not None and (not target or target[-1] != tokenizer.eos_token_id):
            target.append(tokenizer.eos_token_id)
        where = f"{source}:{row.get('_line', i + 1)}"
        if not ids:
            raise ValueError(f"{where}: the prompt is empty (the encoder needs at least one token)")
        cut = False
        for what, tokens, most in (("prompt", ids, max_source), ("completion", target, max_target)):
            if len(tokens) > most:
                if not truncate:
                    raise ValueError(f"{where}: the {what} has {len(tokens)} tokens, but the model allows {most}; "
                                     "shorten it or pass --max-length (or --truncate)")
                end = tokens[-1:] if tokens[-1] == tokenizer.eos_token_id else []
                tokens[:] = tokens[:most - len(end)] + end
                cut = True
        if cut and truncated is not None:
            truncated.append(where)
        examples.append(Example(ids, target, task))
    return examples


def split_eval(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(eval, train) of one task's examples, shuffled with `seed`; at least one eval example when
    fraction > 0 and there are two or more examples."""
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    n_eval = max(1, int(len(examples) * fraction)) if len(examples) > 1 and fraction > 0 else 0
    return examples[:n_eval], examples[n_eval:]


def collate_seq2seq(batch: list[Example], pad_id: int, decoder_start_id: int):
    """(input_ids, attention_mask, decoder_input_ids, labels, prefix_ids) of encoder-decoder rows,
    right-padded; the decoder's inputs are the labels shifted right after its start token (HF's
    shift_tokens_right: what the model computes from labels)."""
    ids, mask, _, prefix_ids = collate([Example(ex.ids, ex.ids, ex.task) for ex in batch], pad_id)
    width = max(len(ex.labels) for ex in batch)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, ex in enumerate(batch):
        labels[i, :len(ex.labels)] = torch.tensor(ex.labels)
    decoder_ids = torch.full_like(labels, decoder_start_id)
    decoder_ids[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return ids, mask, decoder_ids, labels, prefix_ids


def collate(batch: list[Example], pad_id: int):
    """(input_ids, attention_mask, labels, prefix_ids) tensors of a batch, right-padded."""
    width = max(len(ex.ids) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):     # right padding: training needs no left padding
        input_ids[i, :len(ex.ids)] = torch.tensor(ex.ids)
        labels[i, :len(ex.labels)] = torch.tensor(ex.labels)
        mask[i, :len(ex.ids)] = 1
    prefix_ids = torch.tensor([ex.task for ex in batch], dtype=torch.long)
    return input_ids, mask, labels, prefix_ids


def label_tokens(batch: list[Example], seq2seq: bool = False) -> int:
    """Tokens the loss covers (labels shifted by one, -100 ignored; encoder-decoder rows: every
    target token), counted on the host."""
    skip = 0 if seq2seq else 1
    return sum(sum(1 for t in ex.labels[skip:] if t != -100) for ex in batch)


def masked_row(row: Example) -> Example:
    """The same input with no label: it runs forward/backward but adds nothing to the loss."""
    return Example(row.ids, [-100] * len(row.labels), row.task)


class BatchPlan:
    """The rows of each optimizer step, a function of the step alone (so a resumed run, under any
    number of processes, sees what an uninterrupted one would): epoch 0 in the given order, each
    later epoch a permutation seeded by (seed, epoch)."""

    def __init__(self, examples: list[Example], rows_per_step: int, seed: int):
        self.examples, self.rows, self.seed = examples, rows_per_step, seed
        self.per_epoch = -(-len(examples) // rows_per_step)
        self._order: tuple[int, list[int]] | None = None

    def __call__(self, step: int) -> list[Example]:
        epoch, i = divmod(step, self.per_epoch)
        if epoch == 0:
            order = range(len(self.examples))
        else:
            if self._order is None or self._order[0] != epoch:
                perm = list(range(len(self.examples)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
                self._order = (epoch, perm)
            order = self._order[1]
        return [self.examples[j] for j in order[i * self.rows:(i + 1) * self.rows]]
