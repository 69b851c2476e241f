"""The serving engine on tiny random models (CPU, reference kernels; the CUDA graph test needs a GPU)."""
import time
import warnings

import pytest
import torch

from hf_tiny import peft_greedy, tiny_model
from prefix_kernels.serve import (ByteTokenizer, Engine, PromptTooLong, QueueFull, SamplingParams,
                                  UnknownPrefix)
from prefix_kernels.serve.sampling import sample, uniform_noise
from utils import requires_gpu

P = 4
GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPTS = ["hello there", "a", "the quick brown fox", "0123456789"]


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def prefixes(family="llama", names=("a", "b", "c", "d"), seed=1):
    model = tiny_model(family)
    cfg = model.config
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(cfg.num_hidden_layers, 2, hkv, P, d, generator=g) for n in names}


def engine(family="llama", names=("a", "b", "c"), **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 48)
    table = prefixes(family)
    return Engine(tiny_model(family), {n: table[n] for n in names}, tokenizer=ByteTokenizer(128), **kw)


def alone(prompt, prefix, params=GREEDY, family="llama"):
    """The same request on a fresh engine with nothing else in flight."""
    return engine(family, names=(prefix,)).generate([prompt], prefix, params)[0]


# -- correctness against PEFT and against running alone ---------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])     # GQA + rotary; absolute positions
def test_greedy_matches_peft(family):
    table = prefixes(family)
    eng = Engine(tiny_model(family), {"a": table["a"], "b": table["b"]}, max_batch=2, max_seq_len=32)
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    outs = eng.generate(prompts, ["a", "b"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for out, prompt, name in zip(outs, prompts, "ab"):
        assert out.token_ids == peft_greedy(family, table[name], prompt, 6), name
        assert out.finish_reason == "length" and out.prompt_tokens == len(prompt)


def test_mixed_prefixes_equal_each_alone():
    eng = engine(names=("a", "b", "c"))
    names = ["a", "b", "c", "a"]
    outs = eng.generate(PROMPTS, names, GREEDY)
    for out, prompt, name in zip(outs, PROMPTS, names):
        assert out.token_ids == alone(prompt, name).token_ids, (prompt, name)
    assert len({tuple(o.token_ids) for o in outs}) > 1     # the prefixes matter


def test_joining_mid_flight_changes_nothing():
    eng = engine()
    params = SamplingParams(temperature=0, max_tokens=12)
    first = eng.submit(PROMPTS[0], "a", params)
    for _ in range(4):
        eng.step()
    late = [eng.submit(p, n, params) for p, n in zip(PROMPTS[1:], "bca")]
    while not all(r.done for r in [first] + late):
        eng.step()
    assert first.result().token_ids == alone(PROMPTS[0], "a", params).token_ids
    for req, prompt, name in zip(late, PROMPTS[1:], "bca"):
        assert req.result().token_ids == alone(prompt, name, params).token_ids


def test_more_requests_than_slots_queue_and_all_finish():
    eng = engine(max_batch=2)
    outs = eng.generate(PROMPTS * 2, ["a", "b", "c", "a"] * 2, GREEDY)
    assert [o.token_ids for o in outs[:4]] == [o.token_ids for o in outs[4:]]
    assert eng.num_active == 0 and eng._free_slots == [0, 1]


def test_add_and_remove_prefix_while_serving():
    table = prefixes()
    eng = engine(names=("a",), max_prefixes=2)
    params = SamplingParams(temperature=0, max_tokens=10)
    running = eng.submit(PROMPTS[0], "a", params)
    eng.step()
    eng.remove_prefix("a")                                # in flight: keeps its prefix to the end
    with pytest.raises(UnknownPrefix, match="no prefix named 'a'"):
        eng.submit(PROMPTS[0], "a", params)
    eng.add_prefix("d", table["d"])
    with pytest.raises(ValueError, match="bank is full"):  # row of "a" is still in use
        eng.add_prefix("b", table["b"])
    added = eng.submit(PROMPTS[1], "d", params)
    while not (running.done and added.done):
        eng.step()
    assert running.result().token_ids == alone(PROMPTS[0], "a", params).token_ids
    assert added.result().token_ids == alone(PROMPTS[1], "d", params).token_ids
    eng.add_prefix("b", table["b"])                       # "a"'s row is free again
    assert eng.prefixes == ["b", "d"]
    assert eng.generate([PROMPTS[2]], "b", params)[0].token_ids == alone(PROMPTS[2], "b", params).token_ids


def test_adapter_folders_serve_like_their_tensors(tmp_path):
    from prefix_kernels.bank import PrefixBank

    table = prefixes()
    layers, _, hkv, p, d = table["a"].shape
    bank = PrefixBank(layers, hkv, d, p, names=["a"])
    bank.set_entry("a", table["a"])
    bank.save_pretrained(str(tmp_path / "a"))
    eng = Engine(tiny_model("llama"), {"a": str(tmp_path / "a")}, tokenizer=ByteTokenizer(128), max_batch=4,
                 max_seq_len=48)
    assert eng.generate([PROMPTS[0]], "a", GREEDY)[0].token_ids == alone(PROMPTS[0], "a").token_ids
    longer = PrefixBank(layers, hkv, d, p + 1, names=["x"])
    longer.save_pretrained(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="does not fit this model's prefix bank: num_virtual_tokens is 5 in the "
                                         "adapter but 4 here"):
        eng.add_prefix("x", str(tmp_path / "x"))
    assert eng.prefixes == ["a"] and eng.rows.num_free == eng.rows.capacity - 1


def test_replacing_a_prefix_keeps_requests_in_flight_on_the_old_one():
    table = prefixes()
    eng = engine(names=("a",), max_prefixes=2)
    params = SamplingParams(temperature=0, max_tokens=10)
    running = eng.submit(PROMPTS[0], "a", params)
    eng.step()
    eng.add_prefix("a", table["b"])                      # "a" now means b's prefix
    new = eng.submit(PROMPTS[0], "a", params)
    while not (running.done and new.done):
        eng.step()
    assert running.result().token_ids == alone(PROMPTS[0], "a", params).token_ids
    assert new.result().token_ids == alone(PROMPTS[0], "b", params).token_ids


# -- sampling ---------------------------------------------------------------------------------

def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10)
    solo = alone(PROMPTS[0], "a", params).token_ids
    eng = engine()
    crowd = [eng.submit(p, n, params if i % 2 == 0 else GREEDY) for i, (p, n) in enumerate(zip(PROMPTS, "abcb"))]
    while not all(r.done for r in crowd):
        eng.step()
    assert crowd[0].result().token_ids == solo
    other = alone(PROMPTS[0], "a", SamplingParams(temperature=1.0, seed=99, max_tokens=10)).token_ids
    assert other != solo


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    n = logits.shape[0]
    args = dict(seeds=torch.full((n,), 7), steps=torch.arange(n), any_sampled=True)
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
    counts = torch.bincount(sample(logits, ones, zeros, ones, any_filtered=False, **args), minlength=4)
    torch.testing.assert_close(counts / n, logits[0].softmax(-1), atol=0.03, rtol=0)
    top2 = sample(logits, ones, zeros + 2, ones, any_filtered=True, **args)
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample(logits, ones, zeros, torch.full((n,), 0.5), any_filtered=True, **args)
    assert set(nucleus.tolist()) == {0}                    # p(top) = 0.64 >= 0.5
    greedy = sample(logits, torch.zeros(n), zeros, ones, any_filtered=False, **args)
    assert set(greedy.tolist()) == {0}
    u = uniform_noise(torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0]), 1000)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.03
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])


def test_top_k_one_is_greedy():
    params = SamplingParams(temperature=0.7, top_k=1, seed=3, max_tokens=8)
    assert alone(PROMPTS[2], "b", params).token_ids == alone(PROMPTS[2], "b").token_ids


# -- stopping ---------------------------------------------------------------------------------

def test_stop_strings_max_tokens_and_cache_length():
    full = alone(PROMPTS[0], "a", SamplingParams(temperature=0, max_tokens=20))
    text = full.text
    assert len(text) >= 6
    stop = text[3:5]
    cut = alone(PROMPTS[0], "a", SamplingParams(temperature=0, max_tokens=20, stop=[stop, "\x00never"]))
    assert cut.finish_reason == "stop" and cut.text == text[:text.index(stop)]
    short = alone(PROMPTS[0], "a", SamplingParams(temperature=0, max_tokens=3))
    assert short.finish_reason == "length" and short.token_ids == full.token_ids[:3]
    eng = engine(max_seq_len=16)
    capped = eng.generate([PROMPTS[0]], "a", SamplingParams(temperature=0, max_tokens=100))[0]
    assert capped.finish_reason == "length"
    assert len(PROMPTS[0]) + len(capped.token_ids) == 16 + 1  # the last token never enters the cache
    assert capped.token_ids == alone(PROMPTS[0], "a", SamplingParams(temperature=0, max_tokens=6)).token_ids


def test_rows_finishing_at_the_cache_end_leave_the_others_alone():
    params = SamplingParams(temperature=0, max_tokens=12)
    eng = engine(max_seq_len=16)
    outs = eng.generate([PROMPTS[0], PROMPTS[1], PROMPTS[3]], ["a", "b", "c"], params)
    assert [len(o.token_ids) for o in outs] == [6, 12, 7]     # 11 + 6 = 10 + 7 = 16 + 1
    for out, prompt, name in zip(outs, [PROMPTS[0], PROMPTS[1], PROMPTS[3]], "abc"):
        assert out.token_ids == alone(prompt, name, params).token_ids[:len(out.token_ids)]


def test_streamed_text_equals_the_final_text():
    eng = engine()
    req = eng.submit(PROMPTS[3], "c", SamplingParams(temperature=0, max_tokens=12, stop=["zz"]), stream=True)
    while not req.done:
        eng.step()
    streamed = "".join(text for text, _ in req.events(timeout=1))
    assert streamed == req.result().text


def test_eos_stops_unless_ignored():
    eng = engine()
    first = eng.generate([PROMPTS[1]], "a", GREEDY)[0].token_ids
    eng.tokenizer.eos_token_ids = frozenset({first[2]})
    out = eng.generate([PROMPTS[1]], "a", GREEDY)[0]
    assert out.finish_reason == "stop" and out.token_ids == first[:first.index(first[2])]
    assert eng.generate([PROMPTS[1]], "a", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].token_ids == first


# -- errors and cancellation ------------------------------------------------------------------

def test_submission_errors_name_the_problem():
    eng = engine(queue_size=2, max_seq_len=16)
    with pytest.raises(UnknownPrefix, match=r"no prefix named 'zzz'; this server has \['a', 'b', 'c'\]"):
        eng.submit("hi", "zzz")
    with pytest.raises(PromptTooLong, match="16 tokens but the engine's max_seq_len is 16"):
        eng.submit("x" * 16, "a")
    with pytest.raises(ValueError, match="out of range"):
        eng.submit([500], "a")
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    eng.submit("hi", "a")
    eng.submit("hi", "b")
    with pytest.raises(QueueFull, match="queue is full"):
        eng.submit("hi", "c")


def test_cancel_frees_the_slot():
    eng = engine(max_batch=1)
    long = eng.submit(PROMPTS[0], "a", SamplingParams(temperature=0, max_tokens=30))
    waiting = eng.submit(PROMPTS[1], "b", GREEDY)
    eng.step()
    long.cancel()
    while not waiting.done:
        eng.step()
    assert long.result().finish_reason == "cancelled" and len(long.output_ids) < 30
    assert waiting.result().token_ids == alone(PROMPTS[1], "b").token_ids
    assert eng.num_active == 0 and all(eng.rows.users(r) == 0 for r in range(eng.rows.capacity))


def test_background_thread_serves_concurrent_submissions():
    eng = engine().start()
    try:
        outs = eng.generate(PROMPTS, ["c", "b", "a", "c"], GREEDY)
    finally:
        eng.close()
    for out, prompt, name in zip(outs, PROMPTS, "cbac"):
        assert out.token_ids == alone(prompt, name).token_ids


def test_generate_on_a_running_scheduler_admits_its_prompts_together(monkeypatch):
    """Queued one by one, the scheduler thread prefilled the first prompts alone while the rest
    were still being tokenized (a wave of 32 in `bench serve` ran at half the engine's speed)."""
    eng = engine()
    groups = []
    prefill = eng._prefill
    monkeypatch.setattr(eng, "_prefill", lambda group: (groups.append(len(group)), prefill(group))[1])
    encode = eng.tokenizer.encode
    monkeypatch.setattr(eng.tokenizer, "encode", lambda text: (time.sleep(0.05), encode(text))[1])   # a long prompt
    eng.start()
    try:
        outs = eng.generate(PROMPTS, ["c", "b", "a", "c"], GREEDY)
    finally:
        eng.close()
    assert groups == [len(PROMPTS)], groups
    assert all(o.finish_reason in ("length", "stop") for o in outs)


def test_unsupported_geometry_is_refused():
    table = prefixes("mistral")                            # sliding window 64
    with pytest.raises(ValueError, match="sliding window of 64"):
        Engine(tiny_model("mistral"), {"a": table["a"]}, max_seq_len=64)
    with pytest.raises(ValueError, match="at least one prefix"):
        Engine(tiny_model("llama"), {})
    gpt2 = prefixes("gpt2")                                # 128 absolute positions, offset P
    prefix_len = gpt2["a"].shape[3]
    with pytest.raises(ValueError, match=f"need {127 + prefix_len} positions but gpt2 has 128; "
                                         f"use max_seq_len <= {128 - prefix_len}"):
        Engine(tiny_model("gpt2"), {"a": gpt2["a"]}, max_seq_len=127)


# -- chunked prefill, time to first token -------------------------------------------------------

LONG = [(7 * i + 3) % 120 + 1 for i in range(37)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])     # rotary; absolute positions (padding clamped)
def test_chunked_prefill_equals_one_shot_and_peft(family):
    """Chunks of 3 tokens: prompts spread over many steps, several chunks per forward, rows
    continuing over their cached keys beside rows starting, fp32 greedy."""
    table = prefixes(family)
    prompts = [LONG[:11], [9], LONG[5:24], LONG[:10]]
    names = ["a", "b", "a", "b"]
    params = SamplingParams(temperature=0, max_tokens=5)
    outs, caches = {}, {}
    for chunk in (3, 2048):
        eng = Engine(tiny_model(family), {"a": table["a"], "b": table["b"]}, max_batch=4, max_seq_len=40,
                     prefill_chunk=chunk)
        outs[chunk] = [o.token_ids for o in eng.generate(prompts, names, params)]
        caches[chunk] = eng.cache
    assert outs[3] == outs[2048]
    # the prompts' keys and values in every layer (layer 1's depend on layer 0's attention)
    for slot, prompt in enumerate(prompts):
        for buf in ("k", "v"):
            chunked, one_shot = (getattr(caches[c], buf)[:, slot, :, :len(prompt)] for c in (3, 2048))
            torch.testing.assert_close(chunked, one_shot, rtol=1e-5, atol=1e-5)
    for tokens, prompt, name in zip(outs[3], prompts, names):
        assert tokens == peft_greedy(family, table[name], prompt, 5)


def test_a_long_prompt_does_not_stall_decoding_rows():
    eng = engine(max_seq_len=64, prefill_chunk=4)
    params = SamplingParams(temperature=0, max_tokens=40)
    running = eng.submit(PROMPTS[1], "a", params)
    for _ in range(3):
        eng.step()
    long = eng.submit(LONG, "b", GREEDY)
    counts = [len(running.output_ids)]
    while not long.output_ids:
        eng.step()
        counts.append(len(running.output_ids))
    assert len(counts) - 1 == -(-len(LONG) // 4)                 # 10 steps of 4 prompt tokens
    assert all(b == a + 1 for a, b in zip(counts, counts[1:])), counts   # a token every step
    while not (running.done and long.done):
        eng.step()
    assert long.result().token_ids == alone(LONG, "b").token_ids
    assert running.result().token_ids == alone(PROMPTS[1], "a", params).token_ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_step_reads_tensors_on_the_host_only_to_hand_out_tokens(family, monkeypatch):
    """On a GPU every host read of a device tensor is a sync that stalls the step pipeline (the
    patched model's padding check read the prefill's all-ones mask: one sync per prefill)."""
    from serve_utils import HOST_READERS, host_reads

    eng = engine(family, max_seq_len=64, prefill_chunk=8)
    steps, reads = host_reads(monkeypatch, eng, [eng.submit(p, n, GREEDY) for p, n in zip(PROMPTS, "abca")])
    assert [r for r in reads if r[1] not in HOST_READERS] == []
    assert steps > 8 and ("tolist", "_collect") in {r[:2] for r in reads}      # the spy saw the reads


def test_a_step_prefills_its_chunks_in_as_few_forwards_as_padding_allows():
    """Each prefill forward through the model's eager modules costs ~20-35 ms of host time on an
    H100 whatever its size: a step's chunks (prompt starts and continuations alike) share one
    forward unless padding them to the longest would cost more than 1.25x their tokens."""
    from prefix_kernels.serve.prefill_plan import Chunk, group_chunks

    eng = engine(prefill_chunk=8)
    lengths = lambda groups: [[c.length for c in g] for g in groups]        # noqa: E731
    chunks = lambda *ns: [Chunk(None, 0, n) for n in ns]                     # noqa: E731
    groups = lambda c: group_chunks(c, eng.prefill_chunk)                    # noqa: E731
    assert lengths(groups(chunks(2, 3, 3))) == [[3, 3, 2]]             # 9 padded <= 1.25 x 8
    assert lengths(groups(chunks(1, 8))) == [[8], [1]]                 # 16 padded for 9 tokens
    assert lengths(groups(chunks(1, 1, 1, 4))) == [[4, 1], [1, 1]]     # 8 padded: the chunk's size
    mixed = [Chunk(None, 5, 2), Chunk(None, 0, 3), Chunk(None, 0, 3)]     # a continuation joins starts
    assert len(groups(mixed)) == 1


def test_prefill_wait_holds_new_prompts_while_rows_decode():
    """prefill_wait: while rows decode, new prompts wait until they hold prefill_chunk / 2 tokens
    or the oldest has waited prefill_wait; then they share one forward. Rows keep decoding."""
    eng = engine(max_seq_len=64, prefill_chunk=16, prefill_wait=3600.0)
    params = SamplingParams(temperature=0, max_tokens=30)
    running = eng.submit(PROMPTS[1], "a", params)
    eng.step()                                   # nothing decodes yet: prefilled at once
    assert running.output_ids and eng.prefill_forwards == 1 and eng.prefill_seconds > 0
    forwards = []
    prefill = eng._prefill_forward
    eng._prefill_forward = lambda group: forwards.append([c.req for c in group]) or prefill(group)
    short = eng.submit("abc", "b", GREEDY)       # 3 tokens < 16 / 2: held
    for _ in range(3):
        before = len(running.output_ids)
        eng.step()
        assert len(running.output_ids) == before + 1 and not short.output_ids and forwards == []
    other = eng.submit("defgh", "c", GREEDY)     # 3 + 5 = 8 tokens: both go, in one forward
    eng.step()
    assert forwards == [[other, short]] or forwards == [[short, other]]
    assert eng.prefill_forwards == 2             # the engine's own count, which bench serve reports
    while not (short.done and other.done):
        eng.step()
    assert short.result().token_ids == alone("abc", "b").token_ids
    assert other.result().token_ids == alone("defgh", "c").token_ids


def test_prefill_wait_ends_after_the_wait():
    eng = engine(max_seq_len=64, prefill_chunk=16, prefill_wait=0.05)
    running = eng.submit(PROMPTS[1], "a", SamplingParams(temperature=0, max_tokens=40))
    eng.step()
    short = eng.submit("abc", "b", GREEDY)
    eng.step()
    assert not short.output_ids                  # held: rows decode, 3 tokens, not waited yet
    time.sleep(0.06)
    eng.step()
    assert short.output_ids                      # waited 50 ms: prefilled
    with pytest.raises(ValueError, match="prefill_wait"):
        engine(prefill_wait=-1)


def test_time_to_first_token_is_recorded():
    eng = engine(prefill_chunk=5)
    req = eng.submit(LONG, "a", GREEDY)
    for _ in range(3):
        eng.step()
        assert req.ttft is None                                   # 37 tokens: 8 steps of 5
    out = eng.generate([PROMPTS[0]], "b", GREEDY)[0]
    while not req.done:
        eng.step()
    first = req.result()
    assert first.ttft is not None and 0 < first.ttft <= req.first_token_at - req.submitted_at + 1e-9
    assert out.ttft is not None and out.ttft > 0
    assert eng.num_active == 0


# -- a failed request fails alone ---------------------------------------------------------------

def _bad(field, value):
    params = SamplingParams(temperature=0.7, max_tokens=4)
    setattr(params, field, value)        # past SamplingParams' own checks, as a client could
    return params


@pytest.mark.parametrize("field,value,message", [
    ("top_k", 2 ** 63, r"top_k must be an integer in 0\.\.128"),
    ("top_k", 129, r"top_k must be an integer in 0\.\.128"),
    ("top_k", 2.5, "top_k must be an integer"),
    ("top_k", 10 ** 5000, "an integer of 16610 bits"),
    ("temperature", float("inf"), "temperature must be a finite number"),
    ("top_p", float("nan"), r"top_p must be a number in \(0, 1\]"),
    ("max_tokens", 0, "max_tokens must be an integer >= 1"),
    ("seed", 2 ** 64, r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    ("stop", "ab", "stop must be a list of strings"),
], ids=["top_k_2e63", "top_k_vocab_plus_1", "top_k_float", "top_k_5000_digits", "temperature_inf",
        "top_p_nan", "max_tokens_0", "seed_2e64", "stop_str"])
def test_out_of_range_parameters_are_refused_at_submit(field, value, message):
    eng = engine()
    bystander = eng.submit(PROMPTS[0], "a", GREEDY)
    with pytest.raises(ValueError, match=message):
        eng.submit(PROMPTS[1], "b", _bad(field, value))
    assert eng.num_waiting == 1 and all(eng.rows.users(r) == (r == 0) for r in range(eng.rows.capacity))
    while not bystander.done:
        eng.step()
    assert bystander.result().token_ids == alone(PROMPTS[0], "a").token_ids


def test_a_request_failing_in_prefill_fails_alone(monkeypatch):
    eng = engine()
    reqs = [eng.submit(p, n, GREEDY) for p, n in zip(PROMPTS, "abca")]
    victim = reqs[2]
    forward = eng._prefill_forward

    def failing(group):                  # raises whenever the victim's chunk is in the forward
        if any(c.req is victim for c in group):
            raise RuntimeError("boom in prefill")
        return forward(group)

    monkeypatch.setattr(eng, "_prefill_forward", failing)
    while not all(r.done for r in reqs):
        eng.step()
    out = victim.result()
    assert out.finish_reason == "error" and out.error == "RuntimeError: boom in prefill" and not out.token_ids
    for req, prompt, name in zip(reqs, PROMPTS, "abca"):
        if req is not victim:
            assert req.result().token_ids == alone(prompt, name).token_ids
    assert eng.num_active == 0 and all(eng.rows.users(r) == 0 for r in range(eng.rows.capacity))


def test_a_request_failing_on_its_tokens_fails_alone():
    eng = engine()
    params = SamplingParams(temperature=0, max_tokens=8, stop=["\x00never"])
    reqs = [eng.submit(p, n, params) for p, n in zip(PROMPTS, "abca")]
    eng.step()
    victim = reqs[1]

    def broken(token):
        raise UnicodeError("bad bytes")

    victim.detok.add = broken
    while not all(r.done for r in reqs):
        eng.step()
    assert victim.result().finish_reason == "error" and "UnicodeError: bad bytes" in victim.result().error
    for req, prompt, name in zip(reqs, PROMPTS, "abca"):
        if req is not victim:
            assert req.result().token_ids == alone(prompt, name, params).token_ids


# -- the parts: bank rows and the KV cache ----------------------------------------------------------

def test_bank_rows_count_users_and_free_retired_rows():
    from prefix_kernels.bank import PrefixBank
    from prefix_kernels.serve.request import UnknownPrefix as Unknown
    from prefix_kernels.serve.rows import BankRows, free_names

    bank = PrefixBank(1, 1, 4, 2, names=free_names(2))
    rows = BankRows(bank)
    assert rows.install("x", lambda row: None) == 0
    with pytest.raises(ValueError, match="already served"):
        rows.install("x", lambda row: None)
    with pytest.raises(OSError):
        rows.install("y", lambda row: (_ for _ in ()).throw(OSError("disk")))
    assert rows.num_free == 1 and rows.names == ["x"]               # the failed fill gave its row back
    held = rows.acquire("x")
    assert rows.install("x", lambda row: None, replace=True) == 1     # x moves; row 0 stays in use
    assert rows.num_free == 0 and bank.names == [".retired-0", "x"]
    rows.release(held)
    assert rows.num_free == 1 and bank.names[0] == ".free-0"
    rows.remove("x")
    assert rows.num_free == 2 and rows.names == []
    with pytest.raises(Unknown):
        rows.acquire("x")
    with pytest.raises(RuntimeError, match="released more often"):
        rows.release(0)
    # names the bank cannot hold as folder names, or that look like its stand-ins: served all the same
    assert [rows.install(n, lambda row: None) for n in (".free-1", "a b")] == [0, 1]
    assert rows.names == [".free-1", "a b"] and bank.names == [".served-0", ".served-1"]
    with pytest.raises(ValueError, match="non-empty string"):
        rows.install("", lambda row: None)


def test_kv_cache_stores_only_inside_a_mode():
    from prefix_kernels.serve.cache import KVCache

    cache = KVCache(2, 3, 1, 8, 4, num_q_heads=2, dtype=torch.float32, device="cpu")
    key = torch.randn(2, 1, 3, 4)
    with pytest.raises(RuntimeError, match="outside an engine forward"):
        cache.update(0, key, key)
    with pytest.raises(ValueError, match="outside the cache"):
        cache.begin_prefill([0], [6], [3])
    with cache.prefilling([2, 0], [0, 0], [3, 1]):
        with pytest.raises(RuntimeError, match="already in a prefill"):
            cache.begin_decode(1, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long))
        k, _ = cache.update(1, key, key + 1)
    assert k is key and cache.mode is None
    assert torch.equal(cache.k[1, 2, :, :3], key[0]) and torch.equal(cache.k[1, 0, :, :1], key[1, :, :1])
    assert not cache.k[1, 0, :, 1:].any()                      # row 1's padding is not stored
    with cache.prefilling([2], [3], [2]):                      # a continuation: window over the cache
        k, v = cache.update(1, key[:1, :, :2], key[:1, :, :2])
        assert cache.mode.key_mask.tolist() == [[1] * 5]
    assert k.shape == (1, 1, 5, 4) and torch.equal(k[0, :, :3], key[0]) and torch.equal(k[0, :, 3:], key[0, :, :2])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_chunks_of_rows_at_different_starts_attend_like_each_row_alone(backend):
    """Two continuing rows (starts 21 and 2, lengths 2 and 17) and a starting one in one forward:
    each real query sees its row's prefix and cached keys up to itself, nothing else. The Triton
    kernel runs here under TRITON_INTERPRET=1."""
    import os

    from prefix_kernels.ops.reference import reference_prefix_attention
    from prefix_kernels.serve.attention import CacheAttention
    from prefix_kernels.serve.cache import KVCache

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on the CPU only under TRITON_INTERPRET=1")
    dtype = torch.float64 if backend == "reference" else torch.float32
    g = torch.Generator().manual_seed(3)
    hkv, hq, d, smax = 2, 4, 16, 40
    cache = KVCache(1, 4, hkv, smax, d, num_q_heads=hq, dtype=dtype, device="cpu")
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    attend = CacheAttention(cache, backend)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)   # noqa: E731
    pk, pv = rand(3, hkv, 5, d), rand(3, hkv, 5, d)
    slots, starts, lengths, entries = [3, 1, 0], [21, 2, 0], [2, 17, 3], torch.tensor([2, 0, 1])
    width = max(lengths)
    q, k, v = rand(3, hq, width, d), rand(3, hkv, width, d), rand(3, hkv, width, d)
    with cache.prefilling(slots, starts, lengths):
        out = attend(None, 0, q, k, v, pk, pv, entries, 0.5)
    for i, (slot, start, n) in enumerate(zip(slots, starts, lengths)):
        end = start + n
        assert torch.equal(cache.k[0, slot, :, start:end], k[i, :, :n])
        want = reference_prefix_attention(q[i:i + 1, :, :n], cache.k[0, slot:slot + 1, :, :end],
                                          cache.v[0, slot:slot + 1, :, :end], pk, pv, entries[i:i + 1], scale=0.5)
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        torch.testing.assert_close(out[i:i + 1, :, :n], want, rtol=tol, atol=tol)


# -- CUDA graphs ------------------------------------------------------------------------------

@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [16, 64, 96])      # the Triton decode kernel; the CUDA ones
def test_cuda_graph_replay_equals_eager(head_dim):
    overrides = dict(hidden_size=4 * head_dim, head_dim=head_dim)
    g = torch.Generator().manual_seed(1)
    table = {n: torch.randn(2, 2, 2, P, head_dim, generator=g) for n in "abcd"}
    outs = {}
    for graphs in (False, True):
        model = tiny_model("llama", **overrides).to("cuda", torch.bfloat16)
        # prefill in chunks of 5: prompts arrive over several steps between graph replays
        eng = Engine(model, table, max_batch=8, max_seq_len=64, cuda_graphs=graphs, prefill_chunk=5)
        eng.warmup()
        # ignore_eos: a random model samples its end token (2) often enough to end a row early
        params = SamplingParams(temperature=0.8, top_p=0.95, seed=5, max_tokens=20, ignore_eos=True)
        greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        first = eng.submit([5, 6, 7, 8], "a", params)
        for _ in range(3):
            eng.step()
        rest = [eng.submit(list(range(3 + i, 20 + 3 * i)), name, greedy if i % 2 else params)
                for i, name in enumerate("bcdab")]
        while not all(r.done for r in [first] + rest):
            eng.step()
        outs[graphs] = [r.result().token_ids for r in [first] + rest]
        assert [len(t) for t in outs[graphs]] == [20, 20, 8, 20, 8, 20]
    assert outs[True] == outs[False]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("prefill_chunk", [3, 2048], ids=["chunked", "one_shot"])
def test_gpu_engine_matches_peft(prefill_chunk):
    """fp32 on the GPU (Triton prefill, chunks over the cached keys with a padding mask, decode,
    CUDA graphs) against PEFT on the CPU."""
    table = prefixes()
    eng = Engine(tiny_model("llama").cuda(), {"a": table["a"], "b": table["b"]}, max_batch=2, max_seq_len=32,
                 prefill_chunk=prefill_chunk)
    assert eng.cuda_graphs
    prompts = [[5, 17, 99, 3, 42, 11, 12, 13], [7, 8]]
    outs = eng.generate(prompts, ["a", "b"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    for out, prompt, name in zip(outs, prompts, "ab"):
        assert out.token_ids == peft_greedy("llama", table[name], prompt, 6), name


# -- models and arguments the engine refuses before touching the model ---------------------------

def test_models_it_cannot_serve_are_refused_before_patching():
    from hf_tiny import tiny_seq2seq

    from prefix_kernels.integrations.transformers import is_patched

    bart = tiny_seq2seq("bart")
    with pytest.raises(ValueError, match="decoder-only models; bart is an encoder-decoder"):
        Engine(bart, {"a": torch.randn(2, 2, 4, P, 16)})
    assert not is_patched(bart)
    gemma2 = tiny_model("gemma2", attn_logit_softcapping=50.0)
    with pytest.raises(ValueError, match="caps its attention logits"):
        Engine(gemma2, prefixes("gemma2", names=("a",)))
    assert not is_patched(gemma2)
    for name, value in (("max_batch", 0), ("max_seq_len", 1), ("queue_size", 0), ("prefill_chunk", 0)):
        with pytest.raises(ValueError, match=f"{name} must be >= "):
            Engine(tiny_model("llama"), prefixes(names=("a",)), **{name: value})


def test_a_bad_prefix_leaves_a_patched_model_as_it_was():
    from prefix_kernels.integrations.transformers import get_prefix_bank, is_patched, patch_model

    model = tiny_model("llama")
    bank = patch_model(model, P, names=["kept"])
    with pytest.raises(ValueError):
        Engine(model, {"bad": torch.randn(3, 3)})
    assert is_patched(model) and get_prefix_bank(model) is bank


def test_eos_stops_without_a_tokenizer():
    model = tiny_model("llama")
    table = prefixes(names=("a",))
    ids = [5, 9, 17, 33]
    free = Engine(model, table, max_batch=2, max_seq_len=48).generate([ids], "a", GREEDY)[0].token_ids
    model = tiny_model("llama")
    model.generation_config.eos_token_id = free[2]
    out = Engine(model, table, max_batch=2, max_seq_len=48).generate([ids], "a", GREEDY)[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:free.index(free[2])]


def test_prefill_wait_auto_waits_as_long_as_a_forward_costs(monkeypatch):
    """prefill_wait="auto": new prompts wait while rows decode for as long as recent prefill
    forwards took (a running mean, at most PREFILL_WAIT_CAP). Seconds here (a slow forward and a
    raised cap), so that a step on a busy CI machine cannot outlast the wait."""
    from prefix_kernels.serve import engine as engine_module

    eng = engine(max_seq_len=64, prefill_chunk=16, prefill_wait="auto")
    assert eng.current_prefill_wait == 0.0                   # no forward yet: nothing to weigh
    prefill = eng._prefill_forward
    slow = 1.5
    eng._prefill_forward = lambda group: time.sleep(slow) or prefill(group)
    running = eng.submit(PROMPTS[1], "a", SamplingParams(temperature=0, max_tokens=40))
    eng.step()
    assert running.output_ids and eng.current_prefill_wait == engine_module.PREFILL_WAIT_CAP   # capped
    monkeypatch.setattr(engine_module, "PREFILL_WAIT_CAP", 10.0)
    assert slow <= eng.current_prefill_wait < slow + 0.5       # the forward's cost, uncapped
    eng._prefill_forward = prefill
    short = eng.submit("abc", "b", GREEDY)
    eng.step()
    assert not short.output_ids                  # held: rows decode, waited < 1.5 s
    time.sleep(slow + 0.05)
    eng.step()
    assert short.output_ids                      # waited past the forward's cost: prefilled
    assert eng._forward_cost < slow              # a cheap forward pulls the mean down
    for bad in ("soon", -1, float("nan")):
        with pytest.raises(ValueError, match="prefill_wait"):
            engine(prefill_wait=bad)
    from prefix_kernels.cli_common import prefill_wait
    assert prefill_wait("auto") == "auto" and prefill_wait("0.03") == 0.03
    for bad in ("soon", "-1", "nan", "inf"):
        with pytest.raises(Exception, match="seconds >= 0 or 'auto'"):
            prefill_wait(bad)
