"""Inputs, calls and the float64 oracle shared by the attention op tests."""
import torch

import prefix_kernels as pk
from prefix_kernels.ops.reference import reference_prefix_attention


def make_inputs(B=2, H=4, HKV=2, SQ=19, SK=None, D=32, P=7, N=3, dtype=torch.float32,
                device="cpu", padding=None, mixed=True, hf_layout=False, fully_padded_row=False):
    SK = SQ if SK is None else SK
    if hf_layout:   # HF hands attention [B, S, H, D] transposed: non-contiguous strides
        q = torch.randn(B, SQ, H, D, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, SK, HKV, D, device=device, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, SK, HKV, D, device=device, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, H, SQ, D, device=device, dtype=dtype)
        k = torch.randn(B, HKV, SK, D, device=device, dtype=dtype)
        v = torch.randn(B, HKV, SK, D, device=device, dtype=dtype)
    bank_k = torch.randn(N, HKV, P, D, device=device, dtype=dtype)
    bank_v = torch.randn(N, HKV, P, D, device=device, dtype=dtype)
    index = None
    if mixed:
        index = torch.tensor([(2 * b) % N for b in range(B)], device=device)
    mask = None
    if padding is not None:
        mask = torch.ones(B, SK, dtype=torch.bool, device=device)
        for b in range(B):
            pad = (3 * b + 2) % max(SK, 1)
            if padding == "left":
                mask[b, :pad] = False
            elif padding == "right":
                mask[b, SK - pad:] = False
            elif padding == "holes":
                mask[b] = torch.rand(SK, device=device) > 0.3
        if fully_padded_row:
            mask[-1] = False
    tensors = [t.requires_grad_() for t in (q, k, v, bank_k, bank_v)]
    return tensors, index, mask


def run(tensors, index, mask, grad_out, backend, causal=True, **kw):
    out = pk.prefix_attention(*tensors, prefix_index=index, key_padding_mask=mask, causal=causal,
                              backend=backend, **kw)
    needs = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(out, needs, grad_out)
    return out, grads


def reference_fp64(tensors, index, mask, grad_out, causal=True, scale=None, **features):
    """Output and the gradients of the inputs that require grad, in float64."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    out = reference_prefix_attention(*leaves, index, mask, scale, causal, **features)
    needs = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad(out, needs, grad_out.double())


NAMES = ["out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"]


def assert_close_fp64(got_all, want_all, rtol=1e-4, atol=3e-5):
    """Kernel results (fp32 under the interpreter) against the float64 reference, by name."""
    for name, got, want in zip(NAMES, got_all, want_all):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def assert_low_precision_within_twice_torch(tensors, index, mask, grad_out, got_all, **features):
    """flash-attention's rule for fp16/bf16: our error against the fp64 reference is at most twice
    PyTorch's own same-dtype computation of the same function (plus a small absolute floor)."""
    ref_out, ref_grads = reference_fp64(tensors, index, mask, grad_out, **features)
    want_all = (ref_out, *ref_grads)
    low = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    pt_out = reference_prefix_attention(*low, index, mask, upcast=False, **features)
    pt_all = (pt_out, *torch.autograd.grad(pt_out, [t for t in low if t.requires_grad], grad_out))
    for name, got, pt, want in zip(NAMES, got_all, pt_all, want_all):
        ours = (got.double() - want).abs().max().item()
        theirs = (pt.double() - want).abs().max().item()
        assert ours == ours and ours != float("inf"), f"{name}: not finite"
        assert ours <= 2 * theirs + 1e-4 * want.abs().max().item(), f"{name}: {ours:.3e} vs torch {theirs:.3e}"
