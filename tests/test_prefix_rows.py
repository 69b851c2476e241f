"""ops/prefix_rows.py (the bank entry prepended to each row's keys, and the prefix rows of dK/dV
summed per entry) against plain PyTorch, run by the interpreter on the CPU; and the cuDNN
frontend vendor's graph plumbing (ops/cudnn_frontend.py) against a stand-in of the `cudnn`
package, so that its calls are checked here before a GPU runs them."""
import pytest
import torch

from prefix_kernels.ops import cudnn_frontend, vendor_attention
from prefix_kernels.ops.prefix_rows import concat_prefix_kv, sum_prefix_rows
from utils import kernel_device

# (B, Hkv, S, D, P, N, index): an out-of-range entry, S=1 with P>S, D not a power of two
ROWS_CASES = [(3, 2, 21, 24, 5, 4, [3, 0, 3]), (2, 1, 1, 16, 40, 1, None), (2, 2, 17, 32, 3, 2, [1, 7]),
              (1, 3, 70, 64, 1, 1, [0])]


def _entries(index, b, n, device):
    entry = torch.zeros(b, dtype=torch.long, device=device) if index is None else index
    return entry, (entry >= 0) & (entry < n)


@pytest.mark.parametrize("case", ROWS_CASES)
def test_concat_prefix_kv_prepends_each_rows_entry(case):
    device = kernel_device()
    b, hkv, s, d, p, n, idx = case
    k = torch.randn(b, s, hkv, d, device=device).transpose(1, 2)        # HF's strides
    v = torch.randn(b, hkv, s, d, device=device)
    bank_k, bank_v = torch.randn(n, hkv, p, d, device=device), torch.randn(n, hkv, p, d, device=device)
    index = None if idx is None else torch.tensor(idx, device=device)
    ck, cv = concat_prefix_kv(k, v, bank_k, bank_v, index)
    assert ck.shape == (b, hkv, p + s, d) and ck.is_contiguous() and cv.is_contiguous()
    entry, valid = _entries(index, b, n, device)
    for got, bank, own in ((ck, bank_k, k), (cv, bank_v, v)):
        rows = bank[entry.clamp(0, n - 1)]
        rows[~valid] = float("nan")       # an out-of-range entry poisons its row, as in the fused op
        want = torch.cat([rows, own], dim=2)
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


@pytest.mark.parametrize("case", ROWS_CASES)
def test_sum_prefix_rows_sums_each_entrys_rows(case):
    device = kernel_device()
    b, hkv, s, d, p, n, idx = case
    bank = torch.randn(n, hkv, p, d, device=device)
    dk = torch.randn(b, hkv, p + s, d, device=device)
    dv = torch.randn(b, p + s, hkv, d, device=device).transpose(1, 2)   # other strides than dk's
    index = None if idx is None else torch.tensor(idx, device=device)
    dpk, dpv = sum_prefix_rows(dk, dv, index, bank, bank)
    entry, valid = _entries(index, b, n, device)
    for got, grad in ((dpk, dk), (dpv, dv)):
        want = torch.zeros(n, hkv, p, d, device=device)
        for row in range(b):
            if valid[row]:      # out-of-range rows count nowhere
                want[entry[row]] += grad[row, :, :p]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    again = sum_prefix_rows(dk, dv, index, bank, bank)
    assert torch.equal(again[0], dpk) and torch.equal(again[1], dpv)       # a fixed order


# -- the cuDNN frontend's plumbing, against a stand-in of its Python package -------------------

class _FakeTensor:
    def __init__(self, log, name, uid):
        self.log, self.name, self.uid, self.attrs = log, name, uid, {}

    def __getattr__(self, attr):
        if not attr.startswith("set_"):
            raise AttributeError(attr)

        def setter(value):
            self.attrs[attr[4:]] = value
            return self
        return setter

    def get_uid(self):
        return self.uid


class _FakeGraph:
    """Records the calls the module makes; execute runs plain attention so results can be checked."""

    def __init__(self, log, **kwargs):
        self.log, self.kwargs, self.tensors = log, kwargs, []
        log.append(("pygraph", kwargs))

    def _new(self, name):
        t = _FakeTensor(self.log, name, 100 + len(self.tensors))
        self.tensors.append(t)
        return t

    def tensor(self, name, dim, stride, data_type):
        t = self._new(name)
        t.attrs.update(dim=dim, stride=stride, data_type=data_type)
        return t

    def sdpa(self, q, k, v, generate_stats, attn_scale, name, **mask):
        self.log.append(("sdpa", attn_scale, mask))
        self.op = ("fwd", attn_scale, mask)
        return self._new("o"), self._new("stats")

    def sdpa_backward(self, q, k, v, o, dO, stats, attn_scale, name, **mask):
        self.log.append(("sdpa_backward", attn_scale, mask))
        self.op = ("bwd", attn_scale, mask)
        return self._new("dq"), self._new("dk"), self._new("dv")

    def validate(self):
        self.log.append("validate")

    def build_operation_graph(self):
        pass

    def create_execution_plans(self, modes):
        pass

    def check_support(self):
        pass

    def build_plans(self):
        pass

    def get_workspace_size(self):
        return 0

    def execute(self, pointers, workspace, handle=None):
        self.log.append(("execute", sorted(pointers)))
        self.pointers = pointers


class _FakeCudnn:
    class data_type:
        BFLOAT16, HALF, FLOAT = "bf16", "fp16", "fp32"

    class heur_mode:
        A, FALLBACK = "A", "FALLBACK"

    class diagonal_alignment:
        TOP_LEFT, BOTTOM_RIGHT = "top_left", "bottom_right"

    def __init__(self):
        self.log = []

    def backend_version(self):
        return 91900

    def create_handle(self):
        return 7

    def set_stream(self, handle, stream):
        self.log.append(("set_stream", handle))

    def pygraph(self, **kwargs):
        return _FakeGraph(self.log, **kwargs)


@pytest.fixture
def fake_cudnn(monkeypatch):
    fake = _FakeCudnn()
    monkeypatch.setattr(cudnn_frontend, "_module", lambda: fake)
    cudnn_frontend.unavailable_reason.cache_clear()
    monkeypatch.setattr(cudnn_frontend, "_GRAPHS", {})
    monkeypatch.setattr(cudnn_frontend, "_handle", lambda device: 7)
    monkeypatch.setattr(cudnn_frontend, "_io_type", lambda dtype: {torch.float32: "fp32"}.get(dtype, str(dtype)))

    def run(self, tensors, device):
        """What cuDNN would compute, by the PyTorch stand-in vendor (bottom-right causal too)."""
        fake.log.append(("run", [tuple(t.shape) for t in tensors]))
        self.graph.execute({uid: t.data_ptr() for uid, t in zip(self.uids, tensors)}, 0)
        _, scale, mask = self.graph.op
        causal = bool(mask)
        if len(tensors) == 5:
            q, k, v, out, lse = tensors
            o, l = vendor_attention._math_forward(q, k, v, scale, causal)
            out.copy_(o)
            lse.copy_(l)
        else:
            q, k, v, out, do, lse, dq, dk, dv = tensors
            for t, g in zip((dq, dk, dv), vendor_attention._math_backward(do, q, k, v, out, lse, scale, causal)):
                t.copy_(g)
    monkeypatch.setattr(cudnn_frontend._Graph, "run", run)
    yield fake
    cudnn_frontend.unavailable_reason.cache_clear()


def test_cudnn_frontend_builds_bottom_right_graphs_once_per_layout(fake_cudnn):
    q = torch.randn(2, 8, 10, 64, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 17, 64, dtype=torch.bfloat16)      # the prefix-prepended keys: Sk > Sq
    assert cudnn_frontend.unavailable_reason() is None
    lay = cudnn_frontend.layout
    assert cudnn_frontend.unsupported_reason(q.dtype, lay(q), lay(k), lay(k), 0.125, True, q.device) is None
    ops = [entry for entry in fake_cudnn.log if isinstance(entry, tuple) and entry[0].startswith("sdpa")]
    bottom_right = dict(diagonal_alignment="bottom_right", diagonal_band_right_bound=0)
    assert ops == [("sdpa", 0.125, bottom_right), ("sdpa_backward", 0.125, bottom_right)]
    out, lse = cudnn_frontend.forward(q, k, k, 0.125, True)
    assert out.shape == q.shape and out.stride() == q.stride() and lse.shape == (2, 8, 10, 1)
    assert lse.dtype == torch.float32
    dq, dk, dv = cudnn_frontend.backward(torch.randn_like(q), q, k, k, out, lse[..., 0], 0.125, True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    graphs = [entry for entry in fake_cudnn.log if isinstance(entry, tuple) and entry[0] == "pygraph"]
    assert len(graphs) == 2            # both graphs built at the first call, then reused
    runs = [entry[1] for entry in fake_cudnn.log if isinstance(entry, tuple) and entry[0] == "run"]
    assert runs[0] == [tuple(q.shape), tuple(k.shape), tuple(k.shape), tuple(q.shape), (2, 8, 10, 1)]
    assert len(runs[1]) == 9           # q, k, v, o, dO, stats, dq, dk, dv


def test_cudnn_frontend_not_causal_has_no_mask_and_a_failed_build_is_a_reason(fake_cudnn, monkeypatch):
    q = torch.randn(1, 2, 4, 32, dtype=torch.float16)
    lay = cudnn_frontend.layout
    cudnn_frontend.unsupported_reason(q.dtype, lay(q), lay(q), lay(q), 0.5, False, q.device)
    assert ("sdpa", 0.5, {}) in fake_cudnn.log

    def no_engine(self):
        raise RuntimeError("No valid execution plans built.")
    monkeypatch.setattr(_FakeGraph, "build_plans", no_engine)
    q2 = torch.randn(1, 2, 5, 32, dtype=torch.float16)
    reason = cudnn_frontend.unsupported_reason(q2.dtype, lay(q2), lay(q2), lay(q2), 0.5, True, q2.device)
    assert "No valid execution plans" in reason
    with pytest.raises(RuntimeError, match="cuDNN frontend: RuntimeError: No valid execution plans"):
        cudnn_frontend.forward(q2, q2, q2, 0.5, True)


def test_cudnn_frontend_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(cudnn_frontend, "_module", lambda: None)
    cudnn_frontend.unavailable_reason.cache_clear()
    try:
        assert "pip install 'prefix-kernels[cudnn]'" in cudnn_frontend.unavailable_reason()
    finally:
        cudnn_frontend.unavailable_reason.cache_clear()


FE_CASES = {"gqa_hf_layout_mixed": (True, dict(B=3, H=4, HKV=2, SQ=11, D=32, P=6, N=3, hf_layout=True)),
            "mqa_one_entry": (True, dict(B=2, H=4, HKV=1, SQ=9, D=16, P=13, N=1, mixed=False)),
            "not_causal_mha": (False, dict(B=2, H=2, HKV=2, SQ=7, D=32, P=3, N=2))}


@pytest.mark.parametrize("case", FE_CASES)
def test_split_pad_mode_through_the_cudnn_frontend_matches_the_reference(fake_cudnn, case):
    """The whole cudnn_fe route of the split path (layouts planned, graphs keyed, K/V
    concatenated, q unpadded, the bank gradient summed) with cuDNN's math done by the stand-in."""
    import math

    import attention_utils
    from prefix_kernels.ops import split_attention as sa
    from prefix_kernels.ops.reference import reference_prefix_attention
    kernel_device()
    causal, shape = FE_CASES[case]
    tensors, index, _ = attention_utils.make_inputs(**shape)
    scale = 1 / math.sqrt(shape["D"])
    assert sa.cudnn_fe_reason(tensors[0], tensors[1], tensors[3], scale, causal) is None
    # the whole eligibility: on CPU tensors the vendor is refused before the frontend is asked
    assert "on the CPU" in sa.unusable_reason(sa.SplitConfig("cudnn_fe", "pad"), tensors[0], tensors[1], tensors[3])
    out = sa.split_prefix_attention(*tensors, index, scale, causal, sa.SplitConfig("cudnn_fe", "pad"))
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    want = reference_prefix_attention(*leaves, index, None, None, causal)
    want_grads = torch.autograd.grad(want, leaves, grad_out.double())
    for name, got, ref in zip(attention_utils.NAMES, (out, *grads), (want, *want_grads)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=3e-5, msg=lambda m: f"{name}: {m}")
    graphs = [e for e in fake_cudnn.log if isinstance(e, tuple) and e[0] == "pygraph"]
    assert len(graphs) == 2         # planned once: the call reused the graphs the plan built
    runs = [e[1] for e in fake_cudnn.log if isinstance(e, tuple) and e[0] == "run"]
    b, h, hkv, sq, d, p = (shape[key] for key in ("B", "H", "HKV", "SQ", "D", "P"))
    assert runs[0][1] == (b, hkv, p + sq, d)      # the prefix-prepended keys, q unpadded
    assert runs[0][0] == (b, h, sq, d)
    masks = [e[2] for e in fake_cudnn.log if isinstance(e, tuple) and e[0] in ("sdpa", "sdpa_backward")]
    assert all(bool(mask) == causal for mask in masks)      # bottom-right band when causal, none else


def test_cudnn_frontend_builds_graphs_for_a_bounded_number_of_shapes(fake_cudnn, monkeypatch):
    """Variable-length batches make a graph per length: past MAX_GRAPHS signatures new shapes are
    refused (and run fused), the first ones keep theirs."""
    monkeypatch.setattr(cudnn_frontend, "MAX_GRAPHS", 3)
    lay = cudnn_frontend.layout
    shapes = [torch.empty(1, 2, s, 16, dtype=torch.float16) for s in (4, 5, 6, 7)]
    reasons = [cudnn_frontend.unsupported_reason(t.dtype, lay(t), lay(t), lay(t), 0.25, True, t.device) for t in shapes]
    assert reasons[:3] == [None, None, None] and "more than" in reasons[3]
    assert cudnn_frontend.graph_counts() == {"built": 3, "refused": []}      # the refusal is not kept
    assert cudnn_frontend.unsupported_reason(torch.float16, lay(shapes[0]), lay(shapes[0]), lay(shapes[0]), 0.25, True,
                                             shapes[0].device) is None
