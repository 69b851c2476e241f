"""Text in and out of the engine: tokenizer adapter, incremental detokenization, stop strings."""
from __future__ import annotations

import threading


class ByteTokenizer:
    """UTF-8 bytes as token ids, for the demo model and tests (no files, no downloads).

    Bytes a vocabulary under 256 cannot hold are rejected on encode; ids >= 256 (special tokens,
    such as the demo model's pad 256 and eos 257) are dropped on decode. Its chat template is
    "role: content" lines, then "assistant: ".
    """

    def __init__(self, vocab_size: int = 256, eos_token_id: int | None = None, pad_token_id: int | None = None):
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of text as ids (ValueError for a byte the vocabulary cannot hold)."""
        ids = list(text.encode("utf-8"))
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise ValueError(f"the byte tokenizer of this {self.vocab_size}-token model cannot encode byte "
                             f"{bad[0]} (use ASCII text)")
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of the byte ids (special ids >= 256 dropped, invalid UTF-8 replaced)."""
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        """"role: content" lines, then "assistant: "."""
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class Tokenizer:
    """One interface over a transformers tokenizer or a ByteTokenizer; calls are serialized
    (a fast tokenizer used from several threads at once can fail with 'Already borrowed')."""

    def __init__(self, tokenizer, eos_token_ids=()):
        self.inner = tokenizer
        self._lock = threading.Lock()
        eos = set(eos_token_ids or ())
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(int(tokenizer.eos_token_id))
        self.eos_token_ids = frozenset(eos)
        self.is_bytes = isinstance(tokenizer, ByteTokenizer)
        # a fast tokenizer's own (Rust) decode, which transformers' wrapper only calls (when it does
        # no cleanup of spaces): the wrapper costs 2.3 us a call against 0.4 us (a word-level
        # tokenizer, this dev machine), and the engine's thread detokenizes each row twice a step
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend_decode = None
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", True)
        if backend is not None and hasattr(backend, "decode") and not cleans_up:
            self._backend_decode = backend.decode

    @property
    def has_chat_template(self) -> bool:
        return self.is_bytes or bool(getattr(self.inner, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        with self._lock:
            if self.is_bytes:
                return self.inner.encode(text)
            return list(self.inner(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template: use /v1/completions")
        with self._lock:
            if self.is_bytes:
                return self.inner.encode(self.inner.apply_chat_template(messages))
            text = self.inner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return list(self.inner(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids) -> str:
        with self._lock:
            if self.is_bytes:
                return self.inner.decode(ids)
            if self._backend_decode is not None:
                return self._backend_decode(ids, skip_special_tokens=True)
            return self.inner.decode(ids, skip_special_tokens=True)


class Detokenizer:
    """Incremental text of a growing token list, with stop strings.

    Decodes a short window of recent tokens per step (not the whole output), holds back a
    trailing replacement character (an unfinished UTF-8 sequence) and, with stop strings, the
    last len(longest stop)-1 characters, so streamed text never has to be taken back.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids, stop):
        self.tok, self.stop = tokenizer, list(stop)
        self.ids = list(prompt_ids[-4:])     # context so the first tokens decode with their spacing
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""           # all text so far (stop string cut off once found)
        self.sent = 0            # characters already handed out
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append a token; True when a stop string completed (the text is cut before it)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def _advance(self, final: bool) -> bool:
        if self.stopped:
            return True
        before = self.tok.decode(self.ids[self.prefix_offset:self.read_offset])
        now = self.tok.decode(self.ids[self.prefix_offset:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return False         # an unfinished character: wait for the next token
        start = max(0, len(self.text) - self.hold)
        self.text += now[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        found = [at for at in (self.text.find(s, start) for s in self.stop) if at >= 0]
        if found:
            self.text = self.text[:min(found)]
            self.stopped = True
        return self.stopped

    def delta(self, final: bool) -> str:
        """Text not handed out yet (all of it when final, unfinished characters included)."""
        if final:
            self._advance(final=True)
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


def prompt_token_ids(prompt, tokenizer: "Tokenizer | None") -> list[int]:
    """A prompt as token ids: text through the tokenizer, or a sequence of ids as a list."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... or token ids")
        return tokenizer.encode(prompt)
    return list(prompt)


def chat_token_ids(messages, tokenizer: "Tokenizer | None") -> list[int]:
    """Chat messages [{"role", "content"}] as token ids, through the tokenizer's chat template."""
    if tokenizer is None:
        raise ValueError("chat needs a tokenizer")
    return tokenizer.encode_chat(messages)
