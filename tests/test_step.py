"""The hand-fused decode step (serve/step.py) against the patched HF model, on tiny random models.

CPU: eager and torch.compile(backend="aot_eager") steps == the patched model's own logits (fp32,
mixed prefixes, rows at different positions, two steps in a row so the cache write is read
back), the weight fusion (no copy, the model unchanged, reversible), sampling inside the step.
GPU (-m gpu): inductor + CUDA graphs, fp32 exact greedy tokens and bf16 logits within tolerance.
"""
from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from hf_tiny import VOCAB, peft_greedy, tiny_model
from prefix_kernels.integrations import transformers as hf
from prefix_kernels.serve.sampling import sample
from prefix_kernels.serve.step import DecodeStep, StepOptions, fuse_linears, unfuse_weights, unsupported_reason
from utils import requires_gpu

P, SMAX = 4, 24
LENS, ROWS = [5, 9, 1], [2, 0, 2]         # rows at different positions, entries shared and not


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")


class Case:
    """A patched tiny model with a 3-entry bank, the prompts' keys/values in a [L, B, Hkv, Smax, D]
    cache (from the model's own cached forward, one row at a time), and its oracle."""

    def __init__(self, family, dtype=torch.float32, device="cpu", lens=LENS, rows=ROWS):
        self.model = tiny_model(family, dtype=dtype).to(device)
        self.bank = hf.patch_model(self.model, P, names=["a", "b", "c"], init="random")
        self.bank.requires_grad_(False).to(dtype)
        self.device, self.dtype = torch.device(device), dtype
        g = torch.Generator().manual_seed(3)
        self.prompts = [torch.randint(2, VOCAB, (n,), generator=g) for n in lens]
        self.rows = rows
        attn = self.model.model.layers[0].self_attn
        cfg = self.model.config
        shape = (cfg.num_hidden_layers, len(lens), cfg.num_key_value_heads, SMAX, attn.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        with torch.no_grad():
            for b, (ids, row) in enumerate(zip(self.prompts, rows)):
                cache = self.model(input_ids=ids[None].to(device), prefix_ids=[row], use_cache=True).past_key_values
                for i, layer in enumerate(cache.layers):
                    self.k[i, b, :, :len(ids)] = layer.keys[0]
                    self.v[i, b, :, :len(ids)] = layer.values[0]

    def step(self, **options):
        backend = "reference" if self.device.type == "cpu" else "auto"
        return DecodeStep(self.model, self.k, self.v, self.bank.prefix, offset=hf.position_offset(self.model),
                          backend=backend, options=StepOptions(**options))

    def inputs(self, tokens, done):
        """Step inputs after `done` decode steps: tokens [B], positions, seqlens, rows."""
        pos = torch.tensor([len(p) + done for p in self.prompts], device=self.device)
        return (torch.tensor(tokens, device=self.device), pos, pos + 1,
                torch.tensor(self.rows, device=self.device))

    @torch.no_grad()
    def oracle(self, new_tokens):
        """Last-position logits of the patched model over prompt + new tokens, per row."""
        out = []
        for ids, row, new in zip(self.prompts, self.rows, new_tokens):
            seq = torch.cat([ids, torch.tensor(new)])[None].to(self.device)
            out.append(self.model(input_ids=seq, prefix_ids=[row]).logits[0, -1])
        return torch.stack(out)


def check_two_steps(case, step, atol=2e-5):
    n = len(case.prompts)
    first, second = [7, 8, 9][:n], [11, 12, 13][:n]
    with torch.no_grad():
        got1 = step.logits(*case.inputs(first, 0))
        got2 = step.logits(*case.inputs(second, 1))
    want1 = case.oracle([[t] for t in first])
    want2 = case.oracle([[a, b] for a, b in zip(first, second)])
    torch.testing.assert_close(got1.float(), want1.float(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(got2.float(), want2.float(), atol=atol, rtol=1e-5)
    return got1


# -- the eager step, every family ------------------------------------------------------------

@pytest.mark.parametrize("family,fuse", [("llama", True), ("llama", False), ("mistral", True), ("qwen2", True),
                                         ("qwen3", True), ("phi3", True), ("gemma", True)])
def test_eager_step_matches_patched_model(family, fuse):
    case = Case(family)
    logits = check_two_steps(case, case.step(compiler=None, fuse=fuse))
    assert (logits[0] - logits[2]).abs().max() > 1e-3      # rows differ: the inputs matter


def test_prefix_entry_matters():
    case = Case("llama", rows=[0, 1, 2], lens=[4, 4, 4])
    case.prompts = [case.prompts[0]] * 3
    for b in range(3):                                      # same tokens, three prefixes
        case.k[:, b], case.v[:, b] = case.k[:, 0], case.v[:, 0]
    with torch.no_grad():                                   # one cache, token and position; three entries
        logits = case.step(compiler=None).logits(*case.inputs([5, 5, 5], 0))
    assert (logits[0] - logits[1]).abs().max() > 1e-3 and (logits[1] - logits[2]).abs().max() > 1e-3


# -- compiled (aot_eager on the CPU: the graph dynamo and AOT autograd build, run eagerly) -----

@pytest.mark.parametrize("family,per_layer,dynamic,batches,rows", [
    ("llama", True, True, (1, 2), 3), ("qwen3", True, False, (), 3), ("phi3", False, True, (), 3),
    ("llama", True, True, (), 2),            # B = the cache's slots = Hkv: the batch size stays symbolic
])
def test_compiled_step_matches_patched_model(family, per_layer, dynamic, batches, rows):
    torch._dynamo.reset()
    case = Case(family, lens=LENS[:rows], rows=ROWS[:rows])
    step = case.step(compiler="aot_eager", per_layer=per_layer, dynamic=dynamic)
    check_two_steps(case, step)
    with torch.no_grad():                                   # B=1 recompiles, B=2 reuses the dynamic graph
        for batch in batches:
            tokens, pos, seqlens, rows = case.inputs([7, 8, 9], 0)
            got = step.logits(tokens[:batch], pos[:batch], seqlens[:batch], rows[:batch])
            torch.testing.assert_close(got, case.oracle([[7], [8], [9]])[:batch], atol=2e-5, rtol=1e-5)


def test_inductor_compiles_the_step_on_the_cpu():
    """Inductor itself (not only aot_eager) compiles the step with top-k/top-p sampling: the decode
    attention's custom op gets an empty workspace rather than None, which inductor (torch 2.13)
    refused ("getitem is not an OpOverload"); tokens and logits as the uncompiled step's."""
    torch._dynamo.reset()
    case = Case("llama")
    sampling = (torch.tensor([0.0, 0.7, 1.3]), torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.8]),
                torch.tensor([1, 2, 3]), torch.tensor([0, 4, 9]))
    with torch.no_grad():
        want = case.step(compiler=None)(*case.inputs([7, 8, 9], 0), *sampling, sampling="filtered")
        got = case.step(compiler="inductor")(*case.inputs([7, 8, 9], 0), *sampling, sampling="filtered")
    assert got.tolist() == want.tolist()


# -- weights: fused as views, no second copy, the model unchanged --------------------------------

def test_fused_weights_are_views_of_one_storage():
    model = tiny_model("llama")
    x = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        want = model(x).logits
    attn = model.model.layers[0].self_attn
    old = weakref.ref(attn.q_proj.weight)
    params = sum(p.numel() for p in model.parameters())
    fused, bias = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    gc.collect()
    assert old() is None, "the unfused weight must be freed (no second copy)"
    assert bias is None and fused.shape == (attn.q_proj.out_features + 2 * attn.k_proj.out_features, 64)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters()) == params
    again, _ = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
    assert again.data_ptr() == fused.data_ptr()             # found, not rebuilt
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=0, rtol=0)
    unfuse_weights(model)
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, want, atol=0, rtol=0)


def test_fused_qkv_bias():                                   # Qwen2: q/k/v carry biases
    model = tiny_model("qwen2")
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1)
        w, b = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        torch.testing.assert_close(torch.nn.functional.linear(x, w, b), want)


def test_unsupported_families_say_why():
    assert "gpt2" in unsupported_reason(tiny_model("gpt2"))
    model = tiny_model("gemma2")
    hf.patch_model(model, P)
    with pytest.raises(NotImplementedError, match="gemma2"):
        DecodeStep(model, torch.zeros(1), torch.zeros(1), torch.zeros(1), offset=P)


def test_dtype_mismatch_is_an_error():
    case = Case("llama")
    with pytest.raises(ValueError, match="k_cache is torch.float16"):
        DecodeStep(case.model, case.k.half(), case.v, case.bank.prefix, offset=P)


# -- sampling inside the step --------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["greedy", "sampled", "filtered"])
def test_sampling_in_step_equals_sampling_its_logits(sampling):
    case = Case("llama")
    step = case.step(compiler=None)
    b = len(LENS)
    temperature = torch.tensor([0.0, 0.7, 1.3])
    top_k, top_p = torch.tensor([0, 5, 0]), torch.tensor([1.0, 1.0, 0.8])
    seeds, steps = torch.tensor([1, 2, 3]), torch.tensor([0, 4, 9])
    out = torch.zeros(b, dtype=torch.long)
    with torch.no_grad():
        logits = step.logits(*case.inputs([7, 8, 9], 0))
        tokens = step(*case.inputs([7, 8, 9], 0), temperature, top_k, top_p, seeds, steps, out=out, sampling=sampling)
    want = sample(logits, temperature, top_k, top_p, seeds, steps, any_sampled=sampling != "greedy",
                  any_filtered=sampling == "filtered")
    assert tokens.tolist() == want.tolist() == out.tolist()
    assert tokens[0] == logits[0].argmax()                  # temperature 0 is greedy in every variant


# -- GPU: inductor and CUDA graphs ---------------------------------------------------------------

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_gpu_compiled_graph_greedy_fp32(family):
    """fp32: the captured inductor step's greedy tokens over 6 steps == the patched model's."""
    from prefix_kernels.serve.graphs import GraphCache

    torch._dynamo.reset()
    case = Case(family, device="cuda")
    step = case.step(compiler="inductor")
    tokens, pos, seqlens, rows = case.inputs([7, 8, 9], 0)
    graphs = GraphCache(case.device)
    history = [[7], [8], [9]]
    with torch.no_grad():
        graphs.capture("g", lambda: step(tokens, pos, seqlens, rows, out=tokens), preserve=[tokens])
        for _ in range(6):
            want = case.oracle(history).argmax(-1)
            got = graphs.replay("g")
            assert got.tolist() == want.tolist() == tokens.tolist()
            for h, t in zip(history, want.tolist()):
                h.append(t)
            pos += 1
            seqlens += 1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_compiled_logits_low_precision(dtype):
    """bf16/fp16: compiled logits within 2x the eager step's own error against the fp32 step."""
    torch._dynamo.reset()
    ref_case = Case("llama", dtype=torch.float32, device="cuda")
    with torch.no_grad():
        want = ref_case.step(compiler=None).logits(*ref_case.inputs([7, 8, 9], 0)).float()
    case = Case("llama", dtype=dtype, device="cuda")
    with torch.no_grad():
        eager = case.step(compiler=None).logits(*case.inputs([7, 8, 9], 0)).float()
        compiled = case.step(compiler="inductor").logits(*case.inputs([7, 8, 9], 0)).float()
    floor = torch.finfo(dtype).eps * want.abs().max()
    assert (compiled - want).abs().max() <= 2 * (eager - want).abs().max() + floor


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("sampling", ["greedy", "filtered"])
def test_gpu_graph_replay_equals_direct_call(sampling):
    """bf16: replaying the captured step gives the tokens of calling the compiled step directly."""
    from prefix_kernels.serve.graphs import GraphCache

    torch._dynamo.reset()
    case = Case("llama", dtype=torch.bfloat16, device="cuda")
    step = case.step(compiler="inductor")
    dev = case.device
    sampling_inputs = (torch.tensor([0.0, 0.7, 1.3], device=dev), torch.tensor([0, 5, 0], device=dev),
                       torch.tensor([1.0, 1.0, 0.8], device=dev), torch.tensor([1, 2, 3], device=dev),
                       torch.tensor([0, 4, 9], device=dev))
    with torch.no_grad():
        direct = step(*case.inputs([7, 8, 9], 0), *sampling_inputs, sampling=sampling).clone()
        tokens, pos, seqlens, rows = case.inputs([7, 8, 9], 0)
        graphs = GraphCache(dev)
        out = graphs.capture("g", lambda: step(tokens, pos, seqlens, rows, *sampling_inputs, out=tokens,
                                               sampling=sampling), preserve=[tokens])
        graphs.replay("g")
    assert out.tolist() == direct.tolist() == tokens.tolist()


def test_bad_inputs_are_named():
    case = Case("llama")
    step = case.step(compiler=None)
    tokens, pos, seqlens, rows = case.inputs([7, 8, 9], 0)
    with pytest.raises(ValueError, match="positions must be a torch.int64 tensor of shape \\[3\\]"):
        step(tokens, pos[:2], seqlens, rows)
    with pytest.raises(ValueError, match="temperature must be a torch.float32"):
        step(tokens, pos, seqlens, rows, sampling="sampled")
    with pytest.raises(ValueError, match="the cache has 3 slots"):
        step(*(torch.zeros(4, dtype=torch.long) for _ in range(4)))
    with pytest.raises(ValueError, match="sampling must be one of"):
        step(tokens, pos, seqlens, rows, sampling="beam")


# -- the engine with the compiled step -----------------------------------------------------------

def _engine(decode_step, table, family="llama", **kw):
    from prefix_kernels.serve import Engine

    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 40)
    return Engine(tiny_model(family), table, decode_step=decode_step, **kw)


def _table(family="llama", names="abc", seed=1):
    from hf_tiny import tiny_config

    cfg = tiny_config(family)
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(cfg.num_hidden_layers, 2, hkv, P, d, generator=g) for n in names}


def test_engine_compiled_step_equals_eager_engine_and_peft():
    """Greedy and sampled requests in one batch (its filtered variant), mixed prefixes, rows at
    different positions: the engine with the compiled step (aot_eager) gives the eager engine's
    tokens; the greedy ones are PEFT's."""
    from prefix_kernels.serve import SamplingParams

    torch._dynamo.reset()
    table = _table()
    prompts = [[5, 17, 99, 3, 42], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20]]
    names = ["a", "b", "c", "a"]
    params = [SamplingParams(temperature=0, max_tokens=6), SamplingParams(temperature=0.9, seed=3, max_tokens=6),
              SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=4, max_tokens=6),
              SamplingParams(temperature=0, max_tokens=6)]
    outs = {}
    for choice in ("eager", StepOptions(compiler="aot_eager", dynamic=False)):
        eng = _engine(choice, table)
        assert (eng.decode_step is None) == (choice == "eager")
        reqs = [eng.submit(p, n, s) for p, n, s in zip(prompts, names, params)]
        while not all(r.done for r in reqs):
            eng.step()
        outs[choice == "eager"] = [r.result().token_ids for r in reqs]
    assert outs[True] == outs[False]
    for i in (0, 3):
        assert outs[True][i] == peft_greedy("llama", table[names[i]], prompts[i], 6)


def test_engine_decode_step_choice():
    from prefix_kernels.serve import SamplingParams
    from prefix_kernels.serve.step import sampling_variant

    table = _table()
    assert _engine("auto", table).decode_step is None               # CPU: the model's modules
    with pytest.raises(NotImplementedError, match="gpt2"):
        _engine("compiled", _table("gpt2"), family="gpt2")
    with pytest.raises(ValueError, match="decode_step must be"):
        _engine("fast", table)
    greedy, plain, filtered = (SamplingParams(temperature=0), SamplingParams(temperature=1),
                               SamplingParams(temperature=1, top_p=0.5))
    assert sampling_variant([greedy, greedy]) == "greedy"
    assert sampling_variant([greedy, plain]) == "sampled"
    assert sampling_variant([plain, filtered, greedy]) == "filtered"
    assert sampling_variant([greedy, SamplingParams(temperature=0, top_k=3)]) == "greedy"


@pytest.mark.gpu
@requires_gpu
def test_gpu_engine_compiled_equals_eager_fp32():
    """fp32 on the GPU, CUDA graphs both ways: the engine's compiled step (auto) gives the tokens
    of its eager step, greedy and sampled, rows joining mid-flight."""
    from prefix_kernels.serve import Engine, SamplingParams

    torch._dynamo.reset()
    table = _table()
    outs = {}
    for choice in ("eager", "auto"):
        eng = Engine(tiny_model("llama").cuda(), table, max_batch=8, max_seq_len=48, decode_step=choice)
        assert (eng.decode_step is None) == (choice == "eager")
        eng.warmup()
        reqs = [eng.submit(list(range(3 + i, 9 + 2 * i)), "abc"[i % 3],
                           SamplingParams(temperature=0.7 * (i % 2), top_k=4 * (i % 3), seed=i, max_tokens=12))
                for i in range(5)]
        eng.step()
        reqs += [eng.submit([1, 2, 3], "b", SamplingParams(temperature=0, max_tokens=12))]
        while not all(r.done for r in reqs):
            eng.step()
        outs[choice] = [r.result().token_ids for r in reqs]
    assert outs["auto"] == outs["eager"]
