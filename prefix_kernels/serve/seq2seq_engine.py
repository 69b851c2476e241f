"""The serving engine for encoder-decoder models (BART, mBART, Pegasus, Marian, Blenderbot, PLBart):
Li & Liang's summarization setting, many prefixes at once.

    engine = Seq2SeqEngine(bart, {"xsum": "adapters/xsum", "cnn": "adapters/cnn"}, tokenizer=tok)
    print(engine.generate(["a long article ..."], "xsum")[0].text)

The scheduler is Engine's (admission, slots, sampling, stop rules, streaming, cancellation, the
CUDA graph per batch bucket); what differs is the forward:
  prefill  one forward of the whole model over a group of sources (right-padded, whole: an
           encoder attends over all of its source, so a source is never split across steps) and
           the decoder's first tokens (its start token, and the forced BOS where the model's
           generation config has one): the encoder runs once per request, each cross-attention
           layer stores the request's encoder keys and values in its slot (`CrossCache`), and
           the first output token is sampled;
  decode   the decoder alone, one token per slot: self-attention over the slot's KV cache and
           cross-attention over the slot's stored source, both with the row's prefix.
Prompts are the encoder's input (max_source_len tokens at most); max_seq_len bounds the decoder's
tokens (its start tokens + the output). Sampling is Engine's: greedy or temperature/top-k/top-p
(no beam search; the generation config's beams, length penalty and n-gram rules are not applied).

The decode step runs the model's own modules (no hand-fused step for these families): under a
CUDA graph on CUDA, as the decoder-only engine's eager step.

Memory, allocated at construction: the decoder's KV cache (2 x layers x max_batch x max_seq_len x
d_model elements) and the cross cache (the same with max_source_len): BART-large in bf16 at
max_batch 32 and max_source_len 1024 holds 1.6 GB of cross keys and values.
"""
from __future__ import annotations

import torch

from ..integrations import transformers as hf
from ..integrations.seq2seq import SITE_ORDER, SEQ2SEQ_FAMILIES, _site_modules
from ..ops.utils import warn_once
from .cache import KVCache
from .engine import POS, ROW, SEQLEN, Engine
from .prefill_plan import Chunk, plan_whole_prompts
from .prefixes import PrefixSource
from .request import Request
from .seq2seq_attention import CrossCache, Seq2SeqAttention


class Seq2SeqEngine(Engine):
    """Serve an encoder-decoder LM with many prefixes at once.

    Args (besides Engine's):
        model: a transformers encoder-decoder LM of a family in SEQ2SEQ_FAMILIES.
        prefixes: as Engine's; adapters fix the prefixed sites (PEFT's seq2seq adapters prefix the
            decoder's self-attention only; prefix-kernels' own hold any of the three). Tensors
            [L, 2, Hkv, P, D] are read as `sites` in the order encoder, decoder, cross.
        sites: the attention sites the prefixes cover, when they are given as tensors (default:
            all three, Li & Liang's).
        max_source_len: encoder tokens per request (default: the model's position limit, at most
            1024).
        max_seq_len: decoder tokens per request: its start tokens + the output (default 256: a
            summary's length, within every family's positions after a prefix offset of up to 256).
        decode_step: "auto" or "eager" (the model's own modules; "compiled" covers decoder-only
            families). compiled_prefill: not available here.
    """

    prompt_bound = "max_source_len"

    def __init__(self, model, prefixes=None, *, sites=None, max_source_len: int | None = None,
                 max_seq_len: int = 256, decode_step: str = "auto", compiled_prefill: bool = False, **kwargs):
        if decode_step not in ("auto", "eager"):
            raise ValueError(f"Seq2SeqEngine: decode_step must be 'auto' or 'eager' (the model's own modules), got "
                             f"{decode_step!r}: the compiled step covers decoder-only families")
        if compiled_prefill:
            raise ValueError("Seq2SeqEngine: compiled_prefill is not available for encoder-decoder models")
        self._check_model(model.config)        # before reading encoder-decoder settings off it
        config = model.config
        limit = getattr(config, "max_position_embeddings", None) or 1024
        self.max_source_len = min(limit, 1024) if max_source_len is None else int(max_source_len)
        if self.max_source_len < 1:
            raise ValueError(f"Seq2SeqEngine: max_source_len must be >= 1, got {max_source_len}")
        self._sites = None if sites is None else tuple(sites)
        # the decoder's first tokens: where HF's generate starts (and the BOS it forces first)
        self.decoder_start_ids = _decoder_start_ids(model)
        if len(self.decoder_start_ids) >= max_seq_len:
            raise ValueError(f"Seq2SeqEngine: max_seq_len={max_seq_len} leaves no room for output after "
                             f"the decoder's {len(self.decoder_start_ids)} start tokens {self.decoder_start_ids}")
        super().__init__(model, prefixes, max_seq_len=max_seq_len, decode_step="eager", **kwargs)

    # -- construction ----------------------------------------------------------------------------

    def _check_model(self, config) -> None:
        model_type = getattr(config, "model_type", None)
        if not getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"Seq2SeqEngine serves encoder-decoder models; {model_type} is decoder-only: use Engine")
        if model_type not in SEQ2SEQ_FAMILIES:
            raise ValueError(f"Seq2SeqEngine does not support model_type {model_type!r}; it serves "
                             f"{', '.join(sorted(SEQ2SEQ_FAMILIES))}")

    def _patch_options(self, entries: dict[str, PrefixSource]) -> dict:
        adapters = {e.adapter.sites for e in entries.values() if e.adapter is not None}
        if len(adapters) > 1:
            raise ValueError(f"the prefixes cover different attention sites {sorted(adapters)}; one engine's "
                             "prefixes must all cover the same sites")
        sites = next(iter(adapters)) if adapters else (self._sites or SITE_ORDER)
        if self._sites is not None and set(self._sites) != set(sites):
            raise ValueError(f"sites={self._sites} but the adapters prefix {sites}")
        return {"sites": [s for s in SITE_ORDER if s in sites]}

    @property
    def max_prompt_len(self) -> int:
        """Prompt tokens a request may have: the encoder's input, max_source_len."""
        return self.max_source_len

    def _check_geometry(self, config):
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and self.max_source_len > limit:
            raise ValueError(f"max_source_len={self.max_source_len} exceeds {config.model_type}'s "
                             f"{limit} encoder positions; use max_source_len <= {limit}")
        hf.check_position_limit(config, self.max_seq_len, self.offset, f"max_seq_len={self.max_seq_len} decoder "
                                "tokens", f"use max_seq_len <= {(limit or 0) - self.offset}")

    def _build_forward(self, model, backend, decode_step, compiled_prefill) -> None:
        config, bank = model.config, self.bank
        found = _site_modules(model)
        sites = {id(m): (site, i) for site, modules in found.items() for i, m in enumerate(modules)}
        num_layers = len(found["decoder"])
        heads = getattr(config, "decoder_attention_heads", None) or config.num_attention_heads
        self.cache = KVCache(num_layers, self.max_batch, bank.num_kv_heads, self.max_seq_len, bank.head_dim,
                             num_q_heads=heads, dtype=self.dtype, device=self.device)
        self.cross = CrossCache(len(found["cross"]), self.max_batch, bank.num_kv_heads, self.max_source_len,
                                bank.head_dim, dtype=self.dtype, device=self.device)
        self.attention = Seq2SeqAttention(self.cache, self.cross, sites, backend)
        hf.set_attention_hook(model, self.attention)
        self.decode_step = self.prefill_step = None
        # the decoder's positions per row (its position embedding counts from the cache length,
        # which the engine's forwards do not pass): set around each forward, None otherwise
        self._positions: torch.Tensor | None = None
        embed = model.get_decoder().embed_positions
        self._position_hook = embed.register_forward_hook(self._embed_positions, with_kwargs=True)
        # what the decode forward passes as the encoder's output: cross-attention reads the slots'
        # stored keys instead (one token, so the layers' projections of it cost nothing)
        self._encoder_stand_in = torch.zeros(self.max_batch, 1, config.d_model, dtype=self.dtype, device=self.device)
        self._pad_id = int(getattr(config, "pad_token_id", None) or 0)

    def _embed_positions(self, module, args, kwargs, output):
        """Forward hook of the decoder's position embedding: the rows' own positions (+ the prefix
        offset) in place of the count from the cache length that the decoder asked for."""
        positions = self._positions
        if positions is None:
            return None
        n, width = positions.shape
        first = args[0] if args else next(iter(kwargs.values()))
        out = module.forward(first, 0, position_ids=(positions + self.offset).reshape(-1))
        return out.reshape(n, width, -1)

    def close(self, timeout: float = 10.0) -> None:
        """Engine.close, then the decoder's position embedding is the model's own again."""
        super().close(timeout)
        self._position_hook.remove()

    def _cached_tokens(self, req: Request) -> int:
        return len(self.decoder_start_ids)

    def _text_context(self, prompt_ids: list[int]) -> list[int]:
        return self.decoder_start_ids       # the output continues the decoder's start, not the source

    # -- prefill: whole sources, several per forward -------------------------------------------

    def _plan_prefill(self) -> list[Chunk]:
        """This step's sources, whole (prefill_plan.plan_whole_prompts)."""
        return plan_whole_prompts(self._prefilling, self.prefill_chunk, self._hold_new_prompts())

    def _prefill_forward(self, group: list[Chunk]) -> list[tuple[Chunk, int]]:
        n, width = len(group), max(c.length for c in group)
        ids = torch.full((n, width), self._pad_id, dtype=torch.long)
        for i, c in enumerate(group):
            ids[i, :c.length] = torch.tensor(c.req.prompt_ids)
        lengths = torch.tensor([c.length for c in group])
        dev = self.device
        slots = [c.req.slot for c in group]
        slot_index = torch.tensor(slots, device=dev)
        start = len(self.decoder_start_ids)
        padded = bool((lengths < width).any())
        self.attention.source_mask = ((torch.arange(width)[None] < lengths[:, None]).to(dev) if padded else None)
        self.attention.slots = slot_index
        self.cross.lengths[slot_index] = lengths.to(dev)
        self._positions = torch.arange(start, device=dev)[None].expand(n, start)
        try:
            with self.cache.prefilling(slots, [0] * n, [start] * n):
                out = self.model(input_ids=ids.to(dev), decoder_input_ids=torch.tensor([self.decoder_start_ids] * n,
                                                                                       device=dev),
                                 decoder_attention_mask=hf.no_padding_mask(n, start, dev), use_cache=False,
                                 prefix_ids=torch.tensor([c.req.row for c in group], device=dev))
        finally:
            self._positions = self.attention.source_mask = self.attention.slots = None
        tokens = self._first_tokens([c.req for c in group], out.logits[:, -1])
        return list(zip(group, tokens))

    # -- decode ----------------------------------------------------------------------------------

    def _decode(self, batch: int, sampling: str) -> torch.Tensor:
        """Engine's, but a decode step these families cannot capture in a CUDA graph runs eagerly
        from then on (said once) instead of failing every request."""
        if self._graphs is None or (batch, sampling) in self._graphs:
            return super()._decode(batch, sampling)
        try:
            return super()._decode(batch, sampling)
        except Exception as e:
            warn_once(f"Seq2SeqEngine: the {self.model.config.model_type} decode step could not be captured in a "
                      f"CUDA graph ({type(e).__name__}: {e}); it runs eagerly from now on (slower: one launch per "
                      "kernel)")
            self._graphs, self.cuda_graphs = None, False
            torch.cuda.synchronize(self.device)
            return super()._decode(batch, sampling)

    def _forward_decode(self, batch: int) -> torch.Tensor:
        self._positions = self._ints[POS, :batch, None]
        try:
            with self.cache.decoding(batch, self._ints[POS], self._ints[SEQLEN]):
                out = self.model(encoder_outputs=(self._encoder_stand_in[:batch],),
                                 decoder_input_ids=self._tokens[:batch],
                                 decoder_attention_mask=self._decode_mask(batch),
                                 use_cache=False, prefix_ids=self._ints[ROW, :batch])
        finally:
            self._positions = None
        return out.logits[:, -1]


def _decoder_start_ids(model) -> list[int]:
    """The decoder start token (generation config, else model config), then the forced BOS if the
    generation config has one."""
    gen, config = getattr(model, "generation_config", None), model.config
    start = getattr(gen, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ValueError(f"{config.model_type}: the model has no decoder_start_token_id; set "
                         "model.generation_config.decoder_start_token_id")
    forced = getattr(gen, "forced_bos_token_id", None)
    return [int(start)] + ([] if forced is None else [int(forced)])
