"""The serving engine: continuous batching of requests, each with its own prefix from the bank.

    engine = Engine(model, {"support": "adapters/support", "legal": "adapters/legal"}, tokenizer=tok)
    engine.start()                                  # a scheduler thread; or drive engine.step()
    req = engine.submit("Hello", prefix="legal", params=SamplingParams(temperature=0, max_tokens=32))
    print(req.result().text)

This file is the scheduler. One step: retire cancelled requests, admit queued ones into free
slots, prefill up to `prefill_chunk` prompt tokens (chunks of one or several prompts, batched per
forward, a long prompt spread over several steps), then one decode step for every slot whose
prompt is in. So a long prompt never stalls the rows that are decoding: they get a token every
step. Its parts: rows.py (which bank row serves which prefix, reference-counted), cache.py (the
KV cache, which only stores), attention.py (the layers' attention over prefix + cache),
prefixes.py (prefixes given as tensors or adapter folders, read once), prefill_plan.py (which
prompt tokens a step prefills, in how many forwards). seq2seq_engine.py runs encoder-decoder
models on this scheduler.

The decode step runs slots 0..B-1 with B the next power of two over the highest decoding slot,
and on CUDA it is a captured CUDA graph per B (static inputs: last tokens, positions, lengths,
bank rows). Slots that are not decoding write their discarded token at the cache's last
position, which no prompt reaches. Sampling runs on the device for the whole batch; stop
strings, EOS and max_tokens are checked on the host, one sync per step.

A request fails alone: its parameters are checked at submit, and a prefill forward that raises
is retried request by request, failing only the request that raises on its own.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque

import numpy as np
import torch

from ..bank import PrefixBank
from ..integrations import transformers as hf
from .attention import CacheAttention
from .cache import KVCache
from .graphs import GraphCache
from .prefill import PrefillStep
from .prefill_plan import Chunk, group_chunks, hold_new_prompts, plan_chunks
from .prefixes import PrefixSource, read_prefix, read_prefixes
from .request import Completion, EngineClosed, QueueFull, Request
from .rows import BankRows, free_names
from .sampling import SamplingParams, sample
from .step import SAMPLING, StepOptions, engine_step, sampling_variant
from .text import Detokenizer, Tokenizer, chat_token_ids, prompt_token_ids
from .validation import check_request

log = logging.getLogger("prefix_kernels.serve")

POS, SEQLEN, ROW, STEP = range(4)      # rows of the per-slot integer inputs


def _wants_logits_to_keep(model) -> bool:
    import inspect
    return "logits_to_keep" in inspect.signature(model.forward).parameters


# prefill_wait="auto" waits as long as a prefill forward costs, never longer than this (seconds)
PREFILL_WAIT_CAP = 0.05


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
        prefill_chunk: prompt tokens prefilled per engine step, over all prompts being prefilled
            (a longer prompt takes several steps, decoding rows go on meanwhile).
        cuda_graphs: capture the decode step (default: on CUDA). backend: the decode kernel's.
        decode_step: "auto" (the compiled step of serve/step.py on CUDA for the families it
            covers, else the model's own modules, said once), "compiled", "eager" (the model's
            modules), or a step.StepOptions. Either way one CUDA graph per batch bucket and
            sampling variant holds the whole step, sampling and the token feedback included.
        compiled_prefill: experimental, off by default: prefill through serve/prefill.py's
            PrefillStep (the decode step's layers over a chunk, compiled with dynamic shapes)
            instead of the model's own modules; needs the hand-fused decode step.
        prefill_wait: experimental, 0 (off) by default: seconds a new prompt may wait for others
            while rows are decoding, or "auto": as long as a prefill forward has lately cost (its
            wall time, a running mean; at most PREFILL_WAIT_CAP). A prefill forward through the
            model's eager modules costs ~20 ms of host time on an H100 whatever its size, and
            stalls every decoding row that long; requests arriving one by one (a server's) would
            each pay it. With a wait, a step starts new prompts only once they hold prefill_chunk / 2
            tokens or the oldest has waited this long (or no row is decoding); prompts already
            begun always go on. Waiting as long as a forward costs at most doubles what the wait
            could save (the ski-rental bound) and adapts to the model and the GPU.
    """

    def __init__(self, model, prefixes=None, *, tokenizer=None, max_batch: int = 32, max_seq_len: int = 1024,
                 max_prefixes: int = 64, queue_size: int = 256, prefill_chunk: int = 2048,
                 cuda_graphs: bool | None = None, backend: str = "auto",
                 decode_step: "str | StepOptions" = "auto", compiled_prefill: bool = False,
                 prefill_wait: "float | str" = 0.0):
        for name, value, low in (("max_batch", max_batch, 1), ("max_seq_len", max_seq_len, 2),
                                 ("max_prefixes", max_prefixes, 1), ("queue_size", queue_size, 1),
                                 ("prefill_chunk", prefill_chunk, 1)):
            if int(value) < low:
                raise ValueError(f"Engine: {name} must be >= {low}, got {value}")
        self._auto_wait = prefill_wait == "auto"
        if not self._auto_wait and not (isinstance(prefill_wait, (int, float)) and 0.0 <= prefill_wait < float("inf")):
            raise ValueError(f"Engine: prefill_wait must be a finite number of seconds >= 0 or 'auto', "
                             f"got {prefill_wait!r}")
        self._check_model(model.config)
        self.model = model.eval()
        offset, source = None, prefixes
        patched = hf.get_prefix_bank(model) if hf.is_patched(model) else None
        # read the prefixes before unpatching a patched model: a bad one leaves it as it was
        entries = read_prefixes(patched if source is None else source)
        if not entries:
            raise ValueError("the engine needs at least one prefix: pass prefixes={name: adapter folder or tensor}")
        if patched is not None:           # re-patched below with a bank of fixed capacity
            offset = hf.position_offset(model)
            hf.unpatch_model(model)
        prefix_len = next(iter(entries.values())).prefix_len
        self.max_batch, self.max_seq_len, self.queue_size = int(max_batch), int(max_seq_len), int(queue_size)
        self.prefill_chunk = int(prefill_chunk)
        self.prefill_wait = PREFILL_WAIT_CAP if self._auto_wait else float(prefill_wait)
        self._forward_cost = 0.0        # a running mean of a prefill forward's seconds ("auto")
        capacity = max(int(max_prefixes), len(entries))
        hf.patch_model(model, prefix_len, init="zeros", names=free_names(capacity), position_offset=offset,
                       backend=backend, **self._patch_options(entries))
        self.bank: PrefixBank = hf.get_prefix_bank(model)
        weight = model.get_input_embeddings().weight
        self.device, self.dtype = weight.device, weight.dtype
        self.bank.requires_grad_(False).to(self.dtype)
        self.offset = hf.position_offset(model)
        try:
            self._check_geometry(model.config)
        except Exception:
            hf.unpatch_model(model)
            raise

        # lock order: _lock -> _cv -> the rows' lock
        self._lock = threading.RLock()           # one step, or one bank change, at a time
        self._cv = threading.Condition()         # guards _waiting; wakes the scheduler
        self.rows = BankRows(self.bank)
        for name, entry in entries.items():
            self._install(name, entry)

        self._build_forward(model, backend, decode_step, compiled_prefill)
        self._model_eos = frozenset(_eos_ids(getattr(model, "generation_config", None)))
        self.tokenizer = None if tokenizer is None else Tokenizer(tokenizer, self._model_eos)
        self.vocab_size = model.config.vocab_size
        self._logits_to_keep = _wants_logits_to_keep(model)

        # slots and their per-step inputs: the host's copy (numpy) and the device's, read by the graphs
        n = self.max_batch
        self._slots: list[Request | None] = [None] * n
        self._free_slots = list(range(n))
        self._prefilling: deque[Request] = deque()          # admitted, prompt not all in the cache
        self._parked = (self.max_seq_len - 1, 1, 0, 0)       # the inputs of a slot that is not decoding
        pin = self.device.type == "cuda"
        self._h = np.zeros((4, n), dtype=np.int64)           # per slot: POS, SEQLEN, ROW, STEP
        self._h[:] = np.array(self._parked)[:, None]
        self._live = np.zeros(n, dtype=np.int64)             # 1 = slot decoding
        # two pinned buffers each way, alternating: a step's copies finish before its buffer's reuse
        self._h_bufs = [torch.zeros(4, n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._tok_bufs = [torch.zeros(n, dtype=torch.long, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self._pending = None                                 # the decode step in flight
        self._ints = torch.tensor(self._h, device=self.device)   # a copy: the device inputs
        self._tokens = torch.zeros(n, 1, dtype=torch.long, device=self.device)
        self._decode_masks: dict[int, torch.Tensor] = {}     # batch -> its all-True mask, kept for capture
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
        # prefill forwards run and their host seconds (launches; the device may lag): each one
        # stalls every decoding row, so how often they run says much of a server's throughput
        self.prefill_forwards = 0
        self.prefill_seconds = 0.0

    # what bounds a prompt's length, for PromptTooLong's message
    prompt_bound = "max_seq_len"

    @property
    def eos_token_ids(self) -> frozenset:
        """Token ids that end a request (unless ignore_eos): the tokenizer's, which include the
        model's generation config's, or those alone when the engine works on token ids."""
        return self.tokenizer.eos_token_ids if self.tokenizer is not None else self._model_eos

    # -- construction: what a subclass for another kind of model replaces ----------------------

    def _check_model(self, config) -> None:
        _check_servable(config)

    def _patch_options(self, entries: dict[str, PrefixSource]) -> dict:
        """Extra patch_model arguments for the bank that holds these prefixes."""
        return {}

    @property
    def max_prompt_len(self) -> int:
        """Prompt tokens a request may have (the rest of max_seq_len is for its output)."""
        return self.max_seq_len - 1

    def _build_forward(self, model, backend, decode_step, compiled_prefill) -> None:
        """The KV cache, the layers' attention over it, and the decode (and prefill) steps."""
        bank = self.bank
        self.cache = KVCache(bank.num_layers, self.max_batch, bank.num_kv_heads, self.max_seq_len, bank.head_dim,
                             num_q_heads=model.config.num_attention_heads, dtype=self.dtype, device=self.device)
        hf.set_attention_hook(model, CacheAttention(self.cache, backend))
        self.decode_step = engine_step(decode_step, model, self.cache, self.bank, offset=self.offset,
                                       backend=backend)
        self.prefill_step = None
        if compiled_prefill:
            if self.decode_step is None:
                hf.unpatch_model(model)
                raise ValueError("Engine: compiled_prefill=True needs the hand-fused decode step "
                                 f"(decode_step={decode_step!r} gives the model's own modules here); "
                                 "pass decode_step='compiled' on CUDA or a StepOptions")
            self.prefill_step = PrefillStep(self.decode_step)

    def _cached_tokens(self, req: Request) -> int:
        """Tokens of `req` in the KV cache once its prompt is in (before its first output)."""
        return len(req.prompt_ids)

    def _text_context(self, prompt_ids: list[int]) -> list[int]:
        """The tokens the output continues, which its first tokens are detokenized after."""
        return prompt_ids

    # -- construction checks -----------------------------------------------------------------

    def _check_geometry(self, config):
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and self.max_seq_len + self.bank.prefix_len > window:
            raise ValueError(f"{config.model_type} has a sliding window of {window} keys but max_seq_len="
                             f"{self.max_seq_len} + {self.bank.prefix_len} prefix slots exceed it (the decode "
                             f"kernel has no window): use max_seq_len <= {window - self.bank.prefix_len}")
        if hf.FAMILIES[config.model_type].absolute_positions:
            hf.check_position_limit(config, self.max_seq_len, self.offset, f"max_seq_len={self.max_seq_len} tokens",
                                    f"use max_seq_len <= {config.max_position_embeddings - self.offset}")

    # -- prefixes ----------------------------------------------------------------------------

    @property
    def prefixes(self) -> list[str]:
        """Names of the prefixes being served."""
        return self.rows.names

    def add_prefix(self, name: str, prefix: "str | torch.Tensor") -> None:
        """Add (or replace) a prefix while serving: an adapter folder or a tensor [L, 2, Hkv, P, D].

        Replacing a name gives new requests the new prefix; requests in flight keep the old one.
        """
        entry = read_prefix(prefix)
        with self._lock:
            self._install(str(name), entry, replace=True)

    def remove_prefix(self, name: str) -> None:
        """Stop serving a prefix: new requests for it fail at once, running ones finish."""
        with self._lock:
            self.rows.remove(name)

    def _install(self, name: str, entry: PrefixSource, replace: bool = False) -> None:
        entry.check(self.bank)
        self.rows.install(name, lambda row: entry.write(self.bank, row), replace=replace)

    # -- submission ----------------------------------------------------------------------------

    def submit(self, prompt: str | list[int], prefix: str, params: SamplingParams | None = None, *, stream: bool = False) -> Request:
        """Queue a request: `prompt` is text (needs a tokenizer) or a list of token ids.

        Raises UnknownPrefix, PromptTooLong, QueueFull, EngineClosed or ValueError; never blocks.
        """
        return self._submit_ids(prompt_token_ids(prompt, self.tokenizer), prefix, params or SamplingParams(), stream)

    def submit_chat(self, messages: list[dict], prefix: str, params: SamplingParams | None = None, *,
                    stream: bool = False) -> Request:
        """Queue a chat request: messages [{"role", "content"}] through the tokenizer's chat template."""
        return self._submit_ids(chat_token_ids(messages, self.tokenizer), prefix, params or SamplingParams(), stream)

    def _submit_ids(self, ids, prefix, params, stream):
        check_request(ids, params, self.vocab_size, self.max_prompt_len, self.tokenizer is not None,
                      bound=self.prompt_bound)
        with self._cv:
            if self._closed:
                raise EngineClosed()
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(self.queue_size)
            row = self.rows.acquire(str(prefix))
            detok = (None if self.tokenizer is None
                     else Detokenizer(self.tokenizer, self._text_context(ids), params.stop))
            req = Request(f"cmpl-{next(self._ids)}", [int(i) for i in ids], str(prefix), row, params, detok, stream,
                          self._cv)
            self._waiting.append(req)
            self._cv.notify_all()
        return req

    def generate(self, prompts: list, prefixes: str | list[str],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Submit every prompt (one prefix name, or one per prompt) and wait for all of them.

        The prompts are tokenized first and queued under the scheduler's lock, so a running
        scheduler admits them together: queued one by one, its thread would prefill the first
        few alone while the rest are still being tokenized, and every later group would stall
        the rows already decoding."""
        if isinstance(prefixes, str):
            prefixes = [prefixes] * len(prompts)
        ids = [prompt_token_ids(p, self.tokenizer) for p in prompts]
        with self._lock:
            reqs = [self.submit(i, prefix, params) for i, prefix in zip(ids, prefixes, strict=True)]
        if self._thread is None:
            while not all(r.done for r in reqs):
                self.step()
        return [r.result() for r in reqs]

    # -- the scheduler -------------------------------------------------------------------------

    @property
    def num_active(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return sum(r is not None for r in self._slots)

    @property
    def num_waiting(self) -> int:
        """Requests queued for a slot."""
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """Whether the engine takes requests (not closed); EngineProcess's also turns False when
        its process dies."""
        return not self._closed

    def has_work(self) -> bool:
        """Whether a step would do anything (requests waiting, running or a step in flight)."""
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
                self.fail_running(e)

    def fail_running(self, error: BaseException) -> None:
        """After a step raised: end every request holding a slot with finish_reason 'error'."""
        with self._lock:
            self._pending = None
            for req in [r for r in self._slots if r is not None]:
                self._finish(req, "error", error=f"{type(error).__name__}: {error}")

    @torch.no_grad()
    def step(self) -> None:
        """One scheduler iteration: retire cancelled, admit, prefill a chunk, launch a decode step,
        then take the previous step's tokens.

        The host reads step t's tokens while the device runs step t+1 (launched as if no row
        finished at t; a row that did finish computes one step more, whose token is dropped), so
        the host's bookkeeping hides behind the device's work.
        """
        with self._lock:
            for req in self._slots:
                if req is not None and req.cancelled:
                    self._finish(req, "cancelled")
            self._admit()
            for group in group_chunks(self._plan_prefill(), self.prefill_chunk):
                self._prefill(group)
            pending, self._pending = self._pending, None
            if self._live.any():
                self._pending = self._launch()
            if pending is not None:
                self._collect(*pending)
            self.steps += 1

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and self._free_slots:
                req = self._waiting.popleft()
                if req.cancelled:
                    self._finish(req, "cancelled")
                    continue
                req.slot = heapq.heappop(self._free_slots)
                req.prefilled = 0
                self._slots[req.slot] = req
                self._prefilling.append(req)

    # -- prefill: chunks of prompts, several per forward ---------------------------------------

    def _plan_prefill(self) -> list[Chunk]:
        """This step's chunks (prefill_plan.plan_chunks; new prompts held while `_hold_new_prompts`)."""
        return plan_chunks(self._prefilling, self.prefill_chunk, self._hold_new_prompts())

    def _hold_new_prompts(self) -> bool:
        wait = self.current_prefill_wait
        if wait <= 0:           # the default: nothing to look at
            return False
        return hold_new_prompts(self._prefilling, bool(self._live.any()), wait, self.prefill_chunk, time.monotonic())

    @property
    def current_prefill_wait(self) -> float:
        """Seconds a new prompt may wait now: prefill_wait, or under "auto" the recent cost of a
        prefill forward (capped at PREFILL_WAIT_CAP)."""
        if self._auto_wait:
            return min(self._forward_cost, PREFILL_WAIT_CAP)
        return self.prefill_wait

    def _prefill(self, group: list[Chunk]) -> None:
        """Run one prefill forward; if it raises, run each chunk alone and fail only the requests
        whose own chunk raises."""
        began = time.perf_counter()
        try:
            tokens = self._prefill_forward(group)
        except Exception as e:
            if len(group) > 1:
                for chunk in group:
                    self._prefill([chunk])
                return
            req = group[0].req
            log.warning("request %s failed in prefill: %s: %s", req.id, type(e).__name__, e)
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            return
        took = time.perf_counter() - began
        self.prefill_forwards += 1
        self.prefill_seconds += took
        self._forward_cost = took if self.prefill_forwards == 1 else 0.8 * self._forward_cost + 0.2 * took
        for chunk in group:
            chunk.req.prefilled = chunk.start + chunk.length
        for chunk, token in tokens:
            req = chunk.req
            self._prefilling.remove(req)
            length = self._cached_tokens(req)
            self._h[:, req.slot] = (length, length + 1, req.row, 1)
            self._live[req.slot] = 1
            self._append(req, token)

    def _prefill_forward(self, group: list[Chunk]) -> list[tuple[Chunk, int]]:
        """One forward over the group's chunks (right-padded); samples the first token of each
        request whose prompt it completes: [(chunk, token)]. Changes no host state."""
        n, width = len(group), max(c.length for c in group)
        ids = torch.zeros(n, width, dtype=torch.long)
        for i, c in enumerate(group):
            ids[i, :c.length] = torch.tensor(c.req.prompt_ids[c.start:c.start + c.length])
        # padding continues each row's positions, held inside the cache's (it is never stored)
        starts = torch.tensor([c.start for c in group])
        positions = (starts[:, None] + torch.arange(width)[None]).clamp(max=self.max_seq_len - 1)
        rows = torch.tensor([c.req.row for c in group])
        finals = [i for i, c in enumerate(group) if c.start + c.length == len(c.req.prompt_ids)]
        ends = [group[i].length - 1 for i in finals]
        kwargs = {}
        if self._logits_to_keep:
            keep = sorted(set(ends)) or [width - 1]      # no request completes: the cheapest
            kwargs["logits_to_keep"] = torch.tensor(keep, device=self.device)
            ends = [keep.index(e) for e in ends]
        dev = self.device
        with self.cache.prefilling([c.req.slot for c in group], starts.tolist(), [c.length for c in group]):
            if self.prefill_step is not None:
                logits = self.prefill_step(ids.to(dev), positions.to(dev), rows.to(dev), self.cache.mode,
                                           torch.tensor(finals, dtype=torch.long, device=dev),
                                           torch.tensor([group[i].length - 1 for i in finals], device=dev))
            else:
                # the mask (all ones: the cache attention owns the masking) also spares the patched
                # model's packed-sequence check and its host sync
                out = self.model(input_ids=ids.to(dev), position_ids=positions.to(dev),
                                 attention_mask=hf.no_padding_mask(n, width, dev), use_cache=False,
                                 prefix_ids=rows.to(dev), **kwargs)
                logits = out.logits[torch.tensor(finals, device=dev), torch.tensor(ends, device=dev)] if finals else None
        if not finals:
            return []
        tokens = self._first_tokens([group[i].req for i in finals], logits)
        return list(zip([group[i] for i in finals], tokens))

    def _first_tokens(self, reqs: list[Request], logits: torch.Tensor) -> list[int]:
        """Sample each request's first token from its prompt's last logits [n, vocab]; sets the
        slots' sampling parameters and the token buffer the decode step reads."""
        dev = self.device
        slots = torch.tensor([r.slot for r in reqs], device=dev)
        self._temperature[slots] = torch.tensor([r.params.temperature for r in reqs], dtype=torch.float32, device=dev)
        self._top_p[slots] = torch.tensor([r.params.top_p for r in reqs], dtype=torch.float32, device=dev)
        self._top_k[slots] = torch.tensor([r.params.top_k for r in reqs], dtype=torch.long, device=dev)
        self._seeds[slots] = torch.tensor([r.params.seed for r in reqs], dtype=torch.long, device=dev)
        tokens = self._sample(logits, slots, torch.zeros(len(reqs), dtype=torch.long, device=dev), reqs)
        self._tokens[slots, 0] = tokens
        return tokens.tolist()

    # -- decode --------------------------------------------------------------------------------

    def _launch(self):
        """Enqueue one decode step of every decoding slot; returns what _collect needs."""
        decoding = np.flatnonzero(self._live).tolist()
        batch = next(b for b in self.buckets if b > decoding[-1])
        self._flip ^= 1
        h_buf, tok_buf = self._h_bufs[self._flip], self._tok_bufs[self._flip]
        h = h_buf.numpy()
        h[:] = self._h
        # a row that finished at the step in flight may be one past the cache: keep its
        # (discarded) step inside the buffers
        np.minimum(h[POS], self.max_seq_len - 1, out=h[POS])
        np.minimum(h[SEQLEN], self.max_seq_len, out=h[SEQLEN])
        self._ints.copy_(h_buf, non_blocking=True)
        reqs = [self._slots[s] for s in decoding]
        tokens = self._decode(batch, sampling_variant(r.params for r in reqs))
        tok_buf[:batch].copy_(tokens, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._h[POS] += self._live
        self._h[SEQLEN] += self._live
        self._h[STEP] += self._live
        return event, tok_buf, reqs, decoding

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
        with self.cache.decoding(batch, self._ints[POS], self._ints[SEQLEN]):
            out = self.model(input_ids=self._tokens[:batch], position_ids=self._ints[POS, :batch, None],
                             attention_mask=self._decode_mask(batch), use_cache=False,
                             prefix_ids=self._ints[ROW, :batch])
        return out.logits[:, -1]

    def _decode_mask(self, batch: int) -> torch.Tensor:
        if batch not in self._decode_masks:
            self._decode_masks[batch] = hf.no_padding_mask(batch, 1, self.device)
        return self._decode_masks[batch]

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
        key = (batch, sampling)
        if key in self._graphs:
            return self._graphs.replay(key)
        return self._graphs.replay(key, self._decode_fn(batch, sampling), preserve=[self._tokens])

    @torch.no_grad()
    def warmup(self, batch_sizes: list[int] | None = None, sampling: tuple[str, ...] = SAMPLING) -> None:
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
            if self.prefill_step is not None:
                self._warm_prefill()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def _warm_prefill(self) -> None:
        """Compile the prefill's graphs (dynamic shapes: one or two rows, prompt starts and
        continuations) on free slots, whose cache contents nobody reads."""
        width = min(16, self.max_seq_len // 2)
        dev = self.device
        for rows in sorted({1, min(2, self.max_batch)}):
            for start in (0, width):
                with self.cache.prefilling(list(range(rows)), [start] * rows, [width] * rows):
                    positions = (start + torch.arange(width, device=dev))[None].expand(rows, width)
                    self.prefill_step(torch.zeros(rows, width, dtype=torch.long, device=dev), positions,
                                      torch.zeros(rows, dtype=torch.long, device=dev), self.cache.mode,
                                      torch.arange(rows, device=dev), torch.full((rows,), width - 1, device=dev))

    # -- per-token bookkeeping -----------------------------------------------------------------

    def _append(self, req: Request, token: int) -> None:
        """Give `req` its next token; an error here (say, in its detokenizer) fails it alone."""
        try:
            self._take_token(req, token)
        except Exception as e:
            log.warning("request %s failed on a token: %s: %s", req.id, type(e).__name__, e)
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")

    def _take_token(self, req: Request, token: int) -> None:
        params = req.params
        req.mark_token()
        req.output_ids.append(token)
        if not params.ignore_eos and token in self.eos_token_ids:      # with or without a tokenizer
            req.output_ids.pop()
            self._finish(req, "stop")
            return
        stopped = req.detok is not None and req.detok.add(token)
        if stopped:
            self._finish(req, "stop")
        elif (len(req.output_ids) >= params.max_tokens
              or self._cached_tokens(req) + len(req.output_ids) > self.max_seq_len):
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
            self._h[:, req.slot] = self._parked
            self._live[req.slot] = 0
            req.slot = None
        if req in self._prefilling:
            self._prefilling.remove(req)
        self.rows.release(req.row)
        req.finish(reason, error)


def serve_engine(model: torch.nn.Module, prefixes: "PrefixBank | dict | None" = None, **kwargs: object) -> Engine:
    """The engine for `model`: Seq2SeqEngine for an encoder-decoder model, else Engine (the same
    arguments; Seq2SeqEngine's own ones, sites and max_source_len, only for the former)."""
    if getattr(model.config, "is_encoder_decoder", False):
        from .seq2seq_engine import Seq2SeqEngine
        return Seq2SeqEngine(model, prefixes, **kwargs)
    return Engine(model, prefixes, **kwargs)


def _check_servable(config) -> None:
    """Refuse, before anything is patched, a model the engine's decode path cannot run exactly."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"Engine runs decoder-only models; {model_type} is an encoder-decoder model: serve it "
                         "with Seq2SeqEngine (prefix_kernels.serve.Seq2SeqEngine, or serve_engine(model, ...))")
    if model_type not in hf.FAMILIES:
        raise ValueError(f"the serving engine does not support model_type {model_type!r}; it serves "
                         f"{', '.join(sorted(hf.FAMILIES))}")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        raise ValueError(f"{model_type} caps its attention logits ({softcap}) and the decode kernel has no softcap: "
                         "the engine cannot serve it (patch_model + model.generate can)")


def _eos_ids(generation_config):
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
