"""Issue 12, finding by finding: the server on loopback facing hostile or careless clients.

Real HTTP clients (http.client) where the finding is about the API, raw sockets where it is
about the protocol. Finding 7 (training checkpoints) is tested with the trainer, not here.
"""
import json
import logging
import os
import socket
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from prefix_kernels.bank import PrefixBank, read_peft_prefix
from prefix_kernels.serve import SamplingParams
from prefix_kernels.serve.server import Server
from serve_utils import (P, alone, completion, make_engine, post, raw_exchange, recv_response, request,
                         split_response, sse_events, start_server, table, wait_until)


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="module")
def server():
    srv = start_server(read_timeout=0.6, keepalive_timeout=0.6, max_tokens_cap=32, max_prompt_bytes=200)
    yield srv
    srv.close()


def head(method, path, headers=(), body=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def json_post(path, body: bytes, extra=()):
    return head("POST", path, ["Content-Type: application/json", f"Content-Length: {len(body)}", *extra], body)


# -- 1. authentication, admin routes, browsers ----------------------------------------------------

@pytest.fixture
def adapters(tmp_path):
    root = tmp_path / "root"
    PrefixBank(2, 2, 16, P, names=["e"], init=table()["e"]).save_pretrained(str(root / "good"))
    PrefixBank(2, 2, 16, P, names=["e"], init=table()["e"]).save_pretrained(str(tmp_path / "outside"))
    os.symlink(tmp_path / "outside", root / "link-out")
    return root


def test_1_api_key_guards_the_openai_routes():
    srv = start_server(api_keys=("k1", "k2"))
    try:
        body = completion(max_tokens=2)
        for headers, want in [({}, 401), ({"Authorization": "Bearer nope"}, 401), ({"Authorization": "k1"}, 401),
                              ({"Authorization": "Bearer k1"}, 200), ({"Authorization": "Bearer k2"}, 200)]:
            status, out, hdrs = request(srv, "POST", "/v1/completions", body, headers=headers)
            assert status == want, (headers, out)
            if want == 401:
                assert out["error"]["type"] == "authentication_error" and hdrs["WWW-Authenticate"] == "Bearer"
        assert request(srv, "GET", "/v1/models")[0] == 401
        assert request(srv, "GET", "/v1/models", headers={"Authorization": "Bearer k2"})[0] == 200
        assert request(srv, "GET", "/health")[0] == 200          # probes need no key
    finally:
        srv.close()


def test_1_admin_routes_are_off_by_default_and_need_their_own_key(adapters):
    srv = start_server(api_keys=("user",))
    try:
        status, out = post(srv, "/v1/prefixes", {"name": "x", "path": "good"}, headers={"Authorization": "Bearer user"})
        assert status == 403 and out["error"]["code"] == "admin_disabled"
        assert request(srv, "DELETE", "/v1/prefixes/a", headers={"Authorization": "Bearer user"})[0] == 403
        assert "a" in srv.engine.prefixes
    finally:
        srv.close()
    with pytest.raises(ValueError, match="admin key"):
        Server(make_engine(), port=0, enable_admin=True, adapter_root=str(adapters))
    with pytest.raises(ValueError, match="adapter-root"):
        Server(make_engine(), port=0, enable_admin=True, admin_key="adm")
    with pytest.raises(ValueError, match="differ"):
        Server(make_engine(), port=0, enable_admin=True, admin_key="k", api_keys=("k",), adapter_root=str(adapters))

    srv = start_server(api_keys=("user",), enable_admin=True, admin_key="adm", adapter_root=str(adapters))
    try:
        admin = {"Authorization": "Bearer adm"}
        assert post(srv, "/v1/prefixes", {"name": "x", "path": "good"}, headers={"Authorization": "Bearer user"}
                    )[0] == 401
        assert post(srv, "/v1/prefixes", {"name": "x", "path": "good"})[0] == 401
        for path in ("../outside", str(adapters.parent / "outside"), "link-out", "good/../../outside", ".", ""):
            status, out = post(srv, "/v1/prefixes", {"name": "x", "path": path}, headers=admin)
            assert status == 400 and out["error"]["param"] == "path", (path, out)
            assert str(adapters) not in out["error"]["message"]          # finding 9: no server paths
        assert post(srv, "/v1/prefixes", {"name": "x", "path": "good"}, headers=admin)[0] == 201
        assert "x" in srv.engine.prefixes
    finally:
        srv.close()


def test_1_browsers_cannot_post_across_origins():
    srv = start_server(allowed_origins=("https://app.example",))
    try:
        body = json.dumps(completion(max_tokens=2)).encode()
        # a text/plain POST is what a page may send without a preflight: 415, never served
        status, out, _ = request(srv, "POST", "/v1/completions", raw=body, headers={"Content-Type": "text/plain"})
        assert status == 415 and out["error"]["code"] == "unsupported_media_type"
        status, out, _ = request(srv, "POST", "/v1/completions", raw=body, headers={"Content-Type": None})
        assert status == 415
        status, out, _ = request(srv, "POST", "/v1/completions", raw=body, headers={"Origin": "https://evil.example"})
        assert status == 403 and out["error"]["code"] == "origin_not_allowed"
        status, out, hdrs = request(srv, "POST", "/v1/completions", raw=body, headers={"Origin": "https://app.example"})
        assert status == 200 and hdrs["Access-Control-Allow-Origin"] == "https://app.example"
        status, _, hdrs = request(srv, "OPTIONS", "/v1/completions", headers={"Origin": "https://app.example"})
        assert status == 204 and "Authorization" in hdrs["Access-Control-Allow-Headers"]
        assert request(srv, "OPTIONS", "/v1/completions", headers={"Origin": "https://evil.example"})[0] == 403
        # DNS rebinding: a page served from evil.example resolving to 127.0.0.1 sends its own Host
        status, out, _ = request(srv, "GET", "/v1/models", headers={"Host": "evil.example:8000"})
        assert status == 403 and out["error"]["code"] == "host_not_allowed"
        assert request(srv, "GET", "/v1/models", headers={"Host": "localhost:1"})[0] == 200
    finally:
        srv.close()


def test_1_binding_beyond_loopback_without_a_key_warns(caplog):
    caplog.set_level(logging.WARNING, logger="prefix_kernels.serve")
    Server(make_engine(), host="0.0.0.0", port=0)
    assert any("no API key" in r.getMessage() for r in caplog.records)
    caplog.clear()
    Server(make_engine(), host="0.0.0.0", port=0, api_keys=("k",))
    Server(make_engine(), host="127.0.0.1", port=0)
    assert not caplog.records


# -- 2. one bad request fails alone -------------------------------------------------------------

def test_2_an_overflowing_top_k_is_400_and_bystanders_finish(server):
    bystanders = [completion(f"bystander {i}", model="abc"[i], max_tokens=24, ignore_eos=True) for i in range(3)]
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(post, server, "/v1/completions", b) for b in bystanders]
        wait_until(lambda: server.engine.num_active > 0)
        for top_k in (2 ** 63, 2 ** 64 + 5, 129, -2):
            status, out = post(server, "/v1/completions", completion(top_k=top_k, temperature=1.0))
            assert status == 400 and out["error"]["param"] == "top_k", out
        for body, fut in zip(bystanders, running):
            status, out = fut.result(timeout=60)
            assert status == 200, out
            ref = alone(body["prompt"], body["model"], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
            assert out["choices"][0]["text"] == ref.text
    assert post(server, "/v1/completions", completion(top_k=128, temperature=1.0, seed=3))[0] == 200


# -- 3. body and prompt limits --------------------------------------------------------------------

def test_3_negative_or_malformed_content_length_is_400(server):
    for value in (b"-5", b"-67108864", b"abc", b"1e3", b"5, 6"):
        raw = raw_exchange(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                                        b"Content-Type: application/json\r\nContent-Length: " + value + b"\r\n\r\n{}")
        status, headers, body = split_response(raw)
        assert status == 400 and json.loads(body)["error"]["type"] == "invalid_request_error", (value, raw[:200])


def test_3_an_oversized_body_is_413_before_it_is_read(server):
    # the header announces 64 MB; nothing of it is sent: the answer comes at once
    start = time.monotonic()
    raw = raw_exchange(server.port, head("POST", "/v1/completions", ["Content-Type: application/json",
                                                                     f"Content-Length: {64 << 20}"]))
    status, headers, body = split_response(raw)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    assert time.monotonic() - start < 2 and headers.get("connection") == "close"
    # chunked, without a length: cut off once over the limit
    chunk = b"x" * (1 << 20)
    data = head("POST", "/v1/completions", ["Content-Type: application/json", "Transfer-Encoding: chunked"])
    data += b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(3))
    status, _, body = split_response(raw_exchange(server.port, data))
    assert status == 413


def test_3_a_long_prompt_is_refused_before_tokenizing(server):
    calls = []
    submit = server.engine.submit
    server.engine.submit = lambda *a, **k: (calls.append(1), submit(*a, **k))[1]
    try:
        status, out = post(server, "/v1/completions", completion("x" * 201))
        assert status == 400 and out["error"]["code"] == "context_length_exceeded" and "201 bytes" in \
            out["error"]["message"]
        status, out = post(server, "/v1/completions", completion(list(range(64))))
        assert status == 400 and out["error"]["code"] == "context_length_exceeded"
        chat = {"model": "a", "messages": [{"role": "user", "content": "y" * 150}] * 2}
        assert post(server, "/v1/chat/completions", chat)[1]["error"]["code"] == "context_length_exceeded"
        assert calls == []
    finally:
        server.engine.submit = submit


# -- 4. timeouts and the connection cap -----------------------------------------------------------

def test_4_a_body_shorter_than_its_content_length_times_out(server):
    start = time.monotonic()
    raw = raw_exchange(server.port, head("POST", "/v1/completions", ["Content-Type: application/json",
                                                                     "Content-Length: 100"], b'{"model": "a"'))
    status, headers, body = split_response(raw)
    assert status == 408 and json.loads(body)["error"]["type"] == "timeout_error"
    assert time.monotonic() - start < 5


def test_4_slowloris_and_idle_connections_are_closed(server):
    def slow(sock):
        try:
            for byte in b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ":
                sock.sendall(bytes([byte]))
                time.sleep(0.01)
            while True:           # a header byte now and then, never the end of the head
                sock.sendall(b"a")
                time.sleep(0.1)
        except OSError:
            pass

    loris = socket.create_connection(("127.0.0.1", server.port))
    idle = socket.create_connection(("127.0.0.1", server.port))
    threading.Thread(target=slow, args=(loris,), daemon=True).start()
    start = time.monotonic()
    loris.settimeout(10)
    idle.settimeout(10)
    got = b""
    while chunk := loris.recv(4096):
        got += chunk
    assert split_response(got)[0] == 408
    assert idle.recv(4096) == b""         # closed without a word
    assert time.monotonic() - start < 5
    loris.close()
    idle.close()


def test_4_connections_over_the_cap_get_503():
    srv = start_server(max_connections=4)
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        wait_until(lambda: len(srv.registry.connections) == 4)
        status, headers, body = split_response(raw_exchange(srv.port, head("GET", "/health")))
        assert status == 503 and json.loads(body)["error"]["code"] == "overloaded" and headers["retry-after"] == "1"
        socks.pop().close()
        wait_until(lambda: len(srv.registry.connections) == 3)
        assert split_response(raw_exchange(srv.port, head("GET", "/health", ["Connection: close"])))[0] == 200
    finally:
        for s in socks:
            s.close()
        srv.close()


# -- 5. the listen backlog ------------------------------------------------------------------------

def test_5_a_burst_of_connections_waits_in_the_backlog(server):
    """256 connects while the event loop is busy for 1 s: with a backlog of 5 most of them would
    wait for a SYN retry (1 s+) or be reset; with 2048 every one completes at once."""
    assert server.config.backlog >= 1024
    server._loop.call_soon_threadsafe(time.sleep, 1.0)
    time.sleep(0.05)
    socks, errors = [], []
    start = time.monotonic()
    for _ in range(256):
        try:
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=0.5))
        except OSError as e:
            errors.append(e)
    elapsed = time.monotonic() - start
    for s in socks:
        s.close()
    assert not errors and elapsed < 0.9, (len(errors), elapsed)


# -- 6. SIGTERM drains --------------------------------------------------------------------------

def test_6_drain_lets_requests_finish_and_ends_streams_with_done():
    srv = start_server(make_engine(max_batch=4, max_seq_len=256))
    body = completion(max_tokens=60, ignore_eos=True)
    health = socket.create_connection(("127.0.0.1", srv.port))       # a keep-alive connection of a prober
    try:
        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(request, srv, "POST", "/v1/completions", {**body, "stream": True})
                       for _ in range(2)]
            plain = pool.submit(post, srv, "/v1/completions", body)
            wait_until(lambda: srv.engine.num_active == 3)
            drain = pool.submit(srv.drain, 30)
            wait_until(lambda: srv.draining)
            health.sendall(head("GET", "/health"))
            status, _, out = split_response(recv_response(health))
            assert status == 503 and json.loads(out)["status"] == "draining"
            with pytest.raises(OSError):          # no longer accepting
                socket.create_connection(("127.0.0.1", srv.port), timeout=2).recv(1)
            for fut in streams:
                status, text, _ = fut.result(30)
                events = sse_events(text)          # ends with [DONE]
                assert status == 200 and events[-1]["choices"][0]["finish_reason"] == "length"
            status, out = plain.result(30)
            assert status == 200 and out["usage"]["completion_tokens"] == 60
            drain.result(30)
    finally:
        health.close()
        srv.close()


def test_6_past_the_drain_timeout_streams_are_aborted_but_end_with_done():
    srv = start_server(make_engine(max_batch=2, max_seq_len=1024))
    try:
        with ThreadPoolExecutor(2) as pool:
            fut = pool.submit(request, srv, "POST", "/v1/completions",
                              completion(max_tokens=1000, ignore_eos=True, stream=True))
            wait_until(lambda: srv.engine.num_active == 1)
            start = time.monotonic()
            srv.drain(0.3)
            status, text, _ = fut.result(30)
        assert time.monotonic() - start < 10
        events = [line for line in text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["error"]["code"] == "aborted"
    finally:
        srv.close()


def test_6_sigterm_on_the_cli_drains_and_exits_zero(tmp_path):
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "prefix_kernels.cli", "serve", "--port", "0", "--device", "cpu", "--drain-timeout",
                             "30", "--max-seq-len", "512"], stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if line.startswith("serving "):
                url = line.split(" on ", 1)[1].split()[0]
                break
        assert url is not None
        port = int(url.rsplit(":", 1)[1])
        body = json.dumps({"model": "demo-a", "prompt": "hi", "max_tokens": 80, "ignore_eos": True,
                           "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(json_post("/v1/completions", body))
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        got = first
        sock.settimeout(30)
        while not (b"data: [DONE]" in got and got.endswith(b"0\r\n\r\n")):
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
        text = split_response(got)[2].decode()
        events = sse_events(text)
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(len(e["choices"][0]["text"]) for e in events) > 0
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.stderr.close()


# -- 8, 9, 10. client errors are 4xx, with no server paths; adapters are checked -----------------------

def test_8_huge_integers_and_deep_nesting_are_400(server):
    for raw in (b'{"model": "a", "prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}",
                b"[" * 100000 + b"]" * 100000, b'{"model": "a", "prompt": "x", "temperature": NaN}',
                b'{"model": "a", "prompt": "x", "max_tokens": 1e400}', b"\xff\xfe{}"):
        status, out = post(server, "/v1/completions", None, raw=raw)
        assert status == 400 and out["error"]["type"] == "invalid_request_error", (raw[:40], out)
    for field, value in [("max_tokens", 10 ** 30), ("seed", 2 ** 70), ("temperature", 1e308), ("top_p", 0),
                         ("stop", ["x"] * 17), ("stop", ["x" * 257]), ("prompt", [2 ** 63])]:
        status, out = post(server, "/v1/completions", completion(**{field: value}))
        assert status == 400 and out["error"]["param"] == field, (field, out)


def _corrupt_adapters(root):
    """Six kinds of broken adapter folder (and two with bad weights: finding 10)."""
    from safetensors.torch import load_file, save_file

    good = PrefixBank(2, 2, 16, P, names=["e"], init=table()["e"])
    kinds = {}

    def make(name, edit):
        folder = root / name
        good.save_pretrained(str(folder))
        edit(folder)
        kinds[name] = folder

    make("bad-json", lambda f: (f / "adapter_config.json").write_text("{not json"))
    make("config-list", lambda f: (f / "adapter_config.json").write_text("[1, 2]"))
    make("no-fields", lambda f: (f / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}'))
    make("truncated", lambda f: (f / "adapter_model.safetensors").write_bytes(
        (f / "adapter_model.safetensors").read_bytes()[:50]))
    make("wrong-key", lambda f: save_file({"secret_tensor_name": torch.zeros(4, 256)}, str(f / "adapter_model.safetensors")))
    make("wrong-shape", lambda f: save_file({"prompt_embeddings": torch.zeros(3, 7)}, str(f / "adapter_model.safetensors")))

    def weights(f, fn):
        t = load_file(str(f / "adapter_model.safetensors"))["prompt_embeddings"]
        save_file({"prompt_embeddings": fn(t)}, str(f / "adapter_model.safetensors"))

    make("nan", lambda f: weights(f, lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))))
    make("integer", lambda f: weights(f, lambda t: t.round().to(torch.int32)))
    return kinds


def test_8_9_10_corrupt_adapters_are_400_without_paths_or_contents(tmp_path):
    root = tmp_path / "root"
    kinds = _corrupt_adapters(root)
    with pytest.raises(ValueError, match=r"nan'.*prompt_embeddings holds non-finite values"):
        read_peft_prefix(str(kinds["nan"]))
    with pytest.raises(ValueError, match=r"integer'.*prompt_embeddings has dtype torch.int32"):
        read_peft_prefix(str(kinds["integer"]))
    srv = start_server(enable_admin=True, admin_key="adm", adapter_root=str(root))
    try:
        for name in kinds:
            status, out = post(srv, "/v1/prefixes", {"name": "x", "path": name}, headers={"Authorization": "Bearer adm"})
            message = out["error"]["message"]
            assert status == 400 and out["error"]["code"] == "invalid_adapter", (name, out)
            assert str(tmp_path) not in message and "secret_tensor_name" not in message, message
            assert message.startswith(f"adapter {name!r} cannot be loaded"), message
        assert "x" not in srv.engine.prefixes
        assert "non-finite" in post(srv, "/v1/prefixes", {"name": "x", "path": "nan"},
                                    headers={"Authorization": "Bearer adm"})[1]["error"]["message"]
    finally:
        srv.close()


# -- 11. half-close ----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_11_a_client_that_half_closes_still_gets_its_answer(server, stream):
    body = json.dumps(completion("half", max_tokens=6, ignore_eos=True, stream=stream)).encode()
    raw = raw_exchange(server.port, json_post("/v1/completions", body), half_close=True)
    status, headers, out = split_response(raw)
    assert status == 200
    ref = alone("half", "a", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)).text
    if stream:
        assert "".join(e["choices"][0]["text"] for e in sse_events(out.decode())) == ref
    else:
        assert json.loads(out)["choices"][0]["text"] == ref


# -- 12. names --------------------------------------------------------------------------------------

def test_12_prefix_names_are_checked_and_paths_percent_decoded(tmp_path):
    root = tmp_path / "root"
    PrefixBank(2, 2, 16, P, names=["e"], init=table()["e"]).save_pretrained(str(root / "e"))
    prefixes = {"has space": table()["a"], "b": table()["b"]}
    srv = start_server(make_engine(prefixes=prefixes), enable_admin=True, admin_key="adm", adapter_root=str(root))
    admin = {"Authorization": "Bearer adm"}
    try:
        for bad in ("with space", "a/b", "", "..", "x" * 65, "é", 7):
            status, out = post(srv, "/v1/prefixes", {"name": bad, "path": "e"}, headers=admin)
            assert status == 400 and out["error"]["param"] == "name", bad
        assert post(srv, "/v1/prefixes", {"name": "v1.2_beta-3", "path": "e"}, headers=admin)[0] == 201
        assert request(srv, "GET", "/v1/models/v1%2E2_beta-3")[1]["id"] == "v1.2_beta-3"
        assert request(srv, "DELETE", "/v1/prefixes/v1%2E2_beta-3", headers=admin)[0] == 200
        # a name the engine was given in-process, with a space: deletable with its encoded form
        assert request(srv, "DELETE", "/v1/prefixes/has%20space", headers=admin)[0] == 200
        assert srv.engine.prefixes == ["b"]
    finally:
        srv.close()


# -- 13. broken pipes ---------------------------------------------------------------------------

def test_13_clients_that_vanish_leave_no_tracebacks(server, caplog):
    caplog.set_level(logging.DEBUG)
    for data in (json_post("/v1/completions", b'{"bad json'), head("GET", "/nowhere"),
                 b"GARBAGE\r\n\r\n", json_post("/v1/completions", json.dumps(completion(max_tokens=30,
                                                                                          stream=True)).encode())):
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.sendall(data)
            sock.close()                       # reset: the answer meets a broken pipe
    wait_until(lambda: server.in_flight == 0 and server.engine.num_active == 0)
    time.sleep(0.2)
    assert request(server, "GET", "/health")[0] == 200
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert not noisy, [(r.name, r.getMessage()) for r in noisy]


# -- 14. unsupported fields and the error shape of every status ---------------------------------------

def test_14_unsupported_openai_fields_are_400_and_neutral_values_pass(server):
    for field, value in [("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 10}),
                         ("best_of", 3), ("n", 2), ("logprobs", 5), ("echo", True), ("suffix", "!"),
                         ("tools", [{"type": "function"}]), ("response_format", {"type": "json_object"}),
                         ("no_such_field", 1)]:
        status, out = post(server, "/v1/completions", completion(**{field: value}))
        assert status == 400 and out["error"]["param"] == field and out["error"]["code"] == "unsupported_parameter", \
            (field, out)
    neutral = dict(presence_penalty=0, frequency_penalty=0, logit_bias={}, best_of=1, n=1, logprobs=None,
                   echo=False, user="someone")
    assert post(server, "/v1/completions", completion(max_tokens=2, **neutral))[0] == 200
    status, out = post(server, "/v1/chat/completions", {"model": "a", "messages": [
        {"role": "tool", "content": "x"}]})
    assert status == 400


def test_14_every_status_is_openai_shaped_json(server):
    cases = {
        404: head("GET", "/v2/nothing"),
        405: head("PUT", "/v1/completions"),
        413: head("POST", "/v1/completions", ["Content-Type: application/json", f"Content-Length: {1 << 30}"]),
        414: head("GET", "/" + "a" * 20000),
        431: head("GET", "/health", ["X-Big: " + "b" * 20000]),
        501: head("PROPFIND", "/health"),
        400: b"GET /health HTTP/1.1\r\nHost localhost\r\n\r\n",
    }
    for want, data in cases.items():
        status, headers, body = split_response(raw_exchange(server.port, data))
        err = json.loads(body)["error"]
        assert status == want and headers["content-type"].startswith("application/json"), (want, status, body)
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err


# -- 15. max_tokens and per-client limits, request timeouts ----------------------------------------

def test_15_max_tokens_is_capped(server):
    status, out = post(server, "/v1/completions", completion(max_tokens=33))
    assert status == 400 and out["error"]["param"] == "max_tokens" and "32]" in out["error"]["message"]
    assert post(server, "/v1/completions", completion(max_tokens=32))[0] == 200
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "ignore_eos": True, "temperature": 0}
    assert post(server, "/v1/chat/completions", chat)[1]["usage"]["completion_tokens"] == 32   # the cap is the default


def test_15_per_client_limits_are_429():
    srv = start_server(make_engine(max_batch=4, max_seq_len=512), api_keys=("alice", "bob"),
                       client_max_requests=2, client_max_tokens=300)
    alice, bob = {"Authorization": "Bearer alice"}, {"Authorization": "Bearer bob"}
    long = completion(max_tokens=100, ignore_eos=True)
    try:
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(post, srv, "/v1/completions", long, headers=alice) for _ in range(2)]
            wait_until(lambda: srv.engine.num_active + srv.engine.num_waiting == 2)
            status, out = post(srv, "/v1/completions", long, headers=alice)
            assert status == 429 and out["error"]["code"] == "client_limit" and "requests in flight" in \
                out["error"]["message"]
            status, out = post(srv, "/v1/completions", completion(max_tokens=250), headers=bob)
            assert status == 200             # another client is not held back
            assert all(f.result(60)[0] == 200 for f in running)
        status, out = post(srv, "/v1/completions", completion(max_tokens=301), headers=bob)
        assert status == 429 and out["error"]["param"] == "max_tokens"
    finally:
        srv.close()


def test_15_a_request_past_its_timeout_is_504_and_frees_its_slot():
    srv = start_server(make_engine(max_batch=1, max_seq_len=4096), request_timeout=0.5)
    try:
        body = completion(max_tokens=4000, ignore_eos=True)
        status, out = post(srv, "/v1/completions", body)
        assert status == 504 and out["error"]["code"] == "timeout"
        status, text, _ = request(srv, "POST", "/v1/completions", {**body, "stream": True})
        assert status == 200 and text.rstrip().endswith("data: [DONE]") and '"code": "timeout"' in text
        wait_until(lambda: srv.engine.num_active == 0)
    finally:
        srv.close()
