"""Features of the fused op beyond plain prefix attention (issue 11): attention dropout, logit
softcapping, sliding windows, packed sequences, and input handling. Each against the float64
reference: the output and all five gradients."""
import math

import pytest
import torch

import prefix_kernels as pk
from prefix_kernels.ops import prefix_attention as op
from attention_utils import (assert_close_fp64, assert_low_precision_within_twice_torch, make_inputs,
                             reference_fp64, run)
from utils import kernel_device, requires_gpu


def _keep_mask(seed, tensors, p):
    """The kernels' keep mask for the op call made right after torch.manual_seed(seed)."""
    q, k = tensors[0], tensors[1]
    torch.manual_seed(seed)
    rng = op.draw_rng()
    return op.dropout_mask(rng, q.shape[0], q.shape[1], q.shape[2], k.shape[2], tensors[3].shape[2], p,
                           q.device)


# -- dropout --------------------------------------------------------------------------------------

DROPOUT_CASES = {
    "gqa2_left_pad": (dict(SQ=19, padding="left"), True),
    "sq_lt_sk_mqa": (dict(SQ=9, SK=30, H=4, HKV=1, P=5), True),
    "p_gt_s_full": (dict(SQ=11, P=20, padding="holes"), False),
}


@pytest.mark.parametrize("case", DROPOUT_CASES)
def test_dropout_matches_reference_with_the_kernels_mask(case):
    shape, causal = DROPOUT_CASES[case]
    device = kernel_device()
    tensors, index, mask = make_inputs(device=device, **shape)
    grad_out = torch.randn_like(tensors[0])
    torch.manual_seed(7)
    out, grads = run(tensors, index, mask, grad_out, "triton", causal=causal, dropout_p=0.3)
    keep = _keep_mask(7, tensors, 0.3)
    ref_out, ref_grads = reference_fp64(tensors, index, mask, grad_out, causal=causal, dropout_p=0.3,
                                        dropout_mask=keep)
    assert_close_fp64((out, *grads), (ref_out, *ref_grads))


def test_dropout_keep_rate_within_a_binomial_bound():
    device = kernel_device()
    p = 0.25
    (q, k, _, bank_k, _), _, _ = make_inputs(B=2, H=2, HKV=2, SQ=48, P=16, device=device)
    keep = _keep_mask(3, [q, k, None, bank_k], p)
    for part in (keep[..., :16], keep[..., 16:]):            # prefix slots, own keys
        n = part.numel()
        bound = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(part.float().mean().item() - (1 - p)) < bound
    # no two rows, heads or calls share their bits
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep, _keep_mask(4, [q, k, None, bank_k], p))


def test_dropout_scales_kept_probabilities_by_one_over_keep_rate():
    # uniform attention (q = 0) over values 1: out = sum_j keep_ij P_ij / (1-p), mean 1
    device = kernel_device()
    p = 0.4
    (q, k, v, bank_k, bank_v), index, _ = make_inputs(B=2, H=4, HKV=2, SQ=40, P=8, device=device)
    q, v, bank_v = torch.zeros_like(q), torch.ones_like(v), torch.ones_like(bank_v)
    out = pk.prefix_attention(q, k, v, bank_k, bank_v, prefix_index=index, dropout_p=p, backend="triton")
    visible = 8 + torch.arange(1, 41, device=device, dtype=torch.float64)     # P + causal own keys
    row_var = p / (1 - p) / visible                                          # sum_j P_ij^2 p/(1-p)
    mean = out[..., 0].double().mean()
    std_of_mean = (row_var.sum() * out.shape[0] * out.shape[1]).sqrt() / out[..., 0].numel()
    assert abs(mean.item() - 1) < 5 * std_of_mean.item()
    assert torch.allclose(out[..., 0], out[..., 1])                         # one mask for all of d


def test_dropout_is_deterministic_for_a_seed():
    device = kernel_device()
    tensors, index, mask = make_inputs(B=2, H=2, HKV=1, SQ=12, device=device, padding="right")
    grad_out = torch.randn_like(tensors[0])
    results = []
    for seed in (5, 5):
        torch.manual_seed(seed)
        results.append(run(tensors, index, mask, grad_out, "triton", dropout_p=0.2))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b) and all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
    torch.manual_seed(6)
    other = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=mask, dropout_p=0.2,
                                backend="triton")
    assert not torch.equal(out_a, other)


def test_checkpoint_recompute_draws_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    device = kernel_device()
    tensors, index, mask = make_inputs(SQ=15, device=device, padding="left")
    grad_out = torch.randn_like(tensors[0])

    def attend(*t):
        return pk.prefix_attention(*t, prefix_index=index, key_padding_mask=mask, dropout_p=0.3,
                                   backend="triton")

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(11)
        out = checkpoint(attend, *tensors, use_reentrant=False) if checkpointed else attend(*tensors)
        torch.rand(3)      # the generator moves on before backward recomputes the forward
        grads.append(torch.autograd.grad(out, tensors, grad_out))
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(plain, recomputed, rtol=0, atol=0)


def test_zero_dropout_is_the_plain_kernel_and_bad_p_is_refused():
    device = kernel_device()
    tensors, index, mask = make_inputs(SQ=10, device=device)
    plain = pk.prefix_attention(*tensors, prefix_index=index, backend="triton")
    zero = pk.prefix_attention(*tensors, prefix_index=index, backend="triton", dropout_p=0.0)
    assert torch.equal(plain, zero)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            pk.prefix_attention(*tensors, prefix_index=index, backend="triton", dropout_p=bad)


def test_reference_backend_dropout_keeps_the_expectation():
    tensors, index, _ = make_inputs(B=2, H=2, HKV=1, SQ=64, P=8)
    q, k, v, bk, bv = (t.detach() for t in tensors)
    q, v, bv = torch.zeros_like(q), torch.ones_like(v), torch.ones_like(bv)
    # p=0.3, not 0.5: a swapped keep/drop mask (mean ~0.43) or a 1/p scale (~2.33) must fail
    out = pk.prefix_attention(q, k, v, bk, bv, prefix_index=index, dropout_p=0.3, backend="reference")
    assert abs(out.mean().item() - 1) < 0.1 and (out != 1).any()


# -- softcap, sliding window, packed sequences ----------------------------------------------------

def _packed_starts(B, S, lengths, device):
    """segment_start [B, S] of documents of the given lengths packed in each row (the rest of a
    row, if any, is one more document)."""
    from prefix_kernels.ops.segments import segment_start_from_position_ids

    rows = []
    for b in range(B):
        pos = torch.cat([torch.arange(n) for n in lengths[b]] + [torch.arange(S - sum(lengths[b]))])
        rows.append(pos)
    return segment_start_from_position_ids(torch.stack(rows)).to(device)


FEATURE_CASES = {
    # window smaller than a 16-block; skipped blocks for later query blocks
    "window5": (dict(SQ=37, padding="left"), dict(window=5)),
    # window 18 over 50 keys: blocks below the bound, plain blocks and diagonal blocks; 18 = 2
    # mod 16 puts the last query that sees a key block first in a query block (off by one bites)
    "window18_gqa4": (dict(SQ=50, H=8, HKV=2, padding="right"), dict(window=18)),
    "window1": (dict(SQ=18, P=3), dict(window=1)),
    "window_sq_lt_sk": (dict(SQ=5, SK=40, padding="left"), dict(window=10)),
    "softcap_causal": (dict(SQ=21, padding="left"), dict(softcap=2.0)),
    "softcap_full_p_gt_s": (dict(SQ=9, P=20, padding="holes"), dict(softcap=1.5, causal=False)),
    "packed": (dict(B=2, SQ=45, H=4, HKV=1), dict(segments=[[11, 19, 15], [1, 30]])),
    "packed_padded_mqa": (dict(B=2, SQ=33, H=2, HKV=1, padding="right"), dict(segments=[[7, 9], [20]])),
    "packed_window_softcap_dropout": (dict(B=2, SQ=40, P=5),
                                      dict(segments=[[17, 16], [3, 3, 30]], window=9, softcap=3.0,
                                           dropout_p=0.2)),
}


def _feature_case(case, bank_grads_only=False):
    """(ours, reference) for FEATURE_CASES[case]: the op's output and gradients next to the fp64
    reference's, the dropout mask taken from the kernels' own RNG."""
    shape, features = FEATURE_CASES[case]
    features = dict(features)
    device = kernel_device()
    tensors, index, mask = make_inputs(device=device, **shape)
    if bank_grads_only:
        for t in tensors[:3]:
            t.requires_grad_(False)
    if "segments" in features:
        q = tensors[0]
        features["segment_start"] = _packed_starts(q.shape[0], q.shape[2], features.pop("segments"), device)
    grad_out = torch.randn_like(tensors[0])
    torch.manual_seed(2)
    out, grads = run(tensors, index, mask, grad_out, "triton", **features)
    if features.get("dropout_p"):
        features["dropout_mask"] = _keep_mask(2, tensors, features["dropout_p"])
    ref_out, ref_grads = reference_fp64(tensors, index, mask, grad_out, **features)
    return (out, *grads), (ref_out, *ref_grads)


@pytest.mark.parametrize("case", FEATURE_CASES)
def test_features_match_fp64_reference(case):
    ours, ref = _feature_case(case)
    assert_close_fp64(ours, ref)


@pytest.mark.parametrize("case", ["window18_gqa4", "window_sq_lt_sk", "softcap_full_p_gt_s", "packed_padded_mqa",
                                  "packed_window_softcap_dropout"])
def test_features_with_atomic_dq_match_fp64_reference(case, monkeypatch):
    """The experimental atomic dQ (PREFIX_KERNELS_BWD_DQ=atomic) with windows, softcap, packed
    documents and dropout: the dK/dV programs visit exactly the pairs the dQ kernel would."""
    monkeypatch.setenv("PREFIX_KERNELS_BWD_DQ", "atomic")
    ours, ref = _feature_case(case)
    assert_close_fp64(ours, ref)


@pytest.mark.parametrize("case", ["window18_gqa4", "softcap_causal", "packed_window_softcap_dropout"])
def test_features_prefix_only_backward(case):
    # A frozen model's first layer asks only for the bank's gradients: another grid, another
    # split count and the segment bound passed as is; checked with each feature on.
    ours, ref = _feature_case(case, bank_grads_only=True)
    assert len(ours) == 3
    for name, got, want in zip(("out", "dprefix_k", "dprefix_v"), ours, ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")


def test_unsorted_segment_starts_still_match_the_reference():
    # not what a packer makes, but the op's rule (key j visible iff start_i <= j <= i) holds for
    # any starts: the backward's query ranges come from a suffix minimum, not from sortedness
    device = kernel_device()
    tensors, index, _ = make_inputs(B=1, H=2, HKV=1, SQ=40, device=device)
    starts = (torch.rand(1, 40) * torch.arange(1, 41)).long().to(device)
    grad_out = torch.randn_like(tensors[0])
    out, grads = run(tensors, index, None, grad_out, "triton", segment_start=starts)
    ref_out, ref_grads = reference_fp64(tensors, index, None, grad_out, segment_start=starts)
    assert_close_fp64((out, *grads), (ref_out, *ref_grads))


def test_packed_rows_equal_their_documents_run_alone():
    device = kernel_device()
    lengths = [6, 17, 9]
    (q, k, v, bk, bv), _, _ = make_inputs(B=1, H=2, HKV=1, SQ=sum(lengths), N=1, mixed=False, device=device)
    starts = _packed_starts(1, sum(lengths), [lengths], device)
    packed = pk.prefix_attention(q, k, v, bk, bv, segment_start=starts, backend="triton")
    at = 0
    for n in lengths:
        alone = pk.prefix_attention(q[:, :, at:at + n], k[:, :, at:at + n], v[:, :, at:at + n], bk, bv,
                                    backend="triton")
        torch.testing.assert_close(packed[:, :, at:at + n], alone, rtol=1e-5, atol=1e-6)
        at += n


def test_segment_starts_from_position_ids_and_cu_seqlens():
    from prefix_kernels.ops.segments import segment_start_from_cu_seqlens, segment_start_from_position_ids

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [5, 6, 7, 8, 9, 10, 0, 1, 2]])
    assert segment_start_from_position_ids(pos).tolist() == [[0, 0, 0, 3, 3, 5, 5, 5, 5],
                                                             [0, 0, 0, 0, 0, 0, 6, 6, 6]]
    assert segment_start_from_cu_seqlens(torch.tensor([0, 3, 5, 9]), 9).tolist() == [[0, 0, 0, 3, 3, 5, 5, 5, 5]]
    assert segment_start_from_cu_seqlens(torch.tensor([0, 3, 5]), 7).tolist() == [[0, 0, 0, 3, 3, 5, 5]]


def test_torch_compile_fullgraph_with_every_feature():
    device = kernel_device()
    tensors, index, mask = make_inputs(B=2, H=2, HKV=1, SQ=12, device=device, padding="right")
    starts = _packed_starts(2, 12, [[7], [12]], device)

    def f(*t):
        return pk.prefix_attention(*t, prefix_index=index, key_padding_mask=mask, backend="triton", dropout_p=0.2,
                                   softcap=5.0, window=6, segment_start=starts).sum()

    # aot_eager: inductor would draw the op's seed with its own RNG (not bitwise eager's)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    got = torch.autograd.grad(compiled(*tensors), tensors)
    torch.manual_seed(1)
    want = torch.autograd.grad(f(*tensors), tensors)
    for a, b in zip(got, want):     # the same seed draws the same masks, compiled or not
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -- input handling -------------------------------------------------------------------------------

def test_float_additive_mask_reads_as_the_bool_mask():
    device = kernel_device()
    tensors, index, mask = make_inputs(SQ=12, device=device, padding="left")
    want = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=mask, backend="triton")
    for pad in (float("-inf"), torch.finfo(torch.float32).min):
        additive = torch.zeros(mask.shape, device=device).masked_fill(~mask, pad)
        got = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=additive, backend="triton")
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    half = torch.zeros(mask.shape, dtype=torch.float16).masked_fill(~mask.cpu(), torch.finfo(torch.float16).min)
    ref = [t.detach() for t in tensors]
    torch.testing.assert_close(pk.prefix_attention(*ref, prefix_index=index, key_padding_mask=half.to(device),
                                                   backend="reference"),
                               pk.prefix_attention(*ref, prefix_index=index, key_padding_mask=mask,
                                                   backend="reference"))


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.update(key_padding_mask=a["key_padding_mask"].float() * -2.0), "only 0/-inf additive masks"),
    (lambda a: a.update(q=a["q"].long(), k=a["k"].long(), v=a["v"].long()), "floating-point"),
    (lambda a: a.update(prefix_index=[0.5, 1.0]), "must hold ints"),
    (lambda a: a.update(prefix_index="ab"), "must be a tensor, list or numpy array of ints"),
    (lambda a: a.update(window=0), "window must be a positive int"),
    (lambda a: a.update(window=4, causal=False), "needs causal=True"),
    (lambda a: a.update(segment_start=torch.zeros(2, 3, dtype=torch.long)), "segment_start must be"),
    (lambda a: a.update(segment_start=torch.zeros(2, 6), causal=True), "must hold ints"),
    (lambda a: a.update(segment_start=torch.zeros(2, 6, dtype=torch.long), causal=False), "need causal=True"),
    (lambda a: a.update(softcap=-1.0), "softcap must be a positive number"),
])
def test_bad_feature_input_raises_a_named_error(mutate, message):
    (q, k, v, bk, bv), index, mask = make_inputs(SQ=6, padding="right")
    args = dict(q=q, k=k, v=v, prefix_k=bk, prefix_v=bv, prefix_index=index, key_padding_mask=mask,
                backend="reference")
    mutate(args)
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        pk.prefix_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("prefix_k"),
                            args.pop("prefix_v"), **args)


def test_prefix_index_as_list_numpy_or_int():
    import numpy as np

    tensors, _, _ = make_inputs(B=3, SQ=5, N=3)
    want = pk.prefix_attention(*tensors, prefix_index=torch.tensor([2, 0, 1]))
    for ids in ([2, 0, 1], (2, 0, 1), np.array([2, 0, 1])):
        torch.testing.assert_close(pk.prefix_attention(*tensors, prefix_index=ids), want, rtol=0, atol=0)
    torch.testing.assert_close(pk.prefix_attention(*tensors, prefix_index=1),
                               pk.prefix_attention(*tensors, prefix_index=[1, 1, 1]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="bank has 3 entries"):
        pk.prefix_attention(*tensors, prefix_index=[0, 3, 1])


# -- GPU: fp16/bf16 against fp64 with the 2x rule -------------------------------------------------

GPU_FEATURE_CASES = [
    (dict(B=2, H=8, HKV=2, SQ=203, D=64, P=32, N=3, padding="left"), dict(dropout_p=0.1)),
    (dict(B=2, H=4, HKV=4, SQ=130, SK=300, D=128, P=7, N=2), dict(dropout_p=0.3)),
    (dict(B=2, H=8, HKV=4, SQ=257, D=256, P=16, N=2, padding="right"), dict(softcap=50.0)),
    (dict(B=2, H=8, HKV=2, SQ=300, D=128, P=32, N=3), dict(softcap=20.0, window=64)),
    (dict(B=2, H=8, HKV=8, SQ=1, SK=500, D=80, P=45, N=3, padding="left"), dict(window=100)),
    (dict(B=1, H=32, HKV=8, SQ=1024, D=128, P=32, N=1), dict(window=256)),
    (dict(B=2, H=8, HKV=2, SQ=777, D=64, P=20, N=2), dict(segments=[[100, 300, 1, 250], [777]])),
    (dict(B=1, H=16, HKV=4, SQ=1000, D=128, P=32, N=1),
     dict(segments=[[130, 400, 70, 300]], window=128, softcap=30.0, dropout_p=0.1)),
]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(GPU_FEATURE_CASES)))
def test_features_low_precision_error_at_most_twice_pytorchs(case, dtype):
    shape, features = GPU_FEATURE_CASES[case]
    features = dict(features)
    tensors, index, mask = make_inputs(device="cuda", dtype=dtype, **shape)
    if "segments" in features:
        q = tensors[0]
        features["segment_start"] = _packed_starts(q.shape[0], q.shape[2], features.pop("segments"), "cuda")
    grad_out = torch.randn_like(tensors[0])
    torch.manual_seed(1)
    out, grads = run(tensors, index, mask, grad_out, "triton", **features)
    if features.get("dropout_p", 0) > 0:
        features = dict(features, dropout_mask=_keep_mask(1, tensors, features["dropout_p"]))
    assert_low_precision_within_twice_torch(tensors, index, mask, grad_out, (out, *grads), **features)
