"""The OpenAI request bodies this server takes, validated with bounds, and the shapes it answers in.

Everything here is pure (no I/O, no engine): a body goes in, a `Generation` (what to submit) comes
out, or an `ApiError` with the status, message and parameter to report. A field this server does
not implement is a 400 naming it, unless it carries its neutral value (`n: 1`,
`presence_penalty: 0`, `logprobs: null`, ...), which changes nothing and is accepted.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from .sampling import SamplingParams

# The reason phrase of each status an error can carry, and its OpenAI error type.
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
          409: "conflict_error", 413: "invalid_request_error", 414: "invalid_request_error",
          415: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
          501: "not_implemented_error", 503: "service_unavailable_error", 504: "timeout_error"}

MAX_STOP = 16              # stop strings per request
MAX_STOP_CHARS = 256       # characters per stop string
MAX_MESSAGES = 1024        # chat messages per request
ROLES = ("system", "developer", "user", "assistant")


class ApiError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = int(status), message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object; 400 for anything else (bad UTF-8, NaN, integers over
    Python's digit limit, nesting deeper than the parser's recursion limit)."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")
    try:
        body = json.loads(raw, parse_constant=no_constants)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:      # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


@dataclass
class Limits:
    """Bounds on one request, set by the server from its flags and the engine."""
    vocab_size: int
    max_seq_len: int
    max_tokens_cap: int           # max_tokens at most (also the chat default)
    max_prompt_bytes: int         # UTF-8 bytes of the prompt (all messages), checked before tokenizing
    max_prompt_len: int | None = None     # prompt tokens at most (None: max_seq_len - 1)
    default_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)


@dataclass
class Generation:
    """A validated request: what to submit to the engine and how to answer."""
    model: str
    chat: bool
    prompt: str | list[int] | None = None         # completions
    messages: list[dict] | None = None            # chat
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    include_usage: bool = False                   # stream_options.include_usage
    prompt_bytes: int = 0


# -- fields ----------------------------------------------------------------------------------------

_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
           "stream_options", "ignore_eos", "user"}
SUPPORTED = {"completions": _COMMON | {"prompt"},
             "chat": _COMMON | {"messages", "max_completion_tokens"}}


def _neutral_empty(v):
    return v in (None, {}, [], "")


# fields accepted only at the value that means "off"
NEUTRAL = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "repetition_penalty": lambda v: v in (None, 1),
    "logit_bias": _neutral_empty,
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "echo": lambda v: v in (None, False),
    "suffix": _neutral_empty,
    "tools": _neutral_empty,
    "functions": _neutral_empty,
    "tool_choice": lambda v: v in (None, "none"),
    "function_call": lambda v: v in (None, "none"),
    "parallel_tool_calls": lambda v: True,        # meaningless without tools
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": lambda v: v in (None, False),
    "metadata": _neutral_empty,
}


def _check_fields(body: dict, kind: str) -> None:
    supported = SUPPORTED[kind]
    for name, value in body.items():
        if name in supported:
            continue
        if name in NEUTRAL and NEUTRAL[name](value):
            continue
        what = "this value of" if name in NEUTRAL else "the field"
        raise ApiError(400, f"{what} {name!r} is not supported by this server (supported: "
                            f"{', '.join(sorted(supported))}; see the README)", param=name,
                       code="unsupported_parameter")


def _number(body, name, default, low, high, *, integer=False, low_open=False):
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        lo = "(" if low_open else "["
        raise ApiError(400, f"{name!r} must be {kind} in {lo}{low}, {high}], got {json.dumps(value)[:60]}",
                       param=name)
    return value


def _bool(body, name):
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{name!r} must be a boolean, got {json.dumps(value)[:60]}", param=name)
    return value


def _stop(body):
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ApiError(400, f"each 'stop' string has at most {MAX_STOP_CHARS} characters", param="stop")
    return stop


def _model(body):
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256:
        raise ApiError(400, "'model' must name a prefix (GET /v1/models lists them)", param="model")
    return model


def _prompt(body, limits: Limits):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]             # a batch of one
    if isinstance(prompt, str) and prompt:
        size = len(prompt.encode("utf-8", "surrogatepass"))
        if size > limits.max_prompt_bytes:
            raise ApiError(400, f"the prompt has {size} bytes; this server takes at most {limits.max_prompt_bytes}"
                                f" (--max-prompt-bytes)", param="prompt", code="context_length_exceeded")
        return prompt, size
    if isinstance(prompt, list) and prompt:
        most = limits.max_seq_len - 1 if limits.max_prompt_len is None else limits.max_prompt_len
        if len(prompt) > most:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens but this model takes at most {most} prompt "
                                f"tokens (its context is {limits.max_seq_len} tokens of prompt + output, or its "
                                "encoder's input)", param="prompt", code="context_length_exceeded")
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < limits.vocab_size for t in prompt):
            return prompt, 0
        raise ApiError(400, f"token ids in 'prompt' must be integers in [0, {limits.vocab_size})", param="prompt")
    raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
                   param="prompt")


def _content(message, i):
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)      # text parts only: no images or audio
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                   param=f"messages[{i}].content")


def _messages(body, limits: Limits):
    messages = body.get("messages")
    if not (isinstance(messages, list) and messages and len(messages) <= MAX_MESSAGES):
        raise ApiError(400, f"'messages' must be a non-empty list of at most {MAX_MESSAGES} messages",
                       param="messages")
    out, size = [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] must be an object with a role in {list(ROLES)}",
                           param=f"messages[{i}]")
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(400, f"messages[{i}] has fields this server does not support: {sorted(extra)}",
                           param=f"messages[{i}]", code="unsupported_parameter")
        content = _content(m, i)
        size += len(content.encode("utf-8", "surrogatepass"))
        out.append({"role": m["role"], "content": content})
    if size > limits.max_prompt_bytes:
        raise ApiError(400, f"the messages have {size} bytes; this server takes at most {limits.max_prompt_bytes}"
                            f" (--max-prompt-bytes)", param="messages", code="context_length_exceeded")
    return out, size


def parse_generation(body: dict, chat: bool, limits: Limits) -> Generation:
    """Validate a /v1/completions (chat=False) or /v1/chat/completions body."""
    _check_fields(body, "chat" if chat else "completions")
    model = _model(body)
    if chat:
        messages, size = _messages(body, limits)
        prompt = None
    else:
        prompt, size = _prompt(body, limits)
        messages = None
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    default = limits.max_tokens_cap if chat else min(limits.default_max_tokens, limits.max_tokens_cap)
    max_tokens = _number(body, name, default, 1, limits.max_tokens_cap, integer=True)
    top_k = _number(body, "top_k", 0, -1, limits.vocab_size, integer=True)
    seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    params = SamplingParams(
        temperature=float(_number(body, "temperature", 1.0, 0, 2)),
        top_p=float(_number(body, "top_p", 1.0, 0, 1, low_open=True)),
        top_k=max(0, top_k), seed=seed, max_tokens=max_tokens, stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"))
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not (isinstance(options, dict) and set(options) <= {"include_usage"}
                and isinstance(options.get("include_usage", False), bool)):
            raise ApiError(400, "'stream_options' takes only {\"include_usage\": bool}", param="stream_options")
        if not stream:
            raise ApiError(400, "'stream_options' needs 'stream': true", param="stream_options")
        include_usage = options.get("include_usage", False)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, "'user' must be a string", param="user")
    return Generation(model, chat, prompt, messages, params, stream, include_usage, size)


# -- answers ---------------------------------------------------------------------------------------

def completion_body(req_id: str, created: int, model: str, chat: bool, text: str, finish_reason: str,
                    prompt_tokens: int, completion_tokens: int) -> dict:
    choice = {"index": 0, "finish_reason": finish_reason}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice.update(text=text, logprobs=None)
    return {"id": req_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


class ChunkWriter:
    """Server-sent events of one streamed request, built from pre-encoded halves: a token costs
    one json.dumps of its text."""

    def __init__(self, req_id: str, created: int, model: str, chat: bool):
        self.chat = chat
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps({"id": req_id, "object": kind, "created": created, "model": model})[:-1]
        self._head = f'data: {head}, "choices": [{{"index": 0, '
        self._usage_head = f'data: {head}, "choices": [], "usage": '

    def role(self) -> bytes:
        return (self._head + '"delta": {"role": "assistant", "content": ""}, "finish_reason": null}]}\n\n').encode()

    def text(self, text: str, finish_reason: str | None = None) -> bytes:
        finish = "null" if finish_reason is None else json.dumps(finish_reason)
        if self.chat:
            delta = f'{{"content": {json.dumps(text)}}}' if text else "{}"
            return (self._head + f'"delta": {delta}, "finish_reason": {finish}}}]}}\n\n').encode()
        return (self._head + f'"text": {json.dumps(text)}, "logprobs": null, "finish_reason": {finish}}}]}}\n\n'
                ).encode()

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        return (self._usage_head + json.dumps(usage) + "}\n\n").encode()

    @staticmethod
    def error(err: ApiError) -> bytes:
        return b"data: " + json.dumps(err.body()).encode() + b"\n\ndata: [DONE]\n\n"

    DONE = b"data: [DONE]\n\n"
