"""An OpenAI-compatible HTTP API over the Engine, on aiohttp.

    GET  /health                  200 {"status": "ok", ...}; 503 {"status": "draining"} while draining,
                                  {"status": "engine down"} once an engine process has died
    GET  /metrics                 Prometheus text: queue depth, running rows, tokens/s, TTFT, requests
    GET  /v1/models[/ID]          each prefix is a model                           (API key)
    POST /v1/completions          {"model": prefix, "prompt": text | token ids, ...} (API key)
    POST /v1/chat/completions     {"model": prefix, "messages": [...], ...}         (API key)
    POST /v1/prefixes             {"name", "path" under --adapter-root}            (admin key)
    DELETE /v1/prefixes/NAME      stop serving a prefix (requests in flight finish) (admin key)

Every error is OpenAI-shaped JSON ({"error": {"message", "type", "param", "code"}}), whatever
its status. One event loop thread serves every connection; the engine decodes on its own thread;
an EventPump (pump.py) carries tokens from one to the other about once per engine step, so the
loop never waits on the engine and the engine never waits on a socket.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

from aiohttp import web

from .api import (
    ApiError,
    ChunkWriter,
    Limits,
    completion_body,
    parse_generation,
    parse_json,
)
from .connections import Registry
from .metrics import Metrics
from .pump import EventPump
from .request import EngineClosed, PromptTooLong, QueueFull, UnknownPrefix
from .rows import BankFull
from .security import Access, ClientLimits, check_name, client_id, is_loopback

log = logging.getLogger("prefix_kernels.serve")
access_log = logging.getLogger("prefix_kernels.serve.access")

KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
INLINE_PROMPT_BYTES = 16 << 10    # longer prompts are tokenized on a worker thread, off the loop


@dataclasses.dataclass
class ServerConfig:
    """The server's limits and access rules (`prefix-kernels serve --help` documents each flag)."""
    api_keys: tuple = ()                  # --api-key (repeatable) / PREFIX_KERNELS_API_KEY (comma-separated)
    admin_key: str | None = None          # --admin-key / PREFIX_KERNELS_ADMIN_KEY
    enable_admin: bool = False
    adapter_root: str | None = None
    allowed_origins: tuple = ()
    allowed_hosts: tuple = ()
    max_body_bytes: int | None = None     # None: max(1 MiB, 8 x max_prompt_bytes)
    max_prompt_bytes: int | None = None   # None: 32 bytes per token of context
    max_tokens_cap: int | None = None     # None: the engine's max_seq_len
    request_timeout: float = 600.0        # seconds per generation request
    read_timeout: float = 30.0            # seconds to receive a request's head, and its body
    keepalive_timeout: float = 5.0        # idle seconds before a keep-alive connection closes
    max_connections: int = 1024
    backlog: int = 2048
    drain_timeout: float = 30.0           # seconds in-flight requests get to finish on SIGTERM
    client_max_requests: int = 0          # per client (API key, else address); 0: no limit
    client_max_tokens: int = 0
    log_prompts: bool = False
    # the pump's period (seconds). 4 ms: ~3 tokens per SSE chunk at C=32; HTTP ran 7,250 / 9,726
    # tokens/s at C=32 / 64 against 6,394-6,755 / 7,477 at 1 ms (H100, 1.5 ms decode steps; ITL
    # p50 then 4.7 / 6.7 ms, the chunk cadence, instead of 1.5 / 3.5)
    poll_interval: float = 0.004
    max_line_size: int = 8190             # request line / header line bytes
    max_field_size: int = 8190

    def check(self) -> "ServerConfig":
        """ValueError naming the first option out of range."""
        for name in ("request_timeout", "read_timeout", "keepalive_timeout", "poll_interval", "max_connections",
                     "backlog", "max_line_size", "max_field_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("drain_timeout", "client_max_requests", "client_max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_body_bytes", "max_prompt_bytes", "max_tokens_cap"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        return self


class _Ctx:
    """What the request log line and the metrics need to know about one request."""
    __slots__ = ("start", "endpoint", "status", "prompt_tokens", "completion_tokens", "req_id", "ttft", "body_read",
                 "finish", "prompt")

    def __init__(self, start: float):
        self.start = start
        self.endpoint, self.status = "other", 500
        self.prompt_tokens = self.completion_tokens = 0
        self.req_id = self.ttft = self.finish = self.prompt = None
        self.body_read = False


class Server:
    """The HTTP server over an Engine.

        server = Server(engine, port=0).start()      # a background thread; port 0: any free port
        ... server.url ...
        server.close()                               # drains for drain_timeout seconds, then aborts
    or  Server(engine, host, port).serve_forever()   # the CLI: SIGTERM/SIGINT drain, then exit

    Options are ServerConfig's fields, as keywords or `config=`.
    """

    def __init__(self, engine, host: str = "127.0.0.1", port: int = 8000, model_name: str = "model",
                 config: ServerConfig | None = None, **options):
        self.engine = engine
        self.host, self.port, self.model_name = host, int(port), model_name
        cfg = self.config = dataclasses.replace(config or ServerConfig(), **options)
        cfg.check()
        self.access = Access(cfg.api_keys, cfg.admin_key, cfg.enable_admin, cfg.adapter_root, cfg.allowed_origins,
                             cfg.allowed_hosts, host)
        prompt_bytes = cfg.max_prompt_bytes or 32 * engine.max_seq_len
        self.max_body = cfg.max_body_bytes or max(1 << 20, 8 * prompt_bytes)
        cap = min(cfg.max_tokens_cap or engine.max_seq_len, engine.max_seq_len)
        self.limits = Limits(vocab_size=engine.vocab_size, max_seq_len=engine.max_seq_len,
                             max_prompt_len=engine.max_prompt_len, max_tokens_cap=cap,
                             max_prompt_bytes=prompt_bytes)
        self.clients = ClientLimits(cfg.client_max_requests, cfg.client_max_tokens)
        self.metrics = Metrics()
        self.created = int(time.time())
        self.draining = False
        self.in_flight = 0
        self._idle = None                  # asyncio.Event: set when in_flight is 0
        self._loop = self._thread = self._listener = self._http = None
        self.registry = self.pump = None
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="prefix-kernels-http")
        self._closed = False
        if not self.access.loopback and not self.access.api_keys:
            log.warning("serving on %s with no API key: anyone who can reach this address can use the server "
                        "(set --api-key or PREFIX_KERNELS_API_KEY)", host)

    @property
    def url(self) -> str:
        host = self.host if ":" not in self.host else f"[{self.host}]"
        return f"http://{host}:{self.port}"

    # -- lifecycle -----------------------------------------------------------------------------

    async def _startup(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        self._loop = loop
        self._idle = asyncio.Event()
        self._idle.set()
        self._http = web.Server(self._handle, handler_cancellation=True)
        self.registry = Registry(max_connections=cfg.max_connections, read_timeout=cfg.read_timeout,
                                 keepalive_timeout=cfg.keepalive_timeout)
        factory = self.registry.factory(self._http, loop, max_line_size=cfg.max_line_size, max_field_size=cfg.max_field_size,
                                        access_log=None, lingering_time=1.0)
        self._listener = await loop.create_server(factory, self.host, self.port, backlog=cfg.backlog,
                                                  reuse_address=True)
        self.port = self._listener.sockets[0].getsockname()[1]
        self.pump = EventPump(cfg.poll_interval, on_tokens=self.metrics.tokens)
        self.pump.start()
        self.registry.start()

    def start(self, engine: bool = True) -> "Server":
        """Serve on a background thread; engine=False leaves the scheduler to the caller."""
        if engine:
            self.engine.start()
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, name="prefix-kernels-http", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._startup(), loop).result(30)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            raise
        return self

    def serve_forever(self, ready=None) -> None:
        """Serve in this thread until SIGTERM or SIGINT, then drain (a second signal aborts).
        ready(server) is called once the port is bound (server.url is then final)."""
        self.engine.start()
        try:
            asyncio.run(self._main(ready))
        finally:
            self.engine.close()
            self._pool.shutdown(wait=False)
            self._closed = True

    async def _main(self, ready) -> None:
        await self._startup()
        if ready is not None:
            ready(self)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal(signame):
            if stop.is_set():
                log.warning("%s again: aborting the requests in flight", signame)
                loop.create_task(self._abort())
            else:
                log.info("%s: draining (up to %g s, --drain-timeout)", signame, self.config.drain_timeout)
                stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        log.info("serving on %s", self.url)
        await stop.wait()
        await self._drain(self.config.drain_timeout)

    async def _drain(self, timeout: float) -> None:
        """Stop accepting, answer /health with 503, give the requests in flight `timeout` seconds,
        then abort the rest (streams still end with [DONE]) and close."""
        self.draining = True
        self.registry.closing = True
        if self._listener is not None:
            self._listener.close()
        try:
            if self.in_flight:
                await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            log.warning("drain: %d requests still in flight after %g s: aborting them", self.in_flight, timeout)
        await self._abort()
        await self._http.shutdown(1.0)
        self.pump.stop()
        self.registry.stop()

    async def _abort(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self.engine.close)
        try:       # let the handlers write their endings (the pump sees every request done)
            if self.in_flight:
                await asyncio.wait_for(self._idle.wait(), 5.0)
        except asyncio.TimeoutError:
            pass

    def drain(self, timeout: float | None = None) -> None:
        """From another thread: drain as on SIGTERM (the server is closed afterwards)."""
        if self._loop is None or self._closed:
            return
        timeout = self.config.drain_timeout if timeout is None else timeout
        asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop).result(timeout + 30)
        self._stop_loop()

    def close(self, drain_timeout: float = 0.0) -> None:
        """Stop: in-flight requests get drain_timeout seconds, then abort; the engine is closed."""
        if not self._closed and self._thread is not None and not self.draining:
            asyncio.run_coroutine_threadsafe(self._drain(drain_timeout), self._loop).result(drain_timeout + 30)
        self._stop_loop()
        self.engine.close()
        self._pool.shutdown(wait=False)

    def _stop_loop(self):
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop.close()
        self._closed = True

    # -- one request ---------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.protocol
        conn.begin()
        start = time.monotonic()
        ctx = _Ctx(start)
        resp = None
        try:
            resp = await self._route(request, ctx)
            ctx.status = resp.status
        except ApiError as e:
            ctx.status = e.status
            resp = self._error_response(request, e, ctx)
        except ConnectionError:
            ctx.status = 499                  # the client went away (nginx's code)
        except asyncio.CancelledError:
            ctx.status = 499
            self._finish(request, ctx, start)
            conn.end()
            raise
        except Exception as e:                # a bug must not take the server down
            log.exception("request %s %s failed", request.method, request.path)
            ctx.status = 500
            resp = self._error_response(request, ApiError(500, f"internal server error ({type(e).__name__})"), ctx)
        try:
            if resp is not None:
                if not resp.prepared:
                    resp.headers.update(self.access.cors_headers(request.headers))
                if conn.eof:
                    resp.force_close()
                await resp.prepare(request)
                await resp.write_eof()
        except ConnectionError:
            ctx.status = 499
        self._finish(request, ctx, start)
        conn.end()
        return resp if resp is not None else web.Response(status=499)

    def _error_response(self, request, err: ApiError, ctx) -> web.Response:
        resp = web.Response(status=err.status, body=err.json_bytes(), content_type="application/json",
                            headers={**err.headers, **self.access.cors_headers(request.headers)})
        if request.method in ("POST", "PUT", "PATCH") and not ctx.body_read or err.status in (408, 413):
            resp.force_close()                # an unread body must not be taken for the next request
        return resp

    def _finish(self, request, ctx: _Ctx, start: float) -> None:
        latency = time.monotonic() - start
        self.metrics.request_done(ctx.endpoint, ctx.status, latency, ctx.prompt_tokens)
        if ctx.ttft is not None:
            self.metrics.ttft.observe(ctx.ttft)
        if not access_log.isEnabledFor(logging.INFO):
            return
        parts = [request.method, request.path[:200], str(ctx.status)]
        if ctx.endpoint in ("completions", "chat"):
            parts += [f"prompt_tokens={ctx.prompt_tokens}", f"completion_tokens={ctx.completion_tokens}"]
            if ctx.finish:
                parts.append(f"finish={ctx.finish}")
            if ctx.ttft is not None:
                parts.append(f"ttft={ctx.ttft:.3f}s")
        parts += [f"latency={latency:.3f}s", f"client={request.protocol.peer()}"]
        if ctx.req_id:
            parts.append(f"id={ctx.req_id}")
        if ctx.prompt is not None and self.config.log_prompts:
            parts.append(f"prompt={json.dumps(ctx.prompt)[:4096]}")
        access_log.info(" ".join(parts))

    async def _route(self, request, ctx) -> web.StreamResponse:
        method = request.method
        if method not in KNOWN_METHODS:
            raise ApiError(501, f"method {method[:20]} is not implemented", code="method_not_implemented")
        raw = request.raw_path.split("?", 1)[0]
        path = raw.rstrip("/") or "/"
        routes = {"/health": ("health", {"GET"}), "/metrics": ("metrics", {"GET"}),
                  "/v1/models": ("models", {"GET"}), "/v1/completions": ("completions", {"POST"}),
                  "/v1/chat/completions": ("chat", {"POST"}), "/v1/prefixes": ("prefixes", {"POST"})}
        arg = None
        if path in routes:
            ctx.endpoint, allowed = routes[path]
        elif re.fullmatch(r"/v1/models/[^/]+", path):
            ctx.endpoint, allowed, arg = "models", {"GET"}, unquote(path.rsplit("/", 1)[1])
        elif re.fullmatch(r"/v1/prefixes/[^/]+", path):
            ctx.endpoint, allowed, arg = "prefixes", {"DELETE"}, unquote(path.rsplit("/", 1)[1])
        else:
            raise ApiError(404, f"no route {method} {request.path[:100]}", code="not_found")
        access = self.access
        access.check_host(request.headers)
        if method == "OPTIONS":
            cors = access.cors_headers(request.headers)
            if not cors:
                raise ApiError(403, "cross-origin requests are not allowed here (--allowed-origin)",
                               code="origin_not_allowed")
            return web.Response(status=204, headers=cors)
        access.check_origin(request.headers)
        if "GET" in allowed:
            allowed = allowed | {"HEAD"}
        if method not in allowed:
            raise ApiError(405, f"{method} is not allowed on {path}", code="method_not_allowed",
                           headers={"Allow": ", ".join(sorted(allowed))})
        endpoint = ctx.endpoint
        if endpoint == "health":
            return self._health()
        if endpoint == "metrics":
            text = self.metrics.render(self.engine, len(self.registry.connections), self.in_flight, self.draining)
            return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
        if endpoint == "prefixes":
            access.check_admin(request.headers)
            if self.draining:
                raise ApiError(503, "the server is shutting down", code="draining", headers={"Retry-After": "1"})
            if method == "DELETE":
                return await self._remove_prefix(arg)
            return await self._add_prefix(await self._json(request, ctx))
        key = access.check_api_key(request.headers)
        if endpoint == "models":
            return self._models(arg)
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="draining", headers={"Retry-After": "1"})
        return await self._generate(request, ctx, key, chat=endpoint == "chat")

    async def _json(self, request, ctx) -> dict:
        ctype = request.headers.get("Content-Type", "")
        if ctype.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(415, f"the body must be JSON with 'Content-Type: application/json', got {ctype[:60]!r}",
                           code="unsupported_media_type")
        length = request.content_length
        if length is not None and length > self.max_body:
            raise ApiError(413, f"the body has {length} bytes; this server takes at most {self.max_body}",
                           code="body_too_large")
        deadline = time.monotonic() + self.config.read_timeout
        chunks, size = [], 0
        while True:
            remaining = deadline - time.monotonic()
            try:
                chunk = await asyncio.wait_for(request.content.readany(), max(remaining, 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, f"the body was not received within {self.config.read_timeout:g} s "
                                    f"(--read-timeout)", code="timeout") from None
            if not chunk:
                break
            size += len(chunk)
            if size > self.max_body:
                raise ApiError(413, f"the body is over {self.max_body} bytes", code="body_too_large")
            chunks.append(chunk)
        ctx.body_read = True
        return parse_json(b"".join(chunks))

    # -- routes --------------------------------------------------------------------------------

    def _health(self) -> web.Response:
        eng = self.engine
        if self.draining:
            return _json_response(503, {"status": "draining", "running": eng.num_active, "waiting": eng.num_waiting},
                                  {"Retry-After": "1"})
        if not eng.alive:                            # an engine process that died
            return _json_response(503, {"status": "engine down", "running": 0, "waiting": 0})
        return _json_response(200, {"status": "ok", "running": eng.num_active, "waiting": eng.num_waiting,
                                    "max_batch": eng.max_batch})

    def _model_card(self, name):
        return {"id": name, "object": "model", "created": self.created, "owned_by": "prefix-kernels",
                "root": self.model_name, "parent": self.model_name, "max_model_len": self.engine.max_seq_len}

    def _models(self, name) -> web.Response:
        if name is None:
            return _json_response(200, {"object": "list", "data": [self._model_card(n) for n in self.engine.prefixes]})
        if name not in self.engine.prefixes:
            raise ApiError(404, str(UnknownPrefix(name, self.engine.prefixes)), param="model", code="model_not_found")
        return _json_response(200, self._model_card(name))

    async def _add_prefix(self, body) -> web.Response:
        extra = set(body) - {"name", "path"}
        if extra:
            raise ApiError(400, f"POST /v1/prefixes takes only 'name' and 'path'; got {sorted(extra)}")
        name = check_name(body.get("name"))
        path = body.get("path")
        real = self.access.adapter_path(path)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(self.engine.add_prefix, name, real))
        except BankFull as e:               # capacity, not a bad adapter
            raise ApiError(409, f"cannot add {name!r}: {e}", code="bank_full") from None
        except (ValueError, FileNotFoundError, TypeError, KeyError) as e:   # the client's adapter
            log.info("adding prefix %r from %r failed: %s: %s", name, real, type(e).__name__, e)
            raise ApiError(400, f"adapter {path!r} cannot be loaded: {self._clean(e, real, path)}",
                           param="path", code="invalid_adapter") from None
        except Exception:                   # the server's fault (out of memory, a bug): 500, logged
            log.exception("adding prefix %r from %r failed", name, real)
            raise ApiError(500, f"adding prefix {name!r} failed on the server", code="internal_error") from None
        return _json_response(201, {"object": "prefix", "id": name, "prefixes": self.engine.prefixes})

    def _clean(self, err, real, shown) -> str:
        """An adapter error for the client: no server paths, no file contents."""
        text = str(err).replace(real, shown).replace(self.access.adapter_root, "<adapter-root>")
        text = re.sub(r"\s*\(keys: .*?\)", "", text)
        text = re.sub(r"(/[^\s'\"]+)+", "<path>", text) if "/" in text else text
        return text[:300] or type(err).__name__

    async def _remove_prefix(self, name) -> web.Response:
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._pool, functools.partial(self.engine.remove_prefix, name))
        except UnknownPrefix as e:
            raise ApiError(404, str(e), code="model_not_found") from None
        return _json_response(200, {"object": "prefix", "id": name, "deleted": True})

    async def _generate(self, request, ctx, key, chat) -> web.StreamResponse:
        gen = parse_generation(await self._json(request, ctx), chat, self.limits)
        ctx.prompt = gen.messages if chat else gen.prompt
        if gen.model not in self.engine.prefixes:
            raise ApiError(404, str(UnknownPrefix(gen.model, self.engine.prefixes)), param="model",
                           code="model_not_found")
        client = client_id(key, request.protocol.peer())
        self.clients.acquire(client, gen.params.max_tokens)
        self.in_flight += 1
        self._idle.clear()
        try:
            req = await self._submit(gen)
            ctx.req_id, ctx.prompt_tokens = req.id, len(req.prompt_ids)
            watch = self.pump.watch(req, gen.stream, time.monotonic() + self.config.request_timeout)
            try:
                if gen.stream:
                    return await self._stream(request, ctx, gen, req, watch)
                return await self._complete(ctx, gen, req, watch)
            finally:
                self.pump.unwatch(watch)
                if not req.done:
                    req.cancel()
                ctx.completion_tokens = len(req.output_ids)
                if watch.first_token_at is not None:
                    ctx.ttft = watch.first_token_at - ctx.start
        finally:
            self.clients.release(client, gen.params.max_tokens)
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def _submit(self, gen):
        eng = self.engine
        if gen.chat:
            call = functools.partial(eng.submit_chat, gen.messages, gen.model, gen.params, stream=gen.stream)
        else:
            call = functools.partial(eng.submit, gen.prompt, gen.model, gen.params, stream=gen.stream)
        try:
            if gen.prompt_bytes <= INLINE_PROMPT_BYTES:
                return call()
            fut = asyncio.get_running_loop().run_in_executor(self._pool, call)
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:        # the client left while its prompt was tokenized
                fut.add_done_callback(lambda f: f.cancelled() or f.exception() or f.result().cancel())
                raise
        except UnknownPrefix as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None
        except PromptTooLong as e:
            raise ApiError(400, str(e), param="prompt", code="context_length_exceeded") from None
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            raise ApiError(503, str(e), code="draining", headers={"Retry-After": "1"}) from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def _failure(self, req, watch) -> ApiError | None:
        """The error a finished (or timed-out) request answers with, or None when it succeeded."""
        if watch.timed_out:
            return ApiError(504, f"the request did not finish within {self.config.request_timeout:g} s "
                                 f"(--request-timeout)", code="timeout")
        reason = req.finish_reason
        if reason == "error":
            log.error("request %s failed in the engine: %s", req.id, req.error)
            return ApiError(500, "generation failed in the engine (see the server log)", code="engine_error")
        if reason in ("abort", "cancelled"):
            return ApiError(503, "the server shut down before the request finished", code="aborted")
        return None

    async def _complete(self, ctx, gen, req, watch) -> web.Response:
        while not (req.done or watch.timed_out):
            await watch.wait()
        ctx.finish = req.finish_reason
        err = self._failure(req, watch)
        if err is not None:
            raise err
        result = req.result()
        req_id = ("chat" + result.id) if gen.chat else result.id
        body = completion_body(req_id, int(time.time()), gen.model, gen.chat, result.text, result.finish_reason,
                               result.prompt_tokens, len(result.token_ids))
        return _json_response(200, body)

    async def _stream(self, request, ctx, gen, req, watch) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                                       **self.access.cors_headers(request.headers)})
        chunked = request.version >= (1, 1)
        if chunked:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunks = ChunkWriter(("chat" + req.id) if gen.chat else req.id, int(time.time()), gen.model, gen.chat)
        if gen.chat:
            await resp.write(chunks.role())
        while True:
            events = await watch.wait()
            if watch.timed_out:
                ctx.finish = "timeout"
                await resp.write(ChunkWriter.error(self._failure(req, watch)))
                return resp
            text = watch.pending + "".join(e[1] for e in events)
            watch.pending = ""
            if not events or events[-1][0] != "done":
                if text:
                    await resp.write(chunks.text(text))
                if chunked and watch.sink is None and (text or gen.chat):     # the head is out: the
                    watch.sink = _sink(request.transport, chunks)             # pump writes from here
                continue
            ctx.finish = req.finish_reason
            err = self._failure(req, watch)
            if err is not None:
                out = (chunks.text(text) if text else b"") + ChunkWriter.error(err)
            else:
                out = chunks.text(text, finish_reason=req.finish_reason)
                if gen.include_usage:
                    out += chunks.usage(len(req.prompt_ids), len(req.output_ids))
                out += ChunkWriter.DONE
            await resp.write(out)
            return resp


STREAM_BUFFER_LIMIT = 256 << 10     # bytes queued for a slow client before its text waits in the pump


def _sink(transport, chunks: ChunkWriter):
    """Write a stream's text as HTTP/1.1 chunks straight to its transport (aiohttp has sent the
    head and frames the end): per token, one json.dumps and one send, no task switch."""
    def write(text: str) -> bool:
        if transport is None or transport.is_closing() or transport.get_write_buffer_size() > STREAM_BUFFER_LIMIT:
            return False
        data = chunks.text(text)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True
    return write


def _json_response(status: int, payload: dict, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=json.dumps(payload).encode(), content_type="application/json",
                        headers=headers)


def default_api_keys() -> tuple:
    """API keys from PREFIX_KERNELS_API_KEY (comma-separated)."""
    return tuple(k.strip() for k in os.environ.get("PREFIX_KERNELS_API_KEY", "").split(",") if k.strip())


__all__ = ["Server", "ServerConfig", "default_api_keys", "is_loopback"]
