"""Lower a @triton.jit kernel to Triton IR for sm_90 without a GPU (the GPU compiler's front end).

Imported by the subprocess scripts of test_kernels_compile.py and test_split_attention.py, which
run without TRITON_INTERPRET (the interpreter replaces @triton.jit). Exits 77 when triton's
compiler internals (whose names move between releases) cannot be imported: the tests skip then.
"""
import sys

try:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
except ImportError as exc:
    print("TRITON_INTERNALS_DIFFER", exc)
    sys.exit(77)


def lower_to_ttir(kernel, signature: dict, constexprs: dict):
    """Triton IR of `kernel` (a JITFunction) for these argument types and constexpr values."""
    src = ASTSource(fn=kernel, signature={**signature, **{name: "constexpr" for name in constexprs}},
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": 4, "num_stages": 2})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    return src.make_ir(target, options, backend.get_codegen_implementation(options),
                       backend.get_module_map(), context)
