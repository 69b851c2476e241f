"""The engine in a process of its own (serve/remote.py): the same results, errors and streams as
the engine in the server's process; a child that dies fails its requests (tiny CPU model)."""
import os
import signal
import time
import warnings

import pytest
import torch

from prefix_kernels.serve import EngineClosed, PromptTooLong, SamplingParams, UnknownPrefix
from prefix_kernels.serve.remote import EngineProcess
from prefix_kernels.serve.server import Server
from serve_utils import NAMES, make_engine, post, request, serve_cli, sse_events, table

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPTS = ["hello there", "a", "the quick brown fox", "0123456789", "zz top"]


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def remote():
    eng = EngineProcess(make_engine)
    yield eng
    eng.close()


def _failing_factory():
    raise ValueError("no such model")


def test_results_equal_the_engine_in_process(remote):
    names = ["a", "b", "c", "a", "d"]
    local = make_engine().generate(PROMPTS, names, GREEDY)
    reqs = [remote.submit(p, n, GREEDY) for p, n in zip(PROMPTS, names)]     # 5 requests, 4 slots
    outs = [r.result(timeout=120) for r in reqs]
    for out, want in zip(outs, local):
        assert out.token_ids == want.token_ids and out.text == want.text
        assert out.finish_reason == "length" and out.prompt_tokens == want.prompt_tokens
    assert remote.steps > 10 and remote.prefill_forwards >= 2        # counters come back too
    stopped = remote.submit(PROMPTS[0], "a", SamplingParams(temperature=0, max_tokens=20, stop=[want_stop(local)]))
    assert stopped.result(timeout=60).finish_reason == "stop"


def want_stop(local):
    """A stop string the first local completion holds (its 3rd and 4th characters)."""
    text = local[0].text
    assert len(text) >= 4, text
    return text[2:4]


def test_streamed_text_equals_the_result(remote):
    req = remote.submit("stream me", "b", GREEDY, stream=True)
    pieces = [text for text, _ in req.events(timeout=60)]
    out = req.result(timeout=60)
    assert out.text and "".join(pieces) == out.text and len(out.token_ids) == 10


def test_errors_are_raised_at_submit_as_the_engine_raises_them(remote):
    with pytest.raises(UnknownPrefix):
        remote.submit("x", "nope", GREEDY)
    with pytest.raises(PromptTooLong):
        remote.submit("x" * 64, "a", GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        remote.submit([5, 999], "a", GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        remote.submit("x", "a", SamplingParams(temperature=-1))
    with pytest.raises(ValueError):                      # a prefix of the wrong shape, checked there
        remote.add_prefix("bad", torch.zeros(1, 2, 3))
    with pytest.raises(UnknownPrefix):
        remote.remove_prefix("nope")


def test_prefixes_added_and_removed_while_serving(remote):
    remote.add_prefix("e", table()["e"])
    assert "e" in remote.prefixes
    out = remote.submit("hi", "e", GREEDY).result(timeout=60)
    want = make_engine(names=("e",), prefixes={"e": table()["e"]}).generate(["hi"], "e", GREEDY)[0]
    assert out.token_ids == want.token_ids
    remote.remove_prefix("e")
    assert "e" not in remote.prefixes
    with pytest.raises(UnknownPrefix):
        remote.submit("hi", "e", GREEDY)


def test_cancel_reaches_the_engine_process(remote):
    req = remote.submit("long", "a", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    deadline = time.monotonic() + 60
    while not req.output_ids and time.monotonic() < deadline:
        time.sleep(0.01)
    req.cancel()
    out = req.result(timeout=60)
    assert out.finish_reason == "cancelled" and len(out.token_ids) < 50


def test_the_server_streams_over_an_engine_process(remote):
    srv = Server(remote, port=0).start()
    try:
        body = {"model": "c", "prompt": "over http", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        status, out = post(srv, "/v1/completions", body)
        assert status == 200 and out["usage"]["completion_tokens"] == 8
        status, text, _ = request(srv, "POST", "/v1/completions", {**body, "stream": True})
        streamed = "".join(e["choices"][0]["text"] for e in sse_events(text) if e["choices"])
        assert status == 200 and streamed and streamed == out["choices"][0]["text"]
        assert post(srv, "/v1/completions", {**body, "model": "zz"})[0] == 404
        status, metrics, _ = request(srv, "GET", "/metrics")
        assert "prefix_kernels_prefill_forwards_total" in metrics
    finally:
        srv._stop_loop()          # the module's engine process stays up for the other tests
        srv._pool.shutdown(wait=False)


def test_a_dead_engine_process_fails_its_requests():
    eng = EngineProcess(make_engine)
    try:
        req = eng.submit("doomed", "a", SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        os.kill(eng._proc.pid, signal.SIGKILL)
        out = req.result(timeout=60)
        assert out.finish_reason == "error" and "exited" in out.error
        with pytest.raises(EngineClosed):
            eng.submit("again", "a", GREEDY)
    finally:
        eng.close()


def test_a_factory_that_raises_says_so():
    with pytest.raises(RuntimeError, match="failed to start: ValueError: no such model"):
        EngineProcess(_failing_factory)
    assert set(NAMES) == {"a", "b", "c", "d"}


def test_serve_cli_with_an_engine_process():
    """`prefix-kernels serve` (its engine in a process of its own, the default; the demo model)
    answers; Ctrl-C (SIGINT to the whole process group) drains: the request in flight ends whole,
    then the server exits, its engine process too."""
    import json
    import queue
    import urllib.request

    server, urls, tail = serve_cli(start_new_session=True)
    try:
        try:
            url = urls.get(timeout=180)
        except queue.Empty:
            raise AssertionError(f"no banner: {''.join(tail)[-2000:]}") from None
        with urllib.request.urlopen(f"{url}/health", timeout=30) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as resp:
            name = json.loads(resp.read())["data"][0]["id"]

        def complete(max_tokens, stream=False):
            body = json.dumps({"model": name, "prompt": "hi", "max_tokens": max_tokens, "temperature": 0,
                               "ignore_eos": True, "stream": stream}).encode()
            req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.read().decode()
        assert json.loads(complete(4))["usage"]["completion_tokens"] == 4
        # a stream under way when Ctrl-C comes: it must still end whole (drained, not aborted)
        import http.client
        host, port = url[len("http://"):].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/completions", json.dumps(
            {"model": name, "prompt": "hi", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
             "stream": True, "stream_options": {"include_usage": True}}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(64).startswith(b"data: ")     # the stream began
        os.killpg(server.pid, signal.SIGINT)           # Ctrl-C: every process of the group
        rest = resp.read().decode()
        conn.close()
        assert rest.rstrip().endswith("data: [DONE]"), rest[-500:] + "".join(tail)[-2000:]
        assert '"completion_tokens": 400' in rest, rest[-500:] + "".join(tail)[-2000:]
        assert server.wait(timeout=60) == 0, "".join(tail)[-2000:]
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def _busy(engine, seconds):
    time.sleep(seconds)
    return seconds


def test_submit_never_waits_on_a_busy_engine_process():
    """A burst of long prompts (far more than a pipe's 64 KiB buffer) while the child is busy:
    submit returns at once (the event loop must never wait on the engine), and every request
    completes once the child is free."""
    import threading

    eng = EngineProcess(make_engine, max_seq_len=1024, queue_size=512)
    try:
        threading.Thread(target=eng.call, args=(_busy, 2.0), daemon=True).start()
        time.sleep(0.3)                                          # the child sleeps in the call
        params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        began = time.monotonic()
        reqs = [eng.submit([7 + i % 50] * 1000, NAMES[i % 4], params) for i in range(200)]   # ~1 MB
        assert time.monotonic() - began < 1.0
        outs = [r.result(timeout=300) for r in reqs]
        assert all(o.finish_reason == "length" and len(o.token_ids) == 1 for o in outs)
    finally:
        eng.close()
    assert not eng.alive
    with pytest.raises(EngineClosed):
        eng.submit("late", "a", GREEDY)
