"""What a user would run instead of the engine's decode step, timed step by step (no prefix).

  hf-compiled   the bare model, HF's StaticCache, `torch.compile(step, mode="reduce-overhead",
                fullgraph=True)` (inductor + its own CUDA graphs), argmax in the step: the fastest
                path transformers offers (ANCHORS.md 3b)
  plain-step    a gpt-fast-style step of plain PyTorch: one q/k/v and one gate/up GEMM per layer
                (views of the model's weights, serve/step.py's fusion), a static cache
                [B, Hkv, Smax, D], GQA attention by masked matmuls over the whole cache, argmax;
                compiled by inductor per layer (as the engine's step) in a CUDA graph captured
                by hand

Both decode every row at the same position after `context` cached tokens and report the mean
milliseconds of one step over `steps` steps (the position advancing), with the bytes a step
must read at least (`memory_limit_ms`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

H200_COPY_BYTES_PER_S = 4.3e12   # measured copy bandwidth of the H200 (ANCHORS.md section 3)


@functools.lru_cache(maxsize=None)
def copy_bytes_per_s() -> float:
    """The GPU's device-to-device copy bandwidth (bytes read + written per second), measured
    once per process; without a GPU, the H200's (the limit is then only a label). Measured, not
    a constant: an H100 copies ~3.0 TB/s where the H200 copies 4.3, and the limit must be the
    machine's own."""
    if not torch.cuda.is_available():
        return H200_COPY_BYTES_PER_S
    n = 1 << 30
    src = torch.ones(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 10 / 1e3
    del src, dst
    return 2 * n / seconds


def memory_limit_ms(model, batch: int, context: int, prefix_tokens: int = 0) -> float:
    """Milliseconds to read what one decode step must: every weight but the embedding table
    (B rows of it; all of it when tied to the output layer), the rows' cached keys/values and
    `prefix_tokens` prefix slots (per distinct prefix in the batch), at the GPU's copy bandwidth."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)
    if tied:
        weights += emb.numel() * emb.element_size()
    config = model.config
    hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = config.num_hidden_layers * 2 * hkv * head_dim * emb.element_size()
    return (weights + (batch * context + prefix_tokens) * per_token) / copy_bytes_per_s() * 1e3


def _cache_len(context: int, steps: int) -> int:
    """Cache slots of both baselines: 512 for the usual 256 + 128 (as ANCHORS 3b), else enough."""
    return max(512, context + steps + 8)


def _time_steps(step, steps: int, device) -> float:
    """Mean ms of one call of step(i) for i in 0..steps-1 (CUDA events; wall clock on the CPU)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            step(i)
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / steps
    begin = time.perf_counter()
    for i in range(steps):
        step(i)
    return (time.perf_counter() - begin) * 1e3 / steps


@torch.no_grad()
def run_hf_compiled(model, prompts: torch.Tensor, steps: int, compiler: str | None = "inductor") -> dict:
    """The bare (unpatched) model with HF's StaticCache, its decode step compiled with
    mode="reduce-overhead" (inductor's CUDA graphs) on CUDA; prompts [B, S] prefilled first.
    compiler None: the same step eagerly (a smoke run)."""
    from transformers import StaticCache

    device = model.get_input_embeddings().weight.device
    batch, context = prompts.shape
    cache = StaticCache(config=model.config, max_cache_len=_cache_len(context, steps))
    ids = prompts.to(device)
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
    token = logits[:, -1].argmax(-1, keepdim=True)

    def decode(token, cache_position):
        out = model(input_ids=token, past_key_values=cache, cache_position=cache_position, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    mode = "reduce-overhead" if device.type == "cuda" and compiler == "inductor" else None
    # static shapes: compiled for this batch size, as a user serving one batch size would
    compiled = torch.compile(decode, mode=mode, fullgraph=True, backend=compiler, dynamic=False) if compiler else decode
    positions = [torch.tensor([context + i], device=device) for i in range(steps + 3)]
    state = {"token": token}

    def step(i):
        state["token"] = compiled(state["token"], positions[i]).clone()   # a graph output is overwritten

    for i in range(3):                     # compile, record the graph, first replay
        step(i)
    ms = _time_steps(lambda i: step(i + 3), steps, device)
    return {"decode_step_ms": ms, "tokens_per_s": batch / ms * 1e3,
            "limit_ms": memory_limit_ms(model, batch, context + steps // 2)}


class PlainStep:
    """A gpt-fast-style greedy decode step of a Llama-family model without any prefix."""

    def __init__(self, model, batch: int, max_len: int, compiler: str | None = "inductor"):
        from ..serve.step import Geometry, layer_weights, make_embed

        self.model, self.batch = model, batch
        weight = model.get_input_embeddings().weight
        g = Geometry.of(model, offset=0, max_seqlen=max_len, backend="reference")
        self.geometry, self.layers = g, [layer_weights(layer, fuse=True) for layer in model.model.layers]
        shape = (len(self.layers), batch, g.num_kv_heads, max_len, g.head_dim)
        self.k = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.v = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        act = model.model.layers[0].mlp.act_fn
        embed, layer = make_embed(g), _plain_layer(g, act)
        compile_ = (lambda f: torch.compile(f, fullgraph=True, backend=compiler)) if compiler else (lambda f: f)
        self._embed, self._layer, self._head = compile_(embed), compile_(layer), compile_(_plain_head(g))

    def __call__(self, tokens, positions):
        """tokens, positions [B] int64 -> next tokens [B] (written into tokens as well)."""
        base = self.model.model
        h, cos, sin, _, _ = self._embed(tokens, positions, positions, positions, self.model.get_input_embeddings()
                                        .weight, base.rotary_emb.inv_freq)
        delta = None
        for i, w in enumerate(self.layers):
            h, delta = self._layer(h, delta, w, self.k[i], self.v[i], positions, cos, sin)
        return self._head(h, delta, base.norm.weight, self.model.lm_head.weight, tokens)


def _plain_layer(g, act):
    from ..serve.step import _linear, _rms_norm, _rotate

    hq, hkv, d = g.num_heads, g.num_kv_heads, g.head_dim

    def layer(h, delta, w, k_cache, v_cache, positions, cos, sin):
        if delta is not None:
            h = h + delta
        b = h.shape[0]
        x = _rms_norm(h, w["input_norm"], g.eps, g.gemma_norm)
        q, k, v = _linear(x, w, "qkv").split([hq * d, hkv * d, hkv * d], dim=-1)
        q = _rotate(q.view(b, hq, d), cos, sin, g.rotary_dim)
        k = _rotate(k.view(b, hkv, d), cos, sin, g.rotary_dim)
        rows = torch.arange(b, device=h.device)
        k_cache[rows, :, positions] = k
        v_cache[rows, :, positions] = v.view(b, hkv, d)
        # GQA by masked matmuls over the whole cache: [B, Hkv, G, D] x [B, Hkv, D, Smax]
        scores = torch.matmul(q.view(b, hkv, hq // hkv, d), k_cache.transpose(-1, -2)).float() * g.scale
        visible = torch.arange(k_cache.shape[2], device=h.device)[None, :] <= positions[:, None]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        o = torch.matmul(scores.softmax(-1).to(v_cache.dtype), v_cache).reshape(b, hq * d)
        h = h + _linear(o, w, "o")
        gate, up = _linear(_rms_norm(h, w["post_norm"], g.eps, g.gemma_norm), w, "gate_up").chunk(2, dim=-1)
        return h, _linear(act(gate) * up, w, "down")
    return layer


def _plain_head(g):
    from ..serve.step import _rms_norm

    def head(h, delta, norm_w, lm_w, out):
        tokens = F.linear(_rms_norm(h + delta, norm_w, g.eps, g.gemma_norm), lm_w).argmax(-1)
        out.copy_(tokens)
        return tokens
    return head


@torch.no_grad()
def run_plain_step(model, batch: int, context: int, steps: int, compiler: str | None = "inductor") -> dict:
    """The plain step at `batch` rows after `context` cached tokens (random keys/values), captured
    in a CUDA graph on CUDA; positions advance between replays. compiler None: eager."""
    from ..serve.graphs import GraphCache

    from ..serve.step import compile_limits

    device = model.get_input_embeddings().weight.device
    step = PlainStep(model, batch, _cache_len(context, steps), compiler)
    step.k.normal_()
    step.v.normal_()
    tokens = torch.randint(3, model.config.vocab_size, (batch,), device=device)
    positions = torch.full((batch,), context, dtype=torch.long, device=device)
    with compile_limits(compiler is not None):     # one compile per batch size of the same code
        if device.type == "cuda":
            graphs = GraphCache(device)
            graphs.capture("plain", lambda: step(tokens, positions), preserve=[tokens])
            run = lambda: graphs.replay("plain")  # noqa: E731
        else:
            run = lambda: step(tokens, positions)  # noqa: E731

        def one(i):
            run()
            positions.add_(1)

        one(0)
        ms = _time_steps(one, steps, device)
    return {"decode_step_ms": ms, "tokens_per_s": batch / ms * 1e3,
            "limit_ms": memory_limit_ms(model, batch, context + steps // 2)}
