"""decode_attention against a per-row float64 oracle.

CPU (TRITON_INTERPRET=1): the Triton split-KV kernels, the reference path, dispatch and errors.
GPU (-m gpu): the CUDA kernel in fp16/bf16, D = 64/80/96/128/256, a bank of 100, lengths up to 16k,
forced splits with both combines (with and without a DecodeWorkspace), strided caches, CUDA
graphs captured without warm-up; and the Triton kernels.
Low precision is judged by flash-attention's rule: error vs the fp64 oracle at most 2x PyTorch's
own same-dtype error, plus a floor of one dtype epsilon at the output's scale.

GPU command: python -m pytest -q -m gpu tests/test_decode.py
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

from prefix_kernels.ops import decode as dec
from prefix_kernels.ops.decode import decode_attention, reference_decode_attention
from prefix_kernels.ops.reference import reference_prefix_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_GPU = torch.cuda.is_available()
needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="the Triton kernels run on the CPU only under TRITON_INTERPRET=1 "
                          "(the README's test command sets it)")
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------------
# Inputs and the oracle
# --------------------------------------------------------------------------------------------

def make_case(B=3, HQ=8, HKV=2, SQ=1, D=32, SMAX=45, P=7, N=5, lens=None, pidx="mixed",
              dtype=torch.float32, device="cpu", layout="bhsd"):
    """q, caches, bank, int lengths [B] and prefix ids [B] (CPU tensors, as the server keeps them)."""
    if layout == "bshd":   # cache stored [B, Smax, Hkv, D] and viewed as [B, Hkv, Smax, D]
        k = torch.randn(B, SMAX, HKV, D, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, SMAX, HKV, D, device=device, dtype=dtype).transpose(1, 2)
        q = torch.randn(B, SQ, HQ, D, device=device, dtype=dtype).transpose(1, 2)
    elif layout == "slice":  # a view into a longer cache
        k = torch.randn(B, HKV, SMAX + 24, D, device=device, dtype=dtype)[:, :, 8:SMAX + 8]
        v = torch.randn(B, HKV, SMAX + 24, D, device=device, dtype=dtype)[:, :, 8:SMAX + 8]
        q = torch.randn(B, HQ, SQ, D, device=device, dtype=dtype)
    else:
        k = torch.randn(B, HKV, SMAX, D, device=device, dtype=dtype)
        v = torch.randn(B, HKV, SMAX, D, device=device, dtype=dtype)
        q = torch.randn(B, HQ, SQ, D, device=device, dtype=dtype)
    pk = torch.randn(N, HKV, P, D, device=device, dtype=dtype)
    pv = torch.randn(N, HKV, P, D, device=device, dtype=dtype)
    if lens is None:
        lens = [(SMAX * (b + 1)) // B - b for b in range(B)]
    lens = torch.tensor(lens, dtype=torch.int64)
    if pidx == "mixed":
        pidx = torch.tensor([(7 * b + N - 1) % N for b in range(B)], dtype=torch.int64)
    elif pidx is not None:
        pidx = torch.tensor(pidx, dtype=torch.int64)
    return q, k, v, lens, pk, pv, pidx


def oracle(q, k, v, lens, pk, pv, pidx, dtype=torch.float64, scale=None):
    """Row by row over each row's valid keys only: no padding mask, no alignment tricks.

    dtype=float64: the truth; dtype=q.dtype: PyTorch's own same-dtype error (upcast=False).
    """
    if pk.dim() == 3:
        pk, pv = pk[None], pv[None]
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        index = None if pidx is None else pidx[b:b + 1].to(q.device)
        outs.append(reference_prefix_attention(
            q[b:b + 1].to(dtype), k[b:b + 1, :, :n].to(dtype), v[b:b + 1, :, :n].to(dtype),
            pk.to(dtype), pv.to(dtype), index, scale=scale, causal=True, upcast=False))
    return torch.cat(outs)


def assert_fa_rule(out, q, k, v, lens, pk, pv, pidx, what=""):
    """err(out) <= 2 * err(PyTorch same dtype) + eps(dtype) * max|ref|, both vs fp64."""
    ref = oracle(q, k, v, lens, pk, pv, pidx)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = (out.double() - ref).abs().max().item()
    if q.dtype == torch.float32:
        tol = 2e-5 * max(1.0, ref.abs().max().item())
        assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"
        return
    err_pt = (oracle(q, k, v, lens, pk, pv, pidx, dtype=q.dtype).double() - ref).abs().max().item()
    floor = torch.finfo(q.dtype).eps * ref.abs().max().item()
    assert err <= 2 * err_pt + floor, (
        f"{what}: max error {err:.3g} > 2 x PyTorch's {err_pt:.3g} + {floor:.3g}")


# --------------------------------------------------------------------------------------------
# CPU: the Triton kernels under the interpreter
# --------------------------------------------------------------------------------------------

# Odd lengths on purpose (no multiple of a block), a row of length 0 (prefix only), lengths
# below Sq, P > length, GQA 4:1, MQA, MHA, a bank of 100 with mixed ids, no index, head dim 24.
CPU_CASES = {
    "gqa4_sq1_bank100": dict(HQ=8, HKV=2, SQ=1, N=100, lens=[37, 0, 45], pidx=[99, 3, 50]),
    "gqa4_sq3": dict(HQ=8, HKV=2, SQ=3, N=100, lens=[37, 0, 2], pidx=[12, 99, 0]),
    "mqa_sq3": dict(HQ=4, HKV=1, SQ=3, D=64, lens=[33, 19, 1]),
    "mha_sq1_d24": dict(HQ=2, HKV=2, SQ=1, D=24, lens=[5, 44, 17]),
    "p_gt_len": dict(P=40, SQ=2, lens=[3, 11, 0], N=3),
    "no_index": dict(pidx=None, SQ=3, N=1, lens=[9, 45, 30]),
    "one_row": dict(B=1, HQ=4, HKV=1, SQ=1, lens=[44], N=100, pidx=[77]),
}


@needs_interpreter
@pytest.mark.parametrize("name", list(CPU_CASES))
def test_triton_interpreter_vs_reference(name):
    case = make_case(**CPU_CASES[name])
    q, k, v, lens, pk, pv, pidx = case
    out = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, backend="triton")
    assert_fa_rule(out, *case, what=name)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_triton_interpreter_splits(num_splits):
    case = make_case(SQ=3, lens=[45, 0, 30], N=100, pidx=[5, 99, 5])
    q, k, v, lens, pk, pv, pidx = case
    out = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, backend="triton",
                           num_splits=num_splits)
    assert_fa_rule(out, *case, what=f"splits={num_splits}")


@needs_interpreter
@pytest.mark.parametrize("layout", ["bshd", "slice"])
def test_triton_interpreter_strided_cache(layout):
    case = make_case(SQ=2, layout=layout, lens=[20, 45, 7])
    q, k, v, lens, pk, pv, pidx = case
    out = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, backend="triton")
    assert_fa_rule(out, *case, what=layout)


@needs_interpreter
def test_triton_interpreter_single_prefix_and_scale():
    q, k, v, lens, pk, pv, _ = make_case(SQ=1, N=1, lens=[10, 20, 30])
    out = decode_attention(q, k, v, lens.int(), pk[0], pv[0], scale=0.3, backend="triton")
    ref = oracle(q, k, v, lens, pk, pv, None, scale=0.3)
    assert (out.double() - ref).abs().max().item() < 2e-5


@needs_interpreter
def test_triton_interpreter_fp16():
    case = make_case(SQ=3, D=64, lens=[45, 0, 30], N=100, pidx=[1, 2, 99], dtype=torch.float16)
    q, k, v, lens, pk, pv, pidx = case
    out = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, backend="triton")
    assert_fa_rule(out, *case, what="fp16")


@needs_interpreter
def test_triton_interpreter_bad_rows_are_nan():
    """Device-side index tensors are not checked on the host: a bad row gets NaN, others don't."""
    q, k, v, lens, pk, pv, pidx = make_case(B=4, lens=[10, 20, 30, 40], N=5)
    bad_lens = torch.tensor([10, 46, 30, 40], dtype=torch.int32)   # 46 > Smax
    bad_pidx = torch.tensor([0, 1, 5, 2], dtype=torch.int32)        # 5 >= N
    out = dec._launch_triton(q, k, v, bad_lens, pk, pv, bad_pidx, 0.2, pk.shape[2] + 45, 2)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    good = oracle(q, k, v, lens, pk, pv, bad_pidx.long().clamp(max=4), scale=0.2)
    assert (out[[0, 3]].double() - good[[0, 3]]).abs().max().item() < 2e-5


# --------------------------------------------------------------------------------------------
# CPU: reference path, dispatch, errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gqa4_sq3", "p_gt_len", "no_index", "mqa_sq3"])
def test_reference_path_matches_oracle(name):
    """One reference call (keys right-aligned per row) equals the row-by-row oracle."""
    case = make_case(**CPU_CASES[name])
    q, k, v, lens, pk, pv, pidx = case
    out = reference_decode_attention(q, k, v, lens, pk, pv, pidx)
    assert (out.double() - oracle(*case)).abs().max().item() < 2e-5


def test_auto_on_cpu_uses_reference_and_says_so_once():
    case = make_case(SQ=2)
    q, k, v, lens, pk, pv, pidx = case
    dec._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx)
        decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx)
    messages = [str(w.message) for w in caught if "decode_attention" in str(w.message)]
    assert len(messages) == 1 and "reference" in messages[0] and "CPU" in messages[0], messages
    assert (out.double() - oracle(*case)).abs().max().item() < 2e-5


def test_select_backend_on_cpu():
    q, k, v, lens, pk, pv, pidx = make_case()
    assert dec.select_backend(q, k, v, pk, pv, "auto")[0] == "reference"
    assert dec.select_backend(q, k, v, pk, pv, "reference")[0] == "reference"
    with pytest.raises(ValueError, match="backend='cuda'"):
        dec.select_backend(q, k, v, pk, pv, "cuda")


def test_extension_is_unavailable_without_gpu_or_when_disabled(monkeypatch):
    from prefix_kernels.ops import _build
    _build.cuda_extension.cache_clear()
    try:
        monkeypatch.setenv("PREFIX_KERNELS_NO_CUDA_EXT", "1")
        module, why = _build.cuda_extension()
        assert module is None and "PREFIX_KERNELS_NO_CUDA_EXT" in why
        if not HAS_GPU:
            _build.cuda_extension.cache_clear()
            monkeypatch.delenv("PREFIX_KERNELS_NO_CUDA_EXT")
            module, why = _build.cuda_extension()
            assert module is None and why
    finally:
        _build.cuda_extension.cache_clear()


def test_build_key_names_versions_and_arch():
    from prefix_kernels.ops import _build
    key = _build._build_key("90")
    assert "sm90" in key and "torch" in key and key.startswith("pk")
    assert _build._arch_flags("90") == ["-gencode=arch=compute_90,code=sm_90"]


def test_import_builds_nothing():
    """Importing the package and the decode module neither builds nor loads the extension."""
    import subprocess
    import sys
    code = ("import sys, prefix_kernels; from prefix_kernels.ops import decode; "
            "assert 'prefix_kernels.ops._build' not in sys.modules, 'imported _build'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=root,
                   env={**os.environ, "PYTHONPATH": root})


BAD_INPUTS = {
    "q_3d": (lambda c: dict(q=c["q"][0]), "q must be a 4-D"),
    "cache_shapes_differ": (lambda c: dict(v_cache=c["v_cache"][:, :, :-1]), "same shape"),
    "batch_mismatch": (lambda c: dict(k_cache=c["k_cache"][:2], v_cache=c["v_cache"][:2]), "batch"),
    "heads": (lambda c: dict(q=torch.randn(3, 7, 1, 32)), "multiple of KV heads"),
    "too_many_queries": (lambda c: dict(q=torch.randn(3, 8, 17, 32)), "1..16"),
    "bank_heads": (lambda c: dict(prefix_k=c["prefix_k"][:, :1], prefix_v=c["prefix_v"][:, :1]), "Hkv=2"),
    "bank_empty": (lambda c: dict(prefix_k=c["prefix_k"][:0], prefix_v=c["prefix_v"][:0]), "N >= 1"),
    "dtype": (lambda c: dict(k_cache=c["k_cache"].half()), "dtype"),
    "lens_shape": (lambda c: dict(cache_seqlens=torch.tensor([1, 2])), "cache_seqlens"),
    "lens_float": (lambda c: dict(cache_seqlens=torch.ones(3)), "int32/int64"),
    "lens_range": (lambda c: dict(cache_seqlens=torch.tensor([1, 46, 2])), "cache holds 45"),
    "lens_negative": (lambda c: dict(cache_seqlens=torch.tensor([1, -1, 2])), "cache_seqlens has values"),
    "index_range": (lambda c: dict(prefix_index=torch.tensor([0, 5, 1])), "bank has 5 entries"),
    "backend": (lambda c: dict(backend="fast"), "backend must be"),
    "splits": (lambda c: dict(num_splits=0), "num_splits"),
    "workspace_type": (lambda c: dict(workspace=torch.zeros(64, dtype=torch.int32)),
                       "workspace must be a DecodeWorkspace"),
    "workspace_small": (lambda c: dict(workspace=dec.DecodeWorkspace("cpu", 2, 8, 2)),
                        r"holds 4 counters but this launch \(batch=3, heads_q=8, heads_kv=2, "
                        r"seqlen_q=1\) needs 6"),
    "workspace_device": (lambda c: dict(workspace=dec.DecodeWorkspace("meta", 3, 8, 2)),
                         "workspace is on meta but q is on cpu"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise_clear_errors(name):
    q, k, v, lens, pk, pv, pidx = make_case()
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens, prefix_k=pk, prefix_v=pv,
                prefix_index=pidx)
    change, message = BAD_INPUTS[name]
    args.update(change(args))
    kwargs = {key: args.pop(key) for key in ("prefix_index", "backend", "num_splits", "workspace")
              if key in args}
    with pytest.raises(ValueError, match=message):
        decode_attention(*args.values(), **kwargs)


def test_workspace_size_is_one_counter_per_block_row():
    # batch * Hkv * ceil(G * Sq / 16): G*Sq = 4 -> 1 chunk, 24 -> 2, 16 -> exactly 1
    assert dec.DecodeWorkspace.required(3, 8, 2, 1) == 6
    assert dec.DecodeWorkspace.required(2, 32, 4, 3) == 16
    assert dec.DecodeWorkspace.required(5, 16, 1, 1) == 5
    assert dec.DecodeWorkspace.required(0, 8, 2) == 0
    ws = dec.DecodeWorkspace("cpu", 4, 32, 4)
    assert ws.size == 16 and ws.counters.dtype == torch.int32 and not ws.counters.any()
    with pytest.raises(ValueError, match="heads_q a multiple of heads_kv"):
        dec.DecodeWorkspace("cpu", 4, 6, 4)


@pytest.mark.parametrize("backend", ["reference"] + (["triton"] if INTERPRET else []))
def test_workspace_is_accepted_and_unused_off_the_cuda_kernel(backend):
    case = make_case(SQ=2)
    q, k, v, lens, pk, pv, pidx = case
    ws = dec.DecodeWorkspace("cpu", 3, 8, 2, 2)
    out = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, backend=backend, workspace=ws)
    assert torch.equal(out, decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, backend=backend))
    assert not ws.counters.any()


# --------------------------------------------------------------------------------------------
# GPU: the CUDA kernel
# --------------------------------------------------------------------------------------------

def _cuda_ext():
    module, why = dec._extension()
    assert module is not None, f"the CUDA extension did not load: {why}"
    return module


def _gpu_case(dtype, D, HQ, HKV, SQ, lens, N=100, P=32, layout="bhsd", smax=None):
    B = len(lens)
    smax = max(max(lens), 1) if smax is None else smax
    case = make_case(B=B, HQ=HQ, HKV=HKV, SQ=SQ, D=D, SMAX=smax, P=P, N=N, lens=lens,
                     dtype=dtype, device="cuda", layout=layout)
    q, k, v, lens_t, pk, pv, pidx = case
    if N == 100:  # mixed ids spread over the whole bank, some rows sharing an entry
        pidx = torch.tensor([(37 * b + 99) % 100 for b in range(B)], dtype=torch.int64)
        pidx[-1] = pidx[0]
    return q, k, v, lens_t, pk, pv, pidx


# (HQ, HKV, SQ, lens): GQA 8:1 as TinyLlama, MQA, MHA with Sq=16, G*Sq > 16 (several row
# chunks), a row of length 0, lengths below Sq, odd lengths.
GPU_SHAPES = {
    "tinyllama_sq1": (32, 4, 1, [1000, 0, 517, 1, 64, 999]),
    "mqa_sq3": (8, 1, 3, [257, 2, 1023, 0]),
    "mha_sq16": (4, 4, 16, [300, 16, 5, 129]),
    "gqa_sq5_chunks": (16, 2, 5, [700, 3, 1100]),
}


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
def test_cuda_vs_reference(dtype, D, shape):
    _cuda_ext()
    HQ, HKV, SQ, lens = GPU_SHAPES[shape]
    case = _gpu_case(dtype, D, HQ, HKV, SQ, lens, P=7 if shape == "mqa_sq3" else 32)
    q, k, v, lens_t, pk, pv, pidx = case
    out = decode_attention(q, k, v, lens_t, pk, pv, prefix_index=pidx, backend="cuda")
    assert_fa_rule(out, *case, what=f"{shape} D={D} {dtype}")


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D,SQ", [(64, 1), (80, 1), (96, 1), (128, 1), (64, 4), (96, 4)])
def test_cuda_long_context(dtype, D, SQ):
    _cuda_ext()
    case = _gpu_case(dtype, D, 32, 4, SQ, [16384, 9001, 1, 4097])
    q, k, v, lens_t, pk, pv, pidx = case
    # lengths on the GPU, no host hint: the split is sized from Smax, no sync
    out = decode_attention(q, k, v, lens_t.cuda().int(), pk, pv, prefix_index=pidx.cuda().int(),
                           backend="cuda")
    assert_fa_rule(out, *case, what=f"16k D={D} Sq={SQ} {dtype}")


@gpu
@needs_gpu
@pytest.mark.parametrize("fused", [True, False], ids=["last_block_combines", "combine_kernel"])
@pytest.mark.parametrize("num_splits", [1, 2, 13, 128])
@pytest.mark.parametrize("D", [80, 96, 128])     # float2 / 8-byte / 16-byte epilogue stores
def test_cuda_forced_splits(num_splits, fused, D):
    _cuda_ext()
    case = _gpu_case(torch.bfloat16, D, 16, 2, 3, [2000, 0, 77, 1999, 5])
    q, k, v, lens_t, pk, pv, pidx = case
    workspace = dec.DecodeWorkspace("cuda", 5, 16, 2, 3) if fused else None
    for _ in range(3):   # the counters must come back to zero for the next launch
        out = decode_attention(q, k, v, lens_t.cuda().int(), pk, pv, prefix_index=pidx.cuda().int(),
                               backend="cuda", num_splits=num_splits, workspace=workspace)
        assert_fa_rule(out, *case, what=f"D={D} splits={num_splits} fused={fused}")
        if fused:
            assert workspace.counters.count_nonzero().item() == 0


@gpu
@needs_gpu
def test_cuda_workspace_serves_smaller_launches_and_stays_zero():
    """One workspace sized for the largest launch serves smaller ones (fewer rows, Sq = 1)."""
    _cuda_ext()
    workspace = dec.DecodeWorkspace("cuda", 6, 32, 4, 4)
    for lens, sq in (([900, 3, 0, 4000, 1, 77], 4), ([129, 2000], 1), ([5000, 17, 64], 3)):
        case = _gpu_case(torch.float16, 64, 32, 4, sq, lens)
        q, k, v, lens_t, pk, pv, pidx = case
        out = decode_attention(q, k, v, lens_t, pk, pv, prefix_index=pidx, backend="cuda",
                               num_splits=7, workspace=workspace)
        assert_fa_rule(out, *case, what=f"workspace reuse B={len(lens)} Sq={sq}")
        assert workspace.counters.count_nonzero().item() == 0


@gpu
@needs_gpu
@pytest.mark.parametrize("layout", ["bshd", "slice"])
def test_cuda_strided_cache_and_bank_view(layout):
    _cuda_ext()
    q, k, v, lens_t, _, _, pidx = _gpu_case(torch.float16, 64, 32, 4, 2, [300, 41, 0], layout=layout)
    # the bank as views of one [L, 2, N, Hkv, P, D] tensor (DESIGN.md)
    store = torch.randn(3, 2, 100, 4, 32, 64, device="cuda", dtype=torch.float16)
    pk, pv = store[1, 0], store[1, 1]
    assert dec.select_backend(q, k, v, pk, pv)[0] == "cuda"
    out = decode_attention(q, k, v, lens_t, pk, pv, prefix_index=pidx)
    assert_fa_rule(out, q, k, v, lens_t, pk, pv, pidx, what=layout)


@gpu
@needs_gpu
def test_cuda_bad_device_indices_give_nan_rows():
    _cuda_ext()
    q, k, v, lens_t, pk, pv, _ = _gpu_case(torch.float16, 64, 8, 2, 1, [50, 60, 70, 80], N=5)
    lens_bad = torch.tensor([50, 81, 70, 80], device="cuda", dtype=torch.int32)   # 81 > Smax
    pidx_bad = torch.tensor([0, 1, -1, 4], device="cuda", dtype=torch.int32)      # -1
    for splits in (None, 1, 4):
        out = decode_attention(q, k, v, lens_bad, pk, pv, prefix_index=pidx_bad, backend="cuda",
                               num_splits=splits)
        assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
        assert not torch.isnan(out[[0, 3]]).any()


@gpu
@needs_gpu
@pytest.mark.parametrize("workspace", [True, False], ids=["workspace", "no_workspace"])
def test_cuda_graph_replay(workspace):
    """Captured once with no warm-up launch, replayed with new queries and lengths: the
    workspace made before capture is what the graph reads, and the kernel leaves it zero."""
    _cuda_ext()
    q, k, v, lens_t, pk, pv, pidx = _gpu_case(torch.bfloat16, 64, 32, 4, 1, [900, 17, 0, 640],
                                          smax=1024)
    lens_d = lens_t.cuda().int()
    pidx_d = pidx.cuda().int()
    ws = dec.DecodeWorkspace("cuda", 4, 32, 4) if workspace else None
    dec._extension()      # the build and the kernels' one-time attributes happen outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = decode_attention(q, k, v, lens_d, pk, pv, prefix_index=pidx_d, num_splits=8,
                               workspace=ws)
    for step in range(3):
        q.copy_(torch.randn_like(q))
        lens_d.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert_fa_rule(out, q, k, v, lens_d.cpu().long(), pk, pv, pidx, what=f"replay {step}")
        if ws is not None:
            assert ws.counters.count_nonzero().item() == 0


@gpu
@needs_gpu
def test_auto_picks_cuda_without_warning():
    _cuda_ext()
    q, k, v, lens_t, pk, pv, pidx = _gpu_case(torch.float16, 128, 8, 2, 1, [100, 200])
    path, why = dec.select_backend(q, k, v, pk, pv)
    assert path == "cuda", why
    dec._warn_once.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decode_attention(q, k, v, lens_t, pk, pv, prefix_index=pidx)


# --------------------------------------------------------------------------------------------
# GPU: the Triton kernels (the fallback when the extension is unavailable)
# --------------------------------------------------------------------------------------------

@gpu
@needs_gpu
@pytest.mark.skipif(INTERPRET, reason="Triton on CUDA tensors needs TRITON_INTERPRET unset")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("D", [64, 96, 128, 256])
@pytest.mark.parametrize("shape", ["tinyllama_sq1", "mqa_sq3", "gqa_sq5_chunks"])
def test_triton_gpu_vs_reference(dtype, D, shape):
    HQ, HKV, SQ, lens = GPU_SHAPES[shape]
    case = _gpu_case(dtype, D, HQ, HKV, SQ, lens)
    q, k, v, lens_t, pk, pv, pidx = case
    out = decode_attention(q, k, v, lens_t, pk, pv, prefix_index=pidx, backend="triton")
    assert_fa_rule(out, *case, what=f"triton {shape} D={D} {dtype}")


@gpu
@needs_gpu
@pytest.mark.skipif(INTERPRET, reason="Triton on CUDA tensors needs TRITON_INTERPRET unset")
def test_auto_without_extension_falls_back_to_triton(monkeypatch):
    from prefix_kernels.ops import _build
    monkeypatch.setenv("PREFIX_KERNELS_NO_CUDA_EXT", "1")
    _build.cuda_extension.cache_clear()
    dec._warn_once.cache_clear()
    try:
        case = _gpu_case(torch.float16, 64, 8, 2, 1, [100, 7])
        q, k, v, lens_t, pk, pv, pidx = case
        with pytest.warns(UserWarning, match="Triton kernel.*PREFIX_KERNELS_NO_CUDA_EXT"):
            out = decode_attention(q, k, v, lens_t, pk, pv, prefix_index=pidx)
        assert_fa_rule(out, *case, what="auto -> triton")
    finally:
        _build.cuda_extension.cache_clear()


# --------------------------------------------------------------------------------------------
# The custom op (prefix_kernels::decode_attention): what torch.compile sees
# --------------------------------------------------------------------------------------------

def test_custom_op_schema_fake_and_compile():
    """opcheck: schema (the workspace counters declared mutated), fake tensor, dispatch; then a
    fullgraph compile through the op equals the eager function."""
    q, k, v, lens, pk, pv, pidx = make_case(B=3, HQ=8, HKV=2, D=32, SMAX=20, P=3, N=4)
    ws = dec.DecodeWorkspace("cpu", 3, 8, 2)
    args = (q, k, v, lens, pk, pv, pidx, 0.2, "reference", 20, ws.counters)
    torch.library.opcheck(dec.decode_attention_op, args)
    want = decode_attention(q, k, v, lens, pk, pv, prefix_index=pidx, scale=0.2, backend="reference")
    compiled = torch.compile(lambda *a: dec.decode_attention_op(*a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), 2 * want)
    torch.testing.assert_close(dec.decode_attention_op(*args[:-1], None), want)


@gpu
@needs_gpu
def test_custom_op_compiled_in_cuda_graph():
    """inductor around the op (CUDA kernel, the workspace's fused combine), captured in a CUDA
    graph with no warm-up launch of the kernel on the capture stream, replayed with new inputs."""
    _cuda_ext()
    q, k, v, lens_t, pk, pv, pidx = _gpu_case(torch.bfloat16, 64, 32, 4, 1, [300, 17, 0, 640], smax=1024)
    lens_d, pidx_d = lens_t.cuda().int(), pidx.cuda().int()
    ws = dec.DecodeWorkspace("cuda", 4, 32, 4)
    fn = torch.compile(lambda q: dec.decode_attention_op(q * 1.0, k, v, lens_d, pk, pv, pidx_d, 0.125, "auto",
                                                         1024, ws.counters), fullgraph=True)    # 0.125 = 1/sqrt(64)
    fn(q)                       # compiles (on the default stream)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn(q)
    for step in range(2):
        q.copy_(torch.randn_like(q))
        lens_d.add_(1)
        graph.replay()
        torch.cuda.synchronize()
        assert_fa_rule(out, q, k, v, lens_d.cpu().long(), pk, pv, pidx, what=f"replay {step}")
        assert ws.counters.count_nonzero().item() == 0
