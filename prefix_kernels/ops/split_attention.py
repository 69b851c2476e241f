"""Split prefix attention: the vendor's kernel (cuDNN, flash) for the own keys, or for all keys.

Three modes (`SplitConfig.mode`), measured against each other by benchmarks/probe_split.py:
  "pad"    no attention kernel of ours (ops/padded_attention.py): the row's prefix keys are
           prepended to its own; a vendor whose causal mask aligns bottom-right (cudnn_fe, flash)
           computes our masking as it is, a top-left one (PyTorch's cuDNN op) gets P zero query
           rows too (the square (P+S) problem), dropped after.
  "merge"  the vendor's causal kernel over the own keys -> (o, lse, natural log); one Triton kernel
           per query block computes the prefix part and merges both by log-sum-exp in place over
           the vendor's output (the merge reads O once). The backward calls the vendor's backward
           with the MERGED output and log-sum-exp: its softmax and its rowsum(dO*O) are then the
           global ones, so its dq, dk, dv are exact for the own keys (PyTorch's ring attention
           runs its parts the same way); Triton adds the prefix's share of dq in place and writes
           fp32 bank partials, reduced in a fixed order by the fused op's `reduce_prefix_grads`.
  "fused_forward"  the fused Triton forward (prefix included) with the backward of "merge".
Backward kinds of "merge" / "fused_forward" (`SplitConfig.backward`): "onepass" (one kernel per
(row, KV head, query split) adds the prefix dq and writes the bank partials, reading q, dO, O
once; P <= ONEPASS_MAX_P), "twopass" (a dq kernel per query block, then a bank-gradient kernel per
prefix block), "auto". Vendors: "cudnn" | "flash" (PyTorch's aten ops, ops/vendor_attention.py)
| "cudnn_fe" (cuDNN through its frontend package, pad mode only: ops/cudnn_frontend.py) | "math"
(a plain PyTorch stand-in with their contract, for the CPU tests under the interpreter).

Only for what the vendor computes the same way (`split_plan` says when): CUDA fp16/bf16, causal
with Sq == Sk (merge's vendor call is over the own keys alone, aligned top-left) or not causal, or
Sq < Sk in pad mode with a bottom-right vendor; no key padding, a head dim the vendor takes,
determinism not requested (the vendors' backward need not be bitwise deterministic). Everything
else runs the fused op (ops/prefix_attention.py).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton

from .prefix_grads import reduce_prefix_grads
from .split_kernels import _split_bwd_dprefix, _split_bwd_dq, _split_bwd_onepass, _split_fwd_merge
from .launch import TunedLauncher
from .utils import LOG2E, cdiv, env_get, head_dim_class, interpreting, next_power_of_2, seq_bucket, sm_count, warn_once
from .vendor_attention import (BOTTOM_RIGHT, VENDOR_MAX_HEAD_DIM, in_layout_of, lse_bhs, vendor_backward,
                               vendor_forward)

LN2 = 0.6931471805599453
VENDORS = ("cudnn", "flash", "math", "cudnn_fe")
MODES = ("pad", "merge", "fused_forward")
BACKWARDS = ("auto", "onepass", "twopass")
PATHS = ("auto", "fused", "split")


class SplitConfig(NamedTuple):
    vendor: str = "cudnn"
    mode: str = "pad"
    backward: str = "auto"


# --------------------------------------------------------------------------------------------
# Launch configs
# --------------------------------------------------------------------------------------------

def _config(block_m, warps, stages):
    return triton.Config({"BLOCK_M": block_m}, num_warps=warps, num_stages=stages)


# These kernels move q, O, dO, dQ once each and do little math (P << S): memory-bound, so wide
# query blocks and enough programs in flight matter more than the pipeline. Two candidates per
# kernel and head-dim class (each compiles ~1 s at first use); default first, which
# PREFIX_KERNELS_AUTOTUNE=0 takes untimed. The one-pass kernel holds 2 x BLOCK_N x D fp32
# accumulators: 8 warps from D=128 on.
_LOOP_CONFIGS = {64: [_config(64, 4, 2), _config(128, 8, 2)],
                 128: [_config(64, 4, 2), _config(128, 8, 2)],
                 256: [_config(32, 4, 2), _config(64, 8, 2)]}
_CANDIDATES = {
    "merge": _LOOP_CONFIGS, "dq": _LOOP_CONFIGS, "dprefix": _LOOP_CONFIGS,
    "onepass": {64: [_config(64, 4, 2), _config(128, 8, 2), _config(32, 4, 2)],
                128: [_config(64, 8, 2), _config(32, 4, 2)],
                256: [_config(32, 8, 2), _config(16, 4, 2)]},
}
_INTERPRET_CONFIG = _config(16, 4, 1)
_KERNELS = {"merge": _split_fwd_merge, "dq": _split_bwd_dq, "dprefix": _split_bwd_dprefix,
            "onepass": _split_bwd_onepass}
# In-place outputs: autotune must put them back after each timed run.
_RESTORE = {"merge": ["o_ptr"], "dq": ["dq_ptr"], "dprefix": None, "onepass": ["dq_ptr"]}
_TUNE_KEY = ["HEAD_DIM", "BLOCK_N", "seq_bucket", "HAS_PIDX", "PREC"]
# All P keys of a one-pass program sit in one block of its registers.
ONEPASS_MAX_P = {64: 128, 128: 64, 256: 32}
# autotune once per key, then launch directly: see ops/launch.py
_LAUNCHER = TunedLauncher(_KERNELS, _CANDIDATES, {name: _TUNE_KEY for name in _KERNELS}, _INTERPRET_CONFIG,
                          restore=_RESTORE)
_launch = _LAUNCHER.launch


def _meta(q, p, one_block=False):
    d = q.shape[-1]          # BLOCK_D: derived by the kernels' heuristics (split_kernels._derive)
    return dict(HEAD_DIM=d, PREC="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
                BLOCK_N=max(16, next_power_of_2(p)) if one_block else _prefix_block(p, d))


def _prefix_block(p: int, d: int) -> int:
    """Prefix keys per block of the looping kernels: all of P up to 64 (32 at D=256); 16 under
    the interpreter so that small test prefixes span several blocks."""
    if interpreting():
        return 16
    return max(16, min(next_power_of_2(p), 32 if d > 128 else 64))


def _onepass_fits(p: int, d: int) -> bool:
    return p <= ONEPASS_MAX_P[head_dim_class(d)]


def _query_splits(sq: int, programs_per_split: int, device) -> int:
    """Query ranges per (row, KV head): about 4 programs per SM, so that a memory-bound grid has
    loads in flight everywhere (the fp32 partials this costs are B*SPLITS*Hkv*P*D, small)."""
    sms = sm_count(device) if device.type == "cuda" else 4
    want = cdiv(4 * sms, max(programs_per_split, 1))
    return max(1, min(want, cdiv(sq, 64), 64))


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, mode,
                    match_layout=False):
    """Merged (out, lse) of modes "merge" and "fused_forward": lse natural log [B, H, Sq] fp32
    contiguous; out in the vendor's layout, or in q's (as the custom op's fake promises) with
    match_layout."""
    b, h, sq, _ = q.shape
    hkv, p = k.shape[1], prefix_k.shape[2]
    if mode == "fused_forward":
        from .prefix_attention import _launch_forward as fused_forward
        out, lse2 = fused_forward(q, k, v, prefix_k, prefix_v, prefix_index, None, scale, causal)
        return out, lse2 * LN2
    out, lse_own = vendor_forward(vendor, q, k, v, scale, causal)
    lse_own = lse_bhs(lse_own, b, h, sq)
    if match_layout:
        out = in_layout_of(out, q)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    meta = _meta(q, p)
    bucket = seq_bucket(sq)
    _launch("merge", lambda m: (cdiv(sq, m["BLOCK_M"]), b * h),
            (q, prefix_k, prefix_v, prefix_index if prefix_index is not None else q, out, lse_own, lse,
             *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *lse_own.stride(),
             h, h // hkv, sq, p, prefix_k.shape[0], scale * LOG2E, bucket),
            dict(HAS_PIDX=prefix_index is not None, **meta), q.dtype, bucket)
    return out, lse


def _backward_kind(backward, p, d):
    """onepass when all P keys fit its one block (asked for, or auto), else twopass."""
    return "onepass" if backward in ("auto", "onepass") and _onepass_fits(p, d) else "twopass"


def _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, scale, causal,
                     vendor, backward, need_dq, need_dkv, need_prefix, match_layout=False):
    """dq, dk, dv (the vendor's, in its layout, or as q, k, v's with match_layout) with the
    prefix's dq added, and the bank gradients; empty tensors for what is not needed."""
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    dq, dk, dv = q.new_empty(0), k.new_empty(0), v.new_empty(0)
    dpk, dpv = prefix_k.new_empty(0), prefix_v.new_empty(0)
    if need_dq or need_dkv:
        dq, dk, dv = vendor_backward(vendor, do, q, k, v, out, lse, scale, causal)
        if match_layout:
            dq, dk, dv = in_layout_of(dq, q), in_layout_of(dk, k), in_layout_of(dv, v)
        dq = dq if need_dq else q.new_empty(0)
        dk, dv = (dk, dv) if need_dkv else (k.new_empty(0), v.new_empty(0))
    if not (need_dq or need_prefix):
        return dq, dk, dv, dpk, dpv

    kind = _backward_kind(backward, p, d) if need_prefix else "twopass"
    meta = _meta(q, p, one_block=kind == "onepass")
    pidx = prefix_index if prefix_index is not None else q
    dq_arg = dq if need_dq else q
    common = dict(HAS_PIDX=prefix_index is not None, **meta)
    bucket = seq_bucket(sq)
    if need_prefix:
        prefix_programs = cdiv(p, meta["BLOCK_N"]) if kind == "twopass" else 1
        splits = _query_splits(sq, b * hkv * prefix_programs, q.device)
        part_k = torch.empty((b, splits, hkv, p, d), device=q.device, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
    if kind == "onepass":
        _launch("onepass", lambda m: (splits, b * hkv),
                (q, prefix_k, prefix_v, pidx, out, do, lse, dq_arg, part_k, part_v,
                 *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *do.stride(),
                 *dq_arg.stride(), hkv, h // hkv, sq, p, n, splits, scale * LOG2E, scale, bucket),
                dict(DQ_GRAD=need_dq, **common), q.dtype, bucket)
    else:
        delta = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
        _launch("dq", lambda m: (cdiv(sq, m["BLOCK_M"]), b * h),
                (q, prefix_k, prefix_v, pidx, out, do, lse, delta, dq_arg,
                 *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *out.stride(), *do.stride(),
                 *dq_arg.stride(), h, h // hkv, sq, p, n, scale * LOG2E, scale, bucket),
                dict(DQ_GRAD=need_dq, **common), q.dtype, bucket)
        if need_prefix:
            _launch("dprefix", lambda m: (cdiv(p, meta["BLOCK_N"]) * splits, b * hkv),
                    (q, prefix_k, prefix_v, pidx, do, lse, delta, part_k, part_v,
                     *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *do.stride(),
                     hkv, h // hkv, sq, p, n, splits, scale * LOG2E, scale, bucket),
                    common, q.dtype, bucket)
    if need_prefix:
        dpk, dpv = reduce_prefix_grads(part_k, part_v, prefix_index, prefix_k, prefix_v, b, splits)
    return dq, dk, dv, dpk, dpv


# --------------------------------------------------------------------------------------------
# Custom ops (torch.compile traces them) and the autograd rule
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefix_kernels::split_attention_fwd", mutates_args=())
def _split_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                         prefix_index: Optional[torch.Tensor], scale: float, causal: bool,
                         vendor: str, mode: str, backward: str) -> tuple[torch.Tensor, torch.Tensor]:
    # `backward` does not change the forward: it rides along for the autograd rule
    return _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, mode,
                           match_layout=True)


@_split_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, mode, backward):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::split_attention_bwd", mutates_args=())
def _split_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                         prefix_index: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                         scale: float, causal: bool, vendor: str, backward: str,
                         need_dq: bool, need_dkv: bool, need_prefix: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, scale, causal,
                            vendor, backward, need_dq, need_dkv, need_prefix, match_layout=True)


@_split_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, scale, causal, vendor, backward,
      need_dq, need_dkv, need_prefix):
    def like(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)

    def dense(t, needed):       # the bank gradients are written densely
        return t.new_empty(t.shape) if needed else t.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            dense(prefix_k, need_prefix), dense(prefix_v, need_prefix))


def _grads(ctx, grad_out, launch_backward):
    """The five input gradients (None where autograd asks for none)."""
    q, k, v, prefix_k, prefix_v, prefix_index, out, lse = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dkv, need_prefix = need[0], need[1] or need[2], need[3] or need[4]
    dq, dk, dv, dpk, dpv = launch_backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, out, lse, ctx.scale, ctx.causal,
        ctx.config.vendor, ctx.config.backward, need_dq, need_dkv, need_prefix)
    return (dq if need_dq else None, dk if need[1] else None, dv if need[2] else None,
            dpk if need[3] else None, dpv if need[4] else None)


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, vendor, mode, backward = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, out, lse)
    ctx.scale, ctx.causal, ctx.config = scale, causal, SplitConfig(vendor, mode, backward)


def _backward(ctx, grad_out, grad_lse):
    return _grads(ctx, grad_out, _split_attention_bwd) + (None,) * 6


_split_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SplitAttention(torch.autograd.Function):
    """The eager path: the launchers without the custom-op dispatch (~45 us of host time)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, config):
        out, lse = _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal,
                                   config.vendor, config.mode)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, out, lse)
        ctx.scale, ctx.causal, ctx.config = scale, causal, config
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _launch_backward) + (None,) * 4


# --------------------------------------------------------------------------------------------
# When to split, and the entry point the public op calls
# --------------------------------------------------------------------------------------------

# path="auto": a SplitConfig here runs for every eligible call (tests set one); None applies the
# measured rule below.
AUTO_SPLIT: Optional[SplitConfig] = None
# The merge split beat the fused op at head_dim 128 from 4096 keys on every such shape of issue
# 10 (fwd+bwd vs cuDNN without a prefix, H100, 9d2eeee, results/probe_split-merge-h100.json:
# 0.88 vs 0.76 at B8 H32/8 S4096 P32, 0.81 vs 0.71 at B4 P256, 0.95 vs 0.78 at B1 S16384), and at
# head_dim 64 too (0.861 vs 0.767 at B2 H32/4 S4096 P128, H100, 46a4328,
# results/probe_split-d64-merge-h100.json; TinyLlama's training step there 0.980x the frozen
# model's with the split against 0.957x fused, results/training-h100.json). It lost at S=1024
# (0.68 vs 0.74 at D=128; 0.51 vs 0.87 at B8 H32/4 D64, 7a6ded6): its extra passes over Q, O, dO
# and dQ are O(S), the attention it hands to cuDNN O(S^2).
AUTO_MERGE_MIN_KEYS = 4096
AUTO_MERGE_MIN_HEAD_DIM = 64


def auto_rule(is_cuda: bool, head_dim: int, seqlen_q: int, seqlen_k: int) -> Optional[SplitConfig]:
    """path='auto' without AUTO_SPLIT: the split variant measured faster for this shape, or None."""
    if is_cuda and head_dim >= AUTO_MERGE_MIN_HEAD_DIM and seqlen_q == seqlen_k >= AUTO_MERGE_MIN_KEYS:
        return SplitConfig("cudnn", "merge", "auto")
    return None


# cuDNN through its frontend package (vendor "cudnn_fe", pad mode), tried first by path="auto"
# where PREFIX_KERNELS_AUTO_CUDNN_FE=1: off by default until measured on a GPU. It predicts
# 0.89-0.99x cuDNN without a prefix on issue 10's shapes (the prefix's P*S scores of S^2/2 at
# cuDNN's speed, plus one K/V concatenation).
AUTO_CUDNN_FE_ENV = "PREFIX_KERNELS_AUTO_CUDNN_FE"


def _auto_configs(q, k) -> list:
    """path='auto': the split variants to try for this shape in order (none: the fused op)."""
    if AUTO_SPLIT is not None:
        return [AUTO_SPLIT]
    configs = []
    if q.is_cuda and env_get(AUTO_CUDNN_FE_ENV, "0") == "1":
        configs.append(SplitConfig("cudnn_fe", "pad", "auto"))
    rule = auto_rule(q.is_cuda, q.shape[-1], q.shape[2], k.shape[2])
    if rule is not None:
        configs.append(rule)
    return configs


def default_config(q) -> SplitConfig:
    """The split variant `path='split'` runs: env PREFIX_KERNELS_SPLIT_VENDOR / _MODE / _BACKWARD
    override the defaults; CPU tensors (interpreter) take the PyTorch stand-in."""
    env = os.environ.get
    vendor = "math" if not q.is_cuda else env("PREFIX_KERNELS_SPLIT_VENDOR", "cudnn")
    mode = env("PREFIX_KERNELS_SPLIT_MODE", "pad")
    backward = env("PREFIX_KERNELS_SPLIT_BACKWARD", "auto")
    return _checked(SplitConfig(vendor, mode, backward))


def _checked(config: SplitConfig) -> SplitConfig:
    for value, allowed in zip(config, (VENDORS, MODES, BACKWARDS)):
        if value not in allowed:
            raise ValueError(f"prefix_attention: split setting {value!r} is not one of {allowed} "
                             f"(SplitConfig, or env PREFIX_KERNELS_SPLIT_VENDOR / _MODE / _BACKWARD)")
    return config


def ineligible_reason(q, k, key_padding_mask, causal, vendor, mode="pad", **features) -> Optional[str]:
    """Why the split path cannot compute this call exactly as the fused op, or None.

    `features`: keyword arguments of the fused op the vendor kernels lack (dropout, softcap,
    sliding window, packed sequences...): any one set (not None, not 0/False) disqualifies.
    Whether cuDNN builds a graph for the shape (vendor "cudnn_fe") is `cudnn_fe_reason`'s."""
    set_features = features_set(features)
    if set_features:
        return f"{', '.join(set_features)} (only the fused kernel has them)"
    if torch.are_deterministic_algorithms_enabled():
        return "torch deterministic algorithms are on (the vendor backward is not bitwise deterministic)"
    if key_padding_mask is not None:
        return "a key padding mask (the vendor kernels take none here)"
    if causal and q.shape[2] != k.shape[2] and not (mode == "pad" and BOTTOM_RIGHT[vendor]):
        return (f"causal with Sq={q.shape[2]} != Sk={k.shape[2]} (vendor {vendor!r} in mode {mode!r} aligns "
                f"the causal mask top-left, this op bottom-right)")
    if vendor == "cudnn_fe" and torch.compiler.is_compiling():
        return "torch.compile (the cuDNN frontend's graphs run in eager mode only)"
    if vendor == "cudnn_fe" and mode != "pad":
        return f"mode {mode!r} with vendor 'cudnn_fe' (it runs mode 'pad')"
    if vendor == "cudnn_fe" and q.shape[2] != k.shape[2]:
        return ("fewer queries than keys with vendor 'cudnn_fe' (a cuDNN graph per key length: decode "
                "and cached prefill run fused)")
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {q.dtype} (the vendor kernels take fp16/bf16)"
        if vendor == "math":
            return "the 'math' stand-in is for CPU tests only"
        if not torch.compiler.is_compiling() and _capability(q.device) < (8, 0):   # dynamo: no capability query
            return f"a GPU of compute capability {_capability(q.device)} (the vendor kernels need 8.0+)"
    elif not interpreting():
        return "CPU tensors (the split path runs on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    elif vendor != "math":
        return f"vendor {vendor!r} on the CPU (only the 'math' stand-in runs there)"
    d = q.shape[-1]
    if d % 8 != 0 or d > VENDOR_MAX_HEAD_DIM[vendor] or d < 16:
        return f"head_dim {d} ({vendor} takes multiples of 8 from 16 to {VENDOR_MAX_HEAD_DIM[vendor]})"
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "an empty sequence"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


def split_plan(path, q, k, prefix_k, key_padding_mask, causal, scale=None, **features) -> Optional[SplitConfig]:
    """The split variant to run for this call, or None for the fused path.

    path: "auto" | "fused" | "split"; None reads PREFIX_KERNELS_ATTENTION (default "auto").
    A requested split that cannot run is announced once with the reason; the fused path runs."""
    if path is None:
        path = env_get("PREFIX_KERNELS_ATTENTION", "auto")
    if path not in PATHS:
        raise ValueError(f"prefix_attention: path must be one of {PATHS}, got {path!r} "
                         f"(keyword path= or env PREFIX_KERNELS_ATTENTION)")
    if path == "fused":
        return None
    configs = [default_config(q)] if path == "split" else _auto_configs(q, k)
    for config in configs:
        reason = unusable_reason(config, q, k, prefix_k, key_padding_mask, causal, scale, **features)
        if reason is None:
            return config
        if path == "split":
            warn_once(f"prefix_attention: path='split' runs the fused kernels instead for {reason}")
        elif config.vendor == "cudnn_fe" and not features_set(features) and key_padding_mask is None:
            # asked for by PREFIX_KERNELS_AUTO_CUDNN_FE, unusable for a reason of the setup or shape
            warn_once(f"prefix_attention: {AUTO_CUDNN_FE_ENV}=1 but the cuDNN frontend cannot run this "
                      f"call: {reason}; path='auto' runs without it")
    return None


def features_set(features: dict) -> list:
    """The names of the fused-only features a call sets (not None, not 0/False)."""
    return sorted(name for name, value in features.items() if value is not None and value is not False
                  and not (isinstance(value, (int, float)) and value == 0))


def unusable_reason(config: SplitConfig, q, k, prefix_k, key_padding_mask=None, causal=True, scale=None,
                    **features) -> Optional[str]:
    """Why this split variant cannot run this call (ineligible_reason, and for cudnn_fe whether
    cuDNN builds a graph for the shape), or None."""
    reason = ineligible_reason(q, k, key_padding_mask, causal, config.vendor, config.mode, **features)
    if reason is None and config.vendor == "cudnn_fe":
        reason = cudnn_fe_reason(q, k, prefix_k, q.shape[-1] ** -0.5 if scale is None else scale, causal)
    return reason


def cudnn_fe_reason(q, k, prefix_k, scale, causal) -> Optional[str]:
    """Why the cuDNN frontend cannot run this call's attention over the prefix-prepended keys, or
    None: the package is missing, or cuDNN builds no graph for the shape (found once per shape,
    then cached)."""
    from . import cudnn_frontend
    reason = cudnn_frontend.unavailable_reason()
    if reason is not None:
        return reason
    b, hkv, sk, d = k.shape
    # the layouts the split path hands it: q as given with its last dim dense (else contiguous),
    # K/V concatenated (ops/prefix_rows.py: contiguous)
    q_layout = cudnn_frontend.layout(q) if q.stride(-1) == 1 else (tuple(q.shape), _dense_strides(q.shape))
    kv_shape = (b, hkv, prefix_k.shape[2] + sk, d)
    kv_layout = (kv_shape, _dense_strides(kv_shape))
    reason = cudnn_frontend.unsupported_reason(q.dtype, q_layout, kv_layout, kv_layout, scale, causal, q.device)
    return None if reason is None else f"cuDNN has no graph for this shape ({reason})"


def _dense_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def split_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, scale: float, causal: bool,
                           config: SplitConfig = SplitConfig()):
    """The split path (inputs already checked by `prefix_attention`; prefix_k [N, Hkv, P, D]).

    Returns out (batch, heads_q, seqlen_q, head_dim) in q's dtype; gradients as the fused op's."""
    _checked(config)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    if config.mode == "pad":
        from .padded_attention import padded_prefix_attention
        return padded_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index, scale, causal, config.vendor)
    if torch.compiler.is_compiling():
        out, _ = _split_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, float(scale),
                                      bool(causal), *config)
        return out
    return _SplitAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, float(scale),
                                 bool(causal), config)
