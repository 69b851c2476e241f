"""An OpenAI-compatible HTTP API over the Engine, on the standard library's ThreadingHTTPServer.

    GET  /health                  status, requests running and waiting, prefixes
    GET  /v1/models[/ID]          each prefix is a model
    POST /v1/completions          {"model": prefix, "prompt": text | token ids, "max_tokens", "temperature",
                                   "top_p", "top_k", "seed", "stop", "stream", "ignore_eos"}
    POST /v1/chat/completions     {"model": prefix, "messages": [...], ...} (needs a chat template)
    POST /v1/prefixes             {"name", "path"}: add or replace a prefix while serving
    DELETE /v1/prefixes/NAME      stop serving a prefix (requests in flight finish)

Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}): 400 malformed or
unsupported input, 404 unknown model/prefix or path, 429 queue full, 503 shutting down.
Streaming sends server-sent events (`data: {...}`, then `data: [DONE]`). A client that hangs up
cancels its request, which frees its slot at the next step.
"""
from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .request import EngineClosed, PromptTooLong, QueueFull, UnknownPrefix
from .sampling import SamplingParams

log = logging.getLogger("prefix_kernels.serve")

MAX_BODY = 16 << 20
POLL_S = 0.05


class ApiError(Exception):
    def __init__(self, status, message, param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), message, param, code

    def body(self):
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def _typed(body, name, kind, default, check=None, what=""):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float, (int, float)) and isinstance(value, bool))
    if not ok or (check is not None and not check(value)):
        raise ApiError(400, f"'{name}' must be {what}, got {json.dumps(value)[:80]}", param=name)
    return value


def sampling_params(body, default_max_tokens):
    """SamplingParams from an OpenAI request body (400 on anything malformed or unsupported)."""
    if _typed(body, "n", int, 1, what="1") != 1:
        raise ApiError(400, "'n' > 1 is not supported: send one request per completion", param="n")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "'logprobs' is not supported by this server", param="logprobs")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16):
        raise ApiError(400, "'stop' must be a string or a list of at most 16 strings", param="stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _typed({"max_tokens": max_tokens}, "max_tokens", int, default_max_tokens,
                        lambda v: v >= 1, "an integer >= 1")
    top_k = _typed(body, "top_k", int, 0, lambda v: v >= -1, "an integer >= -1 (-1 or 0 = off)")
    return SamplingParams(
        temperature=float(_typed(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "a number in [0, 2]")),
        top_p=float(_typed(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        top_k=max(0, top_k), seed=_typed(body, "seed", int, None, what="an integer"), max_tokens=max_tokens,
        stop=stop or [], ignore_eos=bool(_typed(body, "ignore_eos", bool, False, what="a boolean")))


def _prompt(body):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]             # a batch of one
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                   param="prompt")


def _messages(body):
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with string content",
                       param="messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "prefix-kernels"

    @property
    def engine(self):
        return self.server.engine

    def log_message(self, fmt, *args):
        log.debug("%s - " + fmt, self.address_string(), *args)

    # -- plumbing ----------------------------------------------------------------------------

    def _send_json(self, status, payload, headers=()):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _body(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if length > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _client_gone(self) -> bool:
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _dispatch(self, method):
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {("GET", "/health"): self._health, ("GET", "/v1/models"): self._models,
                  ("POST", "/v1/completions"): self._completions, ("POST", "/v1/chat/completions"): self._chat,
                  ("POST", "/v1/prefixes"): self._add_prefix}
        try:
            if (method, path) in routes:
                return routes[(method, path)]()
            if method == "GET" and path.startswith("/v1/models/"):
                return self._model(path[len("/v1/models/"):])
            if method == "DELETE" and path.startswith("/v1/prefixes/"):
                return self._remove_prefix(path[len("/v1/prefixes/"):])
            if any(p == path for _, p in routes):
                raise ApiError(405, f"{method} is not allowed on {path}")
            raise ApiError(404, f"no route {method} {path}")
        except ApiError as e:
            self.close_connection = True     # the body may be unread: start afresh
            self._send_json(e.status, e.body(), [("Retry-After", "1")] if e.status in (429, 503) else ())
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:      # a bug must not take the server down
            log.exception("request failed")
            self._send_json(500, ApiError(500, f"{type(e).__name__}: {e}").body())

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # -- routes ------------------------------------------------------------------------------

    def _health(self):
        eng = self.engine
        self._send_json(200, {"status": "ok", "running": eng.num_active, "waiting": eng.num_waiting,
                              "max_batch": eng.max_batch, "prefixes": eng.prefixes})

    def _model_card(self, name):
        return {"id": name, "object": "model", "created": self.server.created, "owned_by": "prefix-kernels",
                "root": self.server.model_name, "parent": self.server.model_name}

    def _models(self):
        self._send_json(200, {"object": "list", "data": [self._model_card(n) for n in self.engine.prefixes]})

    def _model(self, name):
        if name not in self.engine.prefixes:
            raise ApiError(404, str(UnknownPrefix(name, self.engine.prefixes)), code="model_not_found")
        self._send_json(200, self._model_card(name))

    def _add_prefix(self):
        body = self._body()
        name, path = body.get("name"), body.get("path")
        if not (isinstance(name, str) and name and isinstance(path, str)):
            raise ApiError(400, "POST /v1/prefixes takes {\"name\": str, \"path\": adapter folder}")
        try:
            self.engine.add_prefix(name, path)
        except (ValueError, FileNotFoundError) as e:
            raise ApiError(400, str(e), param="path") from None
        self._send_json(201, {"object": "prefix", "id": name, "prefixes": self.engine.prefixes})

    def _remove_prefix(self, name):
        try:
            self.engine.remove_prefix(name)
        except UnknownPrefix as e:
            raise ApiError(404, str(e), code="model_not_found") from None
        self._send_json(200, {"object": "prefix", "id": name, "deleted": True})

    def _completions(self):
        self._generate(chat=False)

    def _chat(self):
        self._generate(chat=True)

    def _generate(self, chat):
        body = self._body()
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, f"'model' must name a prefix; this server has {self.engine.prefixes}", param="model")
        eng = self.engine
        stream = bool(_typed(body, "stream", bool, False, what="a boolean"))
        try:
            if chat:
                messages = _messages(body)
                if eng.tokenizer is None or not eng.tokenizer.has_chat_template:
                    raise ApiError(400, "this model has no chat template: use /v1/completions")
                ids = eng.tokenizer.encode_chat(messages)
                params = sampling_params(body, max(1, eng.max_seq_len - len(ids)))
                req = eng.submit(ids, model, params, stream=stream)
            else:
                prompt = _prompt(body)
                req = eng.submit(prompt, model, sampling_params(body, 16), stream=stream)
        except UnknownPrefix as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except EngineClosed as e:
            raise ApiError(503, str(e)) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        try:
            if stream:
                self._stream(req, model, chat)
            else:
                self._wait(req, model, chat)
        finally:
            if not req.done:
                req.cancel()

    def _wait(self, req, model, chat):
        while not req.wait(POLL_S):
            if self._client_gone():
                req.cancel()
                self.close_connection = True
                return
        result = req.result()
        if result.finish_reason == "error":
            raise ApiError(500, f"generation failed: {result.error}")
        if result.finish_reason == "abort":
            raise ApiError(503, "the server shut down before the request finished")
        choice = {"index": 0, "finish_reason": result.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        n_out = len(result.token_ids)
        self._send_json(200, {"id": req.id, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": model, "choices": [choice],
                              "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": n_out,
                                        "total_tokens": result.prompt_tokens + n_out}})

    def _stream(self, req, model, chat):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def send(payload):
            self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
            self.wfile.flush()

        def chunk(text, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": req.id, "object": kind, "created": created, "model": model, "choices": [choice]}

        try:
            if chat:
                send(chunk("", role=True))
            while True:
                event = req.poll(POLL_S)
                if event is None:
                    if self._client_gone():
                        raise ConnectionResetError
                    continue
                what, text, _ = event
                if what == "delta":
                    if text:
                        send(chunk(text))
                    continue
                if req.finish_reason == "error":
                    send({"error": ApiError(500, f"generation failed: {req.error}").body()["error"]})
                else:
                    send(chunk(text, finish=req.finish_reason))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return
        except (BrokenPipeError, ConnectionResetError, OSError):
            req.cancel()


class Server:
    """The HTTP server and the engine's scheduler thread.

        server = Server(engine, port=0).start()      # port 0: any free port; see server.url
        ...
        server.close()
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "model"):
        self.engine = engine
        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.httpd.engine, self.httpd.model_name, self.httpd.created = engine, model_name, int(time.time())
        self._thread = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self, engine: bool = True) -> "Server":
        """Serve on a background thread; engine=False leaves the scheduler to the caller."""
        if engine:
            self.engine.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="prefix-kernels-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.engine.start()
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
            self._thread = None
        self.httpd.server_close()
        self.engine.close()
