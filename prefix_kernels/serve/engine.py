"""The serving engine: continuous batching of requests, each with its own prefix from the bank.

    engine = Engine(model, {"support": "adapters/support", "legal": "adapters/legal"}, tokenizer=tok)
    engine.start()                                  # a scheduler thread; or drive engine.step()
    req = engine.submit("Hello", prefix="legal", params=SamplingParams(temperature=0, max_tokens=32))
    print(req.result().text)

One step: retire cancelled requests, admit queued ones into free slots and prefill them (eagerly,
right-padded, a few thousand tokens per forward), then one decode step for every occupied slot.
The decode step runs slots 0..B-1 with B the next power of two over the highest occupied slot,
and on CUDA it is a captured CUDA graph per B (static inputs: last tokens, positions, lengths,
bank rows). Sampling runs on the device for the whole batch; stop strings, EOS and max_tokens
are checked on the host, one sync per step.

The bank has a fixed capacity (max_prefixes rows, one allocation, so captured graphs keep
reading the right memory): adding a prefix writes a free row; removing one hides its name at
once and frees its row when no queued or running request uses it.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
from collections import deque

import numpy as np
import torch

from ..bank import PrefixBank, peft_flat_to_bank, read_peft_prefix
from ..integrations import transformers as hf
from .cache import StaticKVCache
from .graphs import GraphCache
from .request import Completion, EngineClosed, PromptTooLong, QueueFull, Request, UnknownPrefix
from .sampling import SamplingParams, sample
from .step import SAMPLING, engine_step, sampling_variant
from .text import Detokenizer, Tokenizer

log = logging.getLogger("prefix_kernels.serve")

POS, SEQLEN, ROW, STEP = range(4)      # rows of the per-slot integer inputs
_FREE = "<free>"


def _wants_logits_to_keep(model) -> bool:
    import inspect
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class Engine:
    """Serve a causal LM with many prefixes at once.

    Args:
        model: a transformers causal LM of a supported family, patched or not. The engine owns it
            from here on: it (re)patches it with a bank of `max_prefixes` rows.
        prefixes: the prefixes to start with: a PrefixBank (every entry), a dict name -> adapter
            folder (PEFT format) or tensor [L, 2, Hkv, P, D], or None for the patched model's bank.
        tokenizer: a transformers tokenizer or a ByteTokenizer; None = token ids in and out only.
        max_batch: concurrent requests (KV-cache slots). max_seq_len: prompt + output tokens.
        max_prefixes: bank capacity. queue_size: waiting requests before submit raises QueueFull.
        prefill_tokens: padded prompt tokens per prefill forward.
        cuda_graphs: capture the decode step (default: on CUDA). backend: the decode kernel's.
        decode_step: "auto" (the compiled step of serve/step.py on CUDA for the families it
            covers, else the model's own modules, said once), "compiled", "eager" (the model's
            modules), or a step.StepOptions. Either way one CUDA graph per batch bucket and
            sampling variant holds the whole step, sampling and the token feedback included.
    """

    def __init__(self, model, prefixes=None, *, tokenizer=None, max_batch: int = 32, max_seq_len: int = 1024,
                 max_prefixes: int = 64, queue_size: int = 256, prefill_tokens: int = 8192,
                 cuda_graphs: bool | None = None, backend: str = "auto", decode_step="auto"):
        self.model = model.eval()
        offset, source = None, prefixes
        patched = hf.get_prefix_bank(model) if hf.is_patched(model) else None
        if patched is not None:           # re-patched below with a bank of fixed capacity
            offset = hf.position_offset(model)
            source = patched if source is None else source
            hf.unpatch_model(model)
        entries = _entries(source)
        if not entries:
            raise ValueError("the engine needs at least one prefix: pass prefixes={name: adapter folder or tensor}")
        prefix_len = next(iter(entries.values()))[0]
        self.max_batch, self.max_seq_len, self.queue_size = int(max_batch), int(max_seq_len), int(queue_size)
        self.prefill_tokens = max(int(prefill_tokens), self.max_seq_len)
        capacity = max(int(max_prefixes), len(entries))
        hf.patch_model(model, prefix_len, init="zeros", names=[f"{_FREE}{i}" for i in range(capacity)],
                       position_offset=offset, backend=backend)
        self.bank: PrefixBank = hf.get_prefix_bank(model)
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.bank.requires_grad_(False).to(self.dtype)
        self.offset = hf.position_offset(model)
        try:
            self._check_geometry(model.config)
        except ValueError:
            hf.unpatch_model(model)
            raise

        bank = self.bank
        self.cache = StaticKVCache(bank.num_layers, self.max_batch, bank.num_kv_heads, self.max_seq_len,
                                   bank.head_dim, num_q_heads=model.config.num_attention_heads,
                                   dtype=self.dtype, device=self.device, backend=backend)
        hf.set_attention_hook(model, self.cache)
        self.decode_step = engine_step(decode_step, model, self.cache, self.bank, offset=self.offset,
                                       backend=backend)
        self.tokenizer = None if tokenizer is None else Tokenizer(
            tokenizer, _eos_ids(getattr(model, "generation_config", None)))
        self.vocab_size = model.config.vocab_size
        self._logits_to_keep = _wants_logits_to_keep(model)

        # lock order: _lock -> _cv -> _rows_lock
        self._lock = threading.RLock()           # one step, or one bank change, at a time
        self._cv = threading.Condition()         # guards _waiting; wakes the scheduler
        self._rows_lock = threading.Lock()       # bank rows and their users
        # bank rows: name -> row, free rows, users per row, rows waiting to be freed
        self._rows: dict[str, int] = {}
        self._free_rows = list(range(capacity))
        self._users = [0] * capacity
        self._removed: set[int] = set()
        for name, (_, value) in entries.items():
            self._install(name, value)

        # slots and their per-step inputs: the host's copy (numpy) and the device's, read by the graphs
        n = self.max_batch
        self._slots: list[Request | None] = [None] * n
        self._free_slots = list(range(n))
        pin = self.device.type == "cuda"
        self._h = np.zeros((4, n), dtype=np.int64)           # per slot: POS, SEQLEN, ROW, STEP
        self._h[SEQLEN] = 1
        self._live = np.zeros(n, dtype=np.int64)             # 1 = slot occupied
        # two pinned buffers each way, alternating: a step's copies finish before its buffer's reuse
        self._h_bufs = [torch.zeros(4, n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._tok_bufs = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self._pending = None                                 # the decode step in flight
        self._ints = torch.tensor(self._h, device=self.device)   # a copy: the device inputs
        self.cache.positions, self.cache.seqlens = self._ints[POS], self._ints[SEQLEN]
        self._tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self._ones = torch.ones(n, 1, dtype=torch.long, device=self.device)
        self._temperature = torch.zeros(n, device=self.device)
        self._top_p = torch.ones(n, device=self.device)
        self._top_k = torch.zeros(n, dtype=torch.long, device=self.device)
        self._seeds = torch.zeros(n, dtype=torch.long, device=self.device)

        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        self._graphs = GraphCache(self.device) if self.cuda_graphs else None
        self.buckets = sorted({min(1 << i, n) for i in range(n.bit_length() + 1)})

        self._waiting: deque[Request] = deque()
        self._ids = itertools.count()
        self._thread = None
        self._closed = False
        self.steps = 0

    # -- construction checks -----------------------------------------------------------------

    def _check_geometry(self, config):
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and self.max_seq_len + self.bank.prefix_len > window:
            raise ValueError(f"{config.model_type} has a sliding window of {window} keys but max_seq_len="
                             f"{self.max_seq_len} + {self.bank.prefix_len} prefix slots exceed it (the kernels "
                             f"have no window): use max_seq_len <= {window - self.bank.prefix_len}")
        if hf.FAMILIES[config.model_type].absolute_positions:
            limit = config.max_position_embeddings
            if self.max_seq_len + self.offset > limit:
                raise ValueError(f"{config.model_type} has {limit} positions; max_seq_len={self.max_seq_len} at "
                                 f"position offset {self.offset} needs {self.max_seq_len + self.offset}: use "
                                 f"max_seq_len <= {limit - self.offset}")

    # -- prefixes ----------------------------------------------------------------------------

    @property
    def prefixes(self) -> list[str]:
        return sorted(self._rows)

    def add_prefix(self, name: str, prefix) -> None:
        """Add (or replace) a prefix while serving: an adapter folder or a tensor [L, 2, Hkv, P, D].

        Replacing a name gives new requests the new prefix; requests in flight keep the old one.
        """
        _, value = _entry(prefix)
        with self._lock:
            self._install(str(name), value, replace=True)

    def remove_prefix(self, name: str) -> None:
        """Stop serving a prefix: new requests for it fail at once, running ones finish."""
        with self._lock, self._rows_lock:
            if name not in self._rows:
                raise UnknownPrefix(name, self.prefixes)
            self._retire_row(self._rows.pop(name))

    def _install(self, name, value, replace=False):
        bank = self.bank
        if name in self._rows and not replace:
            raise ValueError(f"a prefix named {name!r} is already served")
        if not self._free_rows:
            raise ValueError(f"the prefix bank is full ({bank.num_entries} prefixes, max_prefixes): remove one first")
        if isinstance(value, str):
            config, flat = read_peft_prefix(value)
            if config["num_virtual_tokens"] != bank.prefix_len or flat.shape[1] != bank.num_layers * 2 * bank.token_dim:
                raise ValueError(f"adapter {value!r} ({config['num_virtual_tokens']} virtual tokens, "
                                 f"{config['num_layers']} layers, token_dim {config['token_dim']}) does not fit this "
                                 f"bank ({bank.prefix_len} tokens, {bank.num_layers} layers, token_dim {bank.token_dim})")
            value = peft_flat_to_bank(flat, bank.num_layers, bank.num_kv_heads, bank.head_dim)
        with self._rows_lock:
            row = heapq.heappop(self._free_rows)
        try:
            bank.set_entry(row, value)          # in place: captured graphs read the same storage
        except Exception:
            with self._rows_lock:
                heapq.heappush(self._free_rows, row)
            raise
        with self._rows_lock:
            bank.names[row] = name
            old = self._rows.get(name)
            self._rows[name] = row
            if old is not None:
                self._retire_row(old)

    def _retire_row(self, row):
        self._removed.add(row)
        self._release_row(row, 0)

    def _release_row(self, row, users):
        self._users[row] -= users
        if row in self._removed and self._users[row] == 0:
            self._removed.discard(row)
            self.bank.names[row] = f"{_FREE}{row}"
            heapq.heappush(self._free_rows, row)

    # -- submission ----------------------------------------------------------------------------

    def submit(self, prompt, prefix: str, params: SamplingParams | None = None, *, stream: bool = False) -> Request:
        """Queue a request: `prompt` is text (needs a tokenizer) or a list of token ids.

        Raises UnknownPrefix, PromptTooLong, QueueFull, EngineClosed or ValueError; never blocks.
        """
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: pass tokenizer=... or token ids")
            prompt = self.tokenizer.encode(prompt)
        return self._submit_ids(list(prompt), prefix, params, stream)

    def submit_chat(self, messages, prefix: str, params: SamplingParams | None = None, *, stream=False) -> Request:
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer")
        return self._submit_ids(self.tokenizer.encode_chat(messages), prefix, params or SamplingParams(), stream)

    def _submit_ids(self, ids, prefix, params, stream):
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {self.vocab_size}")
        if len(ids) >= self.max_seq_len:
            raise PromptTooLong(len(ids), self.max_seq_len)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        with self._cv:
            if self._closed:
                raise EngineClosed()
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(self.queue_size)
            with self._rows_lock:
                row = self._rows.get(str(prefix))
                if row is None:
                    raise UnknownPrefix(prefix, self.prefixes)
                self._users[row] += 1
            detok = None if self.tokenizer is None else Detokenizer(self.tokenizer, ids, params.stop)
            req = Request(f"cmpl-{next(self._ids)}", ids, str(prefix), row, params, detok, stream, self._cv)
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def generate(self, prompts, prefixes, params: SamplingParams | None = None) -> list[Completion]:
        """Submit every prompt (one prefix name, or one per prompt) and wait for all of them."""
        if isinstance(prefixes, str):
            prefixes = [prefixes] * len(prompts)
        reqs = [self.submit(p, prefix, params) for p, prefix in zip(prompts, prefixes, strict=True)]
        if self._thread is None:
            while not all(r.done for r in reqs):
                self.step()
        return [r.result() for r in reqs]

    # -- the scheduler -------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        return sum(r is not None for r in self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._waiting) or self.num_active > 0 or self._pending is not None

    def start(self) -> "Engine":
        """Run the scheduler on a background thread (idle when there is nothing to do)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="prefix-kernels-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Stop the scheduler; queued and running requests finish with finish_reason 'abort'."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._lock:
            for req in list(self._waiting) + [r for r in self._slots if r is not None]:
                self._finish(req, "abort")
            self._waiting.clear()

    def _loop(self):
        while True:
            with self._cv:
                while not self._closed and not self.has_work():
                    self._cv.wait(0.5)
                if self._closed:
                    return
            try:
                self.step()
            except Exception as e:       # a failed step fails its requests, never the server
                log.exception("engine step failed")
                with self._lock:
                    self._pending = None
                    for req in [r for r in self._slots if r is not None]:
                        self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    @torch.no_grad()
    def step(self) -> None:
        """One scheduler iteration: retire cancelled, admit + prefill, launch a decode step, then
        take the previous step's tokens.

        The host reads step t's tokens while the device runs step t+1 (launched as if no row
        finished at t; a row that did finish computes one step more, whose token is dropped), so
        the host's bookkeeping hides behind the device's work.
        """
        with self._lock:
            for req in self._slots:
                if req is not None and req.cancelled:
                    self._finish(req, "cancelled")
            admitted = self._admit()
            if admitted:
                size = max(1, self.prefill_tokens // max(len(r.prompt_ids) for r in admitted))
                for i in range(0, len(admitted), size):
                    self._prefill(admitted[i:i + size])
            pending, self._pending = self._pending, None
            if self.num_active:
                self._pending = self._launch()
            if pending is not None:
                self._collect(*pending)
            self.steps += 1

    def _admit(self) -> list[Request]:
        admitted = []
        with self._cv:
            while self._waiting and self._free_slots:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._finish(req, "cancelled")
                    continue
                req.slot = heapq.heappop(self._free_slots)
                self._slots[req.slot] = req
                self._live[req.slot] = 1
                admitted.append(req)
        return admitted

    def _prefill(self, reqs: list[Request]) -> None:
        n, longest = len(reqs), max(len(r.prompt_ids) for r in reqs)
        ids = torch.zeros(n, longest, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        slots = torch.tensor([r.slot for r in reqs])
        rows = torch.tensor([r.row for r in reqs])
        ends = [len(r.prompt_ids) - 1 for r in reqs]
        kwargs = {}
        if self._logits_to_keep:
            keep = sorted(set(ends))
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
            ends = [keep.index(e) for e in ends]
        for r in reqs:
            self._h[:, r.slot] = (len(r.prompt_ids), len(r.prompt_ids) + 1, r.row, 0)
        dev_slots = slots.to(self.device)
        self._temperature[dev_slots] = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32,
                                                    device=self.device)
        self._top_p[dev_slots] = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=self.device)
        self._top_k[dev_slots] = torch.tensor([r.params.top_k for r in reqs], device=self.device)
        self._seeds[dev_slots] = torch.tensor([r.params.seed for r in reqs], device=self.device)
        self.cache.mode, self.cache.prefill_slots = "prefill", dev_slots
        try:
            out = self.model(input_ids=ids.to(self.device), position_ids=torch.arange(longest, device=self.device)
                             .expand(n, longest), use_cache=False, prefix_ids=rows.to(self.device), **kwargs)
        finally:
            self.cache.mode = None
        logits = out.logits[torch.arange(n, device=self.device), torch.tensor(ends, device=self.device)]
        tokens = self._sample(logits, dev_slots, torch.zeros(n, dtype=torch.long, device=self.device), reqs)
        self._tokens[dev_slots, 0] = tokens
        self._h[STEP, slots.numpy()] = 1
        for req, token in zip(reqs, tokens.tolist()):
            self._append(req, token)

    def _launch(self):
        """Enqueue one decode step of every occupied slot; returns what _collect needs."""
        occupied = [s for s, r in enumerate(self._slots) if r is not None]
        batch = next(b for b in self.buckets if b > occupied[-1])
        self._flip ^= 1
        h_buf, tok_buf = self._h_bufs[self._flip], self._tok_bufs[self._flip]
        h = h_buf.numpy()
        h[:] = self._h
        # a row that finished at the step in flight may be one past the cache: keep its
        # (discarded) step inside the buffers
        np.minimum(h[POS], self.max_seq_len - 1, out=h[POS])
        np.minimum(h[SEQLEN], self.max_seq_len, out=h[SEQLEN])
        self._ints.copy_(h_buf, non_blocking=True)
        reqs = [self._slots[s] for s in occupied]
        tokens = self._decode(batch, sampling_variant(r.params for r in reqs))
        tok_buf[:batch].copy_(tokens, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._h[POS] += self._live
        self._h[SEQLEN] += self._live
        self._h[STEP] += self._live
        return event, tok_buf, reqs, occupied

    def _collect(self, event, tok_buf, reqs, slots) -> None:
        """Hand out a launched step's tokens (the step's one wait on the device)."""
        if event is not None:
            event.synchronize()
        tokens = tok_buf.tolist()
        for req, slot in zip(reqs, slots):
            if not req.done:                 # finished or cancelled since the launch: dropped
                self._append(req, tokens[slot])

    def _sample(self, logits, slots, steps, reqs):
        any_sampled = any(r.params.temperature > 0 for r in reqs)
        any_filtered = any_sampled and any(r.params.top_k > 0 or r.params.top_p < 1 for r in reqs)
        return sample(logits, self._temperature[slots], self._top_k[slots], self._top_p[slots],
                      self._seeds[slots], steps, any_sampled=any_sampled, any_filtered=any_filtered)

    # -- the decode forward: eager or a CUDA graph per batch size ----------------------------

    def _forward_decode(self, batch: int) -> torch.Tensor:
        self.cache.mode = "decode"
        try:
            out = self.model(input_ids=self._tokens[:batch], position_ids=self._ints[POS, :batch, None],
                             attention_mask=self._ones[:batch], use_cache=False,
                             prefix_ids=self._ints[ROW, :batch])
        finally:
            self.cache.mode = None
        return out.logits[:, -1]

    def _decode_fn(self, batch: int, sampling: str):
        """One decode step of slots 0..batch-1 as a function of the engine's input buffers: the
        next tokens [batch], also written into the token buffer the next step reads."""
        tokens = self._tokens[:batch, 0]
        if self.decode_step is not None:
            ints = self._ints
            return lambda: self.decode_step(
                tokens, ints[POS, :batch], ints[SEQLEN, :batch], ints[ROW, :batch], self._temperature[:batch],
                self._top_k[:batch], self._top_p[:batch], self._seeds[:batch], ints[STEP, :batch], out=tokens,
                sampling=sampling)

        def eager():
            logits = self._forward_decode(batch)
            new = sample(logits, self._temperature[:batch], self._top_k[:batch], self._top_p[:batch],
                         self._seeds[:batch], self._ints[STEP, :batch], any_sampled=sampling != "greedy",
                         any_filtered=sampling == "filtered")
            tokens.copy_(new)
            return new
        return eager

    def _decode(self, batch: int, sampling: str) -> torch.Tensor:
        """Run one decode step (replaying its CUDA graph, captured on first use); next tokens."""
        if self._graphs is None:
            return self._decode_fn(batch, sampling)()
        # the warm-ups before capture rewrite each row's K/V at its current position (slots not
        # decoding: their parked one) and the token buffer, which is restored
        return self._graphs.replay((batch, sampling), self._decode_fn(batch, sampling), preserve=[self._tokens])

    @torch.no_grad()
    def warmup(self, batch_sizes=None, sampling=SAMPLING) -> None:
        """Compile the decode step and capture its graphs for these batch sizes (default: every
        bucket, largest first: they share one memory pool) and sampling variants, so the first
        requests do not pay for it."""
        with self._lock:
            if self.num_active:
                raise RuntimeError("warmup() runs before serving, with no request in flight")
            self._ints.copy_(torch.from_numpy(self._h))
            for batch in sorted(batch_sizes or self.buckets, reverse=True):
                for variant in sampling:
                    self._decode(batch, variant)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    # -- per-token bookkeeping -----------------------------------------------------------------

    def _append(self, req: Request, token: int) -> None:
        params = req.params
        req.output_ids.append(token)
        if not params.ignore_eos and self.tokenizer is not None and token in self.tokenizer.eos_token_ids:
            req.output_ids.pop()
            self._finish(req, "stop")
            return
        stopped = req.detok is not None and req.detok.add(token)
        if stopped:
            self._finish(req, "stop")
        elif len(req.output_ids) >= params.max_tokens or len(req.prompt_ids) + len(req.output_ids) > self.max_seq_len:
            # the next step would write this token at position max_seq_len: past the cache
            self._finish(req, "length")
        elif req.stream:
            req.push_delta(req.detok.delta(False) if req.detok else "", token)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        if req.done:
            return
        if req.slot is not None:
            self._slots[req.slot] = None
            heapq.heappush(self._free_slots, req.slot)
            self._h[:, req.slot] = (0, 1, 0, 0)
            self._live[req.slot] = 0
            req.slot = None
        with self._rows_lock:
            self._release_row(req.row, 1)
        req.finish(reason, error)


def _entry(value):
    """(prefix length, value) of a prefix given as an adapter folder or a [L, 2, Hkv, P, D] tensor."""
    if isinstance(value, str):
        config, _ = read_peft_prefix(value)
        return config["num_virtual_tokens"], value
    if isinstance(value, torch.Tensor):
        if value.dim() != 5 or value.shape[1] != 2:
            raise ValueError(f"a prefix tensor must be [layers, 2, kv_heads, prefix_len, head_dim], got "
                             f"{list(value.shape)}")
        return value.shape[3], value
    raise TypeError(f"a prefix is an adapter folder or a tensor, got {type(value).__name__}")


def _entries(source) -> dict:
    if source is None:
        return {}
    if isinstance(source, PrefixBank):
        return {name: (source.prefix_len, source.folded(name)) for name in source.names}
    if isinstance(source, dict):
        out = {str(name): _entry(value) for name, value in source.items()}
        lengths = {p for p, _ in out.values()}
        if len(lengths) > 1:
            raise ValueError(f"every prefix of one engine needs the same length; got {sorted(lengths)}")
        return out
    raise TypeError(f"prefixes must be a PrefixBank or a dict name -> folder/tensor, got {type(source).__name__}")


def _eos_ids(generation_config):
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
