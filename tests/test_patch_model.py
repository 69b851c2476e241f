"""patch_model against PEFT prefix tuning and against the unpatched model, on tiny random models."""
import os
import warnings

import pytest
import torch

import prefix_kernels as pk
from hf_tiny import FAMILIES, padded_batch, tiny_model
from prefix_kernels.bank import bank_to_peft_flat, peft_flat_to_bank
from utils import requires_gpu

P = 5
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)


def peft_prefix_model(family, p=P, projection_hidden=None, seed=0):
    """A PEFT prefix-tuning model with a random (non-trivial) prefix."""
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p,
                                prefix_projection=projection_hidden is not None,
                                encoder_hidden_size=projection_hidden or 64)
    model = get_peft_model(tiny_model(family, seed=seed), config)
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        for param in encoder.parameters():
            param.normal_(0, 0.5)
    return model


def peft_run(model, ids, mask, labels):
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.prompt_encoder["default"].named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads


def patched_like_peft(family, peft_model, backend="reference", seed=0, **kw):
    model = tiny_model(family, seed=seed)
    flat = peft_model.prompt_encoder["default"].embedding.weight.detach()
    bank = pk.patch_model(model, flat.shape[0], init="zeros", backend=backend, **kw)
    bank.set_entry(0, peft_flat_to_bank(flat, bank.num_layers, bank.num_kv_heads, bank.head_dim))
    return model, bank


def assert_close(actual, expected, atol=2e-5, rtol=1e-5, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# -- PEFT parity: logits, loss, prefix gradients --------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_peft_parity_reference(family):
    ids, mask, labels = padded_batch()
    peft_model = peft_prefix_model(family)
    logits_ref, loss_ref, grads_ref = peft_run(peft_model, ids, mask, labels)
    model, bank = patched_like_peft(family, peft_model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close(out.logits, logits_ref, what="logits")
    assert_close(out.loss, loss_ref, what="loss")
    assert_close(bank_to_peft_flat(bank.prefix.grad[:, :, 0]), grads_ref["embedding.weight"], atol=1e-6,
                 what="prefix grad")
    assert grads_ref["embedding.weight"].abs().max() > 1e-4    # the comparison is not vacuous


@pytest.mark.parametrize("family", ["llama", "gpt2"])   # GQA + rotary; absolute positions
def test_peft_parity_triton_interpreter(family):
    assert INTERPRETING, "run the tests with TRITON_INTERPRET=1 set (the Triton kernels run on the CPU)"
    ids, mask, labels = padded_batch(batch=2, seq=5)
    peft_model = peft_prefix_model(family, p=3)
    logits_ref, loss_ref, grads_ref = peft_run(peft_model, ids, mask, labels)
    model, bank = patched_like_peft(family, peft_model, backend="triton")
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close(out.logits, logits_ref, what="logits")
    assert_close(out.loss, loss_ref, what="loss")
    assert_close(bank_to_peft_flat(bank.prefix.grad[:, :, 0]), grads_ref["embedding.weight"], atol=1e-6,
                 what="prefix grad")


def test_peft_parity_projection():
    """With the MLP reparameterization: same logits and the same gradients of every MLP weight."""
    ids, mask, labels = padded_batch()
    peft_model = peft_prefix_model("llama", projection_hidden=24)
    logits_ref, loss_ref, grads_ref = peft_run(peft_model, ids, mask, labels)
    model = tiny_model("llama")
    bank = pk.patch_model(model, P, projection_hidden=24, backend="reference")
    enc = peft_model.prompt_encoder["default"]
    bank.set_projection(0, enc.embedding.weight, enc.transform[0].weight, enc.transform[0].bias,
                        enc.transform[2].weight, enc.transform[2].bias)
    calls = []
    materialize = bank.materialize
    bank.materialize = lambda *a, **k: calls.append(1) or materialize(*a, **k)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert len(calls) == 1          # the MLP runs once per step, not once per layer or row
    assert_close(out.logits, logits_ref, what="logits")
    assert_close(out.loss, loss_ref, what="loss")
    for ours, theirs in (("embedding", "embedding.weight"), ("proj_in_weight", "transform.0.weight"),
                         ("proj_in_bias", "transform.0.bias"), ("proj_out_weight", "transform.2.weight"),
                         ("proj_out_bias", "transform.2.bias")):
        assert_close(getattr(bank, ours).grad[0], grads_ref[theirs], atol=1e-6, what=ours)


def test_position_offset_zero():
    """position_offset=0 puts real tokens at 0..S-1: PEFT gives that with position_ids shifted by -P."""
    ids, mask, _ = padded_batch()
    peft_model = peft_prefix_model("llama")
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, position_ids=positions - P).logits
        shifted = peft_model(input_ids=ids, attention_mask=mask).logits
    model, _ = patched_like_peft("llama", peft_model, position_offset=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert_close(out, expected, what="offset 0")
    assert not torch.allclose(out, shifted, atol=1e-3)


# -- several prefixes in one batch --------------------------------------------------------

def _row_weights(logits):
    return torch.randn(logits.shape, generator=torch.Generator().manual_seed(5))


def test_mixed_prefix_batch_equals_rows_alone():
    model = tiny_model("llama")
    bank = pk.patch_model(model, P, num_prefixes=3, names=["a", "b", "c"], backend="reference")
    ids, mask, _ = padded_batch(batch=3)
    prefix_ids = ["c", "a", "c"]
    out = model(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits
    (out * _row_weights(out)).sum().backward()
    batch_grad = bank.prefix.grad.clone()
    bank.prefix.grad = None
    weights = _row_weights(out)
    for row, name in enumerate(prefix_ids):
        alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], prefix_ids=[name]).logits
        assert_close(out[row:row + 1], alone, what=f"row {row}")
        (alone * weights[row:row + 1]).sum().backward()
    assert_close(batch_grad, bank.prefix.grad, atol=1e-5, what="bank grad")
    assert batch_grad[:, :, 1].abs().sum() == 0     # entry "b" is used by no row


def test_prefix_ids_as_tensor_and_ints():
    model = tiny_model("qwen2")
    pk.patch_model(model, P, num_prefixes=2, backend="reference")
    ids, mask, _ = padded_batch(batch=2)
    by_name = model(input_ids=ids, attention_mask=mask, prefix_ids=["1", "0"]).logits
    by_tensor = model(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([1, 0])).logits
    assert torch.equal(by_name, by_tensor)
    with pytest.raises(ValueError, match="pass prefix_ids"):
        model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match="no prefix named 'x'"):
        model(input_ids=ids, attention_mask=mask, prefix_ids=["x", "0"])
    with pytest.raises(ValueError, match="out of range"):
        model(input_ids=ids, attention_mask=mask, prefix_ids=[2, 0])
    with pytest.raises(ValueError, match="batch has 2 rows"):
        model(input_ids=ids, attention_mask=mask, prefix_ids=[0, 0, 1])


# -- the KV cache and generation --------------------------------------------------------------

def test_cache_holds_only_real_tokens():
    model = tiny_model("llama")
    pk.patch_model(model, P, backend="reference")
    ids, mask, _ = padded_batch()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert out.past_key_values.get_seq_length() == ids.shape[1]
    step = model(input_ids=ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1),
                 past_key_values=out.past_key_values, use_cache=True)
    assert step.past_key_values.get_seq_length() == ids.shape[1] + 1


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_builds_no_cache(family):
    """A training step never reads a KV cache: the patched model turns HF's default one off
    (a K and V copy per layer), unless the call asks for it."""
    model = tiny_model(family)
    pk.patch_model(model, P, backend="reference")
    ids, mask, _ = padded_batch()
    model.train()
    assert model(input_ids=ids, attention_mask=mask).past_key_values is None
    assert model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values is not None
    with torch.no_grad():       # evaluation under train(): still no gradient step, HF's default holds
        assert model(input_ids=ids, attention_mask=mask).past_key_values is not None
    model.eval()
    assert model(input_ids=ids, attention_mask=mask).past_key_values is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_skips_hfs_packed_sequence_scan(family, monkeypatch):
    """Without a mask or a cache HF scans the position ids for packed documents (a device sync per
    step); a patched training forward gives it a marked all-True mask instead, with the same loss."""
    import transformers.masking_utils as masking

    model = tiny_model(family)
    pk.patch_model(model, P, backend="reference")
    model.train()
    ids = torch.randint(0, 100, (2, 9))
    expected = model(input_ids=ids, labels=ids, use_cache=True).loss       # a cache: no scan, no mask added

    def refuse(position_ids):
        raise AssertionError("HF scanned the position ids for packed sequences")
    monkeypatch.setattr(masking, "find_packed_sequence_indices", refuse)
    loss = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    loss.backward()
    assert model.prefix_bank.prefix.grad is not None


def _generate_positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text"])
def test_greedy_generate_matches_peft_forward(family):
    """generate's tokens and step logits equal PEFT's forward on the growing sequence.

    Compared against PEFT's forward with generate's position ids (PEFT shifts them by P, as we do)
    rather than PEFT's generate: with transformers 5.24 the cache is passed as `cache=` and PEFT
    0.21's generate silently drops the prefix (it works on 5.17, and matches there too).
    """
    peft_model = peft_prefix_model(family)
    model, _ = patched_like_peft(family, peft_model)
    ids, mask, _ = padded_batch(batch=2, seq=6)
    mask[1] = 1
    new = 4
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ref = peft_model(input_ids=out.sequences, attention_mask=full_mask,
                         position_ids=_generate_positions(full_mask)).logits   # PEFT adds P itself
    for t, step_logits in enumerate(out.logits):
        assert_close(step_logits, ref[:, ids.shape[1] - 1 + t], what=f"step {t}")
    assert torch.equal(out.sequences[:, ids.shape[1]:], ref[:, ids.shape[1] - 1:-1].argmax(-1))
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


def test_generate_mixed_prefixes_beam_and_sampling():
    """Per-row prefixes survive generate's row expansion (beams, num_return_sequences)."""
    model = tiny_model("llama")
    pk.patch_model(model, P, num_prefixes=2, names=["x", "y"], backend="reference")
    ids, mask, _ = padded_batch(batch=2, seq=6)
    mask[1] = 1     # generation takes left padding only
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, num_beams=3,
                           do_sample=False, prefix_ids=["y", "x"], pad_token_id=0)
    for row, name in enumerate(["y", "x"]):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=3,
                               num_beams=3, do_sample=False, prefix_ids=[name], pad_token_id=0)
        assert torch.equal(beams[row:row + 1, -3:], alone[:, -3:])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=True,
                         num_return_sequences=2, prefix_ids=["y", "x"], output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
    seqs = out.sequences
    full_mask = torch.cat([mask.repeat_interleave(2, 0), torch.ones(4, 3, dtype=mask.dtype)], 1)
    with torch.no_grad():
        ref = model(input_ids=seqs, attention_mask=full_mask, position_ids=_generate_positions(full_mask),
                    prefix_ids=["y", "y", "x", "x"]).logits
    for t, step_logits in enumerate(out.logits):
        assert_close(step_logits, ref[:, ids.shape[1] - 1 + t], what=f"sampling step {t}")


# -- gradient checkpointing ---------------------------------------------------------------------

@pytest.mark.parametrize("reentrant,projection", [(False, 16), (True, None)])
def test_gradient_checkpointing_same_gradients(reentrant, projection):
    ids, mask, labels = padded_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama")
        bank = pk.patch_model(model, P, projection_hidden=projection, backend="reference")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in bank.parameters()])
    for plain, ckpt in zip(*grads):
        assert plain.abs().max() > 0
        assert_close(ckpt, plain, atol=1e-6, what="checkpointed grad")


@pytest.mark.parametrize("family", ["llama", "opt"])     # OPT keeps the checkpointing flag on its decoder
def test_reentrant_checkpointing_with_projection_raises(family):
    model = tiny_model(family)
    pk.patch_model(model, P, projection_hidden=16, backend="reference")
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask, labels = padded_batch()
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model(input_ids=ids, attention_mask=mask, labels=labels)


# -- layers without a prefix fall through to SDPA -----------------------------------------------

@pytest.mark.parametrize("causal,sq,sk", [(True, 3, 7), (True, 5, 5), (False, 4, 6)])
def test_fall_through_matches_plain_attention(causal, sq, sk):
    from prefix_kernels.integrations.transformers import prefix_attention_forward

    class Cross(torch.nn.Module):
        is_causal, is_cross_attention, training = causal, not causal, False
    q, k, v = torch.randn(2, 4, sq, 8), torch.randn(2, 4, sk, 8), torch.randn(2, 4, sk, 8)
    keep = torch.ones(2, sk, dtype=torch.bool)
    keep[0, :2] = False
    out, _ = prefix_attention_forward(Cross(), q, k, v, keep, scaling=0.5)
    scores = (q @ k.transpose(-1, -2)) * 0.5
    visible = keep[:, None, None, :]
    if causal:
        visible = visible & (torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + sk - sq)
    expected = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v
    seen = visible.expand(2, 4, sq, sk).any(-1).transpose(1, 2)     # rows that see some key
    assert_close(out[seen], expected.transpose(1, 2)[seen], what="fall-through")


def test_gpt2_cross_attention_falls_through_with_its_mask():
    model = tiny_model("gpt2", add_cross_attention=True)
    pk.patch_model(model, P, backend="reference")
    ids, mask, _ = padded_batch()
    enc = torch.randn(3, 4, 64)
    enc_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask)
        enc2 = enc.clone()
        enc2[enc_mask == 0] = 100.0          # masked encoder states must not matter
        out2 = model(input_ids=ids, attention_mask=mask, encoder_hidden_states=enc2, encoder_attention_mask=enc_mask)
    assert_close(out2.logits, out.logits, what="masked encoder states")


# -- unpatching --------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unpatch_restores_model_bit_for_bit(family):
    model = tiny_model(family)
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    attn = model.config._attn_implementation
    trainable = [p.requires_grad for p in model.parameters()]
    state_keys = set(model.state_dict())
    pk.patch_model(model, P, backend="reference")
    with torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(patched, before)
    pk.unpatch_model(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, before)
    assert model.config._attn_implementation == attn
    assert [p.requires_grad for p in model.parameters()] == trainable
    assert set(model.state_dict()) == state_keys
    assert "generate" not in model.__dict__ and not hasattr(model, "prefix_bank")
    with pytest.raises(ValueError, match="not patched"):
        pk.unpatch_model(model)


def test_patch_touches_only_the_instance_and_freezes_base():
    patched, other = tiny_model("llama"), tiny_model("llama")
    bank = pk.patch_model(patched, P, backend="reference")
    assert other.config._attn_implementation == "sdpa"
    trainable = {n for n, p in patched.named_parameters() if p.requires_grad}
    assert trainable == {"prefix_bank.prefix"} and bank.prefix.requires_grad
    with pytest.raises(ValueError, match="already patched"):
        pk.patch_model(patched, P)


# -- save / load --------------------------------------------------------------------------------

def test_save_load_round_trip_several_entries(tmp_path):
    model = tiny_model("llama")
    bank = pk.patch_model(model, P, num_prefixes=2, names=["default", "task"], backend="reference")
    ids, mask, _ = padded_batch(batch=2)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, prefix_ids=["task", "default"]).logits
    written = bank.save_pretrained(str(tmp_path))
    assert written == [str(tmp_path), str(tmp_path / "task")]
    fresh = tiny_model("llama")
    pk.load_prefix(fresh, str(tmp_path), backend="reference")
    pk.load_prefix(fresh, str(tmp_path / "task"), name="task")
    assert pk.get_prefix_bank(fresh).names == ["default", "task"]
    with torch.no_grad():
        after = fresh(input_ids=ids, attention_mask=mask, prefix_ids=["task", "default"]).logits
    assert torch.equal(after, before)


def test_peft_saved_adapter_loads_and_matches_peft(tmp_path):
    peft_model = peft_prefix_model("qwen3")
    peft_model.save_pretrained(str(tmp_path))
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    model = tiny_model("qwen3")
    pk.load_prefix(model, str(tmp_path), backend="reference")
    with torch.no_grad():
        assert_close(model(input_ids=ids, attention_mask=mask).logits, expected, what="logits")


def test_our_adapter_loads_in_peft_and_folds_the_mlp(tmp_path):
    """An MLP-reparameterized bank saves the folded prefix; PEFT and a plain bank load it alike."""
    from peft import PeftModel

    model = tiny_model("gpt2")
    pk.patch_model(model, P, projection_hidden=24, backend="reference")
    ids, mask, _ = padded_batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    pk.get_prefix_bank(model).save_pretrained(str(tmp_path))
    peft_model = PeftModel.from_pretrained(tiny_model("gpt2"), str(tmp_path))
    plain = tiny_model("gpt2")
    pk.load_prefix(plain, str(tmp_path), backend="reference")
    with torch.no_grad():
        assert_close(peft_model(input_ids=ids, attention_mask=mask).logits, expected, what="PEFT")
        assert_close(plain(input_ids=ids, attention_mask=mask).logits, expected, what="plain bank")


def test_load_rejects_mismatched_adapter(tmp_path):
    peft_prefix_model("llama").save_pretrained(str(tmp_path))
    model = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="num_layers is 2 in the adapter but 3 here"):
        pk.load_prefix(model, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        pk.load_prefix(model, str(tmp_path / "nowhere"))


def test_init_from_text_tokens():
    model = tiny_model("llama")
    token_ids = [5, 9, 11]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([(token_ids * 2)[:P]]), use_cache=True).past_key_values
    bank = pk.patch_model(model, P, init=token_ids, backend="reference")
    assert torch.equal(bank.prefix[1, 0, 0], cache.layers[1].keys[0])
    assert torch.equal(bank.prefix[0, 1, 0], cache.layers[0].values[0])
    with pytest.raises(ValueError, match="needs tokenizer"):
        pk.patch_model(tiny_model("llama"), P, init="some words")


# -- what is not supported raises --------------------------------------------------------------

@pytest.mark.parametrize("family,config_cls,match", [
    ("falcon", "FalconConfig", "'falcon' .*attention registry"),
    ("bloom", "BloomConfig", "'bloom' .*attention registry"),
])
def test_unsupported_family_raises(family, config_cls, match):
    import transformers
    from transformers import AutoModelForCausalLM

    config = getattr(transformers, config_cls)(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                               num_attention_heads=4)
    with pytest.raises(NotImplementedError, match=match):
        pk.patch_model(AutoModelForCausalLM.from_config(config), P)


def test_bad_inputs_raise():
    model = tiny_model("gpt2")
    pk.patch_model(model, P, backend="reference")
    with pytest.raises(ValueError, match="need 133 positions but gpt2 has 128"):
        model(input_ids=torch.zeros(1, 128, dtype=torch.long))
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(ValueError, match="4-D attention mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="static/preallocated cache"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


# -- dtypes and compilation ----------------------------------------------------------------------

def test_bf16_close_to_fp32_as_peft_is():
    """bf16 patched vs fp32 patched errs no more than 2x PEFT's own bf16 error (+ a small floor)."""
    ids, mask, _ = padded_batch()
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        peft_model = peft_prefix_model("llama").to(dtype)
        model, _ = patched_like_peft("llama", peft_model)
        model.to(dtype)
        with torch.no_grad():
            results[dtype] = (model(input_ids=ids, attention_mask=mask).logits.float(),
                              peft_model(input_ids=ids, attention_mask=mask).logits.float())
    ours_err = (results[torch.bfloat16][0] - results[torch.float32][1]).abs().max()
    peft_err = (results[torch.bfloat16][1] - results[torch.float32][1]).abs().max()
    assert peft_err > 0 and ours_err <= 2 * peft_err + 1e-3, (ours_err, peft_err)


def test_torch_compile_matches_eager():
    model = tiny_model("llama")
    bank = pk.patch_model(model, P, backend="reference")
    ids, mask, labels = padded_batch()
    eager = model(input_ids=ids, attention_mask=mask, labels=labels)
    eager.loss.backward()
    eager_grad = bank.prefix.grad.clone()
    bank.prefix.grad = None
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close(out.logits, eager.logits, what="compiled logits")
    assert_close(bank.prefix.grad, eager_grad, atol=1e-6, what="compiled grad")


# -- training ------------------------------------------------------------------------------------

def _train_losses(backend, steps=4):
    model = tiny_model("llama")
    torch.manual_seed(3)
    bank = pk.patch_model(model, 4, num_prefixes=2, backend=backend)
    model.train()
    opt = torch.optim.AdamW(bank.parameters(), lr=3e-2)
    ids, mask, labels = padded_batch(batch=2, seq=6)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, prefix_ids=[1, 0]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_convergence_reference_and_kernels_match_step_by_step():
    assert INTERPRETING, "run the tests with TRITON_INTERPRET=1 set (the Triton kernels run on the CPU)"
    reference, kernels = _train_losses("reference"), _train_losses("triton")
    assert reference[-1] < reference[0] - 0.05       # it learns
    torch.testing.assert_close(torch.tensor(kernels), torch.tensor(reference), atol=1e-5, rtol=1e-5)


def test_hf_trainer_trains_only_the_prefix(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    bank = pk.patch_model(model, P, num_prefixes=3, backend="reference")
    frozen = {n: p.clone() for n, p in model.named_parameters() if n != "prefix_bank.prefix"}
    start = bank.prefix.detach().clone()
    ids, mask, labels = padded_batch(batch=4)
    # a multi-task batch: each row names its prefix; entry 2 is never used
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i], "prefix_ids": i % 2}
            for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=rows).train()
    moved = (bank.prefix.detach() - start).abs().flatten(3).amax(-1)    # [L, 2, N, Hkv]
    assert (moved[:, :, :2] > 0).all() and (moved[:, :, 2] == 0).all()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


# -- on a GPU: the compiled Triton kernels ------------------------------------------------------

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text"])
def test_cuda_kernels_match_peft(family):
    ids, mask, labels = (t.cuda() for t in padded_batch(batch=3, seq=37))
    peft_model = peft_prefix_model(family).cuda()
    logits_ref, loss_ref, grads_ref = peft_run(peft_model, ids, mask, labels)
    model, bank = patched_like_peft(family, peft_model, backend="triton")
    model.cuda()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    # fp32 runs the kernels' dots in IEEE precision: only summation order differs from PEFT/SDPA
    assert_close(out.logits, logits_ref, atol=1e-4, rtol=1e-4, what="logits")
    assert_close(bank_to_peft_flat(bank.prefix.grad[:, :, 0]), grads_ref["embedding.weight"], atol=1e-5, rtol=1e-4,
                 what="prefix grad")


@pytest.mark.gpu
@requires_gpu
def test_cuda_torch_compile_and_bf16_training_step():
    """bf16 eager and inductor-compiled steps, each judged against an fp32 run: the compiled one
    errs no more than twice the eager one (+ a small floor)."""
    ids, mask, labels = (t.cuda() for t in padded_batch(batch=3, seq=37))

    def step(dtype, compile_model):
        model = tiny_model("llama").to(device="cuda", dtype=dtype)
        torch.manual_seed(7)
        bank = pk.patch_model(model, P, num_prefixes=2, backend="triton")
        model.train()
        run = torch.compile(model) if compile_model else model
        loss = run(input_ids=ids, attention_mask=mask, labels=labels, prefix_ids=[1, 0, 1]).loss
        loss.backward()
        return loss.float(), bank.prefix.grad.float()

    ref_loss, ref_grad = step(torch.float32, False)
    eager_loss, eager_grad = step(torch.bfloat16, False)
    comp_loss, comp_grad = step(torch.bfloat16, True)
    assert (comp_loss - ref_loss).abs() <= 2 * (eager_loss - ref_loss).abs() + 1e-3
    assert (comp_grad - ref_grad).abs().max() <= 2 * (eager_grad - ref_grad).abs().max() + 1e-5
