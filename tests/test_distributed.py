"""Data-parallel training: N processes equal one process on the same global batch.

Two gloo processes on the CPU (CI), or two NCCL processes on two GPUs (marked gpu), each started
through `prefix-kernels train --nproc 2` (torchrun's API). The single-process reference trains on
the same global batch (--batch-size 8 = 4 per rank x 2). The data has completions of different
lengths, so the ranks hold different token counts (a mean of per-rank means would differ from
the global token mean), and 17 training rows make a last global batch of one row (one rank
runs a row without labels).

Tolerance: fp32 throughout. The two runs differ only in reduction order (per-rank batches padded
to their own width, gradients summed across ranks): 2.4e-7 on prefix values up to 4, 7e-7 on
losses near 4.8, after 3 AdamW steps on the CPU. 1e-5 (CPU) / 1e-4 (GPU: other cuBLAS kernels
per batch shape) is far below one AdamW step (lr 1e-2), so a lost, doubled or mis-normalized rank
gradient fails (a mean of per-rank means misses by 2.4 on the losses).
"""
import gc
import json
import os
import shutil
import weakref

import pytest
import torch
from hf_tiny import padded_batch, tiny_config, tiny_model

from prefix_kernels import train

WORDS = ["<pad>", "<eos>", "<unk>", "q:", "a:", "red", "blue", "green", "yes", "no", "is", "sky", "grass",
         "the", "sea", "sun", "and", "very", "deep", "bright"]


def _local_model(folder):
    """A tiny Llama (rotary, GQA) and a word-level tokenizer, saved to a folder (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("llama", pad_token_id=0, eos_token_id=1, bos_token_id=None),
                                     dtype=torch.float32).save_pretrained(folder)


def _rows(n=18):
    """Prompts and completions of 1 to 5 words: the ranks' token counts differ."""
    colors, things = ["red", "blue", "green"], ["sky", "sea", "sun", "grass"]
    rows = []
    for i in range(n):
        prompt = f"q: the {things[i % 4]} is" + " very" * (i % 3)
        completion = " " + " ".join([colors[i % 3]] + ["and", colors[(i + 1) % 3]] * (i % 3) + ["deep"] * (i % 2))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    _local_model(str(root / "model"))
    with open(root / "data.jsonl", "w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")
    return root


def _argv(ws, out, *extra, device="cpu"):
    return ["--quiet", "--model", str(ws / "model"), "--data", str(ws / "data.jsonl"), "--out", str(out),
            "--prefix-len", "4", "--lr", "1e-2", "--save-every", "3", "--device", device, "--dtype", "float32",
            "--backend", "reference" if device == "cpu" else "auto", *extra]


def _train(argv):
    args = train.add_arguments(__import__("argparse").ArgumentParser()).parse_args(argv)
    return train.run(args)


def _ckpt(out):
    return torch.load(os.path.join(out, train.CHECKPOINT), map_location="cpu", weights_only=False)


def _single(ws, device):
    """One process, global batch 8: the prefix after 3 steps and after 6 (resumed at 3)."""
    out = ws / f"single-{device}"
    shutil.rmtree(out, ignore_errors=True)
    _train(_argv(ws, out, "--batch-size", "8", "--steps", "3", device=device))
    shutil.copytree(out, ws / f"single3-{device}")
    _train(_argv(ws, out, "--batch-size", "8", "--steps", "6", device=device))
    return _ckpt(ws / f"single3-{device}"), _ckpt(out)


def _assert_same(ckpt, ref, tol):
    assert ckpt["step"] == ref["step"]
    torch.testing.assert_close(torch.tensor(ckpt["losses"]), torch.tensor(ref["losses"]), atol=tol, rtol=tol)
    for name, value in ref["bank"].items():
        torch.testing.assert_close(ckpt["bank"][name], value, atol=tol, rtol=tol)
    # the AdamW state of the replicated prefix, as a resumed run will read it
    for key, state in ref["optimizer"]["state"].items():
        torch.testing.assert_close(ckpt["optimizer"]["state"][key]["exp_avg_sq"], state["exp_avg_sq"],
                                   atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def bart_workspace(tmp_path_factory):
    """A tiny BART (all three prefix sites) and a word-level tokenizer with BART's bos/pad/eos."""
    from hf_tiny import save_tiny_bart

    root = tmp_path_factory.mktemp("dist-bart")
    save_tiny_bart(root / "model", ["<s>", "<pad>", "</s>"] + WORDS[2:])
    with open(root / "data.jsonl", "w") as f:
        for row in _rows():
            f.write(json.dumps(row) + "\n")
    return root


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_encoder_decoder(bart_workspace, strategy):
    """The same for an encoder-decoder model (sources and targets of different lengths per rank;
    FSDP2 shards its encoder and decoder layers)."""
    ws = bart_workspace
    if not (ws / "single").exists():
        _train(_argv(ws, ws / "single", "--batch-size", "8", "--steps", "3"))
    assert train.main(_argv(ws, ws / strategy, "--nproc", "2", "--strategy", strategy, "--batch-size", "4",
                            "--steps", "3")) == 0
    _assert_same(_ckpt(ws / strategy), _ckpt(ws / "single"), 1e-5)
    assert _ckpt(ws / strategy)["identity"]["model"]["model_type"] == "bart"


@pytest.fixture(scope="module")
def single_cpu(workspace):
    return _single(workspace, "cpu")


@pytest.fixture(scope="module")
def ddp_cpu(workspace):
    out = workspace / "ddp"
    # the CLI entry point end to end: relaunch under torchrun, 2 gloo processes
    assert train.main(_argv(workspace, out, "--nproc", "2", "--strategy", "ddp", "--batch-size", "4",
                            "--steps", "3")) == 0
    return out


def test_ddp_two_processes_match_one(ddp_cpu, single_cpu):
    assert "checkpoint.pt" in os.listdir(ddp_cpu)
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(ddp_cpu / "adapters" / "default"))
    for folder in (ddp_cpu, ddp_cpu / "adapters"):      # no temporary files left
        assert not [n for n in os.listdir(folder) if n.startswith(".")]
    ckpt = _ckpt(ddp_cpu)
    assert ckpt["world_size"] == 2 and ckpt["global_batch"] == 8
    _assert_same(ckpt, single_cpu[0], 1e-5)


def test_resume_two_processes_to_one(ddp_cpu, single_cpu, workspace):
    out = workspace / "ddp-then-single"
    shutil.copytree(ddp_cpu, out)
    result = _train(_argv(workspace, out, "--batch-size", "8", "--steps", "6"))
    assert len(result["train_losses"]) == 6
    _assert_same(_ckpt(out), single_cpu[1], 1e-5)


def test_fsdp_resumes_one_process_checkpoint_on_two(single_cpu, workspace):
    """FSDP2 (the frozen base sharded over 2 gloo processes) continues a 1-process checkpoint."""
    out = workspace / "single-then-fsdp"
    shutil.copytree(workspace / "single3-cpu", out)
    result = _train(_argv(workspace, out, "--nproc", "2", "--strategy", "fsdp", "--batch-size", "4",
                          "--steps", "6"))
    assert result["steps"] == 6
    _assert_same(_ckpt(out), single_cpu[1], 1e-5)


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")     # torchrun under pytest's capture
def test_nproc_failure_is_reported(workspace, capsys):
    code = train.main(_argv(workspace, workspace / "bad", "--nproc", "2", "--batch-size", "4", "--steps", "1",
                            "--max-length", "3"))     # every example is too long: every rank fails
    assert code == 2
    assert "processes failed" in capsys.readouterr().err


def test_fsdp_frees_the_unsharded_base_and_keeps_the_bank_replicated():
    """In this process, a 1-rank gloo group: after sharding nothing holds the full frozen weights
    (what lets FSDP2 halve them on 2 GPUs); the bank stays a plain parameter; the sharded model
    gives the unsharded one's loss and prefix gradient."""
    import torch.distributed as dist

    import prefix_kernels as pk
    from prefix_kernels import distributed as pd

    ids, mask, labels = padded_batch()
    reference = tiny_model("llama").train()
    ref_bank = pk.patch_model(reference, 4, backend="reference")
    train.loss_sum(reference, ids, mask, labels).backward()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = tiny_model("llama").train()
        bank = pk.patch_model(model, 4, backend="reference")
        originals = [weakref.ref(p) for p in model.parameters() if not p.requires_grad]
        _, init_device_mesh = pd.fsdp_api()
        pd.shard_frozen_base(model, init_device_mesh("cpu", (1,)))
        gc.collect()
        alive = sum(r() is not None for r in originals)
        assert alive == 0, f"{alive} of {len(originals)} unsharded frozen weights are still referenced"
        assert type(bank.prefix) is torch.nn.Parameter
        assert all(type(p).__name__ == "DTensor" for n, p in model.named_parameters() if "prefix_bank" not in n)
        loss = train.loss_sum(model, ids, mask, labels)
        loss.backward()
        torch.testing.assert_close(loss, train.loss_sum(reference, ids, mask, labels).detach())
        torch.testing.assert_close(bank.prefix.grad, ref_bank.prefix.grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (NCCL)")
def test_nccl_two_gpus_match_one(workspace):
    ref3, _ = _single(workspace, "cuda")
    for strategy in ("ddp", "fsdp"):
        out = workspace / f"nccl-{strategy}"
        assert train.main(_argv(workspace, out, "--nproc", "2", "--strategy", strategy, "--batch-size", "4",
                                "--steps", "3", device="cuda")) == 0
        _assert_same(_ckpt(out), ref3, 1e-4)
