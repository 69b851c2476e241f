"""Fused prefix attention: launchers -> custom op -> autograd -> public fn (the Triton kernels
are in prefix_attention_kernels.py).

Every query attends to the P keys of its row's prefix-bank entry (always visible) and to its own
causal keys that the padding mask keeps. The prefix is read straight from the bank
[N, Hkv, P, D]: no concatenated KV, no repeated GQA heads, no mask tensor is ever built.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional

import torch
import triton

from . import prefix_attention_kernels as kernels
from . import split_attention
from .reference import reference_prefix_attention
from .utils import LOG2E, interpreting as _interpreting, sm_count, warn_once as _warn_once

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _config(block_m, block_n, warps, stages):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Per kernel and head-dim class: the default first (FlexAttention's H100 defaults: fwd 128x64,
# 8 warps, 3 stages at D=128; bwd 64x128 for dK/dV and 128x64 for dQ), then the neighbours
# autotune may pick instead. fp32 runs exact (ieee) dots and gets small tiles.
_CANDIDATES = {
    "fwd": {"fp32": [_config(64, 32, 4, 2), _config(32, 32, 4, 2)],
            64: [_config(128, 128, 4, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3), _config(128, 64, 8, 3)],
            128: [_config(128, 64, 8, 3), _config(128, 128, 8, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3)],
            256: [_config(64, 32, 4, 3), _config(64, 64, 8, 2), _config(128, 32, 8, 2)]},
    "dq": {"fp32": [_config(32, 32, 4, 2), _config(64, 32, 4, 2)],
           64: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 4, 3), _config(64, 128, 8, 2)],
           128: [_config(128, 64, 8, 3), _config(64, 64, 4, 3), _config(128, 32, 8, 3), _config(64, 32, 4, 3)],
           256: [_config(64, 64, 8, 2), _config(64, 32, 4, 2), _config(32, 64, 4, 2)]},
    "dkdv": {"fp32": [_config(16, 32, 4, 2), _config(32, 32, 4, 2)],
             64: [_config(64, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 128, 4, 3), _config(128, 128, 8, 2)],
             128: [_config(64, 128, 8, 3), _config(64, 64, 4, 3), _config(32, 128, 4, 3), _config(64, 128, 8, 2)],
             256: [_config(64, 64, 8, 2), _config(32, 64, 4, 2), _config(32, 32, 4, 2)]},
}
# Hopper candidates (issue 10, design 2), appended after the ones above: deeper pipelines and
# 8 warps at D=128, after Triton's fused-attention tutorial on H100 (fwd 128x128, 8 warps, 3-4
# stages; bwd 32x128 dK/dV and 128x32 dQ at 4-5 stages). Configs over the shared memory of a GPU
# fail to compile and autotune skips them; benchmarks/probe_split.py prints which ones win.
_HOPPER_CANDIDATES = {
    "fwd": {64: [_config(128, 128, 8, 3), _config(128, 64, 4, 4)],
            128: [_config(128, 64, 8, 4), _config(128, 128, 8, 4)]},
    "dq": {64: [_config(128, 64, 4, 4), _config(128, 128, 8, 3)],
           128: [_config(128, 64, 8, 4), _config(128, 128, 8, 3)]},
    "dkdv": {64: [_config(32, 128, 4, 5), _config(64, 128, 4, 4)],
             128: [_config(32, 128, 4, 5), _config(64, 128, 8, 4)]},
}
for _name, _table in _HOPPER_CANDIDATES.items():
    for _cls, _configs in _table.items():
        _CANDIDATES[_name][_cls].extend(_configs)
# 16x16 blocks under the interpreter: small test shapes then span several blocks.
_INTERPRET_CONFIG = _config(16, 16, 4, 1)
_FEATURES = ["HEAD_DIM", "seq_bucket", "CAUSAL", "HAS_KPM", "DROPOUT"]
_TUNE_KEY = {"fwd": _FEATURES, "dq": _FEATURES + ["DQ_GRAD"], "dkdv": _FEATURES + ["PREFIX_GRAD", "OWN_GRAD"]}


def _autotune_enabled() -> bool:
    # PREFIX_KERNELS_AUTOTUNE=0 takes each default untimed (tests, quick runs).
    return os.environ.get("PREFIX_KERNELS_AUTOTUNE", "1") != "0"


def _head_dim_class(head_dim: int, dtype) -> object:
    if dtype == torch.float32:
        return "fp32"
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


_KERNELS = {"fwd": kernels.prefix_attn_fwd, "dq": kernels.prefix_attn_bwd_dq,
            "dkdv": kernels.prefix_attn_bwd_dkdv}


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str):
    """The kernel wrapped in an autotuner over the candidates of the call's head-dim class."""
    kernel = _KERNELS[kernel_name]
    if _interpreting():
        return triton.autotune(configs=[_INTERPRET_CONFIG], key=_TUNE_KEY[kernel_name])(kernel)
    table = _CANDIDATES[kernel_name]
    every = [c for configs in table.values() for c in configs]

    def candidates(configs, named_args, **kwargs):
        cls = _head_dim_class(kwargs["HEAD_DIM"], named_args["q_ptr"].dtype)
        return table[cls] if _autotune_enabled() else table[cls][:1]

    return triton.autotune(configs=every, key=_TUNE_KEY[kernel_name],
                           prune_configs_by={"early_config_prune": candidates})(kernel)


_CHOSEN: dict = {}


def _derived(kernel, args, constexprs) -> dict:
    """The constexprs the kernel's @triton.heuristics derive, computed once per launch key."""
    named = {**dict(zip(kernel.arg_names, args)), **constexprs}
    for name, rule in kernel.values.items():
        named[name] = rule(named)
    return {name: named[name] for name in kernel.values}


def _launch(kernel_name, grid, args, constexprs, dtype, seq_bucket):
    """Launch with the config autotune chose for this key, skipping triton's Autotuner.run (and
    the heuristics wrapper) on later calls: Autotuner.run cost ~70 us of host time per launch
    (H200 host, triton 3.6), which left the GPU idle at B16 S1024 D64 (1.06 ms host vs 0.6 ms
    GPU per forward+backward). The key holds everything the heuristics read (HEAD_DIM, dtype)."""
    key = (kernel_name, dtype, seq_bucket, *sorted(constexprs.items()))
    chosen = _CHOSEN.get(key)
    if chosen is None:
        tuner = _tuned(kernel_name)
        tuner[grid](*args, **constexprs)
        _CHOSEN[key] = (tuner.best_config, _derived(_KERNELS[kernel_name], args, constexprs))
        return
    config, derived = chosen
    _KERNELS[kernel_name].fn[grid](*args, **constexprs, **derived, **config.kwargs,
                                   num_warps=config.num_warps, num_stages=config.num_stages)


def _seq_bucket(n: int) -> int:
    # Autotune once per power-of-two length class (>= 256) rather than per exact length.
    return max(256, triton.next_power_of_2(n))


def _kpm_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, 0          # any pointer: never read when HAS_KPM is False
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


def _rng_args(dropout_p, rng):
    """(threshold, keep_scale, seed, offset) for the kernels; zeros (never read) without dropout.

    A key is kept iff its 16-bit draw >= threshold = round(p * 65536): the keep rate is 1 - p
    to within 2^-17, and kept probabilities are scaled by 1 / (1 - p)."""
    if dropout_p == 0:
        return 0, 0.0, 0, 0
    seed, offset = rng.tolist()
    threshold = min(max(round(dropout_p * 65536), 1), 65535)
    return threshold, 1.0 / (1.0 - dropout_p), int(seed), int(offset) & 0x7FFFFFFF


def draw_rng() -> torch.Tensor:
    """(seed, offset) of one dropout call: int64 [2] on the CPU, from torch's default generator.

    torch.manual_seed makes the masks reproducible, and torch.utils.checkpoint restores this
    generator before it recomputes a forward, so the recompute draws the same mask. A CPU
    tensor: the launchers read it without a device sync."""
    return torch.randint(2**32, 2**62, (2,), dtype=torch.int64)


def _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal,
                    dropout_p=0.0, rng=None):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    p = prefix_k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    kpm, s_kpm_b, s_kpm_n = _kpm_args(key_padding_mask, q)
    bucket = _seq_bucket(max(sq, sk))
    _launch("fwd", lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h),
            (q, k, v, prefix_k, prefix_v, prefix_index if prefix_index is not None else q, kpm, out, lse,
             *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
             s_kpm_b, s_kpm_n, *out.stride(),
             h, h // hkv, sq, sk, p, prefix_k.shape[0], scale * LOG2E,
             *_rng_args(dropout_p, rng), bucket),
            dict(HAS_PIDX=prefix_index is not None, HAS_KPM=key_padding_mask is not None,
                 CAUSAL=causal, DROPOUT=dropout_p > 0, HEAD_DIM=d), q.dtype, bucket)
    return out, lse


def _prefix_splits(sq, rows, p, own_grad, device):
    """How many query ranges each prefix key block is split over.

    With own-key programs in the same grid, 2 splits make a prefix program about as long as an
    average own-key program; alone (first layer) they are split until the GPU is full.
    """
    if own_grad:
        want = 2
    else:
        sms = sm_count(device) if device.type == "cuda" else 4
        want = triton.cdiv(2 * sms, rows * triton.cdiv(p, 64))
    return max(1, min(want, triton.cdiv(sq, 64), 64))


def _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                     scale, causal, need_dq, need_dkv, need_prefix, dropout_p=0.0, rng=None):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    kpm, s_kpm_b, s_kpm_n = _kpm_args(key_padding_mask, q)
    pidx = prefix_index if prefix_index is not None else q
    bucket = _seq_bucket(max(sq, sk))
    flags = dict(HAS_PIDX=prefix_index is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal,
                 DROPOUT=dropout_p > 0, HEAD_DIM=d)
    rng_args = _rng_args(dropout_p, rng)

    delta = torch.empty_like(lse)
    dq = torch.empty_like(q) if need_dq else q.new_empty(0)
    dk = torch.empty_like(k) if need_dkv else k.new_empty(0)
    dv = torch.empty_like(v) if need_dkv else v.new_empty(0)
    dq_arg = dq if need_dq else q
    _launch("dq", lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h),
            (q, k, v, prefix_k, prefix_v, pidx, kpm, out, do, lse, delta, dq_arg,
             *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
             s_kpm_b, s_kpm_n, *out.stride(), *do.stride(), *dq_arg.stride(),
             h, h // hkv, sq, sk, p, n, scale * LOG2E, scale, *rng_args, bucket),
            dict(DQ_GRAD=need_dq, **flags), q.dtype, bucket)

    dpk, dpv = prefix_k.new_empty(0), prefix_v.new_empty(0)
    if need_dkv or need_prefix:
        splits = _prefix_splits(sq, b * hkv, p, need_dkv, q.device) if need_prefix else 1
        part_shape = (b, splits, hkv, p, d) if need_prefix else (0,)
        part_k = torch.empty(part_shape, device=q.device, dtype=torch.float32)
        part_v = torch.empty(part_shape, device=q.device, dtype=torch.float32)
        dk_arg = dk if need_dkv else k
        dv_arg = dv if need_dkv else v

        def grid(m):
            prefix_programs = triton.cdiv(p, m["BLOCK_N"]) * splits if need_prefix else 0
            own_programs = triton.cdiv(sk, m["BLOCK_N"]) if need_dkv else 0
            return (prefix_programs + own_programs, b * hkv)

        _launch("dkdv", grid,
                (q, k, v, prefix_k, prefix_v, pidx, kpm, do, lse, delta, dk_arg, dv_arg, part_k, part_v,
                 *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
                 s_kpm_b, s_kpm_n, *do.stride(), *dk_arg.stride(), *dv_arg.stride(),
                 hkv, h // hkv, sq, sk, p, n, scale * LOG2E, scale, *rng_args, bucket),
                dict(SPLITS=splits, PREFIX_GRAD=need_prefix, OWN_GRAD=need_dkv,
                     # out-of-range own keys need masking only without the causal mask
                     KEEP_MASK=key_padding_mask is not None or not causal, **flags), q.dtype, bucket)
        if need_prefix:
            dpk, dpv = prefix_k.new_empty(prefix_k.shape), prefix_v.new_empty(prefix_v.shape)
            row = hkv * p * d
            block = 1024 if not _interpreting() else 256
            kernels.reduce_prefix_grads[(triton.cdiv(row, block), n)](
                part_k, part_v, pidx, dpk, dpv, b, row, splits,
                HAS_PIDX=prefix_index is not None, BLOCK=block)
    return dq, dk, dv, dpk, dpv


# --------------------------------------------------------------------------------------------
# Custom ops (so torch.compile traces through) and the autograd rule
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefix_kernels::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                          prefix_index: Optional[torch.Tensor],
                          key_padding_mask: Optional[torch.Tensor],
                          scale: float, causal: bool, dropout_p: float, rng: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal,
                           dropout_p, rng)


@_prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal, dropout_p, rng):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                          prefix_index: Optional[torch.Tensor],
                          key_padding_mask: Optional[torch.Tensor],
                          out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                          need_dq: bool, need_dkv: bool, need_prefix: bool,
                          dropout_p: float, rng: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out,
                            lse, scale, causal, need_dq, need_dkv, need_prefix, dropout_p, rng)


@_prefix_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, scale, causal,
      need_dq, need_dkv, need_prefix, dropout_p, rng):
    def like(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)
    def contiguous_like(t, needed):   # the prefix gradients are written densely
        return t.new_empty(t.shape) if needed else t.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            contiguous_like(prefix_k, need_prefix), contiguous_like(prefix_v, need_prefix))


def _save(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal, dropout_p,
          rng, out, lse):
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, rng)
    ctx.scale, ctx.causal, ctx.dropout_p = scale, causal, dropout_p


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, *output)


def _grads(ctx, grad_out, launch_backward):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, rng = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dkv, need_prefix = need[0], need[1] or need[2], need[3] or need[4]
    dq, dk, dv, dpk, dpv = launch_backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        ctx.scale, ctx.causal, need_dq, need_dkv, need_prefix, ctx.dropout_p, rng)
    grads = (dq if need_dq else None, dk if need[1] else None, dv if need[2] else None,
             dpk if need[3] else None, dpv if need[4] else None)
    return grads + (None,) * (len(need) - len(grads))


def _backward(ctx, grad_out, grad_lse):
    return _grads(ctx, grad_out, _prefix_attention_bwd)


class _PrefixAttention(torch.autograd.Function):
    """The eager path: the same launchers without the custom-op dispatch, which cost ~45 us
    per call on the host (fwd 61 us vs 16 us for a trivial op, torch 2.13, CPU)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal,
                dropout_p=0.0, rng=None):
        out, lse = _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                   scale, causal, dropout_p, rng)
        _save(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal,
              dropout_p, rng, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _launch_backward)


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, backend):
    def fail(msg):
        raise ValueError(f"prefix_attention: {msg}")

    if backend not in ("auto", "triton", "reference"):
        fail(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            fail(f"{name} must be a 4-D tensor [batch, heads, seq, head_dim], got "
                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if prefix_k.dim() not in (3, 4) or prefix_k.shape != prefix_v.shape:
        fail(f"prefix_k and prefix_v must both be [N, Hkv, P, D] (or [Hkv, P, D]), got "
             f"{tuple(prefix_k.shape)} and {tuple(prefix_v.shape)}")
    b, hq, sq, d = q.shape
    if k.shape != v.shape:
        fail(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if k.shape[0] != b or k.shape[3] != d:
        fail(f"k {tuple(k.shape)} must be [batch={b}, Hkv, Sk, head_dim={d}] to match q {tuple(q.shape)}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        fail(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    pk = prefix_k if prefix_k.dim() == 4 else prefix_k[None]
    if pk.shape[1] != hkv or pk.shape[3] != d:
        fail(f"prefix_k {tuple(prefix_k.shape)} must have Hkv={hkv} heads and head_dim={d}")
    if pk.shape[2] < 1:
        fail("the prefix must have at least one slot (P >= 1)")
    if pk.shape[0] < 1:
        fail("the prefix bank is empty (N = 0)")
    for name, t in (("k", k), ("v", v), ("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        if t.dtype != q.dtype:
            fail(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast them to one dtype")
        if t.device != q.device:
            fail(f"{name} is on {t.device} but q is on {q.device}")
    if prefix_index is not None:
        if prefix_index.shape != (b,) or prefix_index.dtype not in (torch.int32, torch.int64):
            fail(f"prefix_index must be an int32/int64 tensor of shape [{b}], got "
                 f"{prefix_index.dtype} {tuple(prefix_index.shape)}")
        if prefix_index.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(prefix_index.min()), int(prefix_index.max())
            if lo < 0 or hi >= pk.shape[0]:
                fail(f"prefix_index has values in [{lo}, {hi}] but the bank has {pk.shape[0]} entries")

    if key_padding_mask is not None:
        if key_padding_mask.shape != (b, k.shape[2]):
            fail(f"key_padding_mask must be [batch={b}, Sk={k.shape[2]}], got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            fail(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")


def _triton_unsupported_reason(q) -> Optional[str]:
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the kernels take fp16, bf16, fp32)"
    if q.shape[-1] > MAX_HEAD_DIM or q.shape[-1] < 16:
        return f"head_dim {q.shape[-1]} (the kernels take 16..{MAX_HEAD_DIM})"
    return None


def prefix_attention(q, k, v, prefix_k, prefix_v, *, prefix_index=None, key_padding_mask=None,
                     scale=None, causal=True, backend="auto", dropout_p=0.0, path=None):
    """Attention over a per-row prefix from a prefix bank plus the row's own keys.

    Args:
        q: (batch, heads_q, seqlen_q, head_dim), fp16/bf16/fp32, any strides.
        k, v: (batch, heads_kv, seqlen_k, head_dim); heads_q is a multiple of heads_kv (GQA/MQA).
        prefix_k, prefix_v: the bank, (num_entries, heads_kv, prefix_len, head_dim), or
            (heads_kv, prefix_len, head_dim) for a single prefix. Same dtype as q.
        prefix_index: (batch,) int: bank entry of each row; None means entry 0 for every row.
            Out-of-range values raise ValueError when it is on the CPU (it is moved to the GPU
            without a sync); on CUDA it is not checked on the host (a sync per layer), and a
            row with an out-of-range entry gets NaN output rather than a wrong one.
        key_padding_mask: (batch, seqlen_k) bool or 0/1 ints, True = real token. Prefix slots are
            never masked, so a fully padded row still attends to its prefix.
        scale: softmax scale, default 1/sqrt(head_dim).
        causal: query i sits at key position seqlen_k - seqlen_q + i (bottom-right alignment).
        backend: "auto" (Triton for CUDA tensors, the reference elsewhere), "triton" (on CPU
            tensors only under TRITON_INTERPRET=1), or "reference".
        dropout_p: attention dropout on the probabilities over all P + Sk keys (prefix slots
            included, as PEFT's eager path), kept ones scaled by 1/(1 - p); pass it only in
            training. The kernels draw the mask from a counter-based RNG (Philox) seeded from
            torch's default CPU generator: reproducible under torch.manual_seed, the same in
            backward and in a torch.utils.checkpoint recompute, nothing stored per element
            (`dropout_mask` rebuilds it). The reference backend draws its own mask.
        path: how the Triton backend runs: "fused" (our kernels for all keys), "split" (the
            vendor's cuDNN kernel does the attention, the prefix padded into the same call or
            merged by log-sum-exp: ops/split_attention.py; needs fp16/bf16, no key padding,
            causal only with Sq == Sk, determinism not requested; other calls run fused,
            announced once), or "auto" (the faster for the shape). None reads
            PREFIX_KERNELS_ATTENTION (default "auto").

    Returns:
        (batch, heads_q, seqlen_q, head_dim), dtype of q. Gradients flow to q, k, v and to the
        bank (summed over the rows that share an entry and the query heads of a GQA group).
    """
    _check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, backend)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"prefix_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if backend == "auto":
        backend = "triton" if q.is_cuda else "reference"
    if backend == "triton":
        if not q.is_cuda and not _interpreting():
            raise ValueError("prefix_attention: backend='triton' needs CUDA tensors, or "
                             "TRITON_INTERPRET=1 set before import to run the kernels on the CPU")
        reason = _triton_unsupported_reason(q)
        if reason is not None:
            _warn_once(f"prefix_attention: falling back to the PyTorch reference for {reason}")
            backend = "reference"
    if backend == "reference":
        return reference_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index,
                                          key_padding_mask, scale, causal, dropout_p=dropout_p)

    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    if key_padding_mask is not None and key_padding_mask.dtype != torch.uint8:
        key_padding_mask = (key_padding_mask != 0).to(torch.uint8)    # [B, Sk] bytes: tiny
    if prefix_index is not None:
        prefix_index = prefix_index.to(q.device, non_blocking=True)
    dropout_p = float(dropout_p)
    split = split_attention.split_plan(path, q, k, prefix_k, key_padding_mask, causal,
                                       dropout=dropout_p > 0)
    if split is not None:
        return split_attention.split_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index,
                                                      float(scale), bool(causal), split)
    rng = draw_rng() if dropout_p > 0 else None
    if torch.compiler.is_compiling():
        out, _ = _prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index,
                                       key_padding_mask, float(scale), bool(causal), dropout_p, rng)
        return out
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                  float(scale), bool(causal), dropout_p, rng)


def dropout_mask(rng, batch, heads, seqlen_q, seqlen_k, prefix_len, dropout_p, device):
    """The keep mask [batch, heads, seqlen_q, prefix_len + seqlen_k] (bool, prefix slots first)
    that the kernels draw for `rng` (from draw_rng). A test and debugging aid: reseed torch's
    generator as before the op call and call draw_rng() to get the op's rng."""
    threshold, _, seed, offset = _rng_args(dropout_p, rng)
    keep = torch.empty(batch, heads, seqlen_q, prefix_len + seqlen_k, dtype=torch.int8, device=device)
    block = 16
    kernels.dropout_mask[(triton.cdiv(seqlen_q, block), batch * heads)](
        keep, seed, offset, heads, seqlen_q, seqlen_k, prefix_len, threshold,
        BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
