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
from conftest import kernel_device, requires_gpu


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
    out = pk.prefix_attention(q, k, v, bk, bv, prefix_index=index, dropout_p=0.5, backend="reference")
    assert abs(out.mean().item() - 1) < 0.1 and (out != 1).any()


# -- GPU: fp16/bf16 against fp64 with the 2x rule -------------------------------------------------

GPU_FEATURE_CASES = [
    (dict(B=2, H=8, HKV=2, SQ=203, D=64, P=32, N=3, padding="left"), dict(dropout_p=0.1)),
    (dict(B=2, H=4, HKV=4, SQ=130, SK=300, D=128, P=7, N=2), dict(dropout_p=0.3)),
]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(GPU_FEATURE_CASES)))
def test_features_low_precision_error_at_most_twice_pytorchs(case, dtype):
    shape, features = GPU_FEATURE_CASES[case]
    tensors, index, mask = make_inputs(device="cuda", dtype=dtype, **shape)
    grad_out = torch.randn_like(tensors[0])
    torch.manual_seed(1)
    out, grads = run(tensors, index, mask, grad_out, "triton", **features)
    if features.get("dropout_p", 0) > 0:
        features = dict(features, dropout_mask=_keep_mask(1, tensors, features["dropout_p"]))
    assert_low_precision_within_twice_torch(tensors, index, mask, grad_out, (out, *grads), **features)
