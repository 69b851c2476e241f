"""Fused prefix attention: launchers -> custom op -> autograd -> public fn (the Triton kernels
are in prefix_attention_kernels.py).

Every query attends to the P keys of its row's prefix-bank entry (always visible) and to its own
causal keys that the padding mask keeps. The prefix is read straight from the bank
[N, Hkv, P, D]: no concatenated KV, no repeated GQA heads, no mask tensor is ever built.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import triton

from . import prefix_attention_kernels as kernels
from . import split_attention
from .launch import TunedLauncher
from .prefix_grads import reduce_prefix_grads
from .prefix_attention_inputs import (as_prefix_index, check_features, check_inputs, padding_mask_as_bool,
                                      triton_unsupported_reason as _triton_unsupported_reason)
from .reference import reference_prefix_attention
from .utils import (LOG2E, cdiv, env_get, head_dim_class, interpreting as _interpreting, l2_cache_bytes, seq_bucket,
                    sm_count, warn_once as _warn_once)


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
            # D=64 default 128x64 at 8 warps: 128x128 at 4 warps (the default before) spills 2160 B
            # per thread, 3412 B with dropout (ptxas -v, sm_90a, triton 3.9 codegen), and took
            # 0.215 ms untuned at B8 H32/4 S1024 against 0.144 ms autotuned (H100 328706e / H200
            # c5ed49a); 128x64 at 8 warps spills nothing, with or without dropout
            64: [_config(128, 64, 8, 3), _config(128, 128, 4, 3), _config(128, 64, 4, 3), _config(64, 64, 4, 3)],
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
_FEATURES = ["HEAD_DIM", "BLOCK_P", "seq_bucket", "LPT", "CAUSAL", "HAS_KPM", "DROPOUT", "SOFTCAP", "HAS_WINDOW", "HAS_SEGMENTS"]
_TUNE_KEY = {"fwd": _FEATURES, "dq": _FEATURES + ["DQ_GRAD"],
             "dkdv": _FEATURES + ["PREFIX_GRAD", "OWN_GRAD", "DQ_ATOMIC", "DQ_TMA"]}


def _config_class(constexprs, dtype) -> object:
    """fp32 calls take the small-tile candidates whatever their head dim."""
    return "fp32" if dtype == torch.float32 else head_dim_class(constexprs["HEAD_DIM"])


_KERNELS = {"fwd": kernels.prefix_attn_fwd, "dq": kernels.prefix_attn_bwd_dq,
            "dkdv": kernels.prefix_attn_bwd_dkdv}
_LAUNCHER = TunedLauncher(_KERNELS, _CANDIDATES, _TUNE_KEY, _INTERPRET_CONFIG, config_class=_config_class)
# _launch(name, grid, args, constexprs, dtype, seq_bucket): a module global that the launchers
# look up at each call, so tests/test_kernels_compile.py can record the launches instead
_launch = _LAUNCHER.launch


# Where the LPT sections may keep what their programs share: half of L2 (the rest holds the
# streamed tiles). CPU (interpreter) tensors get a small made-up L2 so tests cross sections.
_L2_SHARE = 0.5


def _schedule(rows: int, bytes_per_row: int, device: torch.device):
    """The program order of a launch: (LPT flag, l2_rows, min_programs) for _program_tile.

    Default: the plain 2-D grid. PREFIX_KERNELS_SCHEDULE=lpt (experimental) takes the LPT order,
    which a scheduling model predicted up to 1.5x faster for dK/dV at the TinyLlama shapes
    (benchmarks/model_program_order.py) but measured 1.4% slower fwd+bwd at B8 H32/4 S1024 D64
    (0.798 vs 0.787 ms, H100, cf0371b, results/probe_split-lpt-h100.json; one shape measured).
    PREFIX_KERNELS_LPT_ROWS=n forces n rows per LPT section."""
    if env_get("PREFIX_KERNELS_SCHEDULE", "rows") != "lpt":
        return False, 0, 0
    forced = int(env_get("PREFIX_KERNELS_LPT_ROWS", "0"))
    if forced > 0:
        return True, forced, 0
    if device.type == "cuda":
        l2, sms = l2_cache_bytes(device), sm_count(device)
    else:
        l2, sms = 64 * 1024, 2
    return True, max(1, int(l2 * _L2_SHARE) // max(1, bytes_per_row)), 4 * sms


def _prefix_block(p: int, d: int, dtype) -> int:
    """Keys per block of the prefix loops (and of the dK/dV kernel's prefix programs), apart from
    the own keys' BLOCK_N: a 32-slot prefix in 128-key blocks computed 4x its scores, 18% of a
    causal forward's blocks at S=1024 for 6% of its keys. Under the interpreter (16-key BLOCK_N)
    at most 32: test prefixes of 17-32 slots run in a block of their own size, longer ones span
    several."""
    cap = 32 if _interpreting() or dtype == torch.float32 or d > 128 else 64
    return min(cap, max(16, 1 << (p - 1).bit_length()))


def _grid(lpt: bool, blocks: int, rows: int):
    return (blocks * rows,) if lpt else (blocks, rows)


def _kpm_args(key_padding_mask, q):
    if key_padding_mask is None:
        return q, 0, 0          # any pointer: never read when HAS_KPM is False
    return key_padding_mask, key_padding_mask.stride(0), key_padding_mask.stride(1)


def _seg_args(segment_start, q):
    if segment_start is None:
        return q, 0             # never read when HAS_SEGMENTS is False
    return segment_start, segment_start.stride(0)


def _last_query_seeing(segment_start, seqlen_k):
    """[B, Sk] int32: for every own key j, the last query that may see it through its segment:
    the last i with segment_start[i] <= j. The suffix minimum of the starts is nondecreasing,
    so one searchsorted finds it for any starts (packed documents give sorted ones)."""
    suffix_min = segment_start.flip(-1).cummin(-1).values.flip(-1).contiguous()
    keys = torch.arange(seqlen_k, device=segment_start.device, dtype=segment_start.dtype)
    keys = keys.expand(segment_start.shape[0], seqlen_k).contiguous()
    return (torch.searchsorted(suffix_min, keys, right=True) - 1).to(torch.int32)


def _feature_args(scale, softcap, window, dropout_p, rng):
    """qk_scale, the other scalar kernel arguments of the optional features, and their flags."""
    if softcap:
        # base-2 logit c*log2(e) * tanh(scale*s/c): Gemma 2's softcap of the scaled score
        qk_scale, cap = scale / softcap, softcap * LOG2E
    else:
        qk_scale, cap = scale * LOG2E, 0.0
    scalars = (cap, int(window), *_rng_args(dropout_p, rng))
    flags = dict(DROPOUT=dropout_p > 0, SOFTCAP=bool(softcap), HAS_WINDOW=window > 0)
    return qk_scale, scalars, flags


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
                    dropout_p=0.0, rng=None, softcap=0.0, window=0, segment_start=None):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    p = prefix_k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((b, h, sq), device=q.device, dtype=torch.float32)
    kpm, s_kpm_b, s_kpm_n = _kpm_args(key_padding_mask, q)
    seg, s_seg_b = _seg_args(segment_start, q)
    qk_scale, scalars, flags = _feature_args(scale, softcap, window, dropout_p, rng)
    bucket = seq_bucket(max(sq, sk))
    # consecutive query heads of a GQA group read the same K/V
    lpt, l2_rows, min_programs = _schedule(b * h, 2 * sk * d * q.element_size() // (h // hkv), q.device)
    _launch("fwd", lambda m: _grid(lpt, cdiv(sq, m["BLOCK_M"]), b * h),
            (q, k, v, prefix_k, prefix_v, prefix_index if prefix_index is not None else q, kpm, seg, out, lse,
             *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
             s_kpm_b, s_kpm_n, s_seg_b, *out.stride(),
             h, h // hkv, sq, sk, p, prefix_k.shape[0], qk_scale, *scalars, bucket, b * h, l2_rows, min_programs),
            dict(LPT=lpt, HAS_PIDX=prefix_index is not None, HAS_KPM=key_padding_mask is not None,
                 CAUSAL=causal, HAS_SEGMENTS=segment_start is not None, HEAD_DIM=d,
                 BLOCK_P=_prefix_block(p, d, q.dtype), **flags),
            q.dtype, bucket)
    return out, lse


def _prefix_splits(sq, rows, prefix_blocks, own_grad, device):
    """How many query ranges each prefix key block is split over.

    With own-key programs in the same grid, 2 splits make a prefix program about as long as an
    average own-key program; alone (first layer) they are split until the GPU is full.
    """
    if own_grad:
        want = 2
    else:
        sms = sm_count(device) if device.type == "cuda" else 4
        want = cdiv(2 * sms, rows * prefix_blocks)
    return max(1, min(want, cdiv(sq, 64), 64))


def _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
                     scale, causal, need_dq, need_dkv, need_prefix, dropout_p=0.0, rng=None,
                     softcap=0.0, window=0, segment_start=None):
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    n, p = prefix_k.shape[0], prefix_k.shape[2]
    kpm, s_kpm_b, s_kpm_n = _kpm_args(key_padding_mask, q)
    seg, s_seg_b = _seg_args(segment_start, q)
    pidx = prefix_index if prefix_index is not None else q
    bucket = seq_bucket(max(sq, sk))
    qk_scale, scalars, feature_flags = _feature_args(scale, softcap, window, dropout_p, rng)
    block_p = _prefix_block(p, d, q.dtype)
    flags = dict(HAS_PIDX=prefix_index is not None, HAS_KPM=key_padding_mask is not None, CAUSAL=causal,
                 HAS_SEGMENTS=segment_start is not None, HEAD_DIM=d, BLOCK_P=block_p, **feature_flags)

    delta = torch.empty_like(lse)
    # dQ by atomics in the dK/dV kernel needs every key block's program, so all three gradients
    dq_mode = atomic_dq_requested()
    atomic = need_dq and need_dkv and need_prefix and dq_mode is not None
    if atomic and d > 128:      # its dK/dV tiles outgrow shared memory (263 KB > 227 KB, H100)
        _warn_once(f"prefix_attention: PREFIX_KERNELS_BWD_DQ={dq_mode} runs at head_dim <= 128 only: "
                   "dQ by the dQ kernel at this head_dim")
        atomic = False
    tma = atomic and dq_mode == "tma" and _tma_reduce_available(q)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32) if atomic else q
    dq = torch.empty_like(q) if need_dq and not atomic else q.new_empty(0)
    dk = torch.empty_like(k) if need_dkv else k.new_empty(0)
    dv = torch.empty_like(v) if need_dkv else v.new_empty(0)
    dq_arg = dq if need_dq and not atomic else q
    elt = q.element_size()
    lpt, l2_rows, min_programs = _schedule(b * h, 2 * sk * d * elt // (h // hkv), q.device)
    _launch("dq", lambda m: _grid(lpt, cdiv(sq, m["BLOCK_M"]), b * h),
            (q, k, v, prefix_k, prefix_v, pidx, kpm, seg, out, do, lse, delta, dq_arg,
             *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
             s_kpm_b, s_kpm_n, s_seg_b, *out.stride(), *do.stride(), *dq_arg.stride(),
             h, h // hkv, sq, sk, p, n, qk_scale, scale, *scalars, bucket, b * h, l2_rows, min_programs),
            dict(LPT=lpt, DQ_GRAD=need_dq and not atomic, **flags), q.dtype, bucket)

    dpk, dpv = prefix_k.new_empty(0), prefix_v.new_empty(0)
    if need_dkv or need_prefix:
        splits = _prefix_splits(sq, b * hkv, cdiv(p, block_p), need_dkv, q.device) if need_prefix else 1
        part_shape = (b, splits, hkv, p, d) if need_prefix else (0,)
        part_k = torch.empty(part_shape, device=q.device, dtype=torch.float32)
        part_v = torch.empty(part_shape, device=q.device, dtype=torch.float32)
        dk_arg = dk if need_dkv else k
        dv_arg = dv if need_dkv else v
        if segment_start is None:
            seg_last = q                # never read
        else:                           # int32 either way: the own-key code compiles with OWN_GRAD off too
            seg_last = _last_query_seeing(segment_start, sk) if need_dkv else segment_start

        # a (row, KV head)'s programs share the Q and dO of its group's query heads
        lpt, l2_rows, min_programs = _schedule(b * hkv, 2 * (h // hkv) * sq * d * elt, q.device)

        def grid(m):
            prefix_programs = cdiv(p, block_p) * splits if need_prefix else 0
            own_programs = cdiv(sk, m["BLOCK_N"]) if need_dkv else 0
            return _grid(lpt, prefix_programs + own_programs, b * hkv)

        _launch("dkdv", grid,
                (q, k, v, prefix_k, prefix_v, pidx, kpm, seg, seg_last, do, lse, delta, dk_arg, dv_arg,
                 part_k, part_v, dq_acc,
                 *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(),
                 s_kpm_b, s_kpm_n, s_seg_b, seg_last.stride(0), *do.stride(), *dk_arg.stride(),
                 *dv_arg.stride(), *dq_acc.stride(),
                 hkv, h // hkv, sq, sk, p, n, qk_scale, scale, *scalars, bucket, b * hkv, l2_rows,
                 min_programs),
                dict(LPT=lpt, SPLITS=splits, PREFIX_GRAD=need_prefix, OWN_GRAD=need_dkv, DQ_ATOMIC=atomic, DQ_TMA=tma,
                     # out-of-range own keys need masking only without the causal mask
                     KEEP_MASK=key_padding_mask is not None or not causal, **flags), q.dtype, bucket)
        if need_prefix:
            dpk, dpv = reduce_prefix_grads(part_k, part_v, prefix_index, prefix_k, prefix_v, b, splits)
    if atomic:
        dq = dq_acc.to(q.dtype)
    return dq, dk, dv, dpk, dpv


def atomic_dq_requested() -> Optional[str]:
    """PREFIX_KERNELS_BWD_DQ=atomic|tma (experimental, off by default): dQ accumulated in fp32 by
    the dK/dV kernel, 5 matmuls per (query, key) tile pair instead of 7: "atomic" by per-element
    atomics, "tma" by one TMA reduce-add per tile (Hopper and later; "atomic" elsewhere), as
    FlashAttention 3 accumulates dQ. Both lose to the dQ kernel at default configs (H100, 46a4328,
    results/probe_dq_modes-h100.json): fwd+bwd 0.798 / 0.777 ms against 0.662 at B8 H32/4 S1024
    D64, 1.452 / 1.294 against 1.094 at B8 H32/8 S1024 D128. None (the dQ kernel) while torch's
    deterministic algorithms are on: the atomics' order is not fixed."""
    mode = env_get("PREFIX_KERNELS_BWD_DQ", "separate")
    if mode not in ("atomic", "tma") or torch.are_deterministic_algorithms_enabled():
        return None
    return mode


def _tma_reduce_available(q) -> bool:
    """Whether the dK/dV kernel can add dQ tiles by TMA here (a Hopper+ GPU, not the interpreter);
    sets triton's scratch allocator, which device-side descriptors need, when none is set."""
    if not q.is_cuda or _interpreting() or torch.cuda.get_device_capability(q.device)[0] < 9:
        _warn_once("prefix_attention: PREFIX_KERNELS_BWD_DQ=tma needs a Hopper or newer GPU: "
                   "dQ is added by per-element atomics instead")
        return False
    try:        # the allocator is a context variable: the autograd thread may not see ours
        from triton.runtime import _allocation
        unset = _allocation._allocator.get() is _allocation._NULL_ALLOCATOR
    except (ImportError, AttributeError):
        unset = True
    if unset:
        triton.set_allocator(_scratch)
    return True


def _scratch(size: int, alignment: int, stream):
    """Triton's per-launch scratch (TMA descriptors built on the device), from torch's allocator
    (its blocks are 512-byte aligned: every alignment triton asks for)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


# --------------------------------------------------------------------------------------------
# Custom ops (so torch.compile traces through) and the autograd rule
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("prefix_kernels::prefix_attention_fwd", mutates_args=())
def _prefix_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                          prefix_index: Optional[torch.Tensor],
                          key_padding_mask: Optional[torch.Tensor],
                          scale: float, causal: bool, dropout_p: float, rng: Optional[torch.Tensor],
                          softcap: float, window: int, segment_start: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal,
                           dropout_p, rng, softcap, window, segment_start)


@_prefix_attention_fwd.register_fake
def _(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal, dropout_p, rng,
      softcap, window, segment_start):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("prefix_kernels::prefix_attention_bwd", mutates_args=())
def _prefix_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                          prefix_index: Optional[torch.Tensor],
                          key_padding_mask: Optional[torch.Tensor],
                          out: torch.Tensor, lse: torch.Tensor, scale: float, causal: bool,
                          need_dq: bool, need_dkv: bool, need_prefix: bool,
                          dropout_p: float, rng: Optional[torch.Tensor],
                          softcap: float, window: int, segment_start: Optional[torch.Tensor]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_backward(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out,
                            lse, scale, causal, need_dq, need_dkv, need_prefix, dropout_p, rng,
                            softcap, window, segment_start)


@_prefix_attention_bwd.register_fake
def _(do, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, scale, causal,
      need_dq, need_dkv, need_prefix, dropout_p, rng, softcap, window, segment_start):
    def like(t, needed):
        return torch.empty_like(t) if needed else t.new_empty(0)
    def contiguous_like(t, needed):   # the prefix gradients are written densely
        return t.new_empty(t.shape) if needed else t.new_empty(0)
    return (like(q, need_dq), like(k, need_dkv), like(v, need_dkv),
            contiguous_like(prefix_k, need_prefix), contiguous_like(prefix_v, need_prefix))


def _save(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal, dropout_p,
          rng, softcap, window, segment_start, out, lse):
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, rng,
                          segment_start)
    ctx.scale, ctx.causal, ctx.dropout_p, ctx.softcap, ctx.window = scale, causal, dropout_p, softcap, window


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs, *output)


def _grads(ctx, grad_out, launch_backward):
    q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse, rng, segment_start = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_dq, need_dkv, need_prefix = need[0], need[1] or need[2], need[3] or need[4]
    dq, dk, dv, dpk, dpv = launch_backward(
        grad_out, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, out, lse,
        ctx.scale, ctx.causal, need_dq, need_dkv, need_prefix, ctx.dropout_p, rng,
        ctx.softcap, ctx.window, segment_start)
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
                dropout_p=0.0, rng=None, softcap=0.0, window=0, segment_start=None):
        out, lse = _launch_forward(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                   scale, causal, dropout_p, rng, softcap, window, segment_start)
        _save(ctx, q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, scale, causal,
              dropout_p, rng, softcap, window, segment_start, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _grads(ctx, grad_out, _launch_backward)


_prefix_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, *, prefix_index: torch.Tensor | Sequence[int] | int | None = None,
                     key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                     causal: bool = True, backend: str = "auto", dropout_p: float = 0.0,
                     path: str | None = None, softcap: float | None = None, window: int | None = None,
                     segment_start: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over a per-row prefix from a prefix bank plus the row's own keys.

    Args:
        q: (batch, heads_q, seqlen_q, head_dim), fp16/bf16/fp32, any strides.
        k, v: (batch, heads_kv, seqlen_k, head_dim); heads_q is a multiple of heads_kv (GQA/MQA).
        prefix_k, prefix_v: the bank, (num_entries, heads_kv, prefix_len, head_dim), or
            (heads_kv, prefix_len, head_dim) for a single prefix. Same dtype as q.
        prefix_index: (batch,) ints (a tensor, list or numpy array; one int: every row): bank
            entry of each row; None means entry 0 for every row. Out-of-range values raise
            ValueError when it is on the CPU (it is moved to the GPU without a sync); on CUDA it
            is not checked on the host (a sync per layer), and a row with an out-of-range entry
            gets NaN output rather than a wrong one.
        key_padding_mask: (batch, seqlen_k), True = real token: bool, 0/1 ints (nonzero = real),
            or a float additive mask as HF builds them (0 = real, -inf or the dtype's min =
            padding; other values raise, and checking them costs a device sync: prefer bool).
            Prefix slots are never masked, so a fully padded row still attends to its prefix.
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
        softcap: logit softcapping (Gemma 2): every score s (prefix and own keys, after scale)
            becomes softcap * tanh(s / softcap). None: off.
        window: sliding window (Mistral, Gemma): own key j is visible to a query at key
            position i iff i - window < j <= i (HF's convention); the prefix stays visible.
            Blocks of keys wholly outside every query's window are skipped. Needs causal.
        segment_start: (batch, seqlen_q) ints: packed sequences. The key position where each
            query's document starts: own key j is visible to query i iff
            segment_start[b, i] <= j <= i's key position, so documents packed in one row never
            see each other; each sees its row's prefix. Blocks before a query block's earliest
            start are skipped. Build it with segment_start_from_position_ids or
            segment_start_from_cu_seqlens (ops/segments.py). Needs causal.
        path: how the Triton backend runs: "fused" (our kernels for all keys), "split" (the
            vendor's cuDNN kernel does the attention, the prefix padded into the same call or
            merged by log-sum-exp: ops/split_attention.py; needs fp16/bf16, no key padding,
            causal only with Sq == Sk, determinism not requested; other calls run fused,
            announced once), or "auto" (the faster for the shape as measured: the split's merge
            mode at head_dim >= 64 from 4096 keys, the fused op elsewhere). None reads
            PREFIX_KERNELS_ATTENTION (default "auto"). Calls with dropout, softcap, a window or
            segments run fused.

    Returns:
        (batch, heads_q, seqlen_q, head_dim), dtype of q. Gradients flow to q, k, v and to the
        bank (summed over the rows that share an entry and the query heads of a GQA group).
    """
    prefix_index = as_prefix_index(prefix_index, q)
    check_inputs(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask, backend)
    softcap, window, segment_start = check_features(q, k, causal, dropout_p, softcap, window, segment_start)
    key_padding_mask = padding_mask_as_bool(key_padding_mask)
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
                                          key_padding_mask, scale, causal, dropout_p=dropout_p,
                                          softcap=softcap or None, window=window or None,
                                          segment_start=segment_start)

    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k[None], prefix_v[None]
    if key_padding_mask is not None and key_padding_mask.dtype != torch.uint8:
        key_padding_mask = key_padding_mask.to(torch.uint8)    # [B, Sk] bytes: tiny
    if prefix_index is not None:
        prefix_index = prefix_index.to(q.device, non_blocking=True)
    dropout_p = float(dropout_p)
    split = split_attention.split_plan(path, q, k, prefix_k, key_padding_mask, causal, scale=float(scale),
                                       dropout=dropout_p > 0, softcap=softcap, window=window,
                                       segments=segment_start is not None)
    if split is not None:
        return split_attention.split_prefix_attention(q, k, v, prefix_k, prefix_v, prefix_index,
                                                      float(scale), bool(causal), split)
    rng = draw_rng() if dropout_p > 0 else None
    if torch.compiler.is_compiling():
        out, _ = _prefix_attention_fwd(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                       float(scale), bool(causal), dropout_p, rng, softcap, window,
                                       segment_start)
        return out
    return _PrefixAttention.apply(q, k, v, prefix_k, prefix_v, prefix_index, key_padding_mask,
                                  float(scale), bool(causal), dropout_p, rng, softcap, window, segment_start)


def dropout_mask(rng, batch, heads, seqlen_q, seqlen_k, prefix_len, dropout_p, device):
    """The keep mask [batch, heads, seqlen_q, prefix_len + seqlen_k] (bool, prefix slots first)
    that the kernels draw for `rng` (from draw_rng). A test and debugging aid: reseed torch's
    generator as before the op call and call draw_rng() to get the op's rng."""
    threshold, _, seed, offset = _rng_args(dropout_p, rng)
    keep = torch.empty(batch, heads, seqlen_q, prefix_len + seqlen_k, dtype=torch.int8, device=device)
    block = 16
    kernels.dropout_mask[(cdiv(seqlen_q, block), batch * heads)](
        keep, seed, offset, heads, seqlen_q, seqlen_k, prefix_len, threshold,
        BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
