"""The serving engine's text layer: a fast tokenizer decoded through its own (Rust) decode gives
transformers' text, and the incremental detokenizer streams exactly the final text."""
import random

import pytest
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from prefix_kernels.serve.text import Detokenizer, Tokenizer

WORDS = ["▁hello", "▁world", "!", "▁caf", "é", "▁a", "b", ",", "▁the", "▁end", "."]


def fast_tokenizer(clean_up: bool) -> PreTrainedTokenizerFast:
    """A sentencepiece-like word-level tokenizer built offline, with special tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = RustTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=clean_up)


@pytest.mark.parametrize("clean_up", [False, True])
def test_decode_equals_transformers_decode(clean_up):
    hf = fast_tokenizer(clean_up)
    tok = Tokenizer(hf)
    assert (tok._backend_decode is not None) == (not clean_up)      # cleanup: transformers' own path
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(WORDS) + 3) for _ in range(rng.randrange(0, 12))]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), ids


@pytest.mark.parametrize("stop", [[], [","], [" the end"]])
def test_streamed_deltas_add_up_to_the_final_text(stop):
    hf = fast_tokenizer(False)
    tok = Tokenizer(hf)
    rng = random.Random(1)
    prompt = hf("hello world", add_special_tokens=True)["input_ids"]
    stopped = 0
    for _ in range(200):
        out = [rng.randrange(3, len(WORDS) + 3) for _ in range(rng.randrange(1, 20))]
        detok = Detokenizer(tok, prompt, stop)
        streamed = ""
        for t in out:
            if detok.add(t):
                stopped += 1
                break
            streamed += detok.delta(False)
        streamed += detok.delta(True)
        assert streamed == detok.text
        context = hf.decode(prompt[-4:], skip_special_tokens=True)
        full = hf.decode(prompt[-4:] + out, skip_special_tokens=True)[len(context):]
        if not stop:
            assert detok.text == full
        else:
            assert full.startswith(detok.text) and all(s not in detok.text for s in stop)
    assert (stopped > 0) == bool(stop)
