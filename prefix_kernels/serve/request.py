"""A request in flight, its result, and the errors a submission can raise."""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Iterator


class UnknownPrefix(KeyError):
    def __init__(self, name, known):
        self.name, self.known = name, list(known)
        super().__init__(name)

    def __str__(self):
        return f"no prefix named {self.name!r}; this server has {self.known}"


class PromptTooLong(ValueError):
    """A prompt of `length` tokens where the engine takes at most `limit`; `bound` names the
    engine's setting behind the limit: "max_seq_len" (prompt + output, a decoder-only engine) or
    "max_source_len" (the encoder's input, an encoder-decoder engine)."""

    def __init__(self, length, limit, bound: str = "max_seq_len"):
        self.length, self.limit, self.bound = length, limit, bound
        what = (f"max_seq_len is {limit + 1} (prompt + output)" if bound == "max_seq_len"
                else f"{bound} is {limit} (the encoder's input)")
        super().__init__(f"the prompt has {length} tokens but the engine's {what}; use at most {limit} "
                         "prompt tokens")


class QueueFull(RuntimeError):
    def __init__(self, size):
        super().__init__(f"the request queue is full ({size} waiting); retry later")


class EngineClosed(RuntimeError):
    def __init__(self):
        super().__init__("the engine is shutting down")


@dataclass
class Completion:
    id: str
    prefix: str
    text: str
    token_ids: list[int]
    finish_reason: str          # "stop", "length", "cancelled", "abort" or "error"
    prompt_tokens: int
    error: str | None = None
    ttft: float | None = None   # seconds from submit to the first token (None: no token came)


class Request:
    """Handle of a submitted request: wait for its result, stream its text, cancel it."""

    def __init__(self, id, prompt_ids, prefix, row, params, detok, stream, wake):
        self.id, self.prompt_ids, self.prefix, self.row = id, prompt_ids, prefix, row
        self.params, self.detok, self.stream = params, detok, stream
        self.slot = None
        self.prefilled = 0                  # prompt tokens in the KV cache
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.output_ids: list[int] = []
        self.finish_reason = None
        self.error = None
        self.cancelled = False
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._wake = wake

    @property
    def done(self) -> bool:
        """Whether the request has finished (any reason)."""
        return self._done.is_set()

    @property
    def ttft(self) -> float | None:
        """Time to first token: seconds from submit to the first generated token, or None."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def text(self) -> str:
        """The text generated so far (stop strings cut off)."""
        return self.detok.text if self.detok is not None else ""

    def cancel(self) -> None:
        """Stop generating; the slot is freed at the next step boundary."""
        self.cancelled = True
        with self._wake:
            self._wake.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finishes or timeout seconds pass; whether it finished."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> Completion:
        """The finished Completion (blocks; TimeoutError after timeout seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return Completion(self.id, self.prefix, self.text, list(self.output_ids), self.finish_reason,
                          len(self.prompt_ids), self.error, self.ttft)

    def events(self, timeout: float | None = None) -> Iterator[tuple[str, int | None]]:
        """Yield (text delta, token id or None) while streaming; ends when the request does.

        Needs submit(..., stream=True). Raises TimeoutError if nothing arrives within timeout.
        """
        while True:
            try:
                kind, text, token = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no token within {timeout} s") from None
            if kind == "done":
                if text:
                    yield text, None
                return
            yield text, token

    def poll(self, timeout: float) -> tuple[str, str, int | None] | None:
        """The next stream event ("delta" | "done", text, token id or None), or None after timeout."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- called by the engine ------------------------------------------------------------------

    def mark_token(self) -> None:
        """A token was generated (the first one sets the time to first token)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()

    def push_delta(self, text: str, token: int) -> None:
        """Engine side: hand a streamed text delta (and its token) to the reader."""
        self._events.put(("delta", text, token))

    def finish(self, reason: str, error: str | None = None) -> None:
        """Engine side: end the request (a finish_reason of Completion) and wake its readers."""
        self.finish_reason, self.error = reason, error
        try:
            tail = self.detok.delta(True) if self.detok is not None else ""
        except Exception as e:          # a tokenizer that cannot decode an id: this request fails alone
            tail = ""
            self.finish_reason, self.error = "error", f"{type(e).__name__}: {e}"
        self._events.put(("done", tail, None))
        self._done.set()
