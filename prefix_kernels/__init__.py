"""prefix-kernels: fused GPU kernels for prefix-tuning.

Importing the package is light: the Triton kernels load on first use.
"""
__version__ = "0.1.0"

__all__ = ["prefix_attention", "reference_prefix_attention", "decode_attention", "DecodeWorkspace", "patch_model",
           "unpatch_model", "load_prefix", "is_patched", "get_prefix_bank", "PrefixBank", "AdapterConfig",
           "read_adapter"]

_INTEGRATION = ("patch_model", "unpatch_model", "load_prefix", "is_patched", "get_prefix_bank")


def __getattr__(name):
    if name == "prefix_attention":
        from .ops.prefix_attention import prefix_attention
        return prefix_attention
    if name in ("decode_attention", "DecodeWorkspace"):
        from .ops import decode
        return getattr(decode, name)
    if name == "reference_prefix_attention":
        from .ops.reference import reference_prefix_attention
        return reference_prefix_attention
    if name in _INTEGRATION:
        from .integrations import transformers as _hf
        return getattr(_hf, name)
    if name == "PrefixBank":
        from .bank import PrefixBank
        return PrefixBank
    if name in ("AdapterConfig", "read_adapter"):
        from . import adapter
        return getattr(adapter, name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
