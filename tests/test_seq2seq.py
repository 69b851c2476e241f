"""Encoder-decoder models: patch_model against PEFT's seq2seq prefix tuning and against a plain
PyTorch oracle (the unpatched model with each prefix concatenated onto its keys and values)."""
import os
import warnings

import pytest
import torch

import prefix_kernels as pk
from hf_tiny import SEQ2SEQ_FAMILIES, seq2seq_batch, tiny_seq2seq
from prefix_kernels.adapter import bank_to_peft_flat, peft_seq2seq_slots, read_adapter
from utils import requires_gpu

P = 3
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)


def assert_close(actual, expected, atol=2e-5, rtol=1e-5, what=""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# -- the oracle: HF's own attention with the prefix concatenated ----------------------------------

ORACLE = "prefix_oracle"


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention; a layer with a prefix gets its rows' prefix prepended to K/V and P visible
    columns prepended to HF's additive mask."""
    layer_prefix = module.__dict__.get("_oracle_prefix")
    if layer_prefix is not None:
        pk_, pv_ = layer_prefix()                                   # [B, H, P, D] each
        key, value = torch.cat([pk_, key], 2), torch.cat([pv_, value], 2)
        if attention_mask is not None:
            attention_mask = torch.nn.functional.pad(attention_mask, (pk_.shape[2], 0), value=0.0)
    if attention_mask is None:
        assert not module.is_causal or query.shape[2] == 1, "the oracle needs HF's causal mask"
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def oracle_model(family, sites, dtype=torch.float32, **overrides):
    """The unpatched model (same weights) with ORACLE attention; returns (model, set_rows) where
    set_rows(prefix [L, 2, N, H, P, D], index [B]) chooses each row's prefix for the next forward."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ORACLE, _oracle_attention)
    AttentionMaskInterface.register(ORACLE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    model = tiny_seq2seq(family, **overrides).to(dtype)      # fp32 weights, cast: as the patched one
    model.config._attn_implementation = ORACLE
    rows = {}
    layer = 0
    for site, modules in site_modules(model).items():
        if site not in sites:
            continue
        for module in modules:
            module.__dict__["_oracle_prefix"] = (lambda i: lambda: (rows["prefix"][i, 0], rows["prefix"][i, 1]))(layer)
            layer += 1

    def set_rows(prefix, index):
        rows["prefix"] = prefix[:, :, index]                       # [L, 2, B, H, P, D]
    return model, set_rows


def site_modules(model):
    from prefix_kernels.integrations.seq2seq import _site_modules
    return _site_modules(model)


def run(model, ids, mask, dec, labels, weights=None, **kw):
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels, **kw)
    loss = out.loss if weights is None else out.loss + (out.logits * weights).sum()
    loss.backward()
    return out.logits.detach()


def compare_with_oracle(backend, family="bart", batch=3, src=7, tgt=5, sites=None, **overrides):
    ids, mask, dec, labels = seq2seq_batch(batch, src, tgt)
    dec_mask = torch.ones_like(dec)
    dec_mask[-1, -2:] = 0           # a right-padded target
    model = tiny_seq2seq(family, **overrides)
    bank = pk.patch_model(model, P, num_prefixes=3, names=["a", "b", "c"], sites=sites, position_offset=0,
                          backend=backend)
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    prefix_ids = ["c", "a", "c"][:batch]
    weights = torch.randn(batch, tgt, model.config.vocab_size, generator=torch.Generator().manual_seed(3)) * 1e-2
    logits = run(model, ids, mask, dec, labels, weights, prefix_ids=prefix_ids, decoder_attention_mask=dec_mask)
    oracle, set_rows = oracle_model(family, bank.sites, **overrides)
    leaf = bank.prefix.detach().clone().requires_grad_(True)
    set_rows(leaf, bank.indices(prefix_ids))
    expected = run(oracle, ids, mask, dec, labels, weights, decoder_attention_mask=dec_mask)
    assert_close(logits, expected, what="logits")
    assert_close(bank.prefix.grad, leaf.grad, atol=1e-5, what="bank grad")
    for site in bank.sites:      # every site is trained, and entry "b" (no row) gets no gradient
        grad = bank.prefix.grad[bank.site_slice(site)]
        assert grad[:, :, 0].abs().max() > 1e-6 and grad[:, :, 1].abs().max() == 0, site


# -- three sites against the oracle -------------------------------------------------------------

@pytest.mark.parametrize("sites", [None, ("encoder", "cross")], ids=["all-sites", "encoder+cross"])
def test_sites_match_oracle_reference(sites):
    compare_with_oracle("reference", sites=sites)


def test_sites_match_oracle_triton_interpreter():
    assert INTERPRETING, "run the tests with TRITON_INTERPRET=1 set (the Triton kernels run on the CPU)"
    compare_with_oracle("triton", batch=2, src=5, tgt=3)


def test_encoder_decoder_layer_counts_differ():
    """distilbart-like: 3 encoder layers, 2 decoder layers; the bank's layer axis is 3 + 2 + 2."""
    compare_with_oracle("reference", batch=2, encoder_layers=3, decoder_layers=2)


# -- PEFT's seq2seq prefix tuning: decoder self-attention only ------------------------------------

def peft_seq2seq(family="bart", layers=2, seed=0):
    from peft import PrefixTuningConfig, get_peft_model

    model = get_peft_model(tiny_seq2seq(family, seed=seed, encoder_layers=layers, decoder_layers=layers),
                           PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0, 0.5)
    return model


def peft_grad_of(bank_grad, layers):
    """Our per-layer decoder gradients summed into PEFT's tied slots: [P, L*2*token_dim]."""
    summed = torch.zeros_like(bank_grad)
    for layer, slot in enumerate(peft_seq2seq_slots(layers, layers)):
        summed[slot] += bank_grad[layer]
    return bank_to_peft_flat(summed)


@pytest.mark.parametrize("family,layers", [("bart", 2), ("bart", 3)] + [(f, 2) for f in SEQ2SEQ_FAMILIES[1:]])
def test_peft_adapter_loads_and_matches_peft(family, layers, tmp_path):
    """PEFT's saved seq2seq adapter: same logits, loss and (tied) prefix gradient. Layers 2 (even:
    PEFT feeds both decoder layers one slot) and 3 (odd: every layer its own slot)."""
    peft_model = peft_seq2seq(family, layers)
    ids, mask, dec, labels = seq2seq_batch()
    out = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    out.loss.backward()
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_seq2seq(family, encoder_layers=layers, decoder_layers=layers)
    bank = pk.load_prefix(model, str(tmp_path), backend="reference")
    assert bank.sites == {"decoder": layers} and bank.task_type == "SEQ_2_SEQ_LM"
    ours = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    ours.loss.backward()
    assert_close(ours.logits, out.logits.detach(), what="logits")
    assert_close(ours.loss, out.loss.detach(), what="loss")
    ref_grad = peft_model.prompt_encoder["default"].embedding.weight.grad
    assert_close(peft_grad_of(bank.prefix.grad[:, :, 0], layers), ref_grad, atol=1e-7, what="prefix grad")
    assert ref_grad.abs().max() > 1e-4


def test_position_offset_matters():
    """Offset 0 differs from PEFT (whose decoder tokens sit at P..): the decoder hook is live."""
    peft_model = peft_seq2seq()
    ids, mask, dec, _ = seq2seq_batch()
    model = tiny_seq2seq("bart")
    bank = pk.patch_model(model, P, sites=("decoder",), position_offset=0, backend="reference")
    with torch.no_grad():
        flat = peft_model.prompt_encoder["default"].embedding.weight
        from prefix_kernels.adapter import peft_seq2seq_to_layers
        bank.set_entry(0, peft_seq2seq_to_layers(flat, 2, 2, bank.num_kv_heads, bank.head_dim))
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits,
                                  expected, atol=1e-3)
        pk.unpatch_model(model)
        bank = pk.patch_model(model, P, sites=("decoder",), backend="reference", init="zeros")
        bank.set_entry(0, peft_seq2seq_to_layers(flat, 2, 2, bank.num_kv_heads, bank.head_dim))
        assert_close(model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, expected,
                     what="offset P")
    with pytest.raises(ValueError, match="need 129 positions but bart has 128"):
        model(input_ids=ids, decoder_input_ids=torch.full((1, 126), 5))
    from prefix_kernels.integrations.transformers import position_offset
    no_decoder_prefix = tiny_seq2seq("bart")
    pk.patch_model(no_decoder_prefix, P, sites=("encoder", "cross"))
    assert position_offset(model) == P and position_offset(no_decoder_prefix) == 0


def test_save_in_peft_layout_loads_in_peft(tmp_path):
    """A PEFT-representable decoder prefix saves in PEFT's layout (PEFT loads it: same logits); one
    that is not (decoder layers sharing a PEFT slot differ) raises under format='peft', and under
    'auto' is written in our layout, which PEFT refuses and we read back exactly."""
    from peft import PeftModel

    peft_model = peft_seq2seq()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = tiny_seq2seq("bart")
    bank = pk.load_prefix(model, str(tmp_path / "peft"), backend="reference")
    ids, mask, dec, _ = seq2seq_batch()
    bank.save_pretrained(str(tmp_path / "ours"), format="peft")
    assert read_adapter(str(tmp_path / "ours")).config.layout == "peft_seq2seq"
    reloaded = PeftModel.from_pretrained(tiny_seq2seq("bart"), str(tmp_path / "ours"))
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert_close(reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, expected,
                     what="PEFT loads ours")
        bank.prefix[1, :, 0] += 0.1     # decoder layers 0 and 1 share PEFT's slot 0: now they differ
        expected = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    with pytest.raises(ValueError, match="shared prefix"):
        bank.save_pretrained(str(tmp_path / "untied"), format="peft")
    with pytest.warns(UserWarning, match="PEFT cannot load"):
        bank.save_pretrained(str(tmp_path / "untied"))
    assert read_adapter(str(tmp_path / "untied")).config.layout == "sites"
    with pytest.raises(KeyError):
        PeftModel.from_pretrained(tiny_seq2seq("bart"), str(tmp_path / "untied"))
    fresh = tiny_seq2seq("bart")
    pk.load_prefix(fresh, str(tmp_path / "untied"), backend="reference")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits, expected)


def test_three_site_adapter_round_trip_and_mismatches(tmp_path):
    model = tiny_seq2seq("bart")
    bank = pk.patch_model(model, P, num_prefixes=2, names=["default", "task"], backend="reference")
    ids, mask, dec, _ = seq2seq_batch(batch=2)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix_ids=["task", "default"]).logits
    bank.save_pretrained(str(tmp_path))
    adapter = read_adapter(str(tmp_path / "task"))
    assert adapter.config.prefix_sites == {"encoder": 2, "decoder": 2, "cross": 2}
    fresh = tiny_seq2seq("bart")
    pk.load_prefix(fresh, str(tmp_path), backend="reference")
    pk.load_prefix(fresh, str(tmp_path / "task"), name="task")
    with torch.no_grad():
        after = fresh(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix_ids=["task", "default"]).logits
    assert torch.equal(after, before)
    decoder_only = tiny_seq2seq("bart")
    pk.patch_model(decoder_only, P, sites=("decoder",))
    with pytest.raises(ValueError, match=r"sites \['encoder', 'decoder', 'cross'\] but this bank has \['decoder'\]"):
        pk.load_prefix(decoder_only, str(tmp_path))
    from hf_tiny import tiny_model
    with pytest.raises(ValueError, match="is for an encoder-decoder model, but this bank belongs to a decoder-only"):
        pk.load_prefix(tiny_model("llama"), str(tmp_path))


# -- the KV cache and generate ------------------------------------------------------------------

def test_generate_mixed_prefixes_equal_rows_alone_and_forward():
    """Per-row prefixes through generate (greedy and beams) == each row alone; the cached steps'
    logits == a full forward over the generated target; the caches hold only real tokens."""
    model = tiny_seq2seq("bart")
    bank = pk.patch_model(model, P, num_prefixes=2, names=["x", "y"], backend="reference")
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    ids, mask, _, _ = seq2seq_batch(batch=3)
    rows = ["y", "x", "y"]
    new = 4
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, prefix_ids=rows, output_logits=True, return_dict_in_generate=True)
    cache = out.past_key_values
    assert cache.self_attention_cache.get_seq_length() == out.sequences.shape[1] - 1
    assert cache.cross_attention_cache.get_seq_length() == ids.shape[1]
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=out.sequences[:, :-1], prefix_ids=rows).logits
    for t, step in enumerate(out.logits):
        assert_close(step, full[:, t], what=f"step {t}")
    for row, name in enumerate(rows):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, prefix_ids=[name])
        assert torch.equal(out.sequences[row:row + 1], alone)
    beams = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, num_beams=2,
                           do_sample=False, prefix_ids=rows)
    for row, name in enumerate(rows):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=3,
                               min_new_tokens=3, num_beams=2, do_sample=False, prefix_ids=[name])
        assert torch.equal(beams[row:row + 1], alone)


def test_encoder_alone_takes_prefix_ids():
    model = tiny_seq2seq("bart")
    pk.patch_model(model, P, num_prefixes=2, backend="reference")
    ids, mask, dec, _ = seq2seq_batch(batch=2)
    with torch.no_grad():
        enc = model.get_encoder()(input_ids=ids, attention_mask=mask, prefix_ids=["1", "0"])
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, prefix_ids=["1", "0"])
        assert_close(enc.last_hidden_state, full.encoder_last_hidden_state, what="encoder alone")
        with pytest.raises(ValueError, match="pass prefix_ids"):
            model.get_encoder()(input_ids=ids, attention_mask=mask)


# -- training features ----------------------------------------------------------------------------

@pytest.mark.parametrize("reentrant,projection", [(False, 16), (True, None)])
def test_gradient_checkpointing_same_gradients(reentrant, projection):
    ids, mask, dec, labels = seq2seq_batch()
    grads = []
    for checkpointing in (False, True):
        model = tiny_seq2seq("bart")
        bank = pk.patch_model(model, P, projection_hidden=projection, backend="reference")
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss.backward()
        grads.append([p.grad.clone() for p in bank.parameters()])
    for plain, ckpt in zip(*grads):
        assert plain.abs().max() > 0
        assert_close(ckpt, plain, atol=1e-6, what="checkpointed grad")


def test_torch_compile_matches_eager():
    model = tiny_seq2seq("bart")
    bank = pk.patch_model(model, P, num_prefixes=2, backend="reference")
    ids, mask, dec, labels = seq2seq_batch()
    rows = torch.tensor([1, 0, 1])
    eager = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels, prefix_ids=rows)
    eager.loss.backward()
    eager_grad = bank.prefix.grad.clone()
    bank.prefix.grad = None
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels, prefix_ids=rows)
    out.loss.backward()
    assert_close(out.logits, eager.logits, what="compiled logits")
    assert_close(bank.prefix.grad, eager_grad, atol=1e-6, what="compiled grad")


def test_unpatch_restores_model_bit_for_bit():
    model = tiny_seq2seq("bart")
    ids, mask, dec, _ = seq2seq_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    pk.patch_model(model, P, backend="reference")
    pk.unpatch_model(model)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert torch.equal(after, before) and all(p.requires_grad for p in model.parameters())


# -- what is refused ----------------------------------------------------------------------------

def test_t5_and_bad_sites_raise():
    with pytest.raises(NotImplementedError, match="cannot patch T5 models .*relative position bias"):
        pk.patch_model(tiny_seq2seq("t5"), P)
    with pytest.raises(ValueError, match="sites must be a non-empty subset"):
        pk.patch_model(tiny_seq2seq("bart"), P, sites=("decoder", "self"))
    with pytest.raises(NotImplementedError, match="init from text"):
        pk.patch_model(tiny_seq2seq("bart"), P, init=[5, 6])
    from hf_tiny import tiny_model
    with pytest.raises(ValueError, match="decoder-only model has one prefix site"):
        pk.patch_model(tiny_model("llama"), P, sites=("encoder",))


# -- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@requires_gpu
def test_cuda_kernels_match_oracle_fp32():
    """The compiled Triton kernels on all three sites (fp32: IEEE dots) against the oracle."""
    ids, mask, dec, labels = seq2seq_batch(batch=3, src=37, tgt=29)
    model = tiny_seq2seq("bart").cuda()
    bank = pk.patch_model(model, P, num_prefixes=3, names=["a", "b", "c"], position_offset=0, backend="triton")
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    rows = ["c", "a", "c"]
    batch = [t.cuda() for t in (ids, mask, dec, labels)]
    logits = run(model, *batch, prefix_ids=rows)
    oracle, set_rows = oracle_model("bart", bank.sites)
    oracle.cuda()
    leaf = bank.prefix.detach().clone().requires_grad_(True)
    set_rows(leaf, bank.indices(rows).cuda())
    expected = run(oracle, *batch)
    assert_close(logits, expected, atol=1e-4, rtol=1e-4, what="logits")
    assert_close(bank.prefix.grad, leaf.grad, atol=1e-5, rtol=1e-4, what="bank grad")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_bf16_training_step_needs_nothing_special(compiled):
    """A bf16 BART on CUDA, patched with defaults but position_offset=0 (the oracle's positions):
    backend auto, all three sites. Its loss and bank gradient err against the fp32 patched run no
    more than 2x what plain bf16 PyTorch (the oracle in bf16) errs, + a small floor; compiled
    (inductor) the same."""
    ids, mask, dec, labels = (t.cuda() for t in seq2seq_batch(batch=4, src=61, tgt=33))
    rows = torch.tensor([1, 0, 1, 1]).cuda()

    def ours(dtype, compile_model):
        model = tiny_seq2seq("bart").to(device="cuda", dtype=dtype)
        torch.manual_seed(7)
        bank = pk.patch_model(model, P, num_prefixes=2, position_offset=0)
        model.train()
        run_model = torch.compile(model) if compile_model else model
        loss = run_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels,
                         prefix_ids=rows).loss
        loss.backward()
        assert bank.prefix.dtype == torch.float32 and bool(torch.isfinite(bank.prefix.grad).all())
        return loss.float(), bank.prefix.grad.float(), bank.prefix.detach().clone(), bank.sites

    ref_loss, ref_grad, prefix, sites = ours(torch.float32, False)
    oracle, set_rows = oracle_model("bart", sites, dtype=torch.bfloat16)
    oracle.cuda().train()
    leaf = prefix.to(torch.bfloat16).requires_grad_(True)
    set_rows(leaf, rows)
    torch_loss = oracle(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels).loss
    torch_loss.backward()
    torch_grad = leaf.grad.float()
    loss, grad, _, _ = ours(torch.bfloat16, compiled)
    assert (loss - ref_loss).abs() <= 2 * (torch_loss.float() - ref_loss).abs() + 1e-3
    assert (grad - ref_grad).abs().max() <= 2 * (torch_grad - ref_grad).abs().max() + 1e-4


@pytest.mark.gpu
@requires_gpu
def test_cuda_generate_mixed_prefixes_equal_rows_alone():
    model = tiny_seq2seq("bart").cuda()
    bank = pk.patch_model(model, P, num_prefixes=2, names=["x", "y"])
    with torch.no_grad():
        bank.prefix.normal_(0, 0.5)
    ids, mask, _, _ = (t.cuda() for t in seq2seq_batch(batch=3, src=23))
    rows = ["y", "x", "y"]
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         prefix_ids=rows)
    for row, name in enumerate(rows):
        alone = model.generate(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=8,
                               min_new_tokens=8, do_sample=False, prefix_ids=[name])
        assert torch.equal(out[row:row + 1], alone)


@pytest.mark.gpu
@requires_gpu
def test_cuda_kernels_match_peft():
    peft_model = peft_seq2seq().cuda()
    ids, mask, dec, labels = (t.cuda() for t in seq2seq_batch(batch=3, src=37, tgt=29))
    out = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    out.loss.backward()
    model = tiny_seq2seq("bart").cuda()
    bank = pk.patch_model(model, P, sites=("decoder",), init="zeros", backend="triton")
    from prefix_kernels.adapter import peft_seq2seq_to_layers
    flat = peft_model.prompt_encoder["default"].embedding.weight.detach()
    bank.set_entry(0, peft_seq2seq_to_layers(flat, 2, 2, bank.num_kv_heads, bank.head_dim))
    ours = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
    ours.loss.backward()
    assert_close(ours.logits, out.logits.detach(), atol=1e-4, rtol=1e-4, what="logits")
    assert_close(peft_grad_of(bank.prefix.grad[:, :, 0], 2), peft_model.prompt_encoder["default"].embedding.weight.grad,
                 atol=1e-5, rtol=1e-4, what="prefix grad")
