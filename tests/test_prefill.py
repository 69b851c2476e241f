"""The compiled prefill (serve/prefill.py, `Engine(compiled_prefill=True)`, experimental) against the
engine's prefill through the patched HF modules, on tiny random models in fp32 on the CPU.

The PrefillStep is compiled with aot_eager here (the graph dynamo and AOT autograd build, dynamic
shapes, run eagerly; inductor on the GPU is the next session's measurement): the KV cache it
writes, the first tokens it samples and the whole generations equal the HF path's, for prompts
prefilled at once and in chunks (rows continuing earlier chunks attend over a cache window).
"""
from __future__ import annotations

import warnings

import pytest
import torch

from hf_tiny import tiny_config, tiny_model
from prefix_kernels.integrations import transformers as hf
from prefix_kernels.serve import Engine, SamplingParams
from prefix_kernels.serve.prefill import PrefillStep
from prefix_kernels.serve.step import StepOptions
from utils import requires_gpu

P = 4
PROMPTS = [[5, 17, 99, 3, 42, 11, 12], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 30], [20]]
NAMES = ["a", "b", "c", "a"]


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")


def _table(family, seed=1):
    cfg = tiny_config(family)
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(cfg.num_hidden_layers, 2, hkv, P, d, generator=g) for n in "abc"}


def _engines(family, prefill_chunk):
    """(HF-prefill engine, compiled-prefill engine): same model weights, prefixes and decode step
    (the hand-fused one, eager: its compiled form is test_step.py's; here only the prefill is
    compiled, which keeps these tests' compile time down)."""
    table = _table(family)
    engines = [Engine(tiny_model(family), table, max_batch=4, max_seq_len=40, prefill_chunk=prefill_chunk,
                      decode_step=StepOptions(compiler=None), compiled_prefill=compiled) for compiled in (False, True)]
    engines[1].prefill_step = PrefillStep(engines[1].decode_step, compiler="aot_eager")
    return engines


@pytest.mark.parametrize("family,prefill_chunk", [("llama", 64), ("qwen3", 5), ("phi3", 64),
                                                  ("gemma", 4)])
def test_compiled_prefill_equals_the_model_prefill(family, prefill_chunk):
    """prefill_chunk 64: every prompt in one forward; 4-5: prompts split over several steps, the
    continuations attending over the cache window with its key mask."""
    torch._dynamo.reset()
    params = [SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0.9, seed=3, max_tokens=5),
              SamplingParams(temperature=0, max_tokens=5), SamplingParams(temperature=0.7, top_k=4, seed=5,
                                                                          max_tokens=5)]
    hf_engine, compiled = _engines(family, prefill_chunk)
    assert hf_engine.prefill_step is None and compiled.prefill_step is not None
    outs, caches = [], []
    for eng in (hf_engine, compiled):
        reqs = [eng.submit(p, n, s) for p, n, s in zip(PROMPTS, NAMES, params)]
        while eng._prefilling or any(not r.output_ids for r in reqs):     # until every prompt is in
            eng.step()
        caches.append((eng.cache.k.clone(), eng.cache.v.clone(), [r.slot for r in reqs]))
        while not all(r.done for r in reqs):
            eng.step()
        outs.append([r.result().token_ids for r in reqs])
    (k0, v0, slots0), (k1, v1, slots1) = caches
    assert slots0 == slots1
    for slot, prompt in zip(slots0, PROMPTS):           # the prompts' keys/values, positions 0..len-1
        n = len(prompt)
        torch.testing.assert_close(k1[:, slot, :, :n], k0[:, slot, :, :n], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(v1[:, slot, :, :n], v0[:, slot, :, :n], atol=2e-5, rtol=1e-5)
    assert outs[1] == outs[0]
    assert k0[:, slots0[0], :, :len(PROMPTS[0])].abs().max() > 0     # the check saw real keys


def test_compiled_prefill_logits_equal_the_model_logits():
    """The logits a PrefillStep returns for the chosen tokens are the patched model's at those tokens."""
    torch._dynamo.reset()
    hf_engine, compiled = _engines("llama", 64)
    ids = torch.tensor([[5, 17, 99, 3], [7, 8, 0, 0]])
    positions = torch.arange(4)[None].expand(2, 4)
    rows = []
    for name in "ab":
        rows.append(compiled.rows.acquire(name))
        compiled.rows.release(rows[-1])
    rows = torch.tensor(rows)
    with torch.no_grad():
        with compiled.cache.prefilling([0, 1], [0, 0], [4, 2]):
            got = compiled.prefill_step(ids, positions, rows, compiled.cache.mode, torch.tensor([0, 1, 0]),
                                        torch.tensor([3, 1, 1]))
        with hf_engine.cache.prefilling([0, 1], [0, 0], [4, 2]):
            want = hf_engine.model(input_ids=ids, position_ids=positions, attention_mask=torch.ones(2, 4),
                                   use_cache=False, prefix_ids=rows).logits
    torch.testing.assert_close(got, want[[0, 1, 0], [3, 1, 1]], atol=2e-5, rtol=1e-5)
    assert (got[0] - got[2]).abs().max() > 1e-3


def test_compiled_prefill_needs_the_fused_decode_step():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="compiled_prefill=True needs the hand-fused decode step"):
        Engine(model, _table("llama"), max_batch=2, max_seq_len=16, decode_step="eager", compiled_prefill=True)
    assert not hf.is_patched(model)                     # refused without leaving the model patched


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("prefill_chunk", [3, 2048], ids=["chunked", "one_shot"])
def test_gpu_inductor_prefill_equals_the_model_prefill(prefill_chunk):
    """Inductor (dynamic shapes) and CUDA graphs, fp32: greedy tokens and the prompts' cache equal
    the HF-prefill engine's."""
    torch._dynamo.reset()
    table = _table("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs, caches = [], []
    for compiled in (False, True):
        eng = Engine(tiny_model("llama").cuda(), table, max_batch=4, max_seq_len=40, prefill_chunk=prefill_chunk,
                     decode_step="compiled", compiled_prefill=compiled)
        outs.append([o.token_ids for o in eng.generate(PROMPTS, NAMES, params)])
        caches.append(eng.cache.k[:, :, :, :6].clone())
    assert outs[1] == outs[0]
    torch.testing.assert_close(caches[1], caches[0], atol=1e-4, rtol=1e-4)


def test_inductor_compiles_the_prefill_on_the_cpu():
    """Inductor itself (dynamic shapes, not only aot_eager) compiles the prefill layers, the fused
    prefix-attention op's reference inside on the CPU: a chunked prefill equals the HF one."""
    torch._dynamo.reset()
    table = _table("llama")
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = []
    for compiled in (False, True):
        eng = Engine(tiny_model("llama"), table, max_batch=4, max_seq_len=40, prefill_chunk=5,
                     decode_step=StepOptions(compiler=None), compiled_prefill=compiled)
        if compiled:
            eng.prefill_step = PrefillStep(eng.decode_step, compiler="inductor")
        outs.append([o.token_ids for o in eng.generate(PROMPTS[:3], NAMES[:3], params)])
    assert outs[1] == outs[0]


def test_warmup_compiles_the_prefill_before_any_request(monkeypatch):
    """warmup() runs the prefill on free slots (starts and continuations, one and two rows), so
    the first request does not compile; what it leaves in the cache changes no answer."""
    torch._dynamo.reset()
    _, compiled = _engines("llama", 64)
    calls = []
    real = compiled.prefill_step.__call__
    monkeypatch.setattr(type(compiled.prefill_step), "__call__",
                        lambda self, ids, *a: calls.append(tuple(ids.shape)) or real(ids, *a))
    compiled.warmup(sampling=("greedy",))
    assert sorted(set(calls)) == [(1, 16), (2, 16)] and len(calls) == 4
    fresh = Engine(tiny_model("llama"), _table("llama"), max_batch=4, max_seq_len=40, prefill_chunk=64,
                   decode_step=StepOptions(compiler=None))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = [o.token_ids for o in fresh.generate(PROMPTS, NAMES, params)]
    assert [o.token_ids for o in compiled.generate(PROMPTS, NAMES, params)] == want
