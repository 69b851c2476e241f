"""Carries the engine's output to the event loop without a thread per request.

The engine runs on its own thread and appends tokens to each Request. One task on the event loop
wakes every `interval` seconds while requests are watched, looks at every watched request (a
length compare: ~0.1 us when nothing is new) and wakes only the handlers that have news, handing
each all its new events at once. So the loop wakes about once per engine step, not once per token
per request, never blocks on the engine, and the engine thread never waits on HTTP: a handler
that falls behind gets several tokens in one wake-up and sends them as one chunk.
"""
from __future__ import annotations

import asyncio
import time


class Watch:
    """A request seen from the loop: `await watch.wait()` returns its new stream events
    [(kind, text, token)] ([] for a non-streamed request) once there are any or it is done."""

    __slots__ = ("req", "stream", "deadline", "events", "delivered", "counted", "ready", "first_token_at",
                 "timed_out", "sink", "pending")

    def __init__(self, req, stream: bool, deadline: float):
        self.req, self.stream, self.deadline = req, stream, deadline
        self.events: list = []
        self.delivered = 0           # delta events taken from the request (one per token)
        self.counted = 0             # tokens already reported to the metrics
        self.ready = asyncio.Event()
        self.first_token_at: float | None = None
        self.timed_out = False
        # sink(text) -> bool: writes a streamed request's new text itself, from the pump's tick
        # (no wake-up of its handler per token); False keeps the text pending (slow client)
        self.sink = None
        self.pending = ""

    async def wait(self) -> list:
        await self.ready.wait()
        self.ready.clear()
        events, self.events = self.events, []
        return events


class EventPump:
    def __init__(self, interval: float = 0.001, on_tokens=None):
        self.interval = float(interval)
        self._watches: set[Watch] = set()
        self._wake = asyncio.Event()
        self._on_tokens = on_tokens          # called with the count of new tokens, once per tick
        self._task = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="prefix-kernels-pump")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def watch(self, req, stream: bool, deadline: float = float("inf")) -> Watch:
        """Follow a submitted request; past `deadline` (time.monotonic()) it is cancelled and its
        handler woken with watch.timed_out set."""
        w = Watch(req, stream, deadline)
        self._watches.add(w)
        self._wake.set()
        return w

    def unwatch(self, w: Watch) -> None:
        self._watches.discard(w)
        new = self._count(w)
        if new and self._on_tokens is not None:
            self._on_tokens(new)

    def _count(self, w: Watch) -> int:
        n = len(w.req.output_ids)
        new = n - w.counted
        if new > 0:
            w.counted = n
            if w.first_token_at is None:
                w.first_token_at = time.monotonic()
            return new
        return 0

    async def _run(self) -> None:
        while True:
            if not self._watches:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.interval)
            self.tick()

    def tick(self) -> None:
        new_tokens = 0
        now = time.monotonic()
        for w in list(self._watches):
            req = w.req
            done = req.done
            new_tokens += self._count(w)
            if now > w.deadline and not done and not w.timed_out:
                w.timed_out = True
                req.cancel()
                w.ready.set()
                continue
            if w.stream and (done or len(req.output_ids) > w.delivered):
                # as many polls as there are new tokens (a token appended but not yet pushed is
                # found at the next tick), and to the end once done
                expected = len(req.output_ids) - w.delivered
                sink = w.sink
                while expected > 0 or done:
                    event = req.poll(0)
                    if event is None:
                        break
                    if event[0] != "delta":
                        w.events.append(event)
                        break
                    w.delivered += 1
                    expected -= 1
                    if sink is None:
                        w.events.append(event)
                    elif event[1]:
                        w.pending += event[1]
                if w.events:
                    w.ready.set()           # the handler writes the end, with the pending text
                elif w.pending and sink(w.pending):
                    w.pending = ""
            elif done:
                w.ready.set()
        if new_tokens and self._on_tokens is not None:
            self._on_tokens(new_tokens)
