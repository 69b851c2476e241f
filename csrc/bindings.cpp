// Python bindings of the CUDA decode kernel. The module is `prefix_kernels._C` when built ahead
// by setup.py (PREFIX_KERNELS_BUILD_CUDA=1) or a JIT-built module (prefix_kernels/ops/_build.py);
// TORCH_EXTENSION_NAME names it either way.
#include <torch/extension.h>

#include <optional>
#include <string>

namespace prefix_kernels {
at::Tensor decode_attention_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                const std::optional<at::Tensor>& prefix_index, double scale,
                                int64_t num_splits, int64_t max_seqlen,
                                const std::optional<at::Tensor>& counters);
std::string decode_compiled_archs();
}  // namespace prefix_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "prefix-kernels CUDA decode attention (split-KV flash-decoding over a prefix bank)";
  m.def("decode_attention_fwd", &prefix_kernels::decode_attention_fwd,
        "out [B, Hq, Sq, D] = attention of q over each row's bank entry and its cached keys",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
        py::arg("prefix_k"), py::arg("prefix_v"), py::arg("prefix_index"), py::arg("scale"),
        py::arg("num_splits"), py::arg("max_seqlen"), py::arg("counters"));
  m.def("compiled_archs", &prefix_kernels::decode_compiled_archs,
        "SASS targets of this build, e.g. '900'");
  m.attr("M_TILE") = 16;       // query rows per block; counters need B * Hkv * ceil(G*Sq/16)
  m.attr("MAX_SPLITS") = 128;
}
