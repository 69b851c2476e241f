"""Hugging Face Trainer on a patched model: saving writes the prefix adapters (PEFT layout), not the
frozen model; PrefixTrainer resumes from them and keeps the `prefix_ids` column."""
import json
import os
import warnings

import pytest
import torch
from hf_tiny import padded_batch, tiny_model

import prefix_kernels as pk

P = 4


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*(cuda|CUDA|pin_memory).*")


def _rows(n=8):
    ids, mask, labels = padded_batch(batch=n)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i], "prefix_ids": i % 2}
            for i in range(n)]


def _args(out, steps, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2,
                             learning_rate=1e-2, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                             logging_steps=1, seed=0, disable_tqdm=True,
                             data_seed=0, **kw)


def _patched():
    model = tiny_model("llama")
    bank = pk.patch_model(model, P, names=["support", "legal"], backend="reference")
    return model, bank


def test_plain_trainer_saves_adapters_not_the_model(tmp_path):
    from transformers import Trainer

    model, bank = _patched()
    trainer = Trainer(model=model, args=_args(tmp_path / "run", 2, save_steps=2, remove_unused_columns=False),
                      train_dataset=_rows())
    trainer.train()
    for folder in (tmp_path / "run" / "checkpoint-2", tmp_path / "final"):
        if folder.name == "final":
            trainer.save_model(str(folder))
        names = set(os.listdir(folder))
        assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & names, names
        for entry in ("support", "legal"):       # no entry named "default": each in its own folder
            config = json.loads((folder / entry / "adapter_config.json").read_text())
            assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == P
    fresh = tiny_model("llama")
    for entry in ("support", "legal"):
        pk.load_prefix(fresh, str(tmp_path / "final" / entry), name=entry, backend="reference")
        torch.testing.assert_close(pk.get_prefix_bank(fresh).folded(entry), bank.folded(entry))
    pk.unpatch_model(model)                  # the model's own save_pretrained is back
    model.save_pretrained(str(tmp_path / "whole"))
    assert "model.safetensors" in os.listdir(tmp_path / "whole")


def test_one_entry_saves_at_the_root_and_peft_reads_it(tmp_path):
    from peft import PeftConfig

    model = tiny_model("llama")
    pk.patch_model(model, P, backend="reference")
    assert model.save_pretrained(str(tmp_path)) == [str(tmp_path)]
    assert PeftConfig.from_pretrained(str(tmp_path)).num_virtual_tokens == P
    assert model.save_pretrained(str(tmp_path / "other"), is_main_process=False) == []


def test_prefix_trainer_resumes_exactly(tmp_path):
    from prefix_kernels.integrations.trainer import PrefixTrainer

    model, whole = _patched()
    PrefixTrainer(model=model, args=_args(tmp_path / "whole", 4, save_strategy="no"), train_dataset=_rows()).train()

    model, bank = _patched()
    PrefixTrainer(model=model, args=_args(tmp_path / "run", 2, save_steps=2), train_dataset=_rows()).train()
    model, resumed = _patched()        # a fresh process: new random prefixes until the checkpoint loads
    trainer = PrefixTrainer(model=model, args=_args(tmp_path / "run", 4, save_steps=2), train_dataset=_rows())
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    torch.testing.assert_close(resumed.prefix, whole.prefix, atol=1e-6, rtol=1e-6)
    assert not torch.equal(resumed.prefix[:, :, 0], bank.prefix[:, :, 0])      # it trained on after step 2


def test_a_gathered_state_dict_is_what_gets_saved(tmp_path):
    """Under DeepSpeed/FSDP Trainer passes the gathered state dict: its prefix values are saved,
    not this process's (possibly sharded) bank."""
    model, bank = _patched()
    state = {f"prefix_bank.{k}": v + 1.0 for k, v in bank.state_dict().items()}
    model.save_pretrained(str(tmp_path), state_dict=state)
    fresh = tiny_model("llama")
    pk.load_prefix(fresh, str(tmp_path / "legal"), name="legal", backend="reference")
    torch.testing.assert_close(pk.get_prefix_bank(fresh).folded("legal"), bank.folded("legal") + 1.0)


def test_prefix_trainer_on_an_encoder_decoder_model(tmp_path):
    """BART with prefixes at all three sites under PrefixTrainer: the loss is the model's own (labels
    in, decoder inputs derived), each row trains its entry, saved adapters load back exactly and a
    resumed run equals an uninterrupted one."""
    from hf_tiny import seq2seq_batch, tiny_seq2seq

    from prefix_kernels.integrations.trainer import PrefixTrainer

    ids, mask, _, labels = seq2seq_batch(batch=8, src=7, tgt=5)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i], "prefix_ids": i % 2}
            for i in range(8)]

    def patched():
        model = tiny_seq2seq("bart")
        return model, pk.patch_model(model, P, names=["xsum", "cnn"], backend="reference")

    model, whole = patched()
    before = whole.prefix.detach().clone()
    PrefixTrainer(model=model, args=_args(tmp_path / "whole", 4, save_strategy="no"), train_dataset=rows).train()
    assert not torch.equal(whole.prefix[:, :, 0], before[:, :, 0]) and not torch.equal(whole.prefix[:, :, 1],
                                                                                      before[:, :, 1])
    model, _ = patched()
    PrefixTrainer(model=model, args=_args(tmp_path / "run", 2, save_steps=2), train_dataset=rows).train()
    model, resumed = patched()
    trainer = PrefixTrainer(model=model, args=_args(tmp_path / "run", 4, save_steps=2), train_dataset=rows)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    torch.testing.assert_close(resumed.prefix, whole.prefix, atol=1e-6, rtol=1e-6)
    trainer.save_model(str(tmp_path / "final"))
    for entry in ("xsum", "cnn"):
        config = json.loads((tmp_path / "final" / entry / "adapter_config.json").read_text())
        assert config["prefix_sites"] == {"encoder": 2, "decoder": 2, "cross": 2}
        fresh = tiny_seq2seq("bart")
        pk.load_prefix(fresh, str(tmp_path / "final" / entry), name=entry, backend="reference")
        torch.testing.assert_close(pk.get_prefix_bank(fresh).folded(entry), resumed.folded(entry))
