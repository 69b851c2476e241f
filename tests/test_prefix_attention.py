"""The fused prefix-attention op against the float64 reference: output and all five gradients."""
import math
import warnings

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.ops.reference import reference_prefix_attention
from attention_utils import NAMES, make_inputs, reference_fp64, run
from utils import kernel_device, requires_gpu


# Odd shapes on purpose: lengths that are no multiple of any block, Sq=1, P=1, P>S, Sq<Sk,
# GQA 4:1, MQA, padding on either side and in holes, fully padded rows, head dims needing padding.
CASES = {
    "base_gqa2": dict(),
    "sq1_decode": dict(SQ=1, SK=37),
    "sq_lt_sk_chunk": dict(SQ=13, SK=45, padding="left"),
    "p1": dict(P=1, SQ=33),
    "p_gt_s": dict(P=40, SQ=9),
    "gqa4": dict(H=8, HKV=2, SQ=35, padding="right"),
    "mqa": dict(H=4, HKV=1, SQ=21, P=17),
    "mha": dict(H=2, HKV=2, SQ=50, B=3, N=3),
    "left_pad_full_row": dict(B=3, SQ=29, padding="left", fully_padded_row=True),
    "holes": dict(SQ=31, padding="holes"),
    "hf_strides": dict(SQ=23, hf_layout=True, padding="right"),
    "head_dim_24": dict(D=24, SQ=18),
    "head_dim_80": dict(D=80, SQ=17, H=2, HKV=1),
    "single_entry_no_index": dict(N=1, mixed=False, SQ=26),
    "sq_gt_sk": dict(SQ=20, SK=11),
    # Sq > 64: the prefix-gradient programs split the queries into ranges (one range up to 64)
    "long_splits": dict(B=2, H=2, HKV=1, SQ=150, P=7, padding="left"),
}


# Non-causal on a representative subset, to keep CI short.
MATRIX = [(c, True) for c in CASES] + [
    (c, False) for c in ("base_gqa2", "sq1_decode", "holes", "p_gt_s", "left_pad_full_row")]


@pytest.mark.parametrize("case, causal", MATRIX, ids=[f"{c}-{'causal' if k else 'full'}" for c, k in MATRIX])
def test_kernels_match_fp64_reference(case, causal):
    device = kernel_device()
    tensors, index, mask = make_inputs(device=device, **CASES[case])
    grad_out = torch.randn_like(tensors[0])
    out, grads = run(tensors, index, mask, grad_out, "triton", causal=causal)
    ref_out, ref_grads = reference_fp64(tensors, index, mask, grad_out, causal=causal)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


SCHEDULE_CASES = [("gqa4", True), ("sq_lt_sk_chunk", True), ("long_splits", True), ("p_gt_s", False)]
# (PREFIX_KERNELS_SCHEDULE, PREFIX_KERNELS_LPT_ROWS): LPT sections by the L2 rule, of one row,
# of 3 rows (uneven last sections), and of every row, against the default 2-D grid
SCHEDULES = [("lpt", "0"), ("lpt", "1"), ("lpt", "3"), ("lpt", "1000")]


@pytest.mark.parametrize("case, causal", SCHEDULE_CASES)
def test_program_order_changes_no_bit(case, causal, monkeypatch):
    """The LPT program order (experimental) only reorders programs: each writes the same tile
    from the same reads whichever order, so every output and gradient is bitwise the default
    order's; a wrong
    (block, row) mapping would skip or repeat a tile."""
    device = kernel_device()
    tensors, index, mask = make_inputs(device=device, **CASES[case])
    grad_out = torch.randn_like(tensors[0])
    monkeypatch.delenv("PREFIX_KERNELS_SCHEDULE", raising=False)
    monkeypatch.delenv("PREFIX_KERNELS_LPT_ROWS", raising=False)
    want = run(tensors, index, mask, grad_out, "triton", causal=causal)
    for schedule, rows in SCHEDULES:
        monkeypatch.setenv("PREFIX_KERNELS_SCHEDULE", schedule)
        monkeypatch.setenv("PREFIX_KERNELS_LPT_ROWS", rows)
        got = run(tensors, index, mask, grad_out, "triton", causal=causal)
        for name, a, b in zip(NAMES, (got[0], *got[1]), (want[0], *want[1])):
            assert torch.equal(a, b), f"{name} differs under schedule {schedule} / {rows} rows"


ATOMIC_CASES = ["base_gqa2", "sq_lt_sk_chunk", "p_gt_s", "gqa4", "mqa", "left_pad_full_row", "head_dim_80",
                "sq_gt_sk", "long_splits"]


@pytest.mark.parametrize("case", ATOMIC_CASES)
def test_atomic_dq_backward_matches_fp64_reference(case, monkeypatch):
    """PREFIX_KERNELS_BWD_DQ=atomic (experimental): dQ accumulated in the dK/dV kernel by atomics,
    from prefix and own key blocks alike: every output and gradient as the reference's."""
    from prefix_kernels.ops import prefix_attention as op

    monkeypatch.setenv("PREFIX_KERNELS_BWD_DQ", "atomic")
    assert op.atomic_dq_requested()
    device = kernel_device()
    tensors, index, mask = make_inputs(device=device, **CASES[case])
    grad_out = torch.randn_like(tensors[0])
    out, grads = run(tensors, index, mask, grad_out, "triton")
    ref_out, ref_grads = reference_fp64(tensors, index, mask, grad_out)
    for name, got, want in zip(NAMES, (out, *grads), (ref_out, *ref_grads)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


def test_atomic_dq_is_refused_when_determinism_is_requested(monkeypatch):
    from prefix_kernels.ops import prefix_attention as op

    monkeypatch.setenv("PREFIX_KERNELS_BWD_DQ", "atomic")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert not op.atomic_dq_requested()
    finally:
        torch.use_deterministic_algorithms(previous)
    monkeypatch.delenv("PREFIX_KERNELS_BWD_DQ")
    assert not op.atomic_dq_requested()         # off by default


def test_unused_bank_entries_get_zero_gradient():
    device = kernel_device()
    tensors, _, mask = make_inputs(B=3, N=4, SQ=17, device=device, padding="right")
    index = torch.tensor([0, 2, 0], device=device)
    out, grads = run(tensors, index, mask, torch.randn_like(tensors[0]), "triton")
    for g in grads[3:]:
        assert g[1].abs().max() == 0 and g[3].abs().max() == 0
        assert g[0].abs().max() > 0 and g[2].abs().max() > 0


def test_fully_padded_row_attends_only_to_its_prefix():
    device = kernel_device()
    tensors, index, _ = make_inputs(B=2, SQ=9, device=device)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    out = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=mask, backend="triton")
    q, _, _, bank_k, bank_v = tensors
    for b in range(2):
        kb = bank_k[index[b]].repeat_interleave(2, 0)
        vb = bank_v[index[b]].repeat_interleave(2, 0)
        expect = torch.softmax(q[b] @ kb.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ vb
        torch.testing.assert_close(out[b], expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("which", ["prefix_only", "q_and_prefix", "kv_only"])
def test_only_requested_gradients_are_computed(which):
    device = kernel_device()
    tensors, index, mask = make_inputs(SQ=21, device=device, padding="left")
    wanted = {"prefix_only": (3, 4), "q_and_prefix": (0, 3, 4), "kv_only": (1, 2)}[which]
    for i, t in enumerate(tensors):
        t.requires_grad_(i in wanted)
    grad_out = torch.randn_like(tensors[0])
    _, grads = run(tensors, index, mask, grad_out, "triton")
    _, ref_grads = reference_fp64(tensors, index, mask, grad_out)
    assert len(grads) == len(wanted)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5)


def test_gradients_are_bitwise_deterministic():
    device = kernel_device()
    tensors, index, mask = make_inputs(B=4, SQ=40, N=2, device=device, padding="right")
    grad_out = torch.randn_like(tensors[0])
    first = run(tensors, index, mask, grad_out, "triton")[1]
    second = run(tensors, index, mask, grad_out, "triton")[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_single_prefix_3d_bank_matches_one_entry_bank():
    device = kernel_device()
    (q, k, v, bk, bv), _, _ = make_inputs(N=1, mixed=False, SQ=15, device=device)
    out3 = pk.prefix_attention(q, k, v, bk[0], bv[0], backend="triton")
    out4 = pk.prefix_attention(q, k, v, bk, bv, backend="triton")
    torch.testing.assert_close(out3, out4, rtol=0, atol=0)


def test_reference_gradcheck():
    tensors, index, mask = make_inputs(B=2, H=2, HKV=1, SQ=4, SK=6, D=3, P=2, N=3,
                                       dtype=torch.float64, padding="left")
    fn = lambda *t: reference_prefix_attention(*t, index, mask, None, True)
    assert torch.autograd.gradcheck(fn, tuple(tensors), eps=1e-6, atol=1e-5)


def test_torch_compile_fullgraph_traces_the_op():
    device = kernel_device()
    tensors, index, mask = make_inputs(SQ=17, device=device, padding="right")
    index = index.to(device)

    def f(q, k, v, bk, bv):
        return pk.prefix_attention(q, k, v, bk, bv, prefix_index=index, key_padding_mask=mask,
                                   backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got = torch.autograd.grad(compiled(*tensors), tensors)
    want = torch.autograd.grad(f(*tensors), tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_auto_backend_on_cpu_is_the_reference():
    tensors, index, mask = make_inputs(SQ=5)
    out = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=mask)
    want = reference_prefix_attention(*tensors, index, mask)
    torch.testing.assert_close(out, want, rtol=0, atol=0)   # CPU tensors: the reference, GPU or not


def test_unsupported_dtype_falls_back_with_one_warning():
    device = kernel_device()
    tensors, index, mask = make_inputs(SQ=5, D=8, dtype=torch.float64, device=device)
    from prefix_kernels.ops import prefix_attention as op_module
    op_module._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pk.prefix_attention(*tensors, prefix_index=index, backend="triton")
        pk.prefix_attention(*tensors, prefix_index=index, backend="triton")
    messages = [str(w.message) for w in caught if "falling back" in str(w.message)]
    assert len(messages) == 1 and "float64" in messages[0]
    torch.testing.assert_close(out, reference_prefix_attention(*tensors, index, None))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(q=a["q"][0]), "q must be a 4-D tensor"),
    (lambda a: a.update(k=a["k"][:, :, :-1], v=a["v"][:, :, :-1], key_padding_mask=None,
                        q=a["q"][:, :3]), "multiple of key/value heads"),
    (lambda a: a.update(v=a["v"][:, :, :-1]), "must have the same shape"),
    (lambda a: a.update(prefix_k=a["prefix_k"][:, :1], prefix_v=a["prefix_v"][:, :1]), "Hkv=2"),
    (lambda a: a.update(prefix_k=a["prefix_k"].half(), prefix_v=a["prefix_v"].half()), "dtype"),
    (lambda a: a.update(prefix_index=torch.tensor([0, 3])), "bank has 3 entries"),
    (lambda a: a.update(prefix_index=torch.tensor([-1, 0])), "values in [-1, 0]"),
    (lambda a: a.update(prefix_index=torch.tensor([0.0, 1.0])), "int32/int64"),
    (lambda a: a.update(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), "key_padding_mask must be"),
    (lambda a: a.update(prefix_k=a["prefix_k"][:, :, :0], prefix_v=a["prefix_v"][:, :, :0]), "P >= 1"),
    (lambda a: a.update(backend="cuda"), "backend must be"),
])
def test_bad_input_raises_a_named_error(mutate, message):
    (q, k, v, bk, bv), index, mask = make_inputs(SQ=6, padding="right")
    args = dict(q=q, k=k, v=v, prefix_k=bk, prefix_v=bv, prefix_index=index, key_padding_mask=mask,
                backend="reference")
    mutate(args)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        pk.prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"),
                            args.pop("prefix_v"), **args)


def test_out_of_range_entry_on_the_device_poisons_only_its_row():
    # A device-resident prefix_index is not checked on the host (a sync per layer); the kernel
    # clamps its reads and makes that row NaN instead of silently wrong.
    device = kernel_device()
    tensors, index, _ = make_inputs(B=3, SQ=9, N=3, device=device)
    bad = torch.tensor([0, 7, 2], device=device)
    from prefix_kernels.ops.prefix_attention import _PrefixAttention
    out = _PrefixAttention.apply(*tensors, bad, None, 1 / math.sqrt(tensors[0].shape[-1]), True)
    assert torch.isnan(out[1]).all()
    want = reference_prefix_attention(*tensors, torch.tensor([0, 0, 2], device=device))
    torch.testing.assert_close(out[[0, 2]], want[[0, 2]], rtol=1e-4, atol=1e-5)


def test_triton_backend_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tensors, index, _ = make_inputs(SQ=4)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        pk.prefix_attention(*tensors, prefix_index=index, backend="triton")


# -- GPU only: low precision judged as flash-attention does --------------------------------------

GPU_CASES = [
    dict(B=2, H=8, HKV=2, SQ=203, D=64, P=32, N=3),
    dict(B=2, H=8, HKV=8, SQ=113, D=80, P=7, N=2, padding="left", fully_padded_row=True),
    dict(B=2, H=4, HKV=1, SQ=257, D=96, P=1, N=3, padding="right"),
    dict(B=3, H=8, HKV=2, SQ=1, SK=300, D=128, P=45, N=3),
    dict(B=2, H=8, HKV=2, SQ=100, SK=777, D=128, P=300, N=3, padding="holes"),
    dict(B=2, H=4, HKV=2, SQ=129, D=256, P=16, N=2, hf_layout=True),
    dict(B=1, H=32, HKV=8, SQ=1024, D=128, P=32, N=1),
]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(GPU_CASES)))
def test_low_precision_error_at_most_twice_pytorchs(case, dtype):
    _check_low_precision(GPU_CASES[case], dtype)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["atomic", "tma"])
@pytest.mark.parametrize("case", [0, 4, 5])
def test_experimental_dq_modes_error_at_most_twice_pytorchs(case, mode, monkeypatch):
    """PREFIX_KERNELS_BWD_DQ=atomic|tma (dQ added in the dK/dV kernel) on the GPU compiler; case 5
    (head_dim 256) falls back to the dQ kernel (its atomic dK/dV tiles outgrow shared memory)."""
    monkeypatch.setenv("PREFIX_KERNELS_BWD_DQ", mode)
    _check_low_precision(GPU_CASES[case], torch.bfloat16)


def _check_low_precision(case, dtype):
    tensors, index, mask = make_inputs(device="cuda", dtype=dtype, **case)
    grad_out = torch.randn_like(tensors[0])
    out, grads = run(tensors, index, mask, grad_out, "triton")
    ref_out, ref_grads = reference_fp64(tensors, index, mask, grad_out)
    # PyTorch's own same-dtype computation of the same function
    low = [t.detach().clone().requires_grad_() for t in tensors]
    pt_out = reference_prefix_attention(*low, index, mask, upcast=False)
    pt_grads = torch.autograd.grad(pt_out, low, grad_out)
    for name, got, pt, want in zip(NAMES, (out, *grads), (pt_out, *pt_grads), (ref_out, *ref_grads)):
        ours = (got.double() - want).abs().max().item()
        theirs = (pt.double() - want).abs().max().item()
        assert math.isfinite(ours)
        assert ours <= 2 * theirs + 1e-4 * want.abs().max().item(), f"{name}: {ours:.3e} vs torch {theirs:.3e}"


@pytest.mark.parametrize("splits", [1, 3, 11])
def test_bank_gradient_reduce_sums_partials_of_each_entry(splits):
    """reduce_prefix_grads: each bank entry's gradient is the sum of its rows' partials over every
    split (more splits than one load takes: the loop over them), in the bank's dtype; an entry no
    row reads gets zeros."""
    from prefix_kernels.ops.prefix_grads import reduce_prefix_grads
    device = kernel_device()
    b, n, hkv, p, d = 5, 4, 2, 7, 24
    part_k = torch.randn(b, splits, hkv, p, d, device=device)
    part_v = torch.randn(b, splits, hkv, p, d, device=device)
    index = torch.tensor([2, 0, 2, 3, 0], device=device)
    bank = torch.zeros(n, hkv, p, d, device=device, dtype=torch.float16)
    dpk, dpv = reduce_prefix_grads(part_k, part_v, index, bank, bank, b, splits)
    assert dpk.dtype == torch.float16 and dpk.shape == bank.shape
    for entry in range(n):
        rows = index == entry
        for got, part in ((dpk, part_k), (dpv, part_v)):
            want = part[rows].sum((0, 1)).half()
            torch.testing.assert_close(got[entry], want, rtol=2e-3, atol=2e-3)
    assert not dpk[1].any() and not dpv[1].any()
