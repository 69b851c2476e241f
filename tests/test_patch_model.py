"""patch_model against PEFT prefix tuning and against the unpatched model, on tiny random models."""
import os
import warnings

import pytest
import torch

import prefix_kernels as pk
from hf_tiny import FAMILIES, padded_batch, tiny_model
from prefix_kernels.bank import bank_to_peft_flat, peft_flat_to_bank

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
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_close(out.logits, logits_ref, what="logits")
    assert_close(out.loss, loss_ref, what="loss")
    for ours, theirs in (("embedding", "embedding.weight"), ("proj_in_weight", "transform.0.weight"),
                         ("proj_in_bias", "transform.0.bias"), ("proj_out_weight", "transform.2.weight"),
                         ("proj_out_bias", "transform.2.bias")):
        assert_close(getattr(bank, ours).grad[0], grads_ref[theirs], atol=1e-6, what=ours)
