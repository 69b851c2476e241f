"""The encoder-decoder serving engine (Seq2SeqEngine) on tiny random BART-family models: CPU,
reference kernels; the CUDA graph test needs a GPU."""
import warnings

import pytest
import torch

from hf_tiny import SEQ2SEQ_FAMILIES, tiny_seq2seq
from prefix_kernels.integrations.transformers import is_patched, patch_model
from prefix_kernels.serve import ByteTokenizer, Engine, PromptTooLong, SamplingParams, Seq2SeqEngine
from prefix_kernels.serve.engine import serve_engine
from utils import requires_gpu

P = 4
SOURCE_LENGTHS = (5, 11, 1, 17, 8, 3)
NAMES = ("a", "b", "a", "b", "b", "a")
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
# a wider init than BART's 0.02: a tiny random model then says varied things (at 0.02 it repeats
# one token, and a test comparing token lists could not tell a broken cross-attention)
STD = 0.2


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def model_and_prefixes(family="bart", sites=None, names=("a", "b"), seed=0):
    """(a fresh model, {name: prefix [L, 2, Hkv, P, D]} for `sites`, a patched copy holding them)."""
    reference = tiny_seq2seq(family, seed=seed, init_std=STD)
    bank = patch_model(reference, P, names=list(names), sites=sites)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        bank.prefix.copy_(torch.randn(bank.prefix.shape, generator=g))
    table = {n: bank.folded(n).clone() for n in names}
    return tiny_seq2seq(family, seed=seed, init_std=STD), table, reference


def sources(seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g).tolist() for n in SOURCE_LENGTHS]


@torch.no_grad()
def greedy(reference, source, name, start, new):
    """Greedy tokens of the patched model's own forward over the growing target (no cache)."""
    target = torch.tensor([start])
    for _ in range(new):
        logits = reference(input_ids=torch.tensor([source]), decoder_input_ids=target, prefix_ids=[name]).logits
        target = torch.cat([target, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return target[0, len(start):].tolist()


def check_against_reference(engine, reference, srcs, names, new=8):
    outs = engine.generate(srcs, list(names), SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    for out, src, name in zip(outs, srcs, names):
        assert out.finish_reason == "length"
        assert out.token_ids == greedy(reference, src, name, engine.decoder_start_ids, new), (src, name)
    spoken = {t for out in outs for t in out.token_ids}
    assert len(spoken) >= 5, f"the model repeats itself ({spoken}): the comparison would not see much"
    return outs


@pytest.mark.parametrize("family", SEQ2SEQ_FAMILIES)
def test_greedy_matches_the_patched_model(family):
    """Six sources of 1-17 tokens, two prefixes mixed, four slots (requests queue and reuse
    slots) and a prefill budget of 20 tokens (sources in several prefill forwards, joining rows
    that are decoding): each output equals the patched model's greedy decoding of it alone."""
    model, table, reference = model_and_prefixes(family)
    engine = Seq2SeqEngine(model, table, max_batch=4, max_seq_len=24, max_source_len=32, prefill_chunk=20)
    assert engine.bank.sites == {"encoder": 2, "decoder": 2, "cross": 2}
    check_against_reference(engine, reference, sources(), NAMES)


@pytest.mark.parametrize("sites", [("decoder",), ("encoder", "cross"), ("cross",)], ids="+".join)
def test_sites_without_a_prefix_attend_as_the_model_does(sites):
    """Sites without a prefix run plain attention in the engine (the encoder's, the decoder's
    over its cache, cross-attention over the stored source)."""
    model, table, reference = model_and_prefixes(sites=sites)
    engine = Seq2SeqEngine(model, table, sites=sites, max_batch=3, max_seq_len=24, prefill_chunk=20)
    assert list(engine.bank.sites) == list(sites)
    check_against_reference(engine, reference, sources(), NAMES)


@pytest.mark.parametrize("sites", [None, ("decoder",)], ids=["all_sites", "decoder"])
def test_the_triton_kernels_serve_as_the_reference(sites):
    """backend="triton" (under TRITON_INTERPRET=1 on the CPU): the fused op over sources with key
    padding (encoder, cross) and the decoder's start, the Triton decode kernel over each slot's
    cache and stored source: the same greedy tokens as the patched model's reference forward."""
    from utils import kernel_device

    if kernel_device() != "cpu":
        pytest.skip("on a GPU the kernels run in test_gpu_cuda_graphs_equal_eager_and_the_patched_model")
    model, table, reference = model_and_prefixes(sites=sites)
    engine = Seq2SeqEngine(model, table, sites=sites, max_batch=4, max_seq_len=24, prefill_chunk=20,
                           backend="triton")
    check_against_reference(engine, reference, sources(), NAMES, new=5)


def test_peft_adapter_serves_as_peft_decodes(tmp_path):
    """A PEFT seq2seq prefix-tuning adapter folder (decoder self-attention only, decoder positions
    from P) gives PEFT's own greedy tokens."""
    from peft import PrefixTuningConfig, get_peft_model

    peft_model = get_peft_model(tiny_seq2seq("bart", init_std=STD),
                                PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(0, 1.0)
    peft_model.save_pretrained(str(tmp_path / "x"))
    engine = Seq2SeqEngine(tiny_seq2seq("bart", init_std=STD), {"x": str(tmp_path / "x")}, max_batch=2,
                           max_seq_len=24)
    assert list(engine.bank.sites) == ["decoder"] and engine.offset == P
    srcs = sources()[:3]
    outs = engine.generate(srcs, "x", GREEDY)
    with torch.no_grad():
        for out, src in zip(outs, srcs):
            target = torch.tensor([engine.decoder_start_ids])
            for _ in range(GREEDY.max_tokens):
                logits = peft_model(input_ids=torch.tensor([src]), decoder_input_ids=target).logits
                target = torch.cat([target, logits[:, -1].argmax(-1, keepdim=True)], 1)
            assert out.token_ids == target[0, 1:].tolist()


def test_forced_bos_and_eos_follow_generate():
    """The decoder starts as HF's generate does (start token, then the forced BOS), and a row ends
    at the model's EOS (which the output leaves out) with finish_reason 'stop'."""
    model, table, reference = model_and_prefixes()
    srcs = sources()
    # an EOS the model says early in some rows: the most frequent first token of the free outputs
    free = Seq2SeqEngine(tiny_seq2seq("bart", init_std=STD), table, max_batch=4, max_seq_len=24).generate(
        srcs, list(NAMES), GREEDY)
    eos = max(range(128), key=lambda t: sum(t in o.token_ids[:4] for o in free))
    for m in (model, reference):
        m.generation_config.forced_bos_token_id = 0
        m.generation_config.eos_token_id = eos
    engine = Seq2SeqEngine(model, table, max_batch=4, max_seq_len=24)
    assert engine.decoder_start_ids == [2, 0]
    outs = engine.generate(srcs, list(NAMES), SamplingParams(temperature=0, max_tokens=10))
    stops = 0
    for out, src, name in zip(outs, srcs, NAMES):
        want = reference.generate(torch.tensor([src]), prefix_ids=[name], max_new_tokens=10, do_sample=False,
                                  num_beams=1)[0].tolist()
        assert want[:2] == [2, 0]
        want = want[2:]
        if eos in want:
            stops += 1
            assert out.finish_reason == "stop" and out.token_ids == want[:want.index(eos)]
        else:
            assert out.finish_reason == "length" and out.token_ids == want[:len(out.token_ids)]
    assert stops >= 1


def test_text_streams_and_stops_like_the_decoder_only_engine():
    model, table, _ = model_and_prefixes()
    engine = Seq2SeqEngine(model, table, tokenizer=ByteTokenizer(128), max_batch=2, max_seq_len=32)
    whole = engine.generate(["hello there"], "a", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    req = engine.submit("hello there", "a", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        stream=True)
    while not req.done:
        engine.step()
    assert "".join(text for text, _ in req.events(timeout=1)) == whole.text == req.result().text
    assert req.result().token_ids == whole.token_ids
    seeded = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=10, ignore_eos=True)
    first, second = (engine.generate(["abc"], "b", seeded)[0].token_ids for _ in range(2))
    assert first == second


def test_a_step_reads_tensors_on_the_host_only_to_hand_out_tokens(monkeypatch):
    """As the decoder-only engine's test: no host read of a tensor in a step but the tokens handed
    out and the prefill's host-built inputs (on a GPU each other read would be a sync)."""
    from serve_utils import HOST_READERS, host_reads

    model, table, _ = model_and_prefixes()
    engine = Seq2SeqEngine(model, table, max_batch=4, max_seq_len=24, prefill_chunk=20)
    steps, reads = host_reads(monkeypatch, engine, [engine.submit(s, n, GREEDY) for s, n in zip(sources(), NAMES)])
    assert [r for r in reads if r[1] not in HOST_READERS] == []
    assert steps > 8 and ("tolist", "_collect") in {r[:2] for r in reads}


def test_sources_are_prefilled_whole_within_the_budget():
    from types import SimpleNamespace

    from prefix_kernels.serve.prefill_plan import plan_whole_prompts

    reqs = [SimpleNamespace(prompt_ids=[0] * n, prefilled=0) for n in (30, 5, 4, 9)]
    lengths = lambda chunks: [(c.start, c.length) for c in chunks]      # noqa: E731
    assert lengths(plan_whole_prompts(reqs, 20, False)) == [(0, 30)]          # longer than the budget: alone
    assert lengths(plan_whole_prompts(reqs[1:], 20, False)) == [(0, 5), (0, 4), (0, 9)]
    assert lengths(plan_whole_prompts(reqs[1:], 10, False)) == [(0, 5), (0, 4)]  # in order, none cut
    assert plan_whole_prompts(reqs, 20, True) == []


def test_prefixes_added_replaced_and_removed_while_serving():
    """A request in flight keeps the prefix it started with; new ones get the new one."""
    model, table, reference = model_and_prefixes(names=("a", "b", "c"))
    engine = Seq2SeqEngine(model, {"a": table["a"]}, max_batch=2, max_seq_len=24, max_prefixes=2)
    src = sources()[1]
    running = engine.submit(src, "a", GREEDY)
    engine.step()
    engine.add_prefix("a", table["b"])                     # replaced: the running request keeps the old
    replaced = engine.submit(src, "a", GREEDY)
    while not (running.done and replaced.done):
        engine.step()
    start = engine.decoder_start_ids
    assert running.result().token_ids == greedy(reference, src, "a", start, GREEDY.max_tokens)
    assert replaced.result().token_ids == greedy(reference, src, "b", start, GREEDY.max_tokens)
    engine.remove_prefix("a")
    engine.add_prefix("c", table["c"])
    assert engine.prefixes == ["c"]
    out = engine.generate([src], "c", GREEDY)[0]
    assert out.token_ids == greedy(reference, src, "c", start, GREEDY.max_tokens)


def test_cancel_frees_the_slot():
    model, table, _ = model_and_prefixes()
    engine = Seq2SeqEngine(model, table, max_batch=1, max_seq_len=24)
    long = engine.submit([5, 6, 7], "a", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    long.cancel()
    after = engine.submit([9, 10], "b", GREEDY)
    while not after.done:
        engine.step()
    assert long.result().finish_reason == "cancelled" and len(after.result().token_ids) == GREEDY.max_tokens


def test_what_it_cannot_serve_is_refused_with_the_reason(tmp_path):
    from hf_tiny import tiny_model

    model, table, _ = model_and_prefixes()
    engine = Seq2SeqEngine(model, table, max_batch=2, max_seq_len=16, max_source_len=8)
    with pytest.raises(PromptTooLong, match="9 tokens but the engine's max_source_len is 8"):
        engine.submit(list(range(3, 12)), "a")
    assert engine.max_prompt_len == 8
    # max_tokens past the decoder's room: the row ends when its cache is full (the last token,
    # never fed back, is not stored: one more than the cache's free positions, as in Engine)
    out = engine.generate([[5, 6]], "a", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 16 - len(engine.decoder_start_ids) + 1
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match="llama is decoder-only: use Engine"):
        Seq2SeqEngine(llama, {"a": torch.randn(2, 2, 2, P, 16)})
    assert not is_patched(llama)
    with pytest.raises(ValueError, match="decode_step must be 'auto' or 'eager'"):
        Seq2SeqEngine(tiny_seq2seq("bart"), table, decode_step="compiled")
    with pytest.raises(ValueError, match="max_source_len=500 exceeds bart's 128 encoder positions"):
        Seq2SeqEngine(tiny_seq2seq("bart"), table, max_source_len=500)
    with pytest.raises(ValueError, match="decoder tokens"):
        Seq2SeqEngine(tiny_seq2seq("bart"), table, max_seq_len=500)
    forced = tiny_seq2seq("bart")
    forced.generation_config.forced_bos_token_id = 0
    with pytest.raises(ValueError, match=r"max_seq_len=2 leaves no room for output after the decoder's 2 start"):
        Seq2SeqEngine(forced, table, max_seq_len=2)
    assert not is_patched(forced)
    # adapters of different sites cannot share a bank
    _, decoder_only, _ = model_and_prefixes(sites=("decoder",))
    folders = {}
    for name, sites, prefix in (("all", None, table["a"]), ("dec", ("decoder",), decoder_only["a"])):
        m = tiny_seq2seq("bart")
        bank = patch_model(m, P, names=[name], sites=sites)
        bank.set_entry(0, prefix)
        bank.save_pretrained(str(tmp_path / name), format="prefix_kernels")
        folders[name] = str(tmp_path / name)
    with pytest.raises(ValueError, match="different attention sites"):
        Seq2SeqEngine(tiny_seq2seq("bart"), folders)
    engine = Seq2SeqEngine(tiny_seq2seq("bart"), {"all": folders["all"]}, max_batch=2, max_seq_len=16)
    with pytest.raises(ValueError, match="sites"):
        engine.add_prefix("dec", folders["dec"])


def test_default_decoder_length_fits_bart_large_positions():
    """Constructed with defaults, a BART-large-shaped config (1024 positions) and P=32 fits: the
    decoder's 256 tokens after the prefix offset, sources up to 1024 tokens."""
    from transformers import BartConfig

    config = BartConfig(vocab_size=128, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, forced_eos_token_id=None)
    model = __import__("transformers").BartForConditionalGeneration(config).eval()
    engine = Seq2SeqEngine(model, {"a": torch.zeros(3, 2, 4, 32, 16)}, max_batch=1)
    assert (engine.max_seq_len, engine.max_source_len, engine.offset) == (256, 1024, 32)


def test_serve_engine_picks_the_engine_of_the_model():
    from hf_tiny import tiny_model

    model, table, _ = model_and_prefixes()
    assert type(serve_engine(model, table, max_batch=2, max_seq_len=16)) is Seq2SeqEngine
    llama = tiny_model("llama")
    assert type(serve_engine(llama, {"a": torch.randn(2, 2, 2, P, 16)}, max_batch=2, max_seq_len=16)) is Engine


def test_serve_command_line_builds_the_encoder_decoder_engine(tmp_path):
    """`prefix-kernels serve --model <a BART folder>`: Seq2SeqEngine with --max-source-len; the
    options of the other kind of model are refused, naming the option, before weights load."""
    from hf_tiny import save_tiny_bart

    from prefix_kernels.serve import launch

    from transformers import AutoModelForSeq2SeqLM

    folder = save_tiny_bart(tmp_path / "bart", ["<s>", "<pad>", "</s>", "<unk>", "a", "b", "c"])
    patch_model(AutoModelForSeq2SeqLM.from_pretrained(folder), P, names=["x"]).save_pretrained(str(tmp_path / "x"))
    parse = lambda *a: launch._parser().parse_args(["--model", folder, "--prefix", f"x={tmp_path / 'x'}",  # noqa: E731
                                                    "--device", "cpu", *a])
    engine, name = launch.build(parse("--max-source-len", "16", "--max-seq-len", "12"))
    assert type(engine) is Seq2SeqEngine and engine.max_prompt_len == 16 and name == "bart"
    out = engine.generate(["a b c"], "x", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    with pytest.raises(SystemExit, match="--decode-step compiled covers decoder-only models"):
        launch.build(parse("--decode-step", "compiled"))
    with pytest.raises(SystemExit, match="--max-source-len is for encoder-decoder models"):
        launch.build(launch._parser().parse_args(["--max-source-len", "8", "--device", "cpu"]))


def test_http_completions_of_an_encoder_decoder_model():
    from serve_utils import post, start_server

    model, table, reference = model_and_prefixes()
    engine = Seq2SeqEngine(model, table, max_batch=2, max_seq_len=24, max_source_len=16)
    server = start_server(engine)
    try:
        src = sources()[1]
        status, out = post(server, "/v1/completions", {"model": "b", "prompt": src, "max_tokens": 6,
                                                       "temperature": 0, "ignore_eos": True})
        assert status == 200, out
        assert out["usage"]["completion_tokens"] == 6
        status, out = post(server, "/v1/completions", {"model": "b", "prompt": list(range(3, 20)), "max_tokens": 2})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded"
        assert "at most 16 prompt tokens" in out["error"]["message"]
    finally:
        server.close()


def test_the_engine_in_its_own_process_serves_an_encoder_decoder_model():
    """EngineProcess (the server's default) with a Seq2SeqEngine: the same tokens as in process, and
    the front checks a source against max_source_len, not max_seq_len."""
    from prefix_kernels.serve.remote import EngineProcess
    from serve_utils import make_seq2seq_engine

    local = make_seq2seq_engine().generate(["summarize this", "and this one"], ["a", "b"], GREEDY)
    remote = EngineProcess(make_seq2seq_engine)
    try:
        assert remote.max_prompt_len == 48 and remote.max_seq_len == 32
        outs = [r.result(timeout=120) for r in (remote.submit("summarize this", "a", GREEDY),
                                                remote.submit("and this one", "b", GREEDY))]
        assert [o.token_ids for o in outs] == [o.token_ids for o in local]
        with pytest.raises(PromptTooLong, match="max_source_len is 48"):
            remote.submit("x" * 49, "a", GREEDY)
        assert remote.submit("x" * 40, "a", GREEDY).result(timeout=60).finish_reason == "length"
    finally:
        remote.close()


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("family", ["bart", "pegasus"])
def test_gpu_cuda_graphs_equal_eager_and_the_patched_model(family):
    """fp32 on the GPU: the engine with CUDA graphs, without, and the patched model's greedy
    decoding on the CPU give the same tokens (all three sites prefixed, and decoder only)."""
    for sites in (None, ("decoder",)):
        model, table, reference = model_and_prefixes(family, sites=sites)
        outs = {}
        for graphs in (True, False):
            engine = Seq2SeqEngine(tiny_seq2seq(family, init_std=STD).cuda(), table, sites=sites, max_batch=4,
                                   max_seq_len=24, prefill_chunk=20, cuda_graphs=graphs)
            engine.warmup()
            assert engine.cuda_graphs == graphs, "the decode step was not captured"
            outs[graphs] = [o.token_ids for o in check_against_reference(engine, reference, sources(), NAMES)]
        assert outs[True] == outs[False]
