"""Helpers of the HTTP server tests: a tiny CPU engine, a real HTTP client, raw sockets."""
import http.client
import json
import socket
import time

import torch

from hf_tiny import tiny_model
from prefix_kernels.serve import ByteTokenizer, Engine
from prefix_kernels.serve.server import Server

NAMES = ("a", "b", "c", "d")
P = 4


def table(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, 2, 2, P, 16, generator=g) for n in NAMES + ("e",)}


def make_engine(names=NAMES, prefixes=None, **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 64)
    prefixes = prefixes if prefixes is not None else {n: table()[n] for n in names}
    return Engine(tiny_model("llama"), prefixes, tokenizer=ByteTokenizer(128), **kw)


def make_seq2seq_engine(**kw):
    """A Seq2SeqEngine on a tiny random BART (all three sites prefixed), byte tokenizer."""
    from hf_tiny import tiny_seq2seq
    from prefix_kernels.serve import Seq2SeqEngine

    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 32)
    kw.setdefault("max_source_len", 48)
    g = torch.Generator().manual_seed(1)
    prefixes = {n: torch.randn(6, 2, 4, P, 16, generator=g) for n in ("a", "b")}
    return Seq2SeqEngine(tiny_seq2seq("bart", init_std=0.2), prefixes, tokenizer=ByteTokenizer(128), **kw)


def alone(prompt, prefix, params):
    return make_engine(names=(prefix,)).generate([prompt], prefix, params)[0]


def start_server(engine=None, **options):
    return Server(engine or make_engine(), port=0, **options).start()


def serve_cli(*args, **popen):
    """Start `prefix-kernels serve --port 0 *args` (OMP_NUM_THREADS=1: steadier on 2 shared
    cores); returns (process, queue of its URL, the last 200 lines of its stderr). --port 0: the
    server binds a free port itself and names it in its banner (a port picked here and bound
    later could be taken in between); a thread drains stderr so the server's request log can
    never fill the pipe and block it."""
    import collections
    import os
    import queue
    import subprocess
    import sys
    import threading

    server = subprocess.Popen([sys.executable, "-m", "prefix_kernels.cli", "serve", "--port", "0", *args],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)
    urls, tail = queue.Queue(), collections.deque(maxlen=200)

    def drain():
        for line in server.stderr:
            tail.append(line)
            if line.startswith("serving ") and " on http://" in line:
                urls.put(line.split(" on ", 1)[1].split()[0])
    threading.Thread(target=drain, daemon=True).start()
    return server, urls, tail


def request(srv, method, path, body=None, raw=None, headers=None, timeout=30):
    """(status, JSON or text, headers) of one request on a fresh connection."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=timeout)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    conn.request(method, path, body=data, headers={k: v for k, v in hdrs.items() if v is not None})
    resp = conn.getresponse()
    payload = resp.read()
    conn.close()
    ctype = resp.getheader("Content-Type", "")
    return resp.status, (json.loads(payload) if "json" in ctype else payload.decode()), dict(resp.getheaders())


def post(srv, path, body, **kw):
    status, out, _ = request(srv, "POST", path, body, **kw)
    return status, out


def sse_events(text):
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(e) for e in events[:-1]]


def raw_exchange(port, data: bytes, *, half_close=False, timeout=10.0, linger_reset=False) -> bytes:
    """Send bytes on a raw socket and read until the server closes (or timeout)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        out = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        sock.close()


def recv_response(sock, timeout=10.0) -> bytes:
    """One whole response with a Content-Length from a socket left open (keep-alive)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def split_response(raw: bytes):
    """(status, headers dict with lower-case names, body bytes) of a raw HTTP/1.x response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return status, headers, body


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def completion(prompt="hello", model="a", **kw):
    return {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}


# the functions that may read a tensor on the host in an engine step: the step's tokens
# (_collect, the prefill's first tokens), the prefill's host-built inputs, the range checks and the
# reference kernels that run only for CPU tensors (never for the device tensors of a GPU engine)
HOST_READERS = {"_collect", "_prefill_forward", "_first_tokens", "_index_on_device", "check_inputs",
                "_check_index_values", "reference_decode_attention", "reference_prefix_attention",
                "visible_keys_mask"}


def host_reads(monkeypatch, engine, reqs):
    """Step `engine` until `reqs` are done; (steps, [(read, function, file:line)] of every host
    read of a tensor meanwhile). On a GPU each read is a sync that stalls the step pipeline."""
    import traceback

    reads = []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **kw):
            caller = traceback.extract_stack(limit=2)[0]
            reads.append((_name, caller.name, f"{caller.filename.rsplit('/', 1)[-1]}:{caller.lineno}"))
            return _original(self, *a, **kw)
        monkeypatch.setattr(torch.Tensor, name, spy)
    steps = 0
    try:
        while not all(r.done for r in reqs):
            engine.step()
            steps += 1
    finally:
        monkeypatch.undo()
    return steps, reads
