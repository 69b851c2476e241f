"""The decode step: one new token for each of B rows, as a pure function of its inputs.

gpt-fast's `decode_one_token(model, x, input_pos)` written for the model families the engine
serves, over the Hugging Face model's own weights (no copies):

    tokens [B], cache positions [B], seqlens [B], bank rows [B], the KV cache, sampling inputs
        -> next tokens [B]

Per layer: RMSNorm (with the residual add of the layer before), one GEMM for q/k/v, rotary at
position + offset (PEFT's convention: the prefix keys carry none), the cache write, decode
attention over the row's prefix-bank entry and its cached keys (the `prefix_kernels::decode_attention`
custom op), o_proj, residual + RMSNorm, one GEMM for gate/up, the activation, down_proj. Under
`torch.compile` (inductor, fullgraph) the norms, rotary, activation, residual adds and the cache
write fuse into a few kernels between the GEMMs; `GraphCache` (graphs.py) then captures the
whole step, sampling included, in one CUDA graph per batch bucket.

q/k/v and gate/up become one GEMM each without a second copy of the weights: `fuse_linears`
concatenates them once and makes the HF modules' weights views into the result, so the model
itself keeps working (`unfuse_weights` gives each module its own storage again).

Compiled per layer by default: every layer has the same shapes, so one small graph serves all of
them (one layer to compile, not an unrolled graph of every layer; `--extra whole` of
benchmarks/profile_decode_step.py times both); the residual add closing a layer is done at the
start of the next one, so nothing fuses less than in one graph. The engine (`Engine(decode_step=)`)
gets its step from `engine_step` and runs it through `sampling_variant` at each step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.decode import DecodeWorkspace, decode_attention_op
from ..ops.utils import warn_once
from .sampling import sample

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
SAMPLING = ("greedy", "sampled", "filtered")     # filtered: top-k / top-p; each one also does the ones before
_STATIC_ROPE = ("default", "linear", "llama3", "yarn")   # inv_freq fixed at init; "dynamic"/"longrope" move it


def unsupported_reason(model) -> Optional[str]:
    """Why `model` has no hand-fused decode step (None: it has one)."""
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        return f"model_type {family!r} has no hand-fused decode step (it has: {', '.join(FAMILIES)})"
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if layers is None or getattr(base, "norm", None) is None or getattr(model, "lm_head", None) is None:
        return f"{family}: expected model.model.layers, model.model.norm and model.lm_head"
    rope = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
    if rope not in _STATIC_ROPE:
        return f"{family}: rotary type {rope!r} (the step takes {', '.join(_STATIC_ROPE)})"
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None):
        return f"{family}: logit softcapping"
    attn, mlp = layers[0].self_attn, layers[0].mlp
    if not (hasattr(attn, "qkv_proj") or all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))):
        return f"{family}: the attention has neither qkv_proj nor q/k/v_proj"
    if not (hasattr(mlp, "gate_up_proj") or all(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))):
        return f"{family}: the MLP has neither gate_up_proj nor gate/up_proj"
    return None


# --------------------------------------------------------------------------------------------
# Weights: views of the model's own parameters
# --------------------------------------------------------------------------------------------

def _adjacent(tensors) -> Optional[torch.Tensor]:
    """One [sum rows, ...] view over tensors that already lie back to back in one storage."""
    first = tensors[0]
    if any(t.device != first.device or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
           or not t.is_contiguous() for t in tensors):
        return None
    if len({t.untyped_storage().data_ptr() for t in tensors}) != 1:
        return None
    for a, b in zip(tensors, tensors[1:]):
        if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
            return None
    shape = (sum(t.shape[0] for t in tensors), *first.shape[1:])
    return first.detach().as_strided(shape, torch.empty(shape, device="meta").stride())


@torch.no_grad()
def fuse_linears(linears) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight, bias) of nn.Linear modules stacked by output rows, as one GEMM computes them.

    The first call concatenates the weights once and makes each module's weight (and bias) a
    view into the result: no second copy of the weights stays alive, and the modules compute
    what they did. Later calls find the views and return the same storage.
    """
    out = []
    for attr in ("weight", "bias"):
        params = [getattr(m, attr) for m in linears]
        if all(p is None for p in params):
            out.append(None)
            continue
        if any(p is None for p in params):
            raise ValueError(f"cannot fuse {[type(m).__name__ for m in linears]}: only some have a {attr}")
        fused = _adjacent(params)
        if fused is None:
            fused, row = torch.cat([p.detach() for p in params]), 0
            for module, p in zip(linears, params):
                setattr(module, attr, nn.Parameter(fused[row:row + p.shape[0]], requires_grad=p.requires_grad))
                row += p.shape[0]
        out.append(fused)
    return out[0], out[1]


def _fusable(model):
    """The groups of nn.Linear modules the step fuses, per layer: (q, k, v), (gate, up)."""
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not hasattr(attn, "qkv_proj"):
            yield [attn.q_proj, attn.k_proj, attn.v_proj]
        if not hasattr(mlp, "gate_up_proj"):
            yield [mlp.gate_proj, mlp.up_proj]


@torch.no_grad()
def unfuse_weights(model) -> None:
    """Give every module that `fuse_linears` made a view its own storage again (one layer's
    worth of extra memory at a time)."""
    for linears in _fusable(model):
        for attr in ("weight", "bias"):
            params = [getattr(m, attr) for m in linears]
            if params[0] is not None and _adjacent(params) is not None:
                for module, p in zip(linears, params):
                    setattr(module, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))


def _eps(norm) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(norm.eps if eps is None else eps)


def layer_weights(layer, fuse: bool) -> dict:
    """One decoder layer's tensors by role (views of its parameters; absent roles left out)."""
    attn, mlp = layer.self_attn, layer.mlp
    w = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight}

    def linear(name, module):
        w[name] = module.weight
        if module.bias is not None:
            w[name + "_bias"] = module.bias

    if hasattr(attn, "qkv_proj"):
        linear("qkv", attn.qkv_proj)
    elif fuse:
        w["qkv"], bias = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if bias is not None:
            w["qkv_bias"] = bias
    else:
        for name in ("q", "k", "v"):
            linear(name, getattr(attn, f"{name}_proj"))
    linear("o", attn.o_proj)
    if hasattr(attn, "q_norm"):
        w["q_norm"], w["k_norm"] = attn.q_norm.weight, attn.k_norm.weight
    if hasattr(mlp, "gate_up_proj"):
        linear("gate_up", mlp.gate_up_proj)
    elif fuse:
        w["gate_up"], bias = fuse_linears([mlp.gate_proj, mlp.up_proj])
        if bias is not None:
            w["gate_up_bias"] = bias
    else:
        linear("gate", mlp.gate_proj)
        linear("up", mlp.up_proj)
    linear("down", mlp.down_proj)
    return w


# --------------------------------------------------------------------------------------------
# The math, as pure functions of tensors (closures over the model's static geometry)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """What the step's functions close over: sizes, constants and the family's variants."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int              # the first rotary_dim dims of a head rotate (partial rotary)
    rotary_scaling: float        # HF's attention_scaling of cos/sin
    scale: float                 # softmax scale
    eps: float
    qk_eps: float
    gemma_norm: bool             # Gemma: x * (1 + w) in fp32; Llama: w * x cast to the dtype
    embed_scale: Optional[float]  # Gemma: embeddings times sqrt(hidden), rounded to the dtype
    offset: int                  # rotary position of cache position 0 (the prefix length, PEFT)
    max_seqlen: int
    backend: str                 # the decode kernel's

    @classmethod
    def of(cls, model, offset: int, max_seqlen: int, backend: str) -> "Geometry":
        config, base = model.config, model.model
        attn = base.layers[0].self_attn
        hkv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = attn.head_dim
        rotary = base.rotary_emb
        gemma = config.model_type.startswith("gemma")
        embed = model.get_input_embeddings()
        embed_scale = None
        if hasattr(embed, "embed_scale"):                # transformers >= 5.2x: the embedding scales
            embed_scale = float(embed.embed_scale.to(embed.weight.dtype))
        elif gemma:                                      # older: GemmaModel.forward's normalizer
            embed_scale = float(torch.tensor(config.hidden_size ** 0.5, dtype=embed.weight.dtype))
        q_norm = getattr(attn, "q_norm", None)
        return cls(num_heads=config.num_attention_heads, num_kv_heads=hkv, head_dim=head_dim,
                   rotary_dim=2 * rotary.inv_freq.numel(), rotary_scaling=float(rotary.attention_scaling),
                   scale=float(attn.scaling), eps=_eps(base.layers[0].input_layernorm),
                   qk_eps=_eps(q_norm) if q_norm is not None else 0.0, gemma_norm=gemma,
                   embed_scale=embed_scale, offset=int(offset), max_seqlen=int(max_seqlen), backend=backend)


def _rms_norm(x, weight, eps: float, gemma: bool):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def _rotate(x, cos, sin, rotary_dim: int):
    """x [B, H, D]; cos, sin [B, 1, rotary_dim] in x's dtype: HF's rotate-half rotary."""
    rot, rest = (x, None) if rotary_dim == x.shape[-1] else (x[..., :rotary_dim], x[..., rotary_dim:])
    half = rotary_dim // 2
    out = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)


def _linear(x, w, name):
    return F.linear(x, w[name], w.get(name + "_bias"))


def _qkv(g: "Geometry", x, w):
    """q [..., Hq, D], k and v [..., Hkv, D] of the normed hidden states x [..., H] (q/k norms
    applied where the family has them, no rotary yet)."""
    hq, hkv, d = g.num_heads, g.num_kv_heads, g.head_dim
    if "qkv" in w:
        q, k, v = _linear(x, w, "qkv").split([hq * d, hkv * d, hkv * d], dim=-1)
    else:
        q, k, v = _linear(x, w, "q"), _linear(x, w, "k"), _linear(x, w, "v")
    lead = x.shape[:-1]
    q, k, v = q.view(*lead, hq, d), k.view(*lead, hkv, d), v.view(*lead, hkv, d)
    if "q_norm" in w:
        q = _rms_norm(q, w["q_norm"], g.qk_eps, g.gemma_norm)
        k = _rms_norm(k, w["k_norm"], g.qk_eps, g.gemma_norm)
    return q, k, v


def _mlp(g: "Geometry", act, h, w):
    """The MLP's output (the next residual delta) for the residual stream h [..., H]."""
    x = _rms_norm(h, w["post_norm"], g.eps, g.gemma_norm)
    if "gate_up" in w:
        gate, up = _linear(x, w, "gate_up").chunk(2, dim=-1)
    else:
        gate, up = _linear(x, w, "gate"), _linear(x, w, "up")
    return _linear(act(gate) * up, w, "down")


def make_embed(g: Geometry):
    def embed(tokens, positions, seqlens, rows, weight, inv_freq):
        """-> hidden [B, H], cos, sin [B, 1, rotary_dim], seqlens and rows as int32."""
        h = F.embedding(tokens, weight)
        if g.embed_scale is not None:
            h = h * g.embed_scale
        freqs = (positions + g.offset).float()[:, None] * inv_freq.float()[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        cos = (angles.cos() * g.rotary_scaling).to(h.dtype)
        sin = (angles.sin() * g.rotary_scaling).to(h.dtype)
        return h, cos, sin, seqlens.to(torch.int32), rows.to(torch.int32)
    return embed


def make_layer(g: Geometry, act):
    hq, d = g.num_heads, g.head_dim

    def layer(h, delta, w, k_cache, v_cache, prefix_k, prefix_v, positions, seqlens, rows, cos, sin, counters,
              index=None):
        """One decoder layer for B rows: h [B, H] is the residual stream before the previous
        layer's MLP output `delta` is added (None for layer 0). Writes the row's key/value at
        `positions` of k_cache/v_cache, this layer's [B, Hkv, Smax, D] (the first B slots), or
        with `index` every layer's [L, B, Hkv, Smax, D] (in a graph of all layers, a write into
        the input itself rather than into a view of it is what inductor does in place: a view's
        write copied the layer's whole cache). The caller slices the B slots: slicing inside the
        graph made the batch size a constant when B was the cache's slot count. counters: the
        decode kernel's workspace (DecodeWorkspace.counters, or None). Returns (h, this layer's
        delta)."""
        if delta is not None:
            h = h + delta
        b = h.shape[0]
        q, k, v = _qkv(g, _rms_norm(h, w["input_norm"], g.eps, g.gemma_norm), w)
        q, k = _rotate(q, cos, sin, g.rotary_dim), _rotate(k, cos, sin, g.rotary_dim)
        slots = torch.arange(b, device=h.device)
        if index is None:
            k_cache[slots, :, positions] = k.to(k_cache.dtype)
            v_cache[slots, :, positions] = v.to(v_cache.dtype)
        else:
            at = torch.full_like(slots, index)
            k_cache[at, slots, :, positions] = k.to(k_cache.dtype)
            v_cache[at, slots, :, positions] = v.to(v_cache.dtype)
            k_cache, v_cache = k_cache[index], v_cache[index]
        o = decode_attention_op(q[:, :, None], k_cache, v_cache, seqlens, prefix_k, prefix_v, rows,
                                g.scale, g.backend, g.max_seqlen, counters)
        h = h + _linear(o.view(b, hq * d), w, "o")
        return h, _mlp(g, act, h, w)
    return layer


def make_head(g: Geometry, sampling: Optional[str]):
    """sampling None: the head returns logits [B, V]; else next tokens [B] (int64), also
    written into `out` (the captured step's feedback buffer), by one of SAMPLING."""
    if sampling is not None and sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING} (or None for logits), got {sampling!r}")

    def head(h, delta, norm_w, lm_w, lm_b, temperature, top_k, top_p, seeds, steps, out):
        x = _rms_norm(h + delta, norm_w, g.eps, g.gemma_norm)
        logits = F.linear(x, lm_w, lm_b)
        if sampling is None:
            return logits
        tokens = sample(logits, temperature, top_k, top_p, seeds, steps,
                        any_sampled=sampling != "greedy", any_filtered=sampling == "filtered")
        if out is not None:
            out.copy_(tokens)
        return tokens
    return head


# --------------------------------------------------------------------------------------------
# The step over one model, eager or compiled
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepOptions:
    """How the step runs. compiler: a torch.compile backend ("inductor"; "aot_eager" for CPU
    tests) or None for eager PyTorch. fuse: q/k/v and gate/up as one GEMM each. dynamic: one
    compile with a symbolic batch size (plus one for B=1) instead of one per batch size.
    per_layer: compile one layer's graph, reused by every layer (else the whole step at once).
    mode: torch.compile's mode, e.g. "max-autotune-no-cudagraphs" to autotune the GEMMs (never
    a CUDA-graph mode: the caller captures the step itself)."""
    compiler: Optional[str] = "inductor"
    fuse: bool = True
    dynamic: bool = True
    per_layer: bool = True
    mode: Optional[str] = None


class DecodeStep:
    """The hand-fused decode step of a patched model, reading its weights, bank and a KV cache.

    Args:
        model: a patched causal LM of one of FAMILIES (see `unsupported_reason`).
        k_cache, v_cache: [L, slots, Hkv, Smax, D] in the model's dtype (the engine's cache).
        bank: the prefix bank's storage [L, 2, N, Hkv, P, D] in the model's dtype, read in place
            (rows written while serving are seen by the next step, captured or not).
        offset: rotary position of cache position 0 (hf.position_offset(model)).
        backend: the decode kernel's ("auto", "cuda", "triton", "reference").
        workspace: the decode kernel's DecodeWorkspace (the engine's cache owns one); None: a
            new one for every slot of the cache on CUDA, none on the CPU.
    """

    def __init__(self, model, k_cache, v_cache, bank, *, offset: int, backend: str = "auto",
                 options: StepOptions = StepOptions(), workspace: DecodeWorkspace | None = None):
        why = unsupported_reason(model)
        if why is not None:
            raise NotImplementedError(f"DecodeStep: {why}")
        dtype = model.get_input_embeddings().weight.dtype
        for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("bank", bank)):
            if t.dtype != dtype:
                raise ValueError(f"DecodeStep: {name} is {t.dtype} but the model is {dtype}; use one dtype")
        self.model, self.options = model, options
        self.k_cache, self.v_cache, self.bank = k_cache, v_cache, bank
        self.geometry = g = Geometry.of(model, offset, k_cache.shape[3], backend)
        if workspace is None and k_cache.is_cuda:
            workspace = DecodeWorkspace(k_cache.device, k_cache.shape[1], g.num_heads, g.num_kv_heads)
        # no workspace (the CPU): an empty tensor, not None, for the custom op (see decode_attention_op)
        self.counters = (torch.empty(0, dtype=torch.int32, device=k_cache.device) if workspace is None
                         else workspace.counters)
        base = model.model
        self.layers = [layer_weights(layer, options.fuse) for layer in base.layers]
        self.embed_weight = model.get_input_embeddings().weight
        self.inv_freq = base.rotary_emb.inv_freq
        self.norm_weight = base.norm.weight
        self.lm_weight, self.lm_bias = model.lm_head.weight, model.lm_head.bias
        self._embed, self._layer = make_embed(g), make_layer(g, _act(base.layers[0].mlp))
        self._heads = {s: make_head(g, s) for s in (None, *SAMPLING)}
        self._compiled: dict = {}

    # -- the step as one function of its inputs --------------------------------------------

    def _forward(self, tokens, positions, seqlens, rows, temperature, top_k, top_p, seeds, steps, out, k_all,
                 v_all, sampling, layer_fn, head_fn, embed_fn):
        """k_all, v_all: [L, B, Hkv, Smax, D], the first B slots of the cache."""
        h, cos, sin, seqlens32, rows32 = embed_fn(tokens, positions, seqlens, rows, self.embed_weight,
                                                  self.inv_freq)
        delta = None
        whole = torch.compiler.is_compiling()         # one graph of every layer (per_layer=False)
        for i, w in enumerate(self.layers):
            k, v, index = (k_all, v_all, i) if whole else (k_all[i], v_all[i], None)
            self._mark(h, delta, cos, sin, seqlens32, rows32, k, v)
            h, delta = layer_fn(h, delta, w, k, v, self.bank[i, 0], self.bank[i, 1], positions, seqlens32, rows32,
                                cos, sin, self.counters, index)
        self._mark(h, delta)
        return head_fn(h, delta, self.norm_weight, self.lm_weight, self.lm_bias, temperature, top_k, top_p,
                       seeds, steps, out)

    def _mark(self, *tensors, dim=0):
        """Batch dims symbolic between separately compiled pieces (dynamic mode, B > 1)."""
        if self._compiling and self.options.dynamic and not torch.compiler.is_compiling():
            for t in tensors:
                if t is not None and t.shape[dim] > 1:
                    torch._dynamo.mark_dynamic(t, dim)

    @property
    def _compiling(self) -> bool:
        return self.options.compiler is not None

    def _functions(self, sampling):
        """(embed, layer, head, whole) for this sampling: compiled once, on first use."""
        if not self._compiling:
            return self._embed, self._layer, self._heads[sampling], None
        if sampling not in self._compiled:
            o = self.options
            compile_ = lambda fn: torch.compile(fn, fullgraph=True, backend=o.compiler, mode=o.mode,  # noqa: E731
                                                dynamic=None if o.dynamic else False)
            if o.per_layer:
                if "layer" not in self._compiled:
                    self._compiled["embed"] = compile_(self._embed)
                    self._compiled["layer"] = compile_(self._layer)
                self._compiled[sampling] = (self._compiled["embed"], self._compiled["layer"],
                                            compile_(self._heads[sampling]), None)
            else:
                head = self._heads[sampling]

                def whole(*args):
                    return self._forward(*args, sampling, self._layer, head, self._embed)
                self._compiled[sampling] = (None, None, None, compile_(whole))
        return self._compiled[sampling]

    def __call__(self, tokens, positions, seqlens, rows, temperature=None, top_k=None, top_p=None, seeds=None,
                 steps=None, out=None, *, sampling: Optional[str] = "greedy"):
        """Next tokens [B] (int64) of rows 0..B-1 (sampling None: logits [B, V] instead).

        tokens, positions, seqlens, rows: [B] int64 device tensors: the last token of each row, the
        cache position it is written at, the keys the row then sees (positions + 1), its bank
        entry. temperature, top_p [B] float32, top_k, seeds, steps [B] int64: the sampling
        inputs (`sampling.sample`), unused when sampling is "greedy" or None. out: [B] int64,
        optional: also receives the tokens (a captured step's feedback buffer).
        """
        args = (tokens, positions, seqlens, rows, temperature, top_k, top_p, seeds, steps, out)
        self._check(args, sampling)
        embed, layer, head, whole = self._functions(sampling)
        b = tokens.shape[0]
        k_all, v_all = self.k_cache[:, :b], self.v_cache[:, :b]
        with compile_limits(self._compiling):
            self._mark(*[a for a in args if a is not None])
            self._mark(k_all, v_all, dim=1)
            if whole is not None:
                return whole(*args, k_all, v_all)
            return self._forward(*args, k_all, v_all, sampling, layer, head, embed)

    _INPUTS = ("tokens", "positions", "seqlens", "rows", "temperature", "top_k", "top_p", "seeds", "steps", "out")
    _FLOAT_INPUTS = ("temperature", "top_p")

    def _check(self, args, sampling):
        """Shapes, dtypes and devices on the host (no sync: values are the caller's)."""
        if sampling is not None and sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING} (or None for logits), got {sampling!r}")
        batch = args[0].shape[0] if isinstance(args[0], torch.Tensor) else None
        needed = self._INPUTS[:4] + (self._INPUTS[4:9] if sampling in ("sampled", "filtered") else ())
        for name, t in zip(self._INPUTS, args):
            if t is None and name not in needed:
                continue
            want = torch.float32 if name in self._FLOAT_INPUTS else torch.int64
            if not isinstance(t, torch.Tensor) or t.shape != (batch,) or t.dtype != want \
                    or t.device != self.k_cache.device:
                raise ValueError(f"DecodeStep: {name} must be a {want} tensor of shape [{batch}] on "
                                 f"{self.k_cache.device}, got {getattr(t, 'dtype', type(t).__name__)} "
                                 f"{tuple(getattr(t, 'shape', ()))} on {getattr(t, 'device', None)}")
        if not 1 <= batch <= self.k_cache.shape[1]:
            raise ValueError(f"DecodeStep: {batch} rows, but the cache has {self.k_cache.shape[1]} slots")

    def logits(self, tokens, positions, seqlens, rows):
        """[B, V] logits of rows 0..B-1 (the cache is written as by a step)."""
        return self(tokens, positions, seqlens, rows, sampling=None)


def _act(mlp):
    act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
    if act is None:
        raise NotImplementedError(f"{type(mlp).__name__}: no act_fn / activation_fn")
    return act


@contextlib.contextmanager
def compile_limits(compiling: bool = True):
    """Batch buckets x sampling variants recompile the same code more often than dynamo's
    default limit (8), past which it would run eager silently: raised for these calls only, and
    hitting it fails loudly."""
    if not compiling:
        yield
        return
    config = torch._dynamo.config
    wanted = {"recompile_limit": 64, "accumulated_recompile_limit": 4096, "fail_on_recompile_limit_hit": True}
    with config.patch(**{k: v for k, v in wanted.items() if hasattr(config, k)}):
        yield


# --------------------------------------------------------------------------------------------
# What the engine asks for
# --------------------------------------------------------------------------------------------

def sampling_variant(params) -> str:
    """The cheapest of SAMPLING that serves every request's SamplingParams in `params`."""
    params = list(params)
    if all(p.temperature == 0 for p in params):
        return "greedy"
    if any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1) for p in params):
        return "filtered"
    return "sampled"


def engine_step(choice, model, cache, bank, *, offset: int, backend: str) -> Optional[DecodeStep]:
    """The decode step an engine runs for `choice` (its `decode_step` argument): a DecodeStep,
    or None for the HF modules through the cache (eager, each graph replaying their kernels).

    "auto": the compiled step on CUDA for a supported family; otherwise None, said once on CUDA
    with the reason. "compiled": the compiled step, or NotImplementedError saying why not.
    "eager": None. A StepOptions: the step with those options (CPU tests: compiler="aot_eager").
    """
    if isinstance(choice, StepOptions):
        options = choice
    elif choice in ("auto", "compiled"):
        options = StepOptions()
    elif choice == "eager":
        return None
    else:
        raise ValueError(f"decode_step must be 'auto', 'compiled', 'eager' or a StepOptions, got {choice!r}")
    why = unsupported_reason(model)
    if choice == "auto":
        if cache.k.device.type != "cuda":
            return None
        if why is not None:
            warn_once(f"Engine: the decode step runs the model's own modules in a CUDA graph ({why})")
            return None
    elif why is not None:
        raise NotImplementedError(f"decode_step={choice!r}: {why}; use decode_step='eager'")
    if backend == "auto" and cache.k.device.type == "cpu":
        backend = "reference"          # what "auto" takes there, without its warning
    return DecodeStep(model, cache.k, cache.v, bank.prefix, offset=offset, backend=backend, options=options,
                      workspace=cache.workspace)
