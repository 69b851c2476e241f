"""Issue 11 at the model level: attention dropout (GPT-2), logit softcapping (Gemma 2), sliding
windows (Mistral) and packed sequences through patch_model, on tiny random models on the CPU.
Kernels: the reference backend everywhere, the Triton kernels (interpreter) on a few cases."""
import math
import os
import warnings

import pytest
import torch

import prefix_kernels as pk
from hf_tiny import VOCAB, padded_batch, tiny_model
from prefix_kernels.bank import peft_flat_to_bank
from utils import requires_gpu

P = 5
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference"] + (["triton"] if INTERPRETING else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _peft_model(family, **overrides):
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_model(family, **overrides),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    return model


def _patched_like(peft_model, family, backend, **overrides):
    model = tiny_model(family, **overrides)
    flat = peft_model.prompt_encoder["default"].embedding.weight.detach()
    bank = pk.patch_model(model, P, init="zeros", backend=backend)
    bank.set_entry(0, peft_flat_to_bank(flat, bank.num_layers, bank.num_kv_heads, bank.head_dim))
    return model, bank


# -- attention dropout -----------------------------------------------------------------------------

def test_gpt2_attention_dropout_matches_peft_in_expectation():
    """Masks cannot match PEFT's draw for draw; the training loss over many draws must agree in
    mean (5 standard errors), differ from draw to draw, and equal PEFT's exactly in eval mode."""
    ids, mask, labels = padded_batch(batch=2, seq=6)
    peft_model = _peft_model("gpt2", attn_pdrop=0.3)
    ours, _ = _patched_like(peft_model, "gpt2", "reference", attn_pdrop=0.3)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids, attention_mask=mask, labels=labels).loss,
                                   peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss)
        peft_model.train(), ours.train()
        draws = 20
        losses = {}
        for name, model in (("peft", peft_model), ("ours", ours)):
            losses[name] = torch.stack([model(input_ids=ids, attention_mask=mask, labels=labels).loss
                                        for _ in range(draws)]).double()
    a, b = losses["peft"], losses["ours"]
    assert a.std() > 1e-3 and b.std() > 1e-3                  # dropout is on in both
    stderr = math.sqrt(a.var() / draws + b.var() / draws)
    assert abs(a.mean() - b.mean()) < 5 * stderr, (a.mean().item(), b.mean().item(), stderr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gpt2_with_attention_dropout_trains(backend):
    model = tiny_model("gpt2", attn_pdrop=0.1)
    bank = pk.patch_model(model, P, backend=backend)
    model.train()
    ids, mask, labels = padded_batch(batch=2, seq=8)
    opt = torch.optim.Adam(bank.parameters(), lr=5e-2)
    losses = []
    for _ in range(8 if backend == "reference" else 3):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        assert bank.prefix.grad.abs().max() > 0 and torch.isfinite(bank.prefix.grad).all()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.skipif(not INTERPRETING, reason="needs TRITON_INTERPRET=1 (the kernels on the CPU)")
def test_dropout_with_gradient_checkpointing_recomputes_the_same_masks():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model("llama", attention_dropout=0.2)
        bank = pk.patch_model(model, P, backend="triton")
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        ids, mask, labels = padded_batch(batch=2, seq=6)
        torch.manual_seed(3)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append(bank.prefix.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_bart_with_attention_dropout_trains_every_site():
    # the reference backend: the kernels' non-causal dropout is checked against it in the op tests
    from hf_tiny import tiny_seq2seq

    model = tiny_seq2seq("bart", attention_dropout=0.3)
    bank = pk.patch_model(model, 3, backend="reference")
    src, tgt = torch.randint(3, VOCAB, (2, 9)), torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        plain = model(input_ids=src, labels=tgt).loss
    model.train()
    loss = model(input_ids=src, labels=tgt).loss
    loss.backward()
    assert loss.item() != plain.item()                           # dropout acts in training
    grad = bank.prefix.grad
    assert torch.isfinite(grad).all() and (grad.flatten(2).abs().amax(-1) > 0).all()   # every layer and site
    model.eval()
    with torch.no_grad():
        assert model(input_ids=src, labels=tgt).loss.item() == plain.item()


# -- logit softcapping -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma2_softcap_matches_peft(backend):
    ids, mask, labels = padded_batch(batch=2, seq=6)
    peft_model = _peft_model("gemma2", attn_logit_softcapping=0.1)
    ref = peft_model(input_ids=ids, attention_mask=mask, labels=labels)
    ref.loss.backward()
    ref_grad = peft_model.prompt_encoder["default"].embedding.weight.grad
    model, bank = _patched_like(peft_model, "gemma2", backend, attn_logit_softcapping=0.1)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=2e-5)
    from prefix_kernels.bank import bank_to_peft_flat
    torch.testing.assert_close(bank_to_peft_flat(bank.prefix.grad[:, :, 0]), ref_grad, rtol=1e-4, atol=1e-6)
    # the softcap matters here: without it the logits move
    uncapped, _ = _patched_like(peft_model, "gemma2", "reference", attn_logit_softcapping=None)
    assert (uncapped(input_ids=ids, attention_mask=mask).logits - ref.logits).abs().max() > 1e-3


# -- sliding windows -------------------------------------------------------------------------------

def _concatenated_reference(model, bank, ids, window):
    """The unpatched model with the prefix in its KV cache, real tokens at positions P.., and a
    4-D mask: the prefix always visible, own keys causal within the window."""
    from transformers import DynamicCache

    b, s = ids.shape
    cache = DynamicCache()
    for layer in range(bank.num_layers):
        kv = bank.prefix[layer, :, 0].detach()               # [2, Hkv, P, D]
        cache.update(kv[0][None].expand(b, -1, -1, -1), kv[1][None].expand(b, -1, -1, -1), layer)
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    own = (j <= i) & (j > i - window)
    visible = torch.cat([torch.ones(s, P, dtype=torch.bool), own], dim=1)[None, None].expand(b, 1, s, P + s)
    return model(input_ids=ids, past_key_values=cache, attention_mask=visible,
                 position_ids=torch.arange(P, P + s)[None].expand(b, s)).logits


@pytest.mark.parametrize("backend", BACKENDS)
def test_mistral_sliding_window_matches_concatenated_prefix(backend):
    window, ids = 4, torch.randint(2, VOCAB, (2, 11))
    model = tiny_model("mistral", sliding_window=window)
    bank = pk.patch_model(model, P, backend=backend)
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
        got = model(input_ids=ids).logits
    pk.unpatch_model(model)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        want = _concatenated_reference(model, bank, ids, window)
        no_window = _concatenated_reference(model, bank, ids, 10**6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)
    assert (no_window - want).abs().max() > 1e-3              # the window matters at this length


def test_mistral_window_generate_equals_full_forwards():
    # generate keeps only the last window-1 keys in sliding layers: our bottom-right window must agree
    window = 4
    model = tiny_model("mistral", sliding_window=window)
    bank = pk.patch_model(model, P, backend="reference")
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    ids = torch.randint(2, VOCAB, (1, 6))
    out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


# -- packed sequences ------------------------------------------------------------------------------

def _documents(lengths, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=g) for n in lengths]


def _doc_loss_sum(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum")


@pytest.mark.parametrize("family, backend", [("llama", b) for b in BACKENDS] + [("gpt2", "reference")])
def test_packed_row_equals_documents_run_one_by_one(family, backend):
    docs = _documents([5, 9, 4] if backend == "reference" else [5, 12])
    model = tiny_model(family)
    bank = pk.patch_model(model, P, backend=backend)
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    packed_ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    logits = model(input_ids=packed_ids, position_ids=position_ids).logits[0]
    loss, at = 0.0, 0
    for d in docs:
        loss = loss + _doc_loss_sum(logits[at:at + len(d)], d)
        at += len(d)
    loss.backward()
    packed_grad = bank.prefix.grad.clone()
    bank.prefix.grad = None
    at, alone_loss = 0, 0.0
    for d in docs:
        alone = model(input_ids=d[None]).logits[0]
        torch.testing.assert_close(logits[at:at + len(d)], alone, rtol=1e-5, atol=2e-5)
        alone_loss = alone_loss + _doc_loss_sum(alone, d)
        at += len(d)
    alone_loss.backward()
    torch.testing.assert_close(packed_grad, bank.prefix.grad, rtol=1e-4, atol=1e-6)


def test_packing_by_collator_and_by_cu_seq_lens():
    from transformers import DataCollatorWithFlattening

    docs = _documents([4, 7, 3])
    model = tiny_model("qwen2")
    bank = pk.patch_model(model, P, backend="reference")
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
        batch = DataCollatorWithFlattening()([{"input_ids": d.tolist()} for d in docs])
        by_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        cu = torch.tensor([0, 4, 11, 14], dtype=torch.int32)
        by_cu = model(input_ids=batch["input_ids"], cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
                      max_length_k=7).logits
        at = 0
        for d in docs:
            torch.testing.assert_close(by_positions[0, at:at + len(d)], model(input_ids=d[None]).logits[0],
                                       rtol=1e-5, atol=2e-5)
            at += len(d)
    torch.testing.assert_close(by_cu, by_positions, rtol=0, atol=0)


def test_packed_with_a_cache_or_several_rows_of_cu_seq_lens_raises():
    model = tiny_model("llama")
    pk.patch_model(model, P, backend="reference")
    ids = torch.randint(2, VOCAB, (2, 6))
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="one packed row"):
        model(input_ids=ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=3, max_length_k=3)
    from transformers import DynamicCache
    cache = DynamicCache()
    model(input_ids=ids[:1, :3], past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="with a KV cache"):
        model(input_ids=ids[:1], position_ids=torch.tensor([[3, 4, 0, 1, 2, 3]]), past_key_values=cache)


# -- GPU: the kernels inside models ----------------------------------------------------------------

GPU_MODEL_CASES = {
    "gemma2_softcap": ("gemma2", dict(attn_logit_softcapping=0.1), False),
    "mistral_window": ("mistral", dict(sliding_window=16), False),
    "llama_packed": ("llama", {}, True),
}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("case", GPU_MODEL_CASES)
def test_models_on_the_gpu_match_the_reference_backend(case):
    family, overrides, packed = GPU_MODEL_CASES[case]
    model = tiny_model(family, **overrides).cuda()
    bank = pk.patch_model(model, P, backend="triton")
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    ids = torch.randint(2, VOCAB, (1 if packed else 2, 57), device="cuda")
    kw = dict(position_ids=torch.tensor([list(range(20)) + list(range(37))], device="cuda")) if packed else {}
    got = model(input_ids=ids, **kw).logits
    model.__dict__["_prefix_kernels_state"].backend = "reference"
    want = model(input_ids=ids, **kw).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@requires_gpu
def test_gpt2_with_attention_dropout_trains_on_the_gpu_in_bf16():
    """Our kernels in bf16 with dropout 0.1 lower GPT-2's loss as the fp32 reference backend does
    (its own dropout masks: the same data, init and steps). The reference itself lowers this tiny
    model's loss by only ~0.045 in 10 steps (dev CPU), so the test compares against it rather
    than against a fixed margin."""
    def train(dtype, backend):
        torch.manual_seed(0)
        model = tiny_model("gpt2", attn_pdrop=0.1, dtype=dtype).cuda()
        bank = pk.patch_model(model, P, backend=backend)
        model.train()
        ids, mask, labels = (t.cuda() for t in padded_batch(batch=4, seq=40))
        opt = torch.optim.Adam(bank.parameters(), lr=5e-2)
        losses = []
        for _ in range(20):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            assert torch.isfinite(bank.prefix.grad).all()
            opt.step()
            losses.append(loss.item())
        return losses

    ours, reference = train(torch.bfloat16, "auto"), train(torch.float32, "reference")
    assert reference[0] - reference[-1] > 0.05, reference
    assert ours[0] - ours[-1] > 0.6 * (reference[0] - reference[-1]), (ours, reference)
