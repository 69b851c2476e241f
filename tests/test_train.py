"""`prefix-kernels train`: the built-in demo, resuming, a local model folder, bad data."""
import json
import os
import warnings

import pytest
import torch

from prefix_kernels import train


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _args(*argv):
    return train.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--quiet", "--backend", "reference", *argv])


def test_demo_loss_falls_and_adapter_loads(tmp_path):
    import prefix_kernels as pk

    result = train.run(_args("--out", str(tmp_path), "--steps", "60"))
    assert result["eval_loss"] < result["eval_loss_before"] - 0.5
    assert sum(result["train_losses"][-10:]) < sum(result["train_losses"][:10]) - 5.0
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint.pt"} <= set(os.listdir(tmp_path))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]      # no temporary files left
    model = train.demo_model()
    pk.load_prefix(model, str(tmp_path), backend="reference")
    ids = torch.tensor([train.ByteTokenizer().encode("review: a dull film. sentiment:")])
    assert model(input_ids=ids).logits.isfinite().all()


def test_resume_continues_exactly(tmp_path):
    whole = train.run(_args("--out", str(tmp_path / "a"), "--steps", "24", "--save-every", "8"))
    train.run(_args("--out", str(tmp_path / "b"), "--steps", "16", "--save-every", "8"))
    resumed = train.run(_args("--out", str(tmp_path / "b"), "--steps", "24", "--save-every", "8"))
    assert len(resumed["train_losses"]) == 24
    torch.testing.assert_close(torch.tensor(resumed["train_losses"]), torch.tensor(whole["train_losses"]),
                               atol=1e-6, rtol=1e-6)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


@pytest.mark.parametrize("rows,match", [
    ([], "no examples"),
    ([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], r"data.jsonl:2: missing field 'completion'"),
    (['{"prompt": "a", "completion": "b"}', "{not json"], r"data.jsonl:2: not valid JSON"),
    ([{"prompt": "a", "completion": 3}], r"data.jsonl:1: field 'completion' must be a string"),
])
def test_bad_data_names_the_line(tmp_path, rows, match):
    path = _write_jsonl(tmp_path / "data.jsonl", rows)
    with pytest.raises(ValueError, match=match):
        train.read_jsonl(path)


def _local_model(folder):
    """A tiny GPT-2 and a word-level tokenizer, saved to a folder (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "q:", "a:", "red", "blue", "green", "yes", "no", "is", "sky", "grass"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=32, n_layer=2, n_head=2, n_positions=24,
                               attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).save_pretrained(folder)


def test_local_model_folder_and_too_long_example(tmp_path):
    _local_model(str(tmp_path / "model"))
    rows = [{"prompt": "q: sky is", "completion": " blue"}, {"prompt": "q: grass is", "completion": " green"}] * 6
    data = _write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "out"
    result = train.run(_args("--model", str(tmp_path / "model"), "--data", data, "--out", str(out),
                             "--prefix-len", "4", "--steps", "5", "--lr", "1e-2"))
    assert len(result["train_losses"]) == 5
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "model") and config["num_virtual_tokens"] == 4
    long_rows = rows[:2] + [{"prompt": " ".join(["red"] * 30), "completion": " no"}]
    data = _write_jsonl(tmp_path / "long.jsonl", long_rows)
    with pytest.raises(ValueError, match=r"long.jsonl:3: 32 tokens, but the model allows 20"):
        train.run(_args("--model", str(tmp_path / "model"), "--data", data, "--out", str(out),
                        "--prefix-len", "4", "--no-resume"))


def test_main_reports_errors_cleanly(tmp_path, capsys):
    assert train.main(["--model", "x"]) == 2
    assert "pass both --model and --data" in capsys.readouterr().err
