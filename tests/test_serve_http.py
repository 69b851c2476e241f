"""The HTTP server on loopback, driven by a real HTTP client (http.client), on a tiny CPU model."""
import json
import socket
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

from prefix_kernels.bank import PrefixBank
from prefix_kernels.serve import SamplingParams
from prefix_kernels.serve.server import Server
from serve_utils import (NAMES, P, alone, make_engine, post, request, sse_events, start_server, table,
                         wait_until)


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture
def server():
    srv = start_server()
    yield srv
    srv.close()


def test_health_and_models(server):
    status, body, _ = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["running"] == 0 and body["max_batch"] == 4
    status, body, _ = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(NAMES) and body["data"][0]["object"] == "model"
    assert request(server, "GET", "/v1/models/c")[1]["id"] == "c"
    status, body, _ = request(server, "GET", "/v1/models/zz")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_completion_matches_the_engine_alone(server):
    body = {"model": "b", "prompt": "hello there", "max_tokens": 10, "temperature": 0}
    status, out = post(server, "/v1/completions", body)
    ref = alone("hello there", "b", SamplingParams(temperature=0, max_tokens=10))
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "b"
    assert out["choices"][0]["text"] == ref.text and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 10, "total_tokens": 21}
    ids = list(b"hello there")
    assert post(server, "/v1/completions", {**body, "prompt": ids})[1]["choices"][0]["text"] == ref.text


def test_concurrent_clients_on_different_prefixes_get_their_text_alone(server):
    jobs = [(f"prompt number {i}", NAMES[i % 4], {"temperature": 0} if i % 2 else
             {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i}) for i in range(10)]

    def client(job):
        prompt, name, sampling = job
        return post(server, "/v1/completions", {"model": name, "prompt": prompt, "max_tokens": 12, **sampling})

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(client, jobs))
    for (prompt, name, sampling), (status, out) in zip(jobs, results):
        assert status == 200, out
        ref = alone(prompt, name, SamplingParams(max_tokens=12, **sampling))
        assert out["choices"][0]["text"] == ref.text, (prompt, name)


def test_streaming_completion_and_chat(server):
    body = {"model": "c", "prompt": "stream me", "max_tokens": 12, "temperature": 0, "stop": ["q"]}
    status, text, headers = request(server, "POST", "/v1/completions",
                                    {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(text)
    assert all(e["object"] == "text_completion" for e in events)
    full = post(server, "/v1/completions", body)[1]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == full["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == full["choices"][0]["finish_reason"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full["usage"]      # include_usage

    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    status, out = post(server, "/v1/chat/completions", chat)
    assert status == 200 and out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and out["usage"]["completion_tokens"] == 8
    assert message["content"] == alone("user: hi\nassistant: ", "a",
                                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).text
    parts = {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "h"},
                                                               {"type": "text", "text": "i"}]}]}
    assert post(server, "/v1/chat/completions", parts)[1]["choices"][0]["message"] == message
    status, text, _ = request(server, "POST", "/v1/chat/completions", {**chat, "stream": True})
    events = sse_events(text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_admin_adds_and_removes_a_prefix(tmp_path):
    root = tmp_path / "adapters"
    bank = PrefixBank(2, 2, 16, P, names=["e"], init=table()["e"])
    bank.save_pretrained(str(root / "e"))
    srv = start_server(api_keys=("user-key",), enable_admin=True, admin_key="admin-key", adapter_root=str(root))
    admin = {"Authorization": "Bearer admin-key"}
    user = {"Authorization": "Bearer user-key"}
    try:
        status, out = post(srv, "/v1/prefixes", {"name": "e", "path": "e"}, headers=admin)
        assert status == 201 and "e" in out["prefixes"]
        body = {"model": "e", "prompt": "new prefix", "max_tokens": 8, "temperature": 0}
        status, out = post(srv, "/v1/completions", body, headers=user)
        assert out["choices"][0]["text"] == alone("new prefix", "e", SamplingParams(temperature=0, max_tokens=8)).text
        assert request(srv, "DELETE", "/v1/prefixes/e", headers=admin)[0] == 200
        assert post(srv, "/v1/completions", body, headers=user)[0] == 404
        assert request(srv, "DELETE", "/v1/prefixes/e", headers=admin)[0] == 404
        status, out = post(srv, "/v1/prefixes", {"name": "f", "path": "nope"}, headers=admin)
        assert status == 400 and out["error"]["param"] == "path"
    finally:
        srv.close()


def test_full_queue_is_429_and_drains_when_the_engine_runs():
    srv = Server(make_engine(queue_size=1), port=0).start(engine=False)     # nothing leaves the queue yet
    try:
        body = {"model": "a", "prompt": "queued", "max_tokens": 4, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, srv, "/v1/completions", body)
            wait_until(lambda: srv.engine.num_waiting == 1)
            status, out, headers = request(srv, "POST", "/v1/completions", body)
            assert status == 429 and "queue is full" in out["error"]["message"] and headers["Retry-After"] == "1"
            srv.engine.start()
            status, out = first.result(timeout=30)
        assert status == 200 and out["usage"]["completion_tokens"] == 4
    finally:
        srv.close()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_slot(stream):
    """A client that goes away cancels its request: a streamed one at its next token (the write
    fails), a non-streamed one when the connection is reset (a clean close is also how a
    half-close looks, which must still get its answer: see the half-close test)."""
    srv = Server(make_engine(max_batch=1, max_seq_len=1024), port=0)
    finished = []
    finish = srv.engine._finish
    srv.engine._finish = lambda req, reason, error=None: (finished.append(reason), finish(req, reason, error))
    srv.start()
    try:
        body = json.dumps({"model": "a", "prompt": "long one", "max_tokens": 1000, "temperature": 0,
                           "ignore_eos": True, "stream": stream}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: srv.engine.num_active == 1)
        if stream:
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        else:       # SO_LINGER 0: close() sends a reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        wait_until(lambda: finished)
        assert finished == ["cancelled"]
        # the one slot is free: the next request runs
        status, out = post(srv, "/v1/completions", {"model": "b", "prompt": "next", "max_tokens": 3})
        assert status == 200
        wait_until(lambda: srv.engine.num_active == 0)
    finally:
        srv.close()


def test_request_log_has_one_line_per_request_without_prompt_text(server, caplog):
    caplog.set_level("INFO", logger="prefix_kernels.serve.access")
    post(server, "/v1/completions", {"model": "a", "prompt": "secret words", "max_tokens": 3, "temperature": 0})
    post(server, "/v1/completions", {"model": "zz", "prompt": "secret words"})
    request(server, "GET", "/health")

    def access_lines():
        return [r.getMessage() for r in caplog.records if r.name == "prefix_kernels.serve.access"]
    wait_until(lambda: len(access_lines()) >= 3)       # the line is written after the response
    lines = access_lines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("POST /v1/completions 200 prompt_tokens=12 completion_tokens=3 finish=length")
    assert "latency=" in lines[0] and "client=127.0.0.1" in lines[0] and "id=cmpl-" in lines[0]
    assert lines[1].startswith("POST /v1/completions 404") and lines[2].startswith("GET /health 200")
    assert not any("secret" in line for line in lines)


def test_log_prompts_puts_the_prompt_in_the_line(caplog):
    srv = start_server(log_prompts=True)
    caplog.set_level("INFO", logger="prefix_kernels.serve.access")
    try:
        post(srv, "/v1/completions", {"model": "a", "prompt": "secret words", "max_tokens": 2})
    finally:
        srv.close()
    assert any('prompt="secret words"' in r.getMessage() for r in caplog.records)


def test_metrics_in_prometheus_text(server):
    post(server, "/v1/completions", {"model": "a", "prompt": "count me", "max_tokens": 5, "temperature": 0,
                                     "ignore_eos": True})
    post(server, "/v1/completions", {"model": "a", "prompt": "x", "temperature": "hot"})
    status, text, headers = request(server, "GET", "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["prefix_kernels_queue_depth"] == 0 and values["prefix_kernels_running_rows"] == 0
    assert values["prefix_kernels_completion_tokens_total"] == 5
    assert values["prefix_kernels_prompt_tokens_total"] == 8
    assert values["prefix_kernels_prefill_forwards_total"] >= 1
    assert values["prefix_kernels_tokens_per_second"] > 0
    assert values["prefix_kernels_time_to_first_token_seconds_count"] == 1
    assert values['prefix_kernels_time_to_first_token_seconds_bucket{le="+Inf"}'] == 1
    assert values['prefix_kernels_requests_total{endpoint="completions",status="200"}'] == 1
    assert values['prefix_kernels_requests_total{endpoint="completions",status="400"}'] == 1
    for line in text.splitlines():     # every sample has a TYPE
        if line.startswith("# TYPE"):
            assert line.split()[3] in ("gauge", "counter", "histogram")


def test_a_slow_stream_reader_gets_its_text_coalesced(server, monkeypatch):
    """While a client's socket buffer is over the limit, its tokens wait in the pump and go out
    together: the text is whole and in order (here the limit is below zero: everything waits)."""
    from prefix_kernels.serve import server as server_module

    monkeypatch.setattr(server_module, "STREAM_BUFFER_LIMIT", -1)
    body = {"model": "d", "prompt": "slow reader", "max_tokens": 20, "temperature": 0, "ignore_eos": True}
    status, text, _ = request(server, "POST", "/v1/completions", {**body, "stream": True})
    events = sse_events(text)
    ref = alone("slow reader", "d", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)).text
    assert status == 200 and "".join(e["choices"][0]["text"] for e in events) == ref
    assert len(events) <= 2          # the first token (which sends the head), then the rest at the end


def test_options_out_of_range_are_refused():
    engine = make_engine()
    for option, value in [("read_timeout", 0), ("poll_interval", -1), ("max_connections", 0), ("drain_timeout", -1),
                          ("max_tokens_cap", 0)]:
        with pytest.raises(ValueError, match=option):
            Server(engine, port=0, **{option: value})
