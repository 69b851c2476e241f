"""Direct launches of compiled kernels (ops/launch.py): the specialization key and the cache that
skips triton's JIT dispatch, with a fake JIT kernel (the real launcher needs a GPU; the GPU op
tests run through it)."""
import inspect

import pytest
import torch

from prefix_kernels.ops import launch
from prefix_kernels.ops.launch import CompiledLaunches, specialization_key
from utils import FakeJit, FakeParam, kernel_params, python_function, requires_gpu


def test_key_splits_what_triton_specializes():
    t = torch.zeros(64)
    base = specialization_key((t, 7, 32, 1.5))
    assert specialization_key((torch.zeros(64), 9, 48, 0.25)) == base          # same classes
    assert specialization_key((t[1:], 7, 32, 1.5)) != base                      # misaligned pointer
    assert specialization_key((t.half(), 7, 32, 1.5)) != base                   # dtype
    assert specialization_key((t, 1, 32, 1.5)) != base                          # 1 is a constexpr
    assert specialization_key((t, 7, 33, 1.5)) != base                          # divisibility by 16
    assert specialization_key((t, 2**40 + 7, 32, 1.5)) != base                  # i64
    assert specialization_key((t, 2**40 + 16, 32, 1.5)) != specialization_key((t, 2**40 + 7, 32, 1.5))
    assert specialization_key((t, 2**63 + 7, 32, 1.5)) != specialization_key((t, 2**40 + 7, 32, 1.5))   # u64
    assert specialization_key((t, None, True, 1.5)) != specialization_key((t, None, False, 1.5))


def _fake_jit(accepts=None):
    """params x, n (runtime) and BLOCK (constexpr); dispatches and direct launches go to .log."""
    return FakeJit([FakeParam("x", False), FakeParam("n", False), FakeParam("BLOCK", True)], log=[],
                   accepts=accepts)


@pytest.fixture(autouse=True)
def _reset():
    CompiledLaunches.disabled_reason = None
    yield
    CompiledLaunches.disabled_reason = None


def test_second_launch_skips_the_dispatch_with_constexprs_appended():
    jit = _fake_jit()
    launches = CompiledLaunches(jit, dict(BLOCK=64, num_warps=4))
    x = torch.zeros(32)
    launches.launch((2,), (x, 5))
    launches.launch((3, 4), (x, 7))
    assert jit.log[0][0] == "jit" and jit.log[0][3] == dict(BLOCK=64, num_warps=4)
    assert jit.log[1] == ("direct", (3, 4, 1), (x, 7, 64))


def test_new_specialization_goes_through_triton_again():
    jit = _fake_jit()
    launches = CompiledLaunches(jit, dict(BLOCK=64))
    x = torch.zeros(32)
    launches.launch((1,), (x, 5))
    launches.launch((1,), (x, 1))          # n == 1: another compiled kernel in triton
    launches.launch((1,), (x[1:], 5))      # misaligned: another one too
    launches.launch((1,), (x, 5))
    assert [entry[0] for entry in jit.log] == ["jit", "jit", "jit", "direct"]


def test_repeated_scalars_take_the_exact_key_and_stay_correct():
    """A launch whose scalars equal an earlier one's skips the specialization key; a changed
    pointer alignment or int class still goes through triton's dispatch, and keys never
    collide across dtypes."""
    jit = _fake_jit()
    launches = CompiledLaunches(jit, dict(BLOCK=64))
    x = torch.zeros(64)
    launches.launch((1,), (x, 5))                  # dispatch
    launches.launch((1,), (torch.zeros(64), 7))    # same classes: direct, exact key stored
    launches.launch((1,), (torch.zeros(64), 7))    # direct through the exact key
    assert len(launches.by_exact) == 1
    launches.launch((1,), (x[1:], 7))              # misaligned: dispatch
    launches.launch((1,), (x.half(), 7))           # dtype: dispatch
    launches.launch((1,), (x, 1))                  # constexpr 1: dispatch
    assert [entry[0] for entry in jit.log] == ["jit", "direct", "direct", "jit", "jit", "jit"]
    for seed in range(200):                        # ever-new scalars (dropout seeds): bounded
        launches.launch((1,), (x, 16 * seed + 3))
    assert len(launches.by_exact) <= 64


def test_tensors_after_scalars_take_no_exact_key():
    launches = CompiledLaunches(_fake_jit(), dict(BLOCK=64))
    x = torch.zeros(64)
    assert launches.exact_key((x, 3, x)) is None
    assert launches.exact_key((x, 3, x)) is None


def test_a_launcher_that_disagrees_turns_direct_launches_off_with_a_warning():
    jit = _fake_jit(accepts=2)               # a launcher that takes the runtime arguments only
    launches = CompiledLaunches(jit, dict(BLOCK=64))
    x = torch.zeros(32)
    launches.launch((1,), (x, 5))
    with pytest.warns(UserWarning, match="direct kernel launches are off"):
        launches.launch((1,), (x, 5))
    launches.launch((1,), (x, 5))
    assert [entry[0] for entry in jit.log] == ["jit", "jit", "jit"]
    assert "exactly 2 arguments" in CompiledLaunches.disabled_reason


def test_missing_constexpr_keeps_the_dispatch():
    jit = _fake_jit()
    launches = CompiledLaunches(jit, dict(num_warps=4))     # BLOCK comes from elsewhere (a default)
    x = torch.zeros(32)
    for _ in range(2):
        launches.launch((1,), (x, 5))
    assert [entry[0] for entry in jit.log] == ["jit", "jit"]


def test_off_under_the_interpreter_and_by_env(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    assert launch.direct_launch_enabled()
    monkeypatch.setenv("PREFIX_KERNELS_DIRECT_LAUNCH", "0")
    assert not launch.direct_launch_enabled()
    monkeypatch.delenv("PREFIX_KERNELS_DIRECT_LAUNCH")
    monkeypatch.setattr(launch, "interpreting", lambda: True)
    assert not launch.direct_launch_enabled()


def test_real_kernels_put_constexprs_last():
    """CompiledLaunches appends the constexprs after the runtime arguments: true of every kernel
    the package launches through it (the launchers' tables and the bank-gradient reduce)."""
    from prefix_kernels.ops import prefix_attention, prefix_attention_kernels, split_attention

    kernels = [*prefix_attention._KERNELS.values(), *split_attention._KERNELS.values(),
               prefix_attention_kernels.reduce_prefix_grads]
    assert len(kernels) == 8
    for kernel in kernels:
        name = python_function(kernel).__name__
        flags = [p.is_constexpr for p in kernel_params(kernel)]
        assert True in flags and all(flags[flags.index(True):]), name
        defaults = [p.default for p in inspect.signature(python_function(kernel)).parameters.values()]
        assert all(d is inspect.Parameter.empty for d, c in zip(defaults, flags) if c), name


# -- on the GPU: the real launcher -------------------------------------------------------------

@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("path", ["fused", "split"])
def test_direct_launches_match_the_dispatch_bitwise(monkeypatch, path):
    """Forward and all gradients through the compiled kernels' launchers equal triton's dispatch
    bit for bit, over shapes, strides, dropout, mixed bank entries and repeated calls (each
    call's second launch of a specialization is a direct one)."""
    import prefix_kernels as pk

    monkeypatch.setenv("PREFIX_KERNELS_AUTOTUNE", "0")
    cases = [dict(b=2, h=4, hkv=2, s=77, d=64, p=5, n=3, dropout=0.0),
             dict(b=3, h=8, hkv=8, s=130, d=128, p=33, n=1, dropout=0.0),
             dict(b=2, h=4, hkv=1, s=64, d=64, p=16, n=2, dropout=0.1)]
    for case in cases:
        if path == "split" and case["dropout"]:
            continue
        gen = torch.Generator(device="cuda").manual_seed(0)
        b, h, hkv, s, d, p, n = (case[k] for k in ("b", "h", "hkv", "s", "d", "p", "n"))
        qkv = torch.randn(b, s, h + 2 * hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        bank_k = torch.randn(n, hkv, p, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        bank_v = torch.randn(n, hkv, p, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        index = torch.arange(b, device="cuda") % n if n > 1 else None
        grad = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, generator=gen)

        def run(direct):
            monkeypatch.setenv("PREFIX_KERNELS_DIRECT_LAUNCH", "1" if direct else "0")
            results = []
            for _ in range(3):
                leaves = [t.detach().clone().requires_grad_() for t in (qkv, bank_k, bank_v)]
                x, pk_, pv_ = leaves
                q, k, v = x.transpose(1, 2).split([h, hkv, hkv], dim=1)    # strided views, as HF's
                torch.manual_seed(1)
                out = pk.prefix_attention(q, k, v, pk_, pv_, prefix_index=index, dropout_p=case["dropout"],
                                          path=path)
                out.backward(grad)
                results.append([out.detach()] + [t.grad for t in leaves])
            return results

        dispatched, direct = run(False), run(True)
        assert CompiledLaunches.disabled_reason is None, CompiledLaunches.disabled_reason
        for a_call, b_call in zip(dispatched, direct):
            for a, b_ in zip(a_call, b_call):
                assert torch.equal(a, b_), case
