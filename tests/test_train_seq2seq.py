"""`prefix-kernels train` on an encoder-decoder model (a tiny BART saved to a folder): the loss is
the model's own, training learns the task, and its adapters serve through Seq2SeqEngine."""
import json
import warnings

import pytest
import torch

from prefix_kernels import train
from prefix_kernels.cli_common import UsageError

WORDS = ["<s>", "<pad>", "</s>", "<unk>", "q:", "red", "blue", "green", "is", "sky", "grass", "sea"]
QUESTIONS = [{"prompt": "q: sky is", "completion": "blue"}, {"prompt": "q: grass is", "completion": "green"},
             {"prompt": "q: sea is", "completion": "blue"}] * 4


@pytest.fixture(autouse=True)
def _quiet():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _args(*argv):
    return train.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--quiet", "--backend", "reference", "--no-tensorboard", *argv])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def bart_folder(tmp_path_factory):
    """A tiny BART (a wide init: prefixes move its outputs) and a word-level tokenizer."""
    from hf_tiny import save_tiny_bart

    return save_tiny_bart(tmp_path_factory.mktemp("bart"), WORDS, max_positions=32, init_std=0.3)


def test_the_loss_is_the_models_own(bart_folder):
    """loss_sum over the target (decoder inputs = the labels shifted right after the start token)
    divided by the target tokens is HF's own seq2seq loss."""
    from transformers import AutoModelForSeq2SeqLM

    from prefix_kernels.train_data import Example, collate_seq2seq, label_tokens

    model = AutoModelForSeq2SeqLM.from_pretrained(bart_folder).eval()
    rows = [Example([4, 9, 8], [6, 2]), Example([4, 10, 8, 5, 5], [7, 7, 6, 2])]
    ids, mask, dec, labels, _ = collate_seq2seq(rows, 1, 2)
    assert dec.tolist() == [[2, 6, 2, 1], [2, 7, 7, 6]]
    with torch.no_grad():
        ours = train.loss_sum(model, ids, mask, labels, decoder_input_ids=dec) / label_tokens(rows, seq2seq=True)
        theirs = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs)


def test_bart_learns_its_tasks_and_the_adapters_serve(tmp_path, bart_folder):
    """Two tasks on all three sites: the loss falls, one adapter per task in prefix-kernels'
    layout, and Seq2SeqEngine serving them answers as trained."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from prefix_kernels.serve import SamplingParams, Seq2SeqEngine

    colors = _write_jsonl(tmp_path / "colors.jsonl", QUESTIONS)
    swapped = _write_jsonl(tmp_path / "swapped.jsonl", [dict(r, completion={"blue": "green", "green": "red"}[
        r["completion"]]) for r in QUESTIONS])
    out = tmp_path / "out"
    result = train.run(_args("--model", bart_folder, "--task", f"colors={colors}", "--task", f"swapped={swapped}",
                             "--out", str(out), "--prefix-len", "4", "--steps", "60", "--lr", "5e-2",
                             "--batch-size", "8", "--eval-fraction", "0"))
    losses = result["train_losses"]
    assert sum(losses[-5:]) / 5 < 0.2 * sum(losses[:5]) / 5, losses
    for name in ("colors", "swapped"):
        config = json.loads((out / "adapters" / name / "adapter_config.json").read_text())
        assert config["prefix_sites"] == {"encoder": 2, "decoder": 2, "cross": 2}
    engine = Seq2SeqEngine(AutoModelForSeq2SeqLM.from_pretrained(bart_folder),
                           {name: str(out / "adapters" / name) for name in ("colors", "swapped")},
                           tokenizer=AutoTokenizer.from_pretrained(bart_folder), max_batch=4, max_seq_len=8)
    prompts = ["q: sky is", "q: grass is", "q: sea is"]
    answers = {name: [c.text.strip() for c in engine.generate(prompts, name, SamplingParams(temperature=0,
                                                                                          max_tokens=4))]
               for name in ("colors", "swapped")}
    assert answers == {"colors": ["blue", "green", "blue"], "swapped": ["green", "red", "green"]}


def test_sites_choose_the_prefixed_attention(tmp_path, bart_folder):
    """--sites decoder: PEFT's one site. Its two decoder layers share one slot of PEFT's layout,
    which trained layers no longer fill alike: saved in prefix-kernels' layout, decoder only."""
    data = _write_jsonl(tmp_path / "d.jsonl", QUESTIONS)
    train.run(_args("--model", bart_folder, "--data", data, "--out", str(tmp_path / "out"), "--prefix-len", "2",
                    "--steps", "2", "--sites", "decoder"))
    config = json.loads((tmp_path / "out" / "adapters" / "default" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_2_SEQ_LM" and config["prefix_sites"] == {"decoder": 2}


def test_truncate_keeps_the_beginning_and_the_end_token(bart_folder):
    from transformers import AutoTokenizer

    from prefix_kernels.train_data import tokenize_seq2seq

    tok = train._HFTokenizer(AutoTokenizer.from_pretrained(bart_folder))
    rows = [{"prompt": "q: " + " ".join(["red"] * 40), "completion": " ".join(["blue"] * 10)}]
    cut = []
    (ex,) = tokenize_seq2seq(rows, tok, 8, 5, "d.jsonl", truncate=True, truncated=cut)
    red, blue, eos = WORDS.index("red"), WORDS.index("blue"), WORDS.index("</s>")
    # this word-level tokenizer adds no special tokens to the source: cut plainly; the target
    # ends in the eos appended to it, which stays
    assert ex.ids == [WORDS.index("q:")] + [red] * 7 and ex.labels == [blue] * 4 + [eos]
    assert cut == ["d.jsonl:1"]
    rows = [{"prompt": "q: red </s>", "completion": "blue"}]
    assert tokenize_seq2seq(rows, tok, 2, 5, "d.jsonl", truncate=True)[0].ids == [WORDS.index("q:"), eos]


def test_what_cannot_train_says_why(tmp_path, bart_folder):
    data = _write_jsonl(tmp_path / "d.jsonl", QUESTIONS)
    with pytest.raises(UsageError, match="--sites takes a comma list of encoder, decoder, cross"):
        train.run(_args("--model", bart_folder, "--data", data, "--out", str(tmp_path / "o"), "--sites", "encoder,x"))
    long = _write_jsonl(tmp_path / "long.jsonl", QUESTIONS[:2] + [{"prompt": " ".join(["red"] * 40),
                                                                    "completion": "blue"}])
    with pytest.raises(ValueError, match=r"long.jsonl:3: the prompt has 40 tokens, but the model allows 32"):
        train.run(_args("--model", bart_folder, "--data", long, "--out", str(tmp_path / "o"), "--prefix-len", "4"))
    with pytest.raises(UsageError, match="no room for a target; use a shorter --prefix-len"):
        train.run(_args("--model", bart_folder, "--data", data, "--out", str(tmp_path / "o")))
    with pytest.raises(UsageError, match="--sites is for encoder-decoder models; llama is decoder-only"):
        train.run(_args("--data", data, "--out", str(tmp_path / "o2"), "--sites", "decoder"))
