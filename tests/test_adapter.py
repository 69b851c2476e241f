"""The adapter format (prefix_kernels.adapter) and the bank's entries: typed config, one reader,
load_adapter / rename / names. No model library is needed here."""
import json

import pytest
import torch
from safetensors.torch import save_file

from prefix_kernels.adapter import (AdapterConfig, bank_to_peft_flat, layers_to_peft_seq2seq,
                                    peft_seq2seq_to_layers, read_adapter)
from prefix_kernels.bank import PrefixBank, read_peft_prefix, validate_name

L, HKV, D, P = 3, 2, 4, 5


def write(folder, config: dict, tensors: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return str(folder)


def peft_config(**overrides):
    config = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": P, "num_layers": L,
              "token_dim": HKV * D, "num_attention_heads": HKV, "peft_version": "0.21.2"}
    config.update(overrides)
    return config


def random_bank(names=("default",), **kw):
    bank = PrefixBank(L, HKV, D, P, names=names, **kw)
    with torch.no_grad():
        if bank.projection_hidden is None:
            bank.prefix.normal_()
    return bank


# -- AdapterConfig ------------------------------------------------------------------------------

def test_config_round_trip_and_peft_defaults():
    config = AdapterConfig.from_dict(peft_config(unknown_future_field=1))
    assert (config.layout, config.sites, config.head_dim) == ("causal", ("decoder",), D)
    again = AdapterConfig.from_dict(config.to_dict())
    assert again == config and config.to_dict()["peft_type"] == "PREFIX_TUNING"
    seq2seq = AdapterConfig.from_dict(peft_config(task_type="SEQ_2_SEQ_LM"))
    assert seq2seq.num_transformer_submodules == 2 and seq2seq.layout == "peft_seq2seq"   # PEFT's rule
    sites = AdapterConfig.from_dict(peft_config(num_layers=5, task_type="SEQ_2_SEQ_LM",
                                                prefix_sites={"cross": 2, "encoder": 3}))
    assert sites.layout == "sites" and sites.sites == ("encoder", "cross")     # in bank order


@pytest.mark.parametrize("change,match", [
    (dict(peft_type="LORA"), "peft_type is 'LORA', expected 'PREFIX_TUNING'"),
    (dict(num_layers=None), "missing num_layers"),
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be a positive integer, got 0"),
    (dict(token_dim=7.5), "token_dim must be a positive integer"),
    (dict(token_dim=9), "token_dim 9 is not a multiple of num_attention_heads 2"),
    (dict(num_transformer_submodules=3), "num_transformer_submodules must be 1"),
    (dict(prefix_sites={"self": 3}), "prefix_sites must name some of"),
    (dict(prefix_sites={"encoder": 1, "decoder": 1}), "num_layers 3 is not the sum of prefix_sites"),
])
def test_config_errors_name_the_problem(change, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig.from_dict(peft_config(**change), source="x/adapter_config.json")


# -- the reader -----------------------------------------------------------------------------------

def test_reader_checks_files_shapes_and_values(tmp_path):
    flat = torch.randn(P, L * 2 * HKV * D)
    good = write(tmp_path / "good", peft_config(), {"prompt_embeddings": flat})
    adapter = read_adapter(good)
    assert torch.equal(adapter.prefix("decoder"), flat.view(P, L, 2, HKV, D).permute(1, 2, 3, 0, 4))
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        read_adapter(str(tmp_path / "nowhere"))
    bad = torch.randn(P + 1, L * 2 * HKV * D)
    with pytest.raises(ValueError, match=r"prompt_embeddings has shape \(6, 48\), but the config says"):
        read_adapter(write(tmp_path / "shape", peft_config(), {"prompt_embeddings": bad}))
    with pytest.raises(ValueError, match="no 'prompt_embeddings' tensor"):
        read_adapter(write(tmp_path / "key", peft_config(), {"other": flat}))
    nan = flat.clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite values"):
        read_adapter(write(tmp_path / "nan", peft_config(), {"prompt_embeddings": nan}))
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_adapter(str(tmp_path / "json"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "adapter_config.json").write_text(json.dumps(peft_config()))
    with pytest.raises(FileNotFoundError, match="no adapter_model.safetensors"):
        read_adapter(str(tmp_path / "noweights"))


def test_read_peft_prefix_stays_for_decoder_only(tmp_path):
    flat = torch.randn(P, L * 2 * HKV * D)
    config, read = read_peft_prefix(write(tmp_path / "a", peft_config(), {"prompt_embeddings": flat}))
    assert torch.equal(read, flat) and config["num_virtual_tokens"] == P and config["num_layers"] == L
    seq2seq = write(tmp_path / "b", peft_config(task_type="SEQ_2_SEQ_LM"), {"prompt_embeddings": flat})
    with pytest.raises(ValueError, match="encoder-decoder prefix adapter"):
        read_peft_prefix(seq2seq)


def test_peft_seq2seq_slots_round_trip():
    """PEFT 0.21 feeds decoder layer l the flat layer (2l) mod L: with L=4, layers 0,2 read slots
    0 and layers 1,3 read slot 2; slots 1 and 3 are unused."""
    flat = torch.randn(P, 4 * 2 * HKV * D)
    layers = peft_seq2seq_to_layers(flat, 4, 4, HKV, D)
    full = flat.view(P, 4, 2, HKV, D).permute(1, 2, 3, 0, 4)
    for layer, slot in enumerate([0, 2, 0, 2]):
        assert torch.equal(layers[layer], full[slot])
    back = layers_to_peft_seq2seq(layers)
    assert torch.equal(peft_seq2seq_to_layers(back, 4, 4, HKV, D), layers)
    assert back.view(P, 4, 2, HKV, D)[:, [1, 3]].abs().max() == 0
    untied = layers.clone()
    untied[2] += 1
    assert layers_to_peft_seq2seq(untied) is None
    odd = peft_seq2seq_to_layers(torch.randn(P, 3 * 2 * HKV * D), 3, 3, HKV, D)
    assert torch.equal(peft_seq2seq_to_layers(layers_to_peft_seq2seq(odd), 3, 3, HKV, D), odd)  # a bijection


# -- the bank: entries, names, load_adapter ---------------------------------------------------------

def test_load_adapter_in_place_by_index_and_by_new_name(tmp_path):
    source = random_bank()
    folder = source.save_pretrained(str(tmp_path / "a"))[0]
    bank = PrefixBank(L, HKV, D, P, names=["x", "y"], init="zeros")
    storage = bank.prefix.data_ptr()
    assert bank.load_adapter(1, folder) == 1
    assert bank.prefix.data_ptr() == storage                   # in place: captured graphs stay valid
    assert torch.equal(bank.folded(1), source.folded(0)) and bank.folded(0).abs().max() == 0
    assert bank.load_adapter("z", read_adapter(folder)) == 2 and bank.names == ["x", "y", "z"]
    assert torch.equal(bank.folded("z"), source.folded(0))


def test_load_adapter_rejects_what_does_not_fit(tmp_path):
    folder = random_bank().save_pretrained(str(tmp_path / "a"))[0]
    with pytest.raises(ValueError, match="num_virtual_tokens is 5 in the adapter but 4 here, num_layers is 3 in "
                                         "the adapter but 2 here"):
        PrefixBank(2, HKV, D, 4).load_adapter(0, folder)
    with pytest.raises(ValueError, match="MLP-reparameterized"):
        PrefixBank(L, HKV, D, P, projection_hidden=8).load_adapter(0, folder)
    seq2seq = PrefixBank(L, HKV, D, P, sites={"decoder": L}, task_type="SEQ_2_SEQ_LM")
    with pytest.raises(ValueError, match="is for a decoder-only model, but this bank belongs to an encoder-decoder"):
        seq2seq.load_adapter(0, folder)
    bank = PrefixBank(L, HKV, D, P, names=["a"])
    with pytest.raises(ValueError, match="invalid prefix name '../up'"):
        bank.load_adapter("../up", folder)
    assert bank.names == ["a"]


def test_sites_are_views_of_one_tensor_and_save_per_site(tmp_path):
    sites = {"encoder": 2, "decoder": 1, "cross": 1}
    bank = PrefixBank(4, HKV, D, P, names=["t"], sites=sites, task_type="SEQ_2_SEQ_LM")
    assert bank.site_slice("decoder") == slice(2, 3) and bank.site_slice("cross") == slice(3, 4)
    cross = torch.randn(1, 2, HKV, P, D)
    bank.set_entry("t", cross, site="cross")
    assert torch.equal(bank.prefix[3, :, 0], cross[0])
    with pytest.raises(ValueError, match="at site 'encoder'"):
        bank.set_entry("t", cross, site="encoder")
    folder = bank.save_pretrained(str(tmp_path))[0]
    adapter = read_adapter(folder)
    assert adapter.config.prefix_sites == sites and adapter.config.layout == "sites"
    for site in sites:
        assert torch.equal(adapter.prefix(site), bank.folded(0)[bank.site_slice(site)])
    with pytest.raises(ValueError, match="cannot be saved in PEFT's format: PEFT prefixes only the decoder"):
        bank.save_pretrained(str(tmp_path / "p"), format="peft")
    with pytest.raises(ValueError, match="sites must map some of"):
        PrefixBank(2, HKV, D, P, sites={"self": 2})
    with pytest.raises(ValueError, match=r"num_layers=3 but the sites .* have 2 layers"):
        PrefixBank(3, HKV, D, P, sites={"encoder": 1, "cross": 1})


def test_mlp_bank_with_sites_saves_the_folded_prefix(tmp_path):
    bank = PrefixBank(4, HKV, D, P, projection_hidden=6, sites={"encoder": 2, "decoder": 2},
                      task_type="SEQ_2_SEQ_LM")
    assert bank.materialize().shape == (4, 2, 1, HKV, P, D)
    adapter = read_adapter(bank.save_pretrained(str(tmp_path))[0])
    assert torch.allclose(adapter.prefix("encoder"), bank.folded(0)[:2]) and adapter.config.prefix_projection is False


def test_rename_and_name_rules():
    bank = PrefixBank(L, HKV, D, P, names=["a", "b"])
    assert bank.rename("b", "c.v2") == 1 and bank.names == ["a", "c.v2"]
    assert bank.rename(0, "a") == 0                            # renaming to itself is allowed
    with pytest.raises(ValueError, match="already exists"):
        bank.rename("a", "c.v2")
    with pytest.raises(ValueError, match="no prefix named 'zz'"):
        bank.rename("zz", "d")
    for bad in ("", "a/b", "..", "x" * 65, "sp ace", 3):
        with pytest.raises(ValueError, match="invalid prefix name"):
            validate_name(bad)
    with pytest.raises(ValueError, match="invalid prefix name"):
        bank.add_entry("no/slash")
    assert validate_name("Task_1-v2.0") == "Task_1-v2.0"


def test_save_checks_every_name_before_writing(tmp_path):
    bank = PrefixBank(L, HKV, D, P, names=["ok", "<free>1"])   # the serving engine's placeholder rows
    with pytest.raises(ValueError, match="invalid prefix name '<free>1'"):
        bank.save_pretrained(str(tmp_path))
    assert not any(tmp_path.iterdir())
    written = bank.save_pretrained(str(tmp_path), names=["ok"])
    assert written == [str(tmp_path)]
    assert torch.equal(read_adapter(written[0]).tensors["decoder"], bank_to_peft_flat(bank.folded("ok")))


def test_a_frozen_bank_is_cast_once_and_again_after_it_changes():
    import torch

    from prefix_kernels.bank import PrefixBank

    bank = PrefixBank(2, 2, 8, 4, names=["a", "b"])
    with torch.no_grad():
        first = bank.materialize(torch.bfloat16)
        assert bank.materialize(torch.bfloat16) is first            # generate: no copy per token
        bank.prefix.mul_(2)                                         # an in-place update (a load, a step)
        again = bank.materialize(torch.bfloat16)
    assert again is not first and torch.equal(again, (bank.prefix * 1).to(torch.bfloat16).detach())
    trained = bank.materialize(torch.bfloat16)                      # grad enabled: in the graph
    assert trained.grad_fn is not None
