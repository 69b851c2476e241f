"""The engine in a process of its own, so that the HTTP front never shares a GIL with the scheduler.

    engine = EngineProcess(build_engine, *args)   # spawns a process that runs build_engine(*args)
    server = Server(engine, port=0).start()       # the same Server: EngineProcess looks like an Engine
    ...
    server.close()                                # closes the engine process too

Why (`prefix-kernels serve` runs it by default): on an H100 the engine's eager prefill forwards ran
about twice as long while the server's event loop shared the process (8.5-11.3 against 4.1-6.9 ms
of prefill per request; benchmarks/NOTES.md, sixth session): a forward is ~870 launches of Python,
and any other thread that wants the GIL stretches it. In two processes the HTTP rows of bench
serve ran at 1.007x / 1.060x the engine's own tokens/s at 32 / 64 clients, against 0.864x / 0.873x
in one (`results/serve-h100.json`, `serve-inprocess-h100.json`). vLLM splits its API server and
its engine core into two processes for the same reason.

The child process builds the engine, then loops: take the front's commands (submit, cancel, a
call), run one engine step, send what every request got in that step (new token ids, the new
text, the end) as one message. The front tokenizes and checks each request as Engine.submit does
(the same errors, raised at once), and hands out RemoteRequests that behave as Requests: the
server's pump reads them unchanged. The child's requests are not streamed (no queue per token
there): the text each step adds is read from its detokenizer, which streams exactly that text.
If the child dies, every request in flight fails and submit raises EngineClosed. The child
ignores SIGINT and SIGTERM (a terminal's Ctrl-C reaches the whole process group): the front
drains first, then closes it; if the front dies, the child sees its pipe close and exits.
"""
from __future__ import annotations

import itertools
import logging
import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass

from .request import EngineClosed, QueueFull, Request, UnknownPrefix
from .rows import BankFull
from .sampling import SamplingParams
from .text import Tokenizer, chat_token_ids, prompt_token_ids
from .validation import check_request

log = logging.getLogger("prefix_kernels.serve")

START_TIMEOUT_S = 1800.0       # building and warming a compiled engine takes minutes
CALL_TIMEOUT_S = 600.0


class RemoteRequest(Request):
    """A Request whose tokens come from the engine process (see Request for the interface)."""

    def __init__(self, owner: "EngineProcess", id, prompt_ids, prefix, params, stream):
        super().__init__(id, prompt_ids, prefix, None, params, None, stream, threading.Condition())
        self._owner = owner
        self._text = ""

    @property
    def text(self) -> str:
        return self._text

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            super().cancel()
            self._owner._send(("cancel", self.id))

    # -- called by the front's reader thread ---------------------------------------------------

    def _add(self, token_ids, text: str) -> None:
        """New tokens and the text they free (text comes with tokens only: held-back text is
        freed by a later token, or at the end)."""
        for i, token in enumerate(token_ids):
            self.mark_token()
            self.output_ids.append(token)
            if self.stream:
                self.push_delta(text if i == 0 else "", token)
        self._text += text

    def _end(self, reason: str, error: str | None, text: str) -> None:
        tail = text[len(self._text):] if text.startswith(self._text) else ""
        self._text = text
        self.finish_reason, self.error = reason, error
        self._events.put(("done", tail, None))
        self._done.set()


@dataclass
class _Live:
    """A request in the child: the engine's Request and what the front has of it."""
    req: Request
    sent: int = 0


def _error_payload(e: BaseException):
    if isinstance(e, UnknownPrefix):
        return ("UnknownPrefix", str(e), (e.name, e.known))
    return (type(e).__name__, str(e), None)


_ERRORS = {"BankFull": BankFull, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
           "TypeError": TypeError, "KeyError": KeyError}


def _raise_payload(payload):
    name, message, extra = payload
    if name == "UnknownPrefix":
        raise UnknownPrefix(*extra)
    cls = _ERRORS.get(name)
    if cls is None:
        raise RuntimeError(f"{name} in the engine process: {message}")
    raise cls(message)


def _counters(engine) -> tuple:
    return engine.steps, engine.prefill_forwards, engine.prefill_seconds


def _child_main(factory, args, kwargs, commands, updates) -> None:
    """The engine process: build the engine, then commands, a step, the step's news; repeat."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    try:
        engine = factory(*args, **kwargs)
        tok = engine.tokenizer
        info = {"prefixes": engine.prefixes, "max_batch": engine.max_batch, "max_seq_len": engine.max_seq_len,
                "max_prompt_len": engine.max_prompt_len, "prompt_bound": engine.prompt_bound,
                "vocab_size": engine.vocab_size, "queue_size": engine.queue_size,
                "tokenizer": None if tok is None else tok.inner, "eos": sorted(engine.eos_token_ids)}
        updates.send(("ready", info))
    except BaseException as e:
        updates.send(("failed", f"{type(e).__name__}: {e}"))
        return
    live: dict[str, _Live] = {}
    while True:
        idle = not engine.has_work()
        while commands.poll(0.2 if idle else 0):
            idle = False
            try:
                msg = commands.recv()
            except EOFError:           # the front is gone
                engine.close()
                return
            kind = msg[0]
            if kind == "submit":
                _, rid, ids, prefix, params = msg
                try:
                    live[rid] = _Live(engine.submit(ids, prefix, params))
                except Exception as e:
                    updates.send(("news", [(rid, [], "", ("error", f"{type(e).__name__}: {e}", ""))],
                                  _counters(engine)))
            elif kind == "cancel":
                item = live.get(msg[1])
                if item is not None:
                    item.req.cancel()
            elif kind == "call":
                _, cid, fn, fargs = msg
                try:
                    result = ("ok", fn(engine, *fargs))
                except Exception as e:
                    result = ("error", _error_payload(e))
                updates.send(("reply", cid, result, engine.prefixes, _counters(engine)))
            elif kind == "close":
                engine.close()
                _send_news(live, updates, engine)
                updates.send(("closed",))
                return
        if engine.has_work():
            try:
                engine.step()
            except Exception as e:     # Engine._loop's rule: a failed step fails its requests
                log.exception("engine step failed")
                engine.fail_running(e)
        _send_news(live, updates, engine)


def _send_news(live, updates, engine) -> None:
    news = []
    for rid, item in list(live.items()):
        req = item.req
        n = len(req.output_ids)
        if n == item.sent and not req.done:
            continue
        new = req.output_ids[item.sent:n]
        item.sent = n
        if req.done:
            news.append((rid, new, "", (req.finish_reason, req.error, req.text)))
            del live[rid]
        else:
            news.append((rid, new, req.detok.delta(False) if req.detok is not None else "", None))
    if news:
        updates.send(("news", news, _counters(engine)))


class EngineProcess:
    """An Engine in a spawned process, with the Engine interface the Server uses.

    factory(*args, **kwargs) runs in the child and returns the Engine (warmed up, if wanted);
    both must pickle (a module-level function). The engine's tokenizer comes back to this
    process, which tokenizes prompts and checks requests before they are sent.
    """

    def __init__(self, factory, *args, start_timeout: float = START_TIMEOUT_S, **kwargs):
        ctx = multiprocessing.get_context("spawn")     # CUDA cannot be forked
        child_commands, self._commands = ctx.Pipe(duplex=False)
        self._updates, child_updates = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, args=(factory, args, kwargs, child_commands, child_updates),
                                 name="prefix-kernels-engine", daemon=True)
        self._proc.start()
        child_commands.close()
        child_updates.close()
        if not self._updates.poll(start_timeout):
            self._proc.terminate()
            raise RuntimeError(f"the engine process did not start within {start_timeout:g} s")
        msg = self._updates.recv()
        if msg[0] != "ready":
            self._proc.join(5)
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        info = msg[1]
        self.max_batch, self.max_seq_len = info["max_batch"], info["max_seq_len"]
        self.max_prompt_len, self.prompt_bound = info["max_prompt_len"], info["prompt_bound"]
        self.vocab_size, self.queue_size = info["vocab_size"], info["queue_size"]
        self._prefixes = list(info["prefixes"])
        eos = frozenset(info["eos"])
        self.tokenizer = None if info["tokenizer"] is None else Tokenizer(info["tokenizer"], eos)
        self._eos = eos
        self.steps = self.prefill_forwards = 0
        self.prefill_seconds = 0.0
        self._lock = threading.Lock()            # the tables below (never held while sending)
        self._requests: dict[str, RemoteRequest] = {}
        self._calls: dict[int, list] = {}        # call id -> [threading.Event, result]
        self._ids = itertools.count()
        self._closed = self._closing = False
        # commands go out through a queue and a thread of their own: a pipe's send blocks once its
        # buffer (64 KiB) is full, which a burst of long prompts fills while the child runs a
        # prefill forward, and the event loop must never wait on the engine
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="prefix-kernels-engine-sender", daemon=True)
        self._sender.start()
        self._reader = threading.Thread(target=self._read, name="prefix-kernels-engine-reader", daemon=True)
        self._reader.start()

    # -- the Engine interface ------------------------------------------------------------------

    @property
    def prefixes(self) -> list[str]:
        return list(self._prefixes)

    @property
    def eos_token_ids(self) -> frozenset:
        return self.tokenizer.eos_token_ids if self.tokenizer is not None else self._eos

    @property
    def num_active(self) -> int:
        return min(len(self._requests), self.max_batch)

    @property
    def num_waiting(self) -> int:
        return max(len(self._requests) - self.max_batch, 0)

    @property
    def alive(self) -> bool:
        """Whether the engine process takes requests (not closed, not closing, not dead)."""
        return not (self._closed or self._closing) and self._proc.is_alive()

    def start(self) -> "EngineProcess":
        return self           # the child runs its scheduler from the start

    def submit(self, prompt, prefix: str, params: SamplingParams | None = None, *, stream: bool = False):
        """As Engine.submit (the same errors, raised here); never blocks on the engine."""
        return self._submit_ids(prompt_token_ids(prompt, self.tokenizer), prefix, params or SamplingParams(), stream)

    def submit_chat(self, messages, prefix: str, params: SamplingParams | None = None, *, stream: bool = False):
        return self._submit_ids(chat_token_ids(messages, self.tokenizer), prefix, params or SamplingParams(), stream)

    def _submit_ids(self, ids, prefix, params, stream):
        check_request(ids, params, self.vocab_size, self.max_prompt_len, self.tokenizer is not None,
                      bound=self.prompt_bound)
        with self._lock:
            if not self.alive:
                raise EngineClosed()
            if str(prefix) not in self._prefixes:
                raise UnknownPrefix(prefix, self._prefixes)
            if len(self._requests) - self.max_batch >= self.queue_size:
                raise QueueFull(self.queue_size)
            req = RemoteRequest(self, f"cmpl-{next(self._ids)}", [int(i) for i in ids], str(prefix), params, stream)
            self._requests[req.id] = req
        self._send(("submit", req.id, req.prompt_ids, req.prefix, params))
        return req

    def _send(self, msg) -> None:
        """Queue a command for the child (never blocks); kept in order."""
        self._outbox.put(msg)

    def _send_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._commands.send(msg)
            except (OSError, ValueError):     # the child is gone: the reader fails the requests
                return

    def call(self, fn, *args, timeout: float = CALL_TIMEOUT_S):
        """fn(engine, *args) in the engine process, between two steps; its result (it must pickle)."""
        with self._lock:
            if not self.alive:
                raise EngineClosed()
            cid = next(self._ids)
            slot = self._calls[cid] = [threading.Event(), None]
        self._send(("call", cid, fn, args))
        if not slot[0].wait(timeout):
            raise TimeoutError(f"the engine process did not answer within {timeout:g} s")
        status, value = slot[1]
        if status == "error":
            _raise_payload(value)
        return value

    def add_prefix(self, name: str, prefix) -> None:
        self.call(_add_prefix, str(name), prefix)

    def remove_prefix(self, name: str) -> None:
        self.call(_remove_prefix, str(name))

    def warmup(self, *args, **kwargs) -> None:
        self.call(_warmup, args, kwargs)

    def close(self, timeout: float = 10.0) -> None:
        """Close the engine (requests in flight end with 'abort') and its process."""
        with self._lock:
            running, self._closing = not self._closed and not self._closing, True
        if running:
            self._send(("close",))
        self._outbox.put(None)                 # the sender stops after the close
        self._reader.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
        self._fail_all("abort", None)

    # -- the reader thread ---------------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                msg = self._updates.recv()
                kind = msg[0]
                if kind == "news":
                    self._apply(msg[1])
                    self.steps, self.prefill_forwards, self.prefill_seconds = msg[2]
                elif kind == "reply":
                    _, cid, result, prefixes, counters = msg
                    self._prefixes = list(prefixes)
                    self.steps, self.prefill_forwards, self.prefill_seconds = counters
                    slot = self._calls.pop(cid, None)
                    if slot is not None:
                        slot[1] = result
                        slot[0].set()
                elif kind == "closed":
                    break
        except (EOFError, OSError):
            code = self._proc.exitcode
            log.error("the engine process exited (code %s): failing the requests in flight", code)
            self._fail_all("error", f"the engine process exited (code {code})")
        finally:
            self._closed = True
            self._fail_all("abort", None)

    def _apply(self, news) -> None:
        for rid, token_ids, text, end in news:
            req = self._requests.get(rid)
            if req is None:
                continue
            if token_ids or text:
                req._add(token_ids, text)
            if end is not None:
                with self._lock:
                    self._requests.pop(rid, None)
                req._end(*end)

    def _fail_all(self, reason: str, error: str | None) -> None:
        with self._lock:
            self._closed = True
            reqs, self._requests = list(self._requests.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        for req in reqs:
            if not req.done:
                req._end(reason, error, req.text)
        for slot in calls:
            slot[1] = ("error", ("RuntimeError", error or "the engine process closed", None))
            slot[0].set()


def _add_prefix(engine, name, prefix):
    engine.add_prefix(name, prefix)


def _remove_prefix(engine, name):
    engine.remove_prefix(name)


def _warmup(engine, args, kwargs):
    engine.warmup(*args, **kwargs)

