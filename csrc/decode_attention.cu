// Split-KV decode attention over a prefix bank + a static KV cache (flash-decoding).
//
// Per row b, KV head hk: the "virtual" key sequence is the P slots of the row's bank entry
// (always visible) followed by the row's cache keys 0..len-1. Query i of the Sq new tokens
// sits at cache position len - Sq + i and sees the cache keys at or before it.
//
// One block = one (row, KV head, 16-query-row chunk, split of the keys). The chunk's rows are
// the G query heads x Sq queries of the GQA group (row r = g * Sq + i), so each K/V tile is read
// from memory once for the whole group (when G * Sq > 16, each 16-row chunk is a block of its
// own; the chunks of one split are launched side by side, so their repeated reads hit L2).
// Tiles of 64 keys stream global -> shared with 16-byte cp.async, STAGES deep; each of the 4
// warps takes 16 keys of a tile and runs its own online softmax on tensor cores (mma.sync
// m16n8k16, fp32 accumulators); the warps merge at the end.
// Splits write a partial (out, log2-sum-exp) per row; the last block of a (row, head, chunk)
// to finish merges them (counters in the caller's DecodeWorkspace, reset by that block), or a separate
// combine kernel does when no counter buffer is given.
//
// Device code (parameters, tiles, split kernel, combine) is in decode_kernels.cuh; this file is
// the host side: checks, the split heuristic, the launches.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "decode_kernels.cuh"

namespace prefix_kernels {
namespace {

using namespace decode;

constexpr int MAX_DEVICES = 64;

struct DeviceInfo {
  int sms = 0;
  int blocks_per_sm = 0;
};

// Per kernel instantiation and device: raise the shared-memory limit once, read the occupancy.
template <typename T, int HEAD_DIM>
DeviceInfo device_info(int device) {
  static DeviceInfo cache[MAX_DEVICES];
  TORCH_CHECK(device >= 0 && device < MAX_DEVICES, "decode_attention: device index ", device,
              " out of range");
  DeviceInfo& info = cache[device];
  if (info.sms == 0) {
    using C = Cfg<HEAD_DIM>;
    auto kernel = decode_split_kernel<T, HEAD_DIM>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        C::SMEM_BYTES));
    int sms = 0, blocks = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, NUM_THREADS,
                                                                 C::SMEM_BYTES));
    TORCH_CHECK(blocks > 0, "decode_attention: the head_dim ", HEAD_DIM, " kernel needs ",
                C::SMEM_BYTES, " bytes of shared memory per block, more than this GPU has");
    info.blocks_per_sm = blocks;
    info.sms = sms;  // written last: a concurrent caller sees either 0 or a complete entry
  }
  return info;
}

// flash-attention's num_splits_heuristic: fill whole waves of resident blocks, no more splits
// than needed, and never two split counts giving the same work per split. Every split keeps at
// least SPLIT_UNIT keys (flash-attention's split granularity at D=64): thinner splits pay more in
// fixed cost (prologue latency, the partials, the combine) than they gain in parallelism (H100,
// B=8, 4 KV heads, 288 keys: one split 5.5 us, two 6.8 us; 1056 keys: four 9.3 us, one 12.7 us).
constexpr int SPLIT_UNIT = 4 * BLOCK_N;
// Once the unsplit blocks cover half the SMs, a split mostly puts a second block on a busy SM and
// adds the partials and the combine: on an H100 at B=32 with 4 KV heads (128 blocks, D=64) one
// split took 6.8 / 16.1 / 53.8 us at 288 / 1056 / 4128 keys, two splits 9.6 / 19.4 / 57.4 us (on
// an H200 two won at 4128 keys, 42.8 vs 45.6 us). With the SMs that busy a split keeps 4096+ keys.
constexpr int MIN_KEYS_PER_SPLIT_BUSY = 4096;
int choose_num_splits(int64_t base_blocks, int max_keys, const DeviceInfo& info) {
  const int64_t slots = static_cast<int64_t>(info.sms) * info.blocks_per_sm;
  if (base_blocks >= slots * 4 / 5) return 1;
  const int n_units = std::max(1, max_keys / SPLIT_UNIT);
  int max_splits = std::min(MAX_SPLITS, n_units);
  if (2 * base_blocks >= info.sms)
    max_splits = std::min(max_splits, std::max(1, max_keys / MIN_KEYS_PER_SPLIT_BUSY));
  auto eligible = [&](int s) {
    return s == 1 || (n_units + s - 1) / s != (n_units + s - 2) / (s - 1);
  };
  float eff[MAX_SPLITS + 1] = {};
  float best = 0.f;
  for (int s = 1; s <= max_splits; ++s) {
    if (!eligible(s)) continue;
    const float waves = static_cast<float>(base_blocks * s) / slots;
    eff[s] = waves / std::ceil(waves);
    best = std::max(best, eff[s]);
  }
  for (int s = 1; s <= max_splits; ++s)
    if (eligible(s) && eff[s] >= 0.85f * best) return s;
  return 1;
}

void check_rows_16b(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, "decode_attention: ", name,
              " must be contiguous in head_dim (stride(-1) == 1), got strides ", t.strides());
  for (int d = 0; d < t.dim() - 1; ++d)
    TORCH_CHECK(t.size(d) <= 1 || t.stride(d) % 8 == 0, "decode_attention: ", name,
                " needs strides that are multiples of 8 elements (16-byte rows), got ",
                t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "decode_attention: ", name,
              " must start on a 16-byte boundary");
}

template <typename T, int HEAD_DIM>
void run_decode(DecodeParams& p, int64_t requested_splits, int64_t max_keys, int batch,
                int device, const at::Tensor& q, std::optional<at::Tensor>& part_o,
                std::optional<at::Tensor>& part_lse, bool fused_combine, cudaStream_t stream) {
  using C = Cfg<HEAD_DIM>;
  const DeviceInfo info = device_info<T, HEAD_DIM>(device);
  const int64_t base_blocks = static_cast<int64_t>(batch) * p.num_kv_heads * p.m_chunks;
  int splits = requested_splits > 0
                   ? static_cast<int>(std::min<int64_t>(requested_splits, MAX_SPLITS))
                   : choose_num_splits(base_blocks, static_cast<int>(max_keys), info);
  p.num_splits = splits;
  if (splits > 1) {
    const int64_t rows = static_cast<int64_t>(batch) * p.num_kv_heads * p.rows_per_head;
    part_o = at::empty({rows, splits, HEAD_DIM}, q.options().dtype(at::kFloat));
    part_lse = at::empty({rows, splits}, q.options().dtype(at::kFloat));
    p.part_o = part_o->data_ptr<float>();
    p.part_lse = part_lse->data_ptr<float>();
  }
  if (!fused_combine || splits == 1) p.counters = nullptr;
  TORCH_CHECK(static_cast<int64_t>(splits) * p.m_chunks <= INT32_MAX, "decode_attention: grid too large");
  const dim3 grid(splits * p.m_chunks, p.num_kv_heads, batch);
  decode_split_kernel<T, HEAD_DIM><<<grid, NUM_THREADS, C::SMEM_BYTES, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1 && p.counters == nullptr) {
    const dim3 cgrid(p.m_chunks, p.num_kv_heads, batch);
    decode_combine_kernel<T, HEAD_DIM><<<cgrid, NUM_THREADS, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void run_for_head_dim(int head_dim, DecodeParams& p, int64_t requested_splits, int64_t max_keys,
                      int batch, int device, const at::Tensor& q,
                      std::optional<at::Tensor>& part_o, std::optional<at::Tensor>& part_lse,
                      bool fused_combine, cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      run_decode<T, 64>(p, requested_splits, max_keys, batch, device, q, part_o, part_lse,
                        fused_combine, stream);
      break;
    case 80:
      run_decode<T, 80>(p, requested_splits, max_keys, batch, device, q, part_o, part_lse,
                        fused_combine, stream);
      break;
    case 96:
      run_decode<T, 96>(p, requested_splits, max_keys, batch, device, q, part_o, part_lse,
                        fused_combine, stream);
      break;
    case 128:
      run_decode<T, 128>(p, requested_splits, max_keys, batch, device, q, part_o, part_lse,
                         fused_combine, stream);
      break;
    case 256:
      run_decode<T, 256>(p, requested_splits, max_keys, batch, device, q, part_o, part_lse,
                         fused_combine, stream);
      break;
    default:
      TORCH_CHECK(false, "decode_attention: head_dim must be 64, 80, 96, 128 or 256, got ",
                  head_dim);
  }
}

}  // namespace

#define PK_STRINGIFY_ARGS(...) #__VA_ARGS__
#define PK_STRINGIFY(...) PK_STRINGIFY_ARGS(__VA_ARGS__)

// The SASS targets this object was built for, e.g. "900": lets Python reject a prebuilt
// extension that carries no code for the current GPU.
std::string decode_compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return PK_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

at::Tensor decode_attention_fwd(const at::Tensor& q, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                                const std::optional<at::Tensor>& prefix_index, double scale,
                                int64_t num_splits, int64_t max_seqlen,
                                const std::optional<at::Tensor>& counters) {
  // -- shapes --
  TORCH_CHECK(q.dim() == 4, "decode_attention: q must be [B, Hq, Sq, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4,
              "decode_attention: k_cache and v_cache must be [B, Hkv, Smax, D], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), "decode_attention: k_cache ", k_cache.sizes(),
              " and v_cache ", v_cache.sizes(), " differ");
  TORCH_CHECK(prefix_k.dim() == 4 && prefix_k.sizes() == prefix_v.sizes(),
              "decode_attention: prefix_k and prefix_v must both be [N, Hkv, P, D], got ",
              prefix_k.sizes(), " and ", prefix_v.sizes());
  const int64_t batch = q.size(0), hq = q.size(1), sq = q.size(2), d = q.size(3);
  const int64_t hkv = k_cache.size(1), smax = k_cache.size(2);
  const int64_t n_entries = prefix_k.size(0), plen = prefix_k.size(2);
  TORCH_CHECK(k_cache.size(0) == batch && k_cache.size(3) == d, "decode_attention: k_cache ",
              k_cache.sizes(), " does not match q ", q.sizes(), " in batch or head_dim");
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, "decode_attention: query heads (", hq,
              ") must be a multiple of KV heads (", hkv, ")");
  TORCH_CHECK(prefix_k.size(1) == hkv && prefix_k.size(3) == d, "decode_attention: prefix_k ",
              prefix_k.sizes(), " must have Hkv=", hkv, " and head_dim=", d);
  TORCH_CHECK(plen >= 1 && n_entries >= 1, "decode_attention: the bank needs N >= 1 entries and "
              "P >= 1 slots, got ", prefix_k.sizes());
  TORCH_CHECK(sq >= 1, "decode_attention: q needs at least one query (Sq >= 1)");
  TORCH_CHECK(d == 64 || d == 80 || d == 96 || d == 128 || d == 256,
              "decode_attention: head_dim must be 64, 80, 96, 128 or 256, got ", d);
  TORCH_CHECK(batch <= 65535 && hkv <= 65535, "decode_attention: batch and KV heads must be "
              "<= 65535 (grid limits), got ", batch, " and ", hkv);
  TORCH_CHECK(smax <= INT32_MAX - plen, "decode_attention: cache too long");
  TORCH_CHECK(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == batch &&
                  cache_seqlens.scalar_type() == at::kInt,
              "decode_attention: cache_seqlens must be int32 [", batch, "], got ",
              cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  if (prefix_index.has_value())
    TORCH_CHECK(prefix_index->dim() == 1 && prefix_index->size(0) == batch &&
                    prefix_index->scalar_type() == at::kInt,
                "decode_attention: prefix_index must be int32 [", batch, "], got ",
                prefix_index->scalar_type(), " ", prefix_index->sizes());

  // -- dtypes, devices, layouts --
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16,
              "decode_attention: q must be float16 or bfloat16, got ", dtype);
  for (const at::Tensor* t : {&k_cache, &v_cache, &prefix_k, &prefix_v})
    TORCH_CHECK(t->scalar_type() == dtype, "decode_attention: all of q, k_cache, v_cache, "
                "prefix_k, prefix_v must share one dtype, got ", t->scalar_type(), " vs ", dtype);
  TORCH_CHECK(q.is_cuda(), "decode_attention: q must be a CUDA tensor");
  for (const at::Tensor* t : {&k_cache, &v_cache, &prefix_k, &prefix_v, &cache_seqlens})
    TORCH_CHECK(t->device() == q.device(), "decode_attention: every tensor must be on ",
                q.device(), ", found one on ", t->device());
  if (prefix_index.has_value())
    TORCH_CHECK(prefix_index->device() == q.device(), "decode_attention: prefix_index is on ",
                prefix_index->device(), ", q on ", q.device());
  TORCH_CHECK(q.is_contiguous(), "decode_attention: q must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0,
              "decode_attention: q must start on a 16-byte boundary");
  TORCH_CHECK(cache_seqlens.is_contiguous(), "decode_attention: cache_seqlens must be contiguous");
  if (prefix_index.has_value())
    TORCH_CHECK(prefix_index->is_contiguous(), "decode_attention: prefix_index must be contiguous");
  check_rows_16b(k_cache, "k_cache");
  check_rows_16b(v_cache, "v_cache");
  check_rows_16b(prefix_k, "prefix_k");
  check_rows_16b(prefix_v, "prefix_v");
  TORCH_CHECK(num_splits >= 0 && num_splits <= MAX_SPLITS, "decode_attention: num_splits must "
              "be in [0, ", MAX_SPLITS, "] (0 = automatic), got ", num_splits);

  const int64_t rows_per_head = (hq / hkv) * sq;
  const int64_t m_chunks = (rows_per_head + M_TILE - 1) / M_TILE;
  TORCH_CHECK(rows_per_head <= INT32_MAX / 2, "decode_attention: too many query rows per head");
  const bool fused_combine = counters.has_value();
  if (fused_combine) {
    TORCH_CHECK(counters->scalar_type() == at::kInt && counters->is_contiguous() &&
                    counters->device() == q.device(),
                "decode_attention: counters must be a contiguous int32 tensor on ", q.device());
    TORCH_CHECK(counters->numel() >= batch * hkv * m_chunks, "decode_attention: counters needs ",
                batch * hkv * m_chunks, " entries, got ", counters->numel());
  }

  at::Tensor out = at::empty(q.sizes(), q.options());
  if (batch == 0 || hq == 0) return out;

  c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();

  DecodeParams p{};
  p.q = q.data_ptr();
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.pk = prefix_k.data_ptr();
  p.pv = prefix_v.data_ptr();
  p.seqlens = cache_seqlens.data_ptr<int>();
  p.prefix_index = prefix_index.has_value() ? prefix_index->data_ptr<int>() : nullptr;
  p.out = out.data_ptr();
  p.counters = fused_combine ? counters->data_ptr<int>() : nullptr;
  p.k_stride_b = k_cache.stride(0);
  p.k_stride_h = k_cache.stride(1);
  p.k_stride_n = k_cache.stride(2);
  p.v_stride_b = v_cache.stride(0);
  p.v_stride_h = v_cache.stride(1);
  p.v_stride_n = v_cache.stride(2);
  p.pk_stride_n = prefix_k.stride(0);
  p.pk_stride_h = prefix_k.stride(1);
  p.pk_stride_p = prefix_k.stride(2);
  p.pv_stride_n = prefix_v.stride(0);
  p.pv_stride_h = prefix_v.stride(1);
  p.pv_stride_p = prefix_v.stride(2);
  p.num_kv_heads = static_cast<int>(hkv);
  p.seqlen_q = static_cast<int>(sq);
  p.rows_per_head = static_cast<int>(rows_per_head);
  p.m_chunks = static_cast<int>(m_chunks);
  p.max_cache_len = static_cast<int>(smax);
  p.prefix_len = static_cast<int>(plen);
  p.num_entries = static_cast<int>(std::min<int64_t>(n_entries, INT32_MAX));
  p.scale_log2 = static_cast<float>(scale) * LOG2E;

  const int64_t hint = max_seqlen > 0 ? std::min(max_seqlen, smax) : smax;
  std::optional<at::Tensor> part_o, part_lse;  // kept alive until the launches are queued
  const int device = q.get_device();
  if (dtype == at::kHalf)
    run_for_head_dim<__half>(static_cast<int>(d), p, num_splits, plen + hint,
                             static_cast<int>(batch), device, q, part_o, part_lse, fused_combine,
                             stream);
  else
    run_for_head_dim<__nv_bfloat16>(static_cast<int>(d), p, num_splits, plen + hint,
                                    static_cast<int>(batch), device, q, part_o, part_lse,
                                    fused_combine, stream);
  return out;
}

}  // namespace prefix_kernels
