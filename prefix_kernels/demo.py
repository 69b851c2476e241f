"""The built-in demo shared by `prefix-kernels train` and `prefix-kernels serve` with no --model.

One tiny Llama built from a config with a fixed seed (the same weights in every process, nothing
downloaded) and a byte tokenizer, so an adapter that the train demo writes is served by the serve
demo as is: `prefix-kernels train` then `prefix-kernels serve --prefix sentiment=prefix-out/adapters/sentiment`.
"""
from __future__ import annotations

import random

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .serve.text import ByteTokenizer

# base_model_name_or_path of the adapters the demo writes: the serve demo checks it
DEMO_MODEL_NAME = "prefix-kernels-demo"
DEMO_TASK = "sentiment"
PAD_ID, EOS_ID, VOCAB_SIZE = 256, 257, 258      # bytes 0..255, then pad and eos

_WORDS = {"positive": ["great", "lovely", "superb", "fun", "moving", "brilliant", "sharp", "warm"],
          "negative": ["dull", "awful", "boring", "flat", "clumsy", "tedious", "cold", "weak"]}


def demo_tokenizer() -> "ByteTokenizer":
    """The demo's tokenizer: UTF-8 bytes, pad 256, eos 257 (serve.text.ByteTokenizer)."""
    from .serve.text import ByteTokenizer

    return ByteTokenizer(VOCAB_SIZE, eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def demo_model(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The demo's model: a 2-layer Llama (hidden 128, 4 query / 2 KV heads of 32), random weights
    from seed 0, the same in every process. The global RNG is left as it was."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
    config.name_or_path = DEMO_MODEL_NAME
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    return model


def demo_examples(n: int = 400, seed: int = 0) -> list[dict]:
    """The demo task: {'prompt': 'review: a dull, flat film. sentiment:', 'completion': ' negative'}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(_WORDS))
        words = rng.sample(_WORDS[label], 2)
        rows.append({"prompt": f"review: a {words[0]}, {words[1]} film. sentiment:", "completion": f" {label}"})
    return rows


def demo_prefixes(model: torch.nn.Module, prefix_len: int = 8, names: tuple[str, ...] = ("demo-a", "demo-b"),
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """Random prefixes [L, 2, Hkv, P, D] for the serve demo when no adapter is given."""
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(config.num_hidden_layers, 2, config.num_key_value_heads, prefix_len, head_dim,
                              generator=gen) for name in names}
