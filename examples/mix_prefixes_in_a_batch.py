"""One batch, a different prefix on every row: the fused op reads each row's prefix from the bank.

    python examples/mix_prefixes_in_a_batch.py                                  # random prefixes
    python examples/mix_prefixes_in_a_batch.py --adapter sentiment=prefix-out-two-tasks/adapters/sentiment \
                                               --adapter topic=prefix-out-two-tasks/adapters/topic

On the demo model (what `prefix-kernels train` trains when given no --model). Greedy generation of
the whole mixed batch, then of each row alone with its prefix: the same tokens.
"""
from __future__ import annotations

import argparse

import torch

import prefix_kernels as pk
from prefix_kernels.demo import EOS_ID, PAD_ID, demo_model, demo_tokenizer

PROMPTS = ["review: a dull, flat film. sentiment:", "text: the soup was late. topic:",
           "review: a superb film. sentiment:", "text: the match was late. topic:"]


def left_padded(tokenizer, prompts):
    rows = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, rows))
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def until_eos(ids: list[int]) -> list[int]:
    """New tokens up to the first eos: a batch pads a finished row on, a row alone just stops."""
    return ids[:ids.index(EOS_ID) + 1] if EOS_ID in ids else ids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a prefix adapter trained on the demo model (repeat); default: two random prefixes")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, tokenizer = demo_model().eval(), demo_tokenizer()
    adapters = dict(pair.split("=", 1) for pair in args.adapter)
    if adapters:
        for name, folder in adapters.items():
            pk.load_prefix(model, folder, name=name)
        names = list(adapters)
    else:
        names = ["a", "b"]
        pk.patch_model(model, 8, names=names)
    row_prefix = [names[i % len(names)] for i in range(len(PROMPTS))]

    ids, mask = left_padded(tokenizer, PROMPTS)
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=mask, prefix_ids=row_prefix, do_sample=False,
                               max_new_tokens=args.max_new_tokens, pad_token_id=PAD_ID)
    for row, (prompt, name) in enumerate(zip(PROMPTS, row_prefix)):
        alone_ids, alone_mask = left_padded(tokenizer, [prompt])
        with torch.no_grad():
            alone = model.generate(input_ids=alone_ids, attention_mask=alone_mask, prefix_ids=[name],
                                   do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=PAD_ID)
        mixed_new = until_eos(batch[row, ids.shape[1]:].tolist())
        alone_new = until_eos(alone[0, alone_ids.shape[1]:].tolist())
        same = mixed_new == alone_new
        print(f"[{name}] {prompt!r} -> {tokenizer.decode(mixed_new)!r}  (same as alone: {same})")
        if not same:
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
