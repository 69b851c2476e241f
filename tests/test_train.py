"""`prefix-kernels train`: the demo, resuming, several tasks in one run, the optimizer's schedule and
accumulation, atomic adapters and checkpoints that say why they cannot resume, bad data."""
import json
import os
import warnings

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels import checkpoint, train
from prefix_kernels.demo import demo_model, demo_tokenizer
from prefix_kernels.train_log import lr_factor


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _args(*argv):
    return train.add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["--quiet", "--backend", "reference", "--no-tensorboard", *argv])


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_demo_loss_falls_adapter_serves_and_a_rerun_says_so(tmp_path, capsys):
    out = tmp_path / "demo"
    result = train.run(_args("--out", str(out), "--steps", "60", "--warmup-steps", "5"))
    assert result["eval_loss"] < result["eval_loss_before"] - 0.5
    assert sum(result["train_losses"][-10:]) < sum(result["train_losses"][:10]) - 5.0
    adapter = out / "adapters" / "sentiment"
    assert result["adapters"] == {"sentiment": str(adapter)}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(adapter))
    for folder in (out, out / "adapters"):
        assert not [n for n in os.listdir(folder) if n.startswith(".")]      # no temporary files left
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "prefix-kernels-demo"
    steps = [r for r in _log(out) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert steps[0]["lr"] == pytest.approx(5e-2 / 6) and steps[5]["lr"] == pytest.approx(5e-2)   # warm-up
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert [list(r["eval_loss"]) for r in _log(out) if "eval_loss" in r] == [["sentiment"]] * 2
    err = capsys.readouterr().err
    assert f"--prefix sentiment={adapter}" in err

    # the serve demo's model and tokenizer take the adapter as is
    model = demo_model()
    pk.load_prefix(model, str(adapter), backend="reference")
    ids = torch.tensor([demo_tokenizer().encode("review: a dull film. sentiment:")])
    assert model(input_ids=ids).logits.isfinite().all()

    again = train.run(_args("--out", str(out), "--steps", "60"))
    assert again["train_losses"] == result["train_losses"]
    err = capsys.readouterr().err
    assert "is already at step 60 of 60: nothing left to train" in err and "train loss" not in err


def test_resume_continues_exactly_and_says_so(tmp_path, capsys, local_model):
    data = _write_jsonl(tmp_path / "data.jsonl", COLORS)
    argv = ["--model", local_model, "--data", data, "--prefix-len", "3", "--batch-size", "4", "--steps", "6",
            "--save-every", "2", "--lr-schedule", "cosine", "--warmup-steps", "2", "--eval-fraction", "0"]
    whole = train.run(_args("--out", str(tmp_path / "a"), *argv))
    assert torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["step"] == 6
    prev = torch.load(tmp_path / "a" / "checkpoint.prev.pt", weights_only=False)      # the last good one kept
    assert prev["step"] == 4
    (tmp_path / "b").mkdir()
    torch.save(prev, tmp_path / "b" / "checkpoint.pt")
    capsys.readouterr()
    resumed = train.run(_args("--out", str(tmp_path / "b"), *argv))
    assert f"resuming from {tmp_path / 'b' / 'checkpoint.pt'} at step 4 of 6" in capsys.readouterr().err
    assert len(resumed["train_losses"]) == 6      # the epoch's second pass is reshuffled the same way
    torch.testing.assert_close(torch.tensor(resumed["train_losses"]), torch.tensor(whole["train_losses"]),
                               atol=1e-6, rtol=1e-6)


def test_grad_accumulation_equals_the_bigger_batch(tmp_path, local_model):
    data = _write_jsonl(tmp_path / "data.jsonl", COLORS[:9] + ANSWERS[:4])     # 13 rows: a short last batch
    argv = ["--model", local_model, "--data", data, "--prefix-len", "3", "--steps", "3", "--eval-fraction", "0"]
    accum = train.run(_args("--out", str(tmp_path / "acc"), *argv, "--batch-size", "2", "--grad-accum", "3"))
    same = train.run(_args("--out", str(tmp_path / "same"), *argv, "--batch-size", "6"))
    torch.testing.assert_close(torch.tensor(accum["train_losses"]), torch.tensor(same["train_losses"]),
                               atol=1e-5, rtol=1e-5)
    a = torch.load(tmp_path / "acc" / "checkpoint.pt", weights_only=False)["bank"]["prefix"]
    b = torch.load(tmp_path / "same" / "checkpoint.pt", weights_only=False)["bank"]["prefix"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lr_schedules():
    assert [lr_factor(s, 10, 3, "constant") for s in (0, 1, 2, 3, 9)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(3, 10, 3, "linear") == 1.0 and lr_factor(9, 10, 3, "linear") == pytest.approx(1 / 7)
    assert lr_factor(3, 11, 3, "cosine") == 1.0
    assert lr_factor(7, 11, 3, "cosine") == pytest.approx(0.5)
    assert lr_factor(11, 11, 3, "cosine") == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_factor(0, 1, 0, "step")


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


WORDS = ["<pad>", "<eos>", "<unk>", "q:", "a:", "red", "blue", "green", "yes", "no", "is", "sky", "grass"]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """A tiny GPT-2 and a word-level tokenizer, saved to a folder (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = str(tmp_path_factory.mktemp("model"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=24,
                               attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).save_pretrained(folder)
    return folder


COLORS = [{"prompt": "q: sky is", "completion": " blue"}, {"prompt": "q: grass is", "completion": " green"}] * 6
ANSWERS = [{"prompt": "a: is sky blue", "completion": " yes"}, {"prompt": "a: is grass red", "completion": " no"}] * 5


def test_local_model_folder_and_too_long_example(tmp_path, local_model):
    data = _write_jsonl(tmp_path / "data.jsonl", COLORS)
    out = tmp_path / "out"
    result = train.run(_args("--model", local_model, "--data", data, "--out", str(out),
                             "--prefix-len", "4", "--steps", "5", "--lr", "1e-2"))
    assert len(result["train_losses"]) == 5
    config = json.loads((out / "adapters" / "default" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == local_model and config["num_virtual_tokens"] == 4
    long_rows = COLORS[:2] + [{"prompt": " ".join(["red"] * 30), "completion": " no"}]
    data = _write_jsonl(tmp_path / "long.jsonl", long_rows)
    with pytest.raises(ValueError, match=r"long.jsonl:3: 32 tokens, but the model allows 20"):
        train.run(_args("--model", local_model, "--data", data, "--out", str(out),
                        "--prefix-len", "4", "--no-resume"))


def test_truncate_cuts_the_start_of_long_prompts(tmp_path, local_model, capsys):
    """--truncate: a prompt that does not fit loses its first tokens (the completion and the
    prompt's end stay); a completion that cannot fit alone is still an error."""
    from prefix_kernels.train_data import tokenize

    tok = train._HFTokenizer(__import__("transformers").AutoTokenizer.from_pretrained(local_model))
    rows = [{"prompt": "q: " + " ".join(["red"] * 30) + " sky is", "completion": " blue", "_line": 7}]
    cut = []
    (ex,) = tokenize(rows, tok, 20, "d.jsonl", truncate=True, truncated=cut)
    assert len(ex.ids) == 20 and cut == ["d.jsonl:7"]
    assert ex.ids[-4:] == [WORDS.index(w) for w in ("sky", "is", "blue", "<eos>")]
    assert ex.labels == [-100] * 18 + ex.ids[-2:]
    with pytest.raises(ValueError, match=r"d.jsonl:1: 23 tokens \(its completion alone has 21\)"):
        tokenize([{"prompt": "q: sky", "completion": " " + " ".join(["no"] * 20)}], tok, 20, "d.jsonl", truncate=True)
    data = _write_jsonl(tmp_path / "long.jsonl", COLORS[:4] + rows)
    train.run(_args("--model", local_model, "--data", data, "--out", str(tmp_path / "out"), "--prefix-len", "4",
                    "--steps", "1", "--truncate"))
    assert "--truncate: 1 example(s) cut to the model's limit" in capsys.readouterr().err


def test_several_tasks_in_one_run(tmp_path, local_model, monkeypatch):
    """Each row of a mixed batch goes through its own task's bank entry; one adapter per task."""
    colors, answers = _write_jsonl(tmp_path / "c.jsonl", COLORS), _write_jsonl(tmp_path / "a.jsonl", ANSWERS)
    seen = []
    loss_sum = train.loss_sum

    def recording(model, ids, mask, labels, prefix_ids=None):
        if model.training:
            seen.append((ids[:, 0].tolist(), prefix_ids.tolist()))
        return loss_sum(model, ids, mask, labels, prefix_ids)

    monkeypatch.setattr(train, "loss_sum", recording)
    out = tmp_path / "out"
    result = train.run(_args("--model", local_model, "--task", f"colors={colors}", "--task", f"answers={answers}",
                             "--out", str(out), "--prefix-len", "3", "--steps", "3", "--batch-size", "6",
                             "--lr", "1e-2", "--eval-fraction", "0.2"))
    q, a = WORDS.index("q:"), WORDS.index("a:")
    assert len(seen) == 3
    for first_tokens, prefix_ids in seen:
        assert {q, a} <= set(first_tokens) or len(first_tokens) < 6          # mixed batches
        assert prefix_ids == [0 if t == q else 1 for t in first_tokens]      # colors is entry 0
    assert set(result["eval_losses"]) == {"colors", "answers"}
    assert [sorted(r["eval_loss"]) for r in _log(out) if "eval_loss" in r] == [["answers", "colors"]] * 2
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(local_model)
    for name in ("colors", "answers"):
        folder = out / "adapters" / name
        assert json.loads((folder / "adapter_config.json").read_text())["num_virtual_tokens"] == 3
        pk.load_prefix(model, str(folder), name=name, backend="reference")
    bank = pk.get_prefix_bank(model)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    for i, name in enumerate(("colors", "answers")):
        torch.testing.assert_close(bank.folded(name), ckpt["bank"]["prefix"][:, :, i].float())


def test_checkpoints_say_why_they_cannot_resume(tmp_path, local_model, capsys):
    data = _write_jsonl(tmp_path / "data.jsonl", COLORS)
    out = tmp_path / "out"
    argv = ["--model", local_model, "--data", data, "--out", str(out), "--prefix-len", "4", "--save-every", "2"]
    train.run(_args(*argv, "--steps", "4"))
    capsys.readouterr()

    assert train.main(["--quiet", *argv, "--steps", "6", "--prefix-len", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]      # after transformers' loading bar
    assert err == (f"prefix-kernels train: error: {out / 'checkpoint.pt'} cannot resume this run: it was trained "
                   "with --prefix-len 4, this run asks for 8 (pass another --out, or --no-resume to start over)")

    with open(out / "checkpoint.pt", "r+b") as f:        # a truncated newest checkpoint: the previous one resumes
        f.truncate(100)
    result = train.run(_args(*argv, "--steps", "6"))
    err = capsys.readouterr().err
    assert "the file is unreadable, truncated or corrupt (100 bytes" in err
    assert f"resuming from the last good one, {out / 'checkpoint.prev.pt'}" in err
    assert "at step 2 of 6" in err and len(result["train_losses"]) == 6

    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        with open(out / name, "r+b") as f:
            f.truncate(10)
    assert train.main(["--quiet", *argv, "--steps", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("prefix-kernels train: error: ") and "cannot resume: the file is unreadable, truncated or corrupt" in err


def test_adapter_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "adapters" / "a"
    checkpoint.write_folder_atomically(str(target), lambda d: [open(os.path.join(d, n), "w").write("v1")
                                                                for n in ("config", "weights", "extra")])

    def crash(folder):
        open(os.path.join(folder, "config"), "w").write("v2")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        checkpoint.write_folder_atomically(str(target), crash)
    assert {n: (target / n).read_text() for n in os.listdir(target)} == {"config": "v1", "weights": "v1", "extra": "v1"}
    checkpoint.write_folder_atomically(str(target), lambda d: [open(os.path.join(d, n), "w").write("v3")
                                                                for n in ("config", "weights")])
    assert {n: (target / n).read_text() for n in os.listdir(target)} == {"config": "v3", "weights": "v3"}
    assert os.listdir(tmp_path / "adapters") == ["a"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o700)       # not tempfile's private mode


def test_main_reports_errors_cleanly(tmp_path, capsys):
    assert train.main(["--data", str(tmp_path / "none.jsonl"), "--model", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(": the folder has no config.json (not a transformers model folder)")
    assert train.main(["--model", "x"]) == 2
    assert "--model needs --data FILE or --task NAME=FILE" in capsys.readouterr().err


def test_nproc_relaunch_keeps_every_task():
    args = _args("--task", "a=a.jsonl", "--task", "b=b.jsonl", "--grad-accum", "2", "--nproc", "2")
    argv = train._to_argv(args, drop=("nproc",))
    assert argv[argv.index("--task"):argv.index("--task") + 4] == ["--task", "a=a.jsonl", "--task", "b=b.jsonl"]
    assert "--nproc" not in argv and argv[argv.index("--grad-accum") + 1] == "2"
    assert _args(*argv).task == ["a=a.jsonl", "b=b.jsonl"]
