"""The split path (the vendor's kernel for the own keys; the prefix either padded into the same
vendor call or computed by Triton kernels merged by log-sum-exp) against the float64 reference:
output and all five gradients.

On the CPU the vendor is the PyTorch stand-in ("math": same contract as cuDNN's op, LSE
[B, H, S, 1] natural log, a backward that takes the merged O and LSE), the Triton kernels run
under the interpreter. The GPU tests run the real cuDNN and flash ops.
"""
import math
import warnings

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.ops import split_attention as sa
from prefix_kernels.ops.vendor_attention import lse_bhs
from prefix_kernels.ops.reference import reference_prefix_attention
import attention_utils
from utils import kernel_device, requires_gpu

NAMES = attention_utils.NAMES


def make_inputs(**kwargs):
    """attention_utils.make_inputs without a padding mask (the split path takes none)."""
    tensors, index, _ = attention_utils.make_inputs(**kwargs)
    return tensors, index


def run_split(tensors, index, grad_out, config, causal=True):
    scale = 1 / math.sqrt(tensors[0].shape[-1])
    out = sa.split_prefix_attention(*tensors, index, scale, causal, config)
    needs = [t for t in tensors if t.requires_grad]
    return out, torch.autograd.grad(out, needs, grad_out)


def reference_fp64(tensors, index, grad_out, causal=True):
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    out = reference_prefix_attention(*leaves, index, None, None, causal)
    needs = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad(out, needs, grad_out.double())


# Odd shapes: lengths no multiple of the 16-row interpreter blocks, S=1, P=1, P>S (several
# prefix blocks), GQA 4:1, MQA, HF strides, a head dim needing padding, mixed ids over 3 entries.
CASES = {
    "base_gqa2": dict(),
    "s1": dict(SQ=1, P=5),
    "p1": dict(P=1, SQ=33),
    "p_gt_s": dict(P=40, SQ=9),
    "gqa4": dict(H=8, HKV=2, SQ=35),
    "mqa": dict(H=4, HKV=1, SQ=21, P=17),
    "hf_strides": dict(SQ=23, hf_layout=True),
    "head_dim_40": dict(D=40, SQ=18, H=2, HKV=1),
    "single_entry": dict(N=1, mixed=False, SQ=26),
    # Sq > 64: the bank-gradient programs split the queries into ranges (one range up to 64)
    "long_splits": dict(B=2, H=2, HKV=1, SQ=150, P=7),
}
MATRIX = ([(case, mode, kind) for case in CASES for mode, kind in (("pad", "auto"), ("merge", "onepass"),
                                                                      ("merge", "twopass"))]
          + [(case, "fused_forward", "onepass") for case in ("base_gqa2", "p_gt_s", "hf_strides")])
# every mode, and for the Triton modes both backward kinds
MODES = [("pad", "auto"), ("merge", "onepass"), ("merge", "twopass")]
MODE_IDS = ["pad", "merge_onepass", "merge_twopass"]


@pytest.mark.parametrize("case, mode, backward", MATRIX, ids=["-".join(m) for m in MATRIX])
def test_split_matches_fp64_reference(case, mode, backward):
    device = kernel_device()
    tensors, index = make_inputs(device=device, **CASES[case])
    grad_out = torch.randn_like(tensors[0])
    out, grads = run_split(tensors, index, grad_out, sa.SplitConfig("math", mode, backward))
    ref_out, ref_grads = reference_fp64(tensors, index, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode, backward", MODES, ids=MODE_IDS)
def test_not_causal_with_more_keys_than_queries(mode, backward):
    device = kernel_device()
    tensors, index = make_inputs(SQ=13, SK=29, device=device)
    grad_out = torch.randn_like(tensors[0])
    out, grads = run_split(tensors, index, grad_out, sa.SplitConfig("math", mode, backward), causal=False)
    ref_out, ref_grads = reference_fp64(tensors, index, grad_out, causal=False)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("mode, backward", MODES, ids=MODE_IDS)
def test_unused_bank_entries_get_zero_gradient(mode, backward):
    device = kernel_device()
    tensors, _ = make_inputs(B=3, N=4, SQ=17, device=device)
    index = torch.tensor([0, 2, 0], device=device)
    _, grads = run_split(tensors, index, torch.randn_like(tensors[0]), sa.SplitConfig("math", mode, backward))
    for g in grads[3:]:
        assert g[1].abs().max() == 0 and g[3].abs().max() == 0
        assert g[0].abs().max() > 0 and g[2].abs().max() > 0


@pytest.mark.parametrize("mode, backward", MODES, ids=MODE_IDS)
def test_prefix_gradients_are_bitwise_deterministic(mode, backward):
    device = kernel_device()
    tensors, index = make_inputs(B=3, SQ=20, N=2, P=20, device=device)
    grad_out = torch.randn_like(tensors[0])
    config = sa.SplitConfig("math", mode, backward)
    first = run_split(tensors, index, grad_out, config)[1]
    second = run_split(tensors, index, grad_out, config)[1]
    for a, b in zip(first[3:], second[3:]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["pad", "merge"])
@pytest.mark.parametrize("wanted", [(3, 4), (0,), (1, 2), (0, 3)], ids=["bank", "q", "kv", "q_bank"])
def test_only_requested_gradients_are_computed(wanted, mode):
    device = kernel_device()
    tensors, index = make_inputs(SQ=21, P=9, device=device)
    for i, t in enumerate(tensors):
        t.requires_grad_(i in wanted)
    grad_out = torch.randn_like(tensors[0])
    _, grads = run_split(tensors, index, grad_out, sa.SplitConfig("math", mode, "auto"))
    _, ref_grads = reference_fp64(tensors, index, grad_out)
    assert len(grads) == len(wanted)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("mode", ["pad", "merge"])
def test_out_of_range_entry_on_the_device_poisons_only_its_row(mode):
    device = kernel_device()
    tensors, _ = make_inputs(B=3, SQ=9, N=3, device=device)
    bad = torch.tensor([0, 7, 2], device=device)
    out = sa.split_prefix_attention(*tensors, bad, 1 / math.sqrt(32), True, sa.SplitConfig("math", mode))
    assert torch.isnan(out[1]).all()
    want = reference_prefix_attention(*tensors, torch.tensor([0, 0, 2], device=device))
    torch.testing.assert_close(out[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-5)


PAD_CASES = ["base_gqa2", "s1", "p_gt_s", "mqa", "hf_strides", "head_dim_40"]


@pytest.mark.parametrize("case", PAD_CASES)
def test_pad_with_a_top_left_vendor_pads_the_queries(case, monkeypatch):
    """PyTorch's cuDNN op aligns causal masks top-left: pad mode then prepends P zero query rows.
    The stand-in made top-left runs that route on the CPU (bottom-right it runs the other)."""
    from prefix_kernels.ops import padded_attention, vendor_attention
    monkeypatch.setitem(vendor_attention.BOTTOM_RIGHT, "math", False)
    assert padded_attention.pads_queries("math", True)
    device = kernel_device()
    tensors, index = make_inputs(device=device, **CASES[case])
    grad_out = torch.randn_like(tensors[0])
    out, grads = run_split(tensors, index, grad_out, sa.SplitConfig("math", "pad"))
    ref_out, ref_grads = reference_fp64(tensors, index, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("sq, sk", [(13, 29), (1, 17), (20, 21)])
def test_pad_mode_bottom_right_vendor_takes_fewer_queries_than_keys(sq, sk):
    """Causal with Sq < Sk (a continued sequence): the prefix-prepended keys under a bottom-right
    mask are this op's alignment, so pad mode with such a vendor needs no fallback."""
    device = kernel_device()
    tensors, index = make_inputs(SQ=sq, SK=sk, device=device)
    assert sa.ineligible_reason(tensors[0], tensors[1], None, True, "math", "pad") is None
    grad_out = torch.randn_like(tensors[0])
    out, grads = run_split(tensors, index, grad_out, sa.SplitConfig("math", "pad"))
    ref_out, ref_grads = reference_fp64(tensors, index, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


# -- dispatch: prefix_attention(path=...) --------------------------------------------------------

@pytest.fixture
def split_calls(monkeypatch):
    calls = []
    real = sa.split_prefix_attention

    def spy(*args, **kwargs):
        calls.append(args[-1])
        return real(*args, **kwargs)
    monkeypatch.setattr(sa, "split_prefix_attention", spy)
    sa.warn_once.cache_clear()
    return calls


def test_path_split_runs_the_split_path(split_calls, monkeypatch):
    device = kernel_device()
    if device == "cuda":
        pytest.skip("the CPU dispatch (stand-in vendor); on the GPU: test_path_split_on_the_gpu_calls_the_vendor")
    tensors, index = make_inputs(SQ=12, device=device)
    out = pk.prefix_attention(*tensors, prefix_index=index, backend="triton", path="split")
    assert len(split_calls) == 1 and split_calls[0].vendor == "math"
    torch.testing.assert_close(out, reference_prefix_attention(*tensors, index), rtol=1e-4, atol=1e-5)
    pk.prefix_attention(*tensors, prefix_index=index, backend="triton", path="fused")
    pk.prefix_attention(*tensors, prefix_index=index, backend="triton")      # auto: fused for now
    assert len(split_calls) == 1
    monkeypatch.setenv("PREFIX_KERNELS_ATTENTION", "split")
    pk.prefix_attention(*tensors, prefix_index=index, backend="triton")
    assert len(split_calls) == 2
    monkeypatch.setenv("PREFIX_KERNELS_ATTENTION", "auto")
    monkeypatch.setattr(sa, "AUTO_SPLIT", sa.SplitConfig("math", "fused_forward", "twopass"))   # as after the probe
    pk.prefix_attention(*tensors, prefix_index=index, backend="triton")
    assert len(split_calls) == 3 and split_calls[-1] == sa.SplitConfig("math", "fused_forward", "twopass")
    with pytest.raises(ValueError, match="split setting 'vendor'"):
        sa.split_prefix_attention(*tensors, index, 0.1, True, sa.SplitConfig("math", "vendor"))
    with pytest.raises(ValueError, match="path must be one of"):
        pk.prefix_attention(*tensors, prefix_index=index, backend="triton", path="cudnn")


@pytest.mark.parametrize("why", ["padding", "bottom_right", "deterministic"])
def test_split_request_it_cannot_serve_runs_fused_with_one_warning(why, split_calls, monkeypatch):
    device = kernel_device()
    sk = 15 if why == "bottom_right" else 12
    tensors, index = make_inputs(SQ=12, SK=sk, device=device)
    mask = torch.ones(2, sk, dtype=torch.bool, device=device) if why == "padding" else None
    if mask is not None:
        mask[0, :3] = False
    if why == "deterministic":
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    if why == "bottom_right":       # the merge mode's vendor call is square: causal needs Sq == Sk
        monkeypatch.setenv("PREFIX_KERNELS_SPLIT_MODE", "merge")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=mask,
                                      backend="triton", path="split")
    assert split_calls == []
    messages = [str(w.message) for w in caught if "path='split'" in str(w.message)]
    expect = {"padding": "key padding", "bottom_right": "Sq=12 != Sk=15", "deterministic": "deterministic"}[why]
    assert len(messages) == 1 and expect in messages[0]
    torch.testing.assert_close(out, reference_prefix_attention(*tensors, index, mask), rtol=1e-4, atol=1e-5)


def test_ineligible_reasons():
    device = kernel_device()
    dtype, vendor, other = ((torch.float32, "math", "cudnn") if device == "cpu"
                            else (torch.bfloat16, "cudnn", "math"))
    q = torch.randn(1, 2, 8, 32, device=device, dtype=dtype)
    reason = sa.ineligible_reason
    assert reason(q, q, None, True, vendor, dropout_p=0.0, softcap=None, window=None) is None
    assert "dropout_p" in reason(q, q, None, True, vendor, dropout_p=0.1)
    assert "softcap" in reason(q, q, None, True, vendor, softcap=30.0)
    q20 = torch.randn(1, 2, 8, 20, device=device, dtype=dtype)
    assert "head_dim 20" in reason(q20, q20, None, True, vendor)
    assert "stand-in" in reason(q, q, None, True, other)
    more_keys = q[:, :, :1].expand(1, 2, 9, 32)
    assert "Sq=8 != Sk=9" in reason(q, more_keys, None, True, vendor, "merge")
    assert reason(q, more_keys, None, False, vendor, "merge") is None
    # pad mode: a bottom-right vendor takes Sq < Sk as it is, a top-left one (PyTorch's cuDNN) not
    assert (reason(q, more_keys, None, True, vendor, "pad") is None) == (vendor == "math")
    assert "mode 'merge' with vendor 'cudnn_fe'" in reason(q, q, None, True, "cudnn_fe", "merge")
    assert "a cuDNN graph per key length" in reason(q, more_keys, None, True, "cudnn_fe", "pad")


def test_vendor_lse_layouts():
    lse4 = torch.randn(2, 3, 5, 1)
    assert lse_bhs(lse4, 2, 3, 5).shape == (2, 3, 5)
    lse3 = torch.randn(2, 3, 5)
    assert lse_bhs(lse3, 2, 3, 5) is lse3
    with pytest.raises(RuntimeError, match="expected \\[2, 3, 5\\]"):
        lse_bhs(torch.randn(2, 3, 128), 2, 3, 5)


@pytest.mark.parametrize("mode", ["pad", "merge"])
def test_torch_compile_fullgraph_traces_the_split_path(mode, split_calls, monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_SPLIT_MODE", mode)
    device = kernel_device()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tensors, index = make_inputs(SQ=17, device=device, dtype=dtype)

    def f(q, k, v, bk, bv):
        return pk.prefix_attention(q, k, v, bk, bv, prefix_index=index, backend="triton", path="split").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = torch.autograd.grad(compiled(*tensors), tensors)
    want = torch.autograd.grad(f(*tensors), tensors)
    assert len(split_calls) >= 2          # traced and eager both took the split path
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5 if device == "cpu" else 2e-2, atol=1e-6 if device == "cpu" else 2e-2)


# -- GPU only: the real vendor kernels, low precision judged as flash-attention does ------------

def assert_within_twice_torch(tensors, index, config):
    """The split path's output and all five gradients within 2x the error of PyTorch's own
    same-dtype computation (against fp64), as flash-attention judges low precision."""
    grad_out = torch.randn_like(tensors[0])
    out, grads = run_split(tensors, index, grad_out, config)
    ref_out, ref_grads = reference_fp64(tensors, index, grad_out)
    low = [t.detach().clone().requires_grad_() for t in tensors]
    pt_out = reference_prefix_attention(*low, index, None, upcast=False)
    pt_grads = torch.autograd.grad(pt_out, low, grad_out)
    for name, got, pt, want in zip(NAMES, (out, *grads), (pt_out, *pt_grads), (ref_out, *ref_grads)):
        ours = (got.double() - want).abs().max().item()
        theirs = (pt.double() - want).abs().max().item()
        assert math.isfinite(ours)
        assert ours <= 2 * theirs + 1e-4 * want.abs().max().item(), f"{name}: {ours:.3e} vs torch {theirs:.3e}"


GPU_CASES = [
    dict(B=2, H=8, HKV=2, SQ=203, D=64, P=32, N=3),                  # GQA, odd length, mixed rows
    dict(B=2, H=8, HKV=8, SQ=257, D=128, P=16, N=2, hf_layout=True),
    dict(B=1, H=16, HKV=1, SQ=300, D=128, P=96, N=1, mixed=False),  # MQA, P over one block: two-pass
    dict(B=2, H=4, HKV=2, SQ=1, D=64, P=7, N=3),
]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", ["pad", "merge", "fused_forward"])
@pytest.mark.parametrize("vendor", ["cudnn", "flash", "cudnn_fe"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_vendor_split_error_at_most_twice_pytorchs(case, vendor, mode, dtype):
    if vendor == "cudnn_fe" and mode != "pad":
        pytest.skip("the cuDNN frontend runs pad mode only")
    tensors, index = make_inputs(device="cuda", dtype=dtype, **GPU_CASES[case])
    reason = sa.unusable_reason(sa.SplitConfig(vendor, mode), tensors[0], tensors[1], tensors[3])
    if reason is not None:
        pytest.skip(reason)
    assert_within_twice_torch(tensors, index, sa.SplitConfig(vendor, mode, "auto"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("vendor", ["flash"])     # cudnn_fe refuses Sq != Sk (a graph per key length)
def test_bottom_right_vendors_take_fewer_queries_than_keys(vendor):
    """The vendor this path trusts to align causal masks bottom-right with Sq < Sk
    (vendor_attention.BOTTOM_RIGHT) against the reference where it matters: top-left would hide
    most keys. cudnn_fe's alignment is checked at Sq == Sk, where the prepended prefix makes
    Sk = P + Sq > Sq as well."""
    tensors, index = make_inputs(device="cuda", dtype=torch.bfloat16, B=2, H=8, HKV=2, SQ=100, SK=300, D=64,
                                 P=24, N=3)
    assert sa.ineligible_reason(tensors[0], tensors[1], None, True, vendor, "pad") is None
    assert_within_twice_torch(tensors, index, sa.SplitConfig(vendor, "pad"))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("vendor, mode", [("cudnn", "pad"), ("cudnn", "merge"), ("flash", "pad"), ("flash", "merge"),
                                          ("cudnn_fe", "pad")])
def test_vendor_split_prefix_gradients_are_deterministic(vendor, mode):
    # merge: our kernels; pad: the vendor's dK/dV rows, deterministic if the vendor's are
    tensors, index = make_inputs(device="cuda", dtype=torch.bfloat16, B=4, H=8, HKV=2, SQ=300, D=64, P=32, N=2)
    grad_out = torch.randn_like(tensors[0])
    config = sa.SplitConfig(vendor, mode, "auto")
    reason = sa.unusable_reason(config, tensors[0], tensors[1], tensors[3])
    if reason is not None:
        pytest.skip(reason)
    first = run_split(tensors, index, grad_out, config)[1]
    second = run_split(tensors, index, grad_out, config)[1]
    for a, b in zip(first[3:], second[3:]):
        assert torch.equal(a, b)


@requires_gpu
@pytest.mark.gpu
def test_path_split_on_the_gpu_calls_the_vendor(split_calls):
    tensors, index = make_inputs(device="cuda", dtype=torch.bfloat16, SQ=64, D=64, P=16)
    pk.prefix_attention(*tensors, prefix_index=index, path="split").sum().backward()
    assert len(split_calls) == 1 and split_calls[0].vendor in ("cudnn", "flash")


# -- GPU compilation without a GPU: the interpreter accepts code the compiler rejects -----------

_FRONTEND_SCRIPT = r"""
import sys
from triton.runtime import Heuristics
from triton_frontend import lower_to_ttir
from prefix_kernels.ops import split_kernels as K
from prefix_kernels.ops.prefix_attention_kernels import reduce_prefix_grads
from prefix_kernels.ops import prefix_rows as R

def lower(kernel, constexprs):
    if isinstance(kernel, Heuristics):      # lower the JIT function under the heuristics wrapper
        kernel = kernel.fn
    fp32_ptrs = ("lse_own_ptr", "lse_ptr", "delta_ptr", "part_k_ptr", "part_v_ptr")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        elif name in ("pidx_ptr", "PIDX"):
            signature[name] = "*i64"
        elif name in fp32_ptrs:
            signature[name] = "*fp32"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16"
        else:
            signature[name] = "fp32" if name in ("qk_scale", "sm_scale") else "i32"
    return lower_to_ttir(kernel, signature, constexprs)

common = dict(HAS_PIDX=True, HEAD_DIM=80, BLOCK_D=128, PREC="tf32", BLOCK_M=64, BLOCK_N=32)
jobs = {"merge": (K._split_fwd_merge, common), "dq": (K._split_bwd_dq, dict(common, DQ_GRAD=True)),
        "dprefix": (K._split_bwd_dprefix, common), "onepass": (K._split_bwd_onepass, dict(common, DQ_GRAD=True)),
        "reduce": (reduce_prefix_grads, dict(HAS_PIDX=True, BLOCK=256, SPLITS_BLOCK=16)),
        "concat_rows": (R._concat_prefix_kv, dict(HAS_PIDX=True, HEAD_DIM=80, BLOCK_S=64, BLOCK_D=128)),
        "sum_rows": (R._sum_prefix_rows, dict(HAS_PIDX=True, HEAD_DIM=80, BLOCK=256))}
failed = 0
for name, (kernel, constexprs) in jobs.items():
    try:
        assert "tt.func" in str(lower(kernel, constexprs))
        print("OK", name)
    except Exception as exc:
        failed += 1
        print("FAILED", name, type(exc).__name__, str(exc)[:1500])
sys.exit(1 if failed else 0)
"""


def test_split_kernels_pass_the_gpu_compiler_frontend():
    # A Python float global read inside a kernel passed every interpreter test and failed to
    # compile on the H200 (GPU call 1, 2026-11-30). This lowers each kernel to Triton IR for
    # sm_90 as the GPU would, without a GPU (a subprocess: the interpreter replaces @triton.jit).
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests_dir = os.path.dirname(os.path.abspath(__file__))       # triton_frontend.py
    env["PYTHONPATH"] = os.pathsep.join([tests_dir] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    res = subprocess.run([sys.executable, "-c", _FRONTEND_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    if res.returncode == 77 or "make_ir() takes" in res.stdout:   # not an import error of ours
        pytest.skip(f"this triton's compiler internals differ: {res.stderr.strip().splitlines()[-1:]}")
    assert res.returncode == 0, res.stdout + res.stderr[-2000:]
    assert res.stdout.count("OK") == 7, res.stdout


def test_auto_rule_picks_merge_only_where_it_was_measured_faster():
    merge = sa.SplitConfig("cudnn", "merge", "auto")
    assert sa.auto_rule(True, 128, 4096, 4096) == merge
    assert sa.auto_rule(True, 256, 16384, 16384) == merge
    assert sa.auto_rule(True, 128, 1024, 1024) is None           # S=1024: the fused op leads
    assert sa.auto_rule(True, 64, 4096, 4096) == merge            # D=64 too (H100, 46a4328)
    assert sa.auto_rule(True, 32, 4096, 4096) is None            # D<64: never measured
    assert sa.auto_rule(True, 128, 4096, 8192) is None           # bottom-right causal: vendors can't
    assert sa.auto_rule(False, 128, 4096, 4096) is None          # CPU tensors: the fused kernels


def test_auto_tries_the_cudnn_frontend_first_only_when_asked(monkeypatch):
    from types import SimpleNamespace
    gpu_q = SimpleNamespace(is_cuda=True, shape=(2, 32, 4096, 128))
    gpu_k = SimpleNamespace(shape=(2, 8, 4096, 128))
    merge = sa.SplitConfig("cudnn", "merge", "auto")
    monkeypatch.delenv(sa.AUTO_CUDNN_FE_ENV, raising=False)
    assert sa._auto_configs(gpu_q, gpu_k) == [merge]
    monkeypatch.setenv(sa.AUTO_CUDNN_FE_ENV, "1")
    assert sa._auto_configs(gpu_q, gpu_k) == [sa.SplitConfig("cudnn_fe", "pad", "auto"), merge]
    short_q = SimpleNamespace(is_cuda=True, shape=(8, 32, 1024, 64))
    assert sa._auto_configs(short_q, SimpleNamespace(shape=(8, 4, 1024, 64))) == [sa.SplitConfig("cudnn_fe", "pad", "auto")]
    cpu_q = SimpleNamespace(is_cuda=False, shape=(2, 32, 4096, 128))
    assert sa._auto_configs(cpu_q, gpu_k) == []


def test_auto_falls_through_to_the_next_split_and_says_why_once(split_calls, monkeypatch):
    """A variant auto cannot run (here the frontend's vendor on CPU tensors) hands the call to the
    next one; the opt-in is told once why its variant did not run."""
    device = kernel_device()
    if device == "cuda":
        pytest.skip("the CPU chain (the stand-in vendor)")
    monkeypatch.setattr(sa, "_auto_configs", lambda q, k: [sa.SplitConfig("cudnn_fe", "pad"),
                                                            sa.SplitConfig("math", "merge", "onepass")])
    tensors, index = make_inputs(SQ=12, device=device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            out = pk.prefix_attention(*tensors, prefix_index=index, backend="triton", path="auto")
    assert [c.vendor for c in split_calls] == ["math", "math"]
    messages = [str(w.message) for w in caught if sa.AUTO_CUDNN_FE_ENV in str(w.message)]
    assert len(messages) == 1 and "cudnn_fe" in messages[0]
    torch.testing.assert_close(out, reference_prefix_attention(*tensors, index), rtol=1e-4, atol=1e-5)
