"""The HTTP server on loopback, driven by a real HTTP client (http.client), on a tiny CPU model."""
import http.client
import json
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from hf_tiny import tiny_model
from prefix_kernels.bank import PrefixBank
from prefix_kernels.serve import ByteTokenizer, Engine, SamplingParams
from prefix_kernels.serve.server import Server

NAMES = ("a", "b", "c", "d")
P = 4


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


def table(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, 2, 2, P, 16, generator=g) for n in NAMES + ("e",)}


def make_engine(names=NAMES, **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 64)
    prefixes = {n: table()[n] for n in names}
    return Engine(tiny_model("llama"), prefixes, tokenizer=ByteTokenizer(128), **kw)


def alone(prompt, prefix, params):
    return make_engine(names=(prefix,)).generate([prompt], prefix, params)[0]


@pytest.fixture
def server():
    srv = Server(make_engine(), port=0).start()
    yield srv
    srv.close()


def request(srv, method, path, body=None, raw=None, timeout=30):
    host, port = srv.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if "json" in ctype else payload.decode())


def sse_events(text):
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


# -- the happy paths ---------------------------------------------------------------------------

def test_health_and_models(server):
    status, body = request(server, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["prefixes"] == list(NAMES)
    status, body = request(server, "GET", "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [m["id"] for m in body["data"]] == list(NAMES) and body["data"][0]["object"] == "model"
    assert request(server, "GET", "/v1/models/c")[1]["id"] == "c"
    assert request(server, "GET", "/v1/models/zz")[0] == 404


def test_completion_matches_the_engine_alone(server):
    body = {"model": "b", "prompt": "hello there", "max_tokens": 10, "temperature": 0}
    status, out = request(server, "POST", "/v1/completions", body)
    ref = alone("hello there", "b", SamplingParams(temperature=0, max_tokens=10))
    assert status == 200 and out["object"] == "text_completion" and out["model"] == "b"
    assert out["choices"][0]["text"] == ref.text and out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 11, "completion_tokens": 10, "total_tokens": 21}
    ids = list(b"hello there")
    assert request(server, "POST", "/v1/completions", {**body, "prompt": ids})[1]["choices"][0]["text"] == ref.text


def test_concurrent_clients_on_different_prefixes_get_their_text_alone(server):
    jobs = [(f"prompt number {i}", NAMES[i % 4], {"temperature": 0} if i % 2 else
             {"temperature": 0.9, "top_p": 0.9, "seed": 100 + i}) for i in range(10)]

    def client(job):
        prompt, name, sampling = job
        return request(server, "POST", "/v1/completions",
                       {"model": name, "prompt": prompt, "max_tokens": 12, **sampling})

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(client, jobs))
    for (prompt, name, sampling), (status, out) in zip(jobs, results):
        assert status == 200, out
        ref = alone(prompt, name, SamplingParams(max_tokens=12, **sampling))
        assert out["choices"][0]["text"] == ref.text, (prompt, name)


def test_streaming_completion_and_chat(server):
    body = {"model": "c", "prompt": "stream me", "max_tokens": 12, "temperature": 0, "stop": ["q"]}
    status, text = request(server, "POST", "/v1/completions", {**body, "stream": True})
    events = sse_events(text)
    assert status == 200 and all(e["object"] == "text_completion" for e in events)
    full = request(server, "POST", "/v1/completions", body)[1]["choices"][0]
    assert "".join(e["choices"][0]["text"] for e in events) == full["text"]
    assert events[-1]["choices"][0]["finish_reason"] == full["finish_reason"]

    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    status, out = request(server, "POST", "/v1/chat/completions", chat)
    assert status == 200 and out["object"] == "chat.completion"
    message = out["choices"][0]["message"]
    assert message["role"] == "assistant" and out["usage"]["completion_tokens"] == 8
    assert message["content"] == alone("user: hi\nassistant: ", "a",
                                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).text
    status, text = request(server, "POST", "/v1/chat/completions", {**chat, "stream": True})
    events = sse_events(text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_add_and_remove_prefix_over_http(server, tmp_path):
    bank = PrefixBank(2, 2, 16, P, names=["e"], init=table()["e"])
    bank.save_pretrained(str(tmp_path))
    status, out = request(server, "POST", "/v1/prefixes", {"name": "e", "path": str(tmp_path)})
    assert status == 201 and "e" in out["prefixes"]
    body = {"model": "e", "prompt": "new prefix", "max_tokens": 8, "temperature": 0}
    status, out = request(server, "POST", "/v1/completions", body)
    assert out["choices"][0]["text"] == alone("new prefix", "e", SamplingParams(temperature=0, max_tokens=8)).text
    assert request(server, "DELETE", "/v1/prefixes/e")[0] == 200
    assert request(server, "POST", "/v1/completions", body)[0] == 404
    assert request(server, "DELETE", "/v1/prefixes/e")[0] == 404
    assert request(server, "POST", "/v1/prefixes", {"name": "f", "path": str(tmp_path / "nope")})[0] == 400


# -- errors ------------------------------------------------------------------------------------

def test_errors_are_4xx_with_a_message(server):
    cases = [
        (request(server, "POST", "/v1/completions", raw=b"{not json"), 400, "not valid JSON"),
        (request(server, "POST", "/v1/completions", raw=b"[1, 2]"), 400, "JSON object"),
        (request(server, "POST", "/v1/completions", {"model": "zz", "prompt": "x"}), 404,
         "no prefix named 'zz'; this server has ['a', 'b', 'c', 'd']"),
        (request(server, "POST", "/v1/completions", {"prompt": "x"}), 400, "'model' must name a prefix"),
        (request(server, "POST", "/v1/completions", {"model": "a", "prompt": "x" * 64}), 400,
         "64 tokens but the engine's max_seq_len is 64"),
        (request(server, "POST", "/v1/completions", {"model": "a", "prompt": "x", "temperature": "hot"}), 400,
         "'temperature' must be a number"),
        (request(server, "POST", "/v1/completions", {"model": "a", "prompt": ["x", "y"]}), 400, "one prompt"),
        (request(server, "POST", "/v1/completions", {"model": "a", "prompt": "x", "n": 2}), 400, "'n' > 1"),
        (request(server, "POST", "/v1/chat/completions", {"model": "a", "messages": "hi"}), 400, "'messages'"),
        (request(server, "GET", "/v2/nothing"), 404, "no route"),
        (request(server, "GET", "/v1/completions"), 405, "not allowed"),
    ]
    for (status, body), want_status, want_text in cases:
        assert status == want_status and want_text in body["error"]["message"], (status, body)
        assert body["error"]["type"] == "invalid_request_error"
    assert request(server, "GET", "/health")[0] == 200       # still serving


def test_full_queue_is_429_and_drains_when_the_engine_runs():
    srv = Server(make_engine(queue_size=1), port=0).start(engine=False)   # nothing leaves the queue yet
    try:
        body = {"model": "a", "prompt": "queued", "max_tokens": 4, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(request, srv, "POST", "/v1/completions", body)
            deadline = time.monotonic() + 10
            while srv.engine.num_waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            status, out = request(srv, "POST", "/v1/completions", body)
            assert status == 429 and "queue is full" in out["error"]["message"]
            srv.engine.start()
            status, out = first.result(timeout=30)
        assert status == 200 and out["usage"]["completion_tokens"] == 4
    finally:
        srv.close()


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_slot(stream):
    srv = Server(make_engine(max_batch=1, max_seq_len=1024), port=0)
    finished = []
    finish = srv.engine._finish
    srv.engine._finish = lambda req, reason, error=None: (finished.append(reason), finish(req, reason, error))
    srv.start()
    try:
        host, port = srv.httpd.server_address[:2]
        body = json.dumps({"model": "a", "prompt": "long one", "max_tokens": 1000, "temperature": 0,
                           "ignore_eos": True, "stream": stream}).encode()
        sock = socket.create_connection((host, port))
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 10
        while srv.engine.num_active == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        if stream:
            assert sock.recv(1024).startswith(b"HTTP/1.1 200")
        sock.close()
        deadline = time.monotonic() + 10
        while not finished and time.monotonic() < deadline:
            time.sleep(0.01)
        assert finished == ["cancelled"]
        # the one slot is free: the next request runs
        status, out = request(srv, "POST", "/v1/completions", {"model": "b", "prompt": "next", "max_tokens": 3})
        assert status == 200 and srv.engine.num_active == 0
    finally:
        srv.close()
