"""GPU kernel timings as pytest-benchmark tests (marked gpu; skipped without CUDA). Each timed
round synchronizes the device. On the GPU machine, `bash benchmarks/gpu_run.sh benchgpu` runs them
with --benchmark-json so the numbers land in $OUT/gpu-benchmarks.json with the machine's details."""
import pytest
import torch

import prefix_kernels as pk

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _timed(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@pytest.mark.parametrize("shape", [(8, 32, 8, 1024, 128, 32), (2, 32, 4, 4096, 64, 128)],
                         ids=["B8-S1024-D128-P32", "B2-S4096-D64-P128-gqa8"])
def test_prefix_attention_fwd_bwd_bf16(benchmark, shape):
    b, h, hkv, s, d, p = shape
    leaf = lambda *dims: torch.randn(*dims, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v, bank_k, bank_v = leaf(b, h, s, d), leaf(b, hkv, s, d), leaf(b, hkv, s, d), leaf(1, hkv, p, d), \
        leaf(1, hkv, p, d)
    grad = torch.randn_like(q)
    step = _timed(lambda: pk.prefix_attention(q, k, v, bank_k, bank_v).backward(grad))
    benchmark.pedantic(step, rounds=30, iterations=1, warmup_rounds=5)
    benchmark.extra_info.update(shape="B,H,Hkv,S,D,P=" + ",".join(map(str, shape)), dtype="bfloat16",
                                device=torch.cuda.get_device_name())


@pytest.mark.parametrize("batch,context", [(32, 4096), (32, 16384)])
def test_decode_attention_bf16(benchmark, batch, context):
    g = lambda *dims: torch.randn(*dims, device="cuda", dtype=torch.bfloat16)      # noqa: E731
    q, k, v = g(batch, 32, 1, 64), g(batch, 4, context, 64), g(batch, 4, context, 64)
    bank_k, bank_v = g(8, 4, 32, 64), g(8, 4, 32, 64)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    index = torch.arange(batch, device="cuda") % 8
    step = _timed(lambda: pk.decode_attention(q, k, v, lens, bank_k, bank_v, prefix_index=index))
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)
    benchmark.extra_info.update(batch=batch, context=context, dtype="bfloat16", device=torch.cuda.get_device_name())
