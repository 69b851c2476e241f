// Device code of the split-KV decode kernel: parameters, tile configuration, helpers, the
// split kernel and the combine. Included by decode_attention.cu (host side, bindings of shapes
// to launches); see there for the design.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

namespace prefix_kernels {
namespace decode {

constexpr int NUM_WARPS = 4;
constexpr int NUM_THREADS = NUM_WARPS * 32;
constexpr int M_TILE = 16;                   // query rows per block: one mma m16 tile
constexpr int WARP_N = 16;                   // keys per warp per tile: one k16 step of P @ V
constexpr int BLOCK_N = NUM_WARPS * WARP_N;  // keys per pipeline stage
constexpr int MAX_SPLITS = 128;
constexpr int ROW_THREADS = NUM_THREADS / M_TILE;  // epilogue: 8 threads per query row
constexpr float LOG2E = 1.4426950408889634f;

static_assert(NUM_THREADS % M_TILE == 0 && ROW_THREADS == 8, "epilogue maps 8 threads per row");

struct DecodeParams {
  const void* q;             // [B, Hq, Sq, D] contiguous
  const void* k;             // [B, Hkv, Smax, D], last dim contiguous
  const void* v;
  const void* pk;            // [N, Hkv, P, D], last dim contiguous
  const void* pv;
  const int* seqlens;        // [B] int32
  const int* prefix_index;   // [B] int32, or null: entry 0 for every row
  void* out;                 // [B, Hq, Sq, D] contiguous
  float* part_o;             // [B*Hq*Sq, splits, D] fp32, normalized per split
  float* part_lse;           // [B*Hq*Sq, splits] log2-sum-exp of the split's scaled scores
  int* counters;             // [B*Hkv*m_chunks] zeros, or null: separate combine kernel

  int64_t k_stride_b, k_stride_h, k_stride_n;
  int64_t v_stride_b, v_stride_h, v_stride_n;
  int64_t pk_stride_n, pk_stride_h, pk_stride_p;
  int64_t pv_stride_n, pv_stride_h, pv_stride_p;

  int num_kv_heads;
  int seqlen_q;
  int rows_per_head;   // M = G * Sq: query rows of one (row, KV head)
  int m_chunks;        // ceil(M / M_TILE)
  int max_cache_len;   // Smax
  int prefix_len;      // P
  int num_entries;     // N
  int num_splits;
  float scale_log2;    // softmax scale * log2(e): scores go through exp2
};

template <int HEAD_DIM>
struct Cfg {
  static_assert(HEAD_DIM == 64 || HEAD_DIM == 80 || HEAD_DIM == 96 || HEAD_DIM == 128 ||
                    HEAD_DIM == 256,
                "head_dim 64/80/96/128/256");
  // Bytes in flight per SM matter most for a memory-bound kernel: 4 stages x 18 KB at D=64
  // (3 blocks/SM), 3 x 34 KB at D=128 (2 blocks/SM), 3 x 66 KB at D=256 (1 block/SM).
  // D=80 (3 x 22 KB, 3 blocks/SM: 198 KB) and D=96 (4 x 26 KB, 2 blocks/SM: 208 KB) follow the
  // same rule, chosen from the shared-memory budget, not yet measured.
  static constexpr int STAGES = (HEAD_DIM == 64 || HEAD_DIM == 96) ? 4 : 3;
  static constexpr int MIN_BLOCKS = HEAD_DIM <= 80 ? 3 : (HEAD_DIM <= 128 ? 2 : 1);
  // +8 elements (16 B) per shared row: the 8 rows an ldmatrix reads land in distinct banks.
  static constexpr int ROW = HEAD_DIM + 8;
  static constexpr int TILE_BYTES = BLOCK_N * ROW * 2;       // one of K or V, 2-byte elements
  static constexpr int STAGE_BYTES = 2 * TILE_BYTES;
  static constexpr int CHUNKS_PER_ROW = HEAD_DIM / 8;        // 16-byte chunks per key row
  static constexpr int LOADS_PER_THREAD = BLOCK_N * CHUNKS_PER_ROW / NUM_THREADS;
  static constexpr int K_STEPS = HEAD_DIM / 16;
  static constexpr int D_TILES = HEAD_DIM / 8;               // n8 tiles of the output
  static constexpr int DIMS_PER_THREAD = HEAD_DIM / ROW_THREADS;
  // fp32 vectors of the epilogue and combine: float4, or float2 where a thread's dims are not a
  // multiple of 4 (D=80: 10 dims, 8-byte aligned)
  static constexpr int F_VEC = DIMS_PER_THREAD % 4 == 0 ? 4 : 2;
  static constexpr int COMBINE_UNROLL = 64 / DIMS_PER_THREAD;  // 16 float4 loads in flight
  // The tile loads unrolled keep every address live: 255 registers and spills at D=256.
  static constexpr int LOAD_UNROLL = HEAD_DIM == 256 ? 1 : BLOCK_N * HEAD_DIM / 8 / NUM_THREADS;
  static constexpr int O_ROW = HEAD_DIM + 4;                 // fp32 epilogue row (+16 B)
  // At D=256 the Q fragments (64 registers) would push the kernel past 255 registers into
  // spills (ptxas -v, nvcc 13.0): there Q stays in shared memory, re-read by ldmatrix per tile.
  static constexpr bool Q_IN_SMEM = HEAD_DIM == 256;
  static constexpr int Q_BYTES = Q_IN_SMEM ? M_TILE * ROW * 2 : 0;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES + Q_BYTES;  // Q after the stages
  static constexpr int EPI_O_FLOATS = NUM_WARPS * M_TILE * O_ROW;
  static constexpr int EPI_BYTES = (EPI_O_FLOATS + M_TILE * MAX_SPLITS) * 4;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(BLOCK_N * CHUNKS_PER_ROW % NUM_THREADS == 0, "whole loads per thread");
  static_assert(DIMS_PER_THREAD % 2 == 0, "float2 (or float4) epilogue");
  static_assert(SMEM_BYTES <= 227 * 1024, "fits one Hopper SM");
};

// -- element type: packing, conversion, the tensor-core instruction --

template <typename T>
struct TypeOps;

template <>
struct TypeOps<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);  // .x (low 16 bits) = a: the lower column
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct TypeOps<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, int src_bytes) {
  // src_bytes = 0 reads nothing and zero-fills: out-of-range keys become finite zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr)
               : "memory");
}

__device__ __forceinline__ uint32_t load_u32(const void* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Store N floats as T: 16-byte stores when N is a multiple of 8 (dst 16-byte aligned), else
// 8-byte (N % 4 == 0, D=96) or 4-byte stores (N even, D=80): dst is N * 2 bytes into its row.
template <typename T, int N>
__device__ __forceinline__ void store_row_chunk(T* dst, const float (&v)[N], float mul) {
  static_assert(N % 2 == 0, "whole pairs");
  if constexpr (N % 8 == 0) {
#pragma unroll
    for (int j = 0; j < N / 8; ++j) {
      uint4 u;
      u.x = TypeOps<T>::pack(v[8 * j + 0] * mul, v[8 * j + 1] * mul);
      u.y = TypeOps<T>::pack(v[8 * j + 2] * mul, v[8 * j + 3] * mul);
      u.z = TypeOps<T>::pack(v[8 * j + 4] * mul, v[8 * j + 5] * mul);
      u.w = TypeOps<T>::pack(v[8 * j + 6] * mul, v[8 * j + 7] * mul);
      reinterpret_cast<uint4*>(dst)[j] = u;
    }
  } else if constexpr (N % 4 == 0) {
#pragma unroll
    for (int j = 0; j < N / 4; ++j) {
      uint2 u;
      u.x = TypeOps<T>::pack(v[4 * j + 0] * mul, v[4 * j + 1] * mul);
      u.y = TypeOps<T>::pack(v[4 * j + 2] * mul, v[4 * j + 3] * mul);
      reinterpret_cast<uint2*>(dst)[j] = u;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N / 2; ++j)
      reinterpret_cast<uint32_t*>(dst)[j] = TypeOps<T>::pack(v[2 * j] * mul, v[2 * j + 1] * mul);
  }
}

// -- combine: merge the splits of one 16-row chunk into the output --
// 8 threads per row (consecutive lanes); sm_w holds [M_TILE][MAX_SPLITS] weights.
template <typename T, int HEAD_DIM>
__device__ void combine_chunk(const DecodeParams& p, int64_t row_base, int chunk, float* sm_w) {
  using C = Cfg<HEAD_DIM>;
  const int row = threadIdx.x / ROW_THREADS;
  const int part = threadIdx.x % ROW_THREADS;
  const int r = chunk * M_TILE + row;
  const bool row_ok = r < p.rows_per_head;
  const int64_t row_id = row_base + r;
  const int splits = p.num_splits;
  const float* lse = p.part_lse + row_id * splits;

  // Partials were written by other blocks of this grid: __ldcg reads them from L2, not L1.
  float mx = -INFINITY;
  if (row_ok)
    for (int s = part; s < splits; s += ROW_THREADS) mx = fmaxf(mx, __ldcg(lse + s));
#pragma unroll
  for (int off = ROW_THREADS / 2; off > 0; off /= 2)
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  const float m_use = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  if (row_ok) {
    for (int s = part; s < splits; s += ROW_THREADS) {
      const float w = exp2f(__ldcg(lse + s) - m_use);  // empty split: lse = -inf -> 0
      sm_w[row * MAX_SPLITS + s] = w;
      sum += w;
    }
  }
#pragma unroll
  for (int off = ROW_THREADS / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  __syncwarp();  // a row's weights are written and read by the same 8 lanes of one warp
  if (!row_ok) return;

  float acc[C::DIMS_PER_THREAD];
#pragma unroll
  for (int j = 0; j < C::DIMS_PER_THREAD; ++j) acc[j] = 0.f;
  // Every split wrote finite values for a good row (zeros where it saw nothing), so no branch:
  // unrolled, 16 float4 loads per thread are in flight instead of one L2 round trip per split.
  const float* src0 = p.part_o + row_id * splits * HEAD_DIM + part * C::DIMS_PER_THREAD;
#pragma unroll C::COMBINE_UNROLL
  for (int s = 0; s < splits; ++s) {
    const float w = sm_w[row * MAX_SPLITS + s];
    if constexpr (C::F_VEC == 4) {
      const float4* src = reinterpret_cast<const float4*>(src0 + s * HEAD_DIM);
#pragma unroll
      for (int j = 0; j < C::DIMS_PER_THREAD / 4; ++j) {
        const float4 x = __ldcg(src + j);
        acc[4 * j + 0] += w * x.x;
        acc[4 * j + 1] += w * x.y;
        acc[4 * j + 2] += w * x.z;
        acc[4 * j + 3] += w * x.w;
      }
    } else {
      const float2* src = reinterpret_cast<const float2*>(src0 + s * HEAD_DIM);
#pragma unroll
      for (int j = 0; j < C::DIMS_PER_THREAD / 2; ++j) {
        const float2 x = __ldcg(src + j);
        acc[2 * j + 0] += w * x.x;
        acc[2 * j + 1] += w * x.y;
      }
    }
  }
  T* dst = static_cast<T*>(p.out) + row_id * HEAD_DIM + part * C::DIMS_PER_THREAD;
  store_row_chunk<T>(dst, acc, sum > 0.f ? 1.f / sum : 0.f);
}

// --------------------------------------------------------------------------------------------
// The split kernel
// --------------------------------------------------------------------------------------------

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS, Cfg<HEAD_DIM>::MIN_BLOCKS)
    decode_split_kernel(const DecodeParams p) {
  using C = Cfg<HEAD_DIM>;
  using Ops = TypeOps<T>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float sm_max[NUM_WARPS][M_TILE];
  __shared__ float sm_sum[NUM_WARPS][M_TILE];
  __shared__ int sm_is_last;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int gid = lane / 4;  // mma fragment: row group
  const int tig = lane % 4;  // mma fragment: thread in group
  const int chunk = blockIdx.x % p.m_chunks;  // chunks of one split are adjacent: KV reuse in L2
  const int split = blockIdx.x / p.m_chunks;
  const int hk = blockIdx.y;
  const int b = blockIdx.z;

  // -- the row's key range and this split's part of it --
  int seqlen = p.seqlens[b];
  int entry = p.prefix_index != nullptr ? p.prefix_index[b] : 0;
  // Values are not checked on the host (that would sync): a bad row reads nothing, gets NaN.
  const bool bad = seqlen < 0 || seqlen > p.max_cache_len || entry < 0 || entry >= p.num_entries;
  if (bad) {
    seqlen = 0;
    entry = 0;
  }
  const int total = p.prefix_len + seqlen;
  const int keys_per_split = ceil_div(ceil_div(total, p.num_splits), BLOCK_N) * BLOCK_N;
  const int64_t split_begin = static_cast<int64_t>(split) * keys_per_split;
  const int t_begin = split_begin < total ? static_cast<int>(split_begin) : total;
  const int t_end = imin(t_begin + keys_per_split, total);
  const int num_tiles = ceil_div(t_end - t_begin, BLOCK_N);

  const T* k_head = static_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v_head = static_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const T* pk_head = static_cast<const T*>(p.pk) + entry * p.pk_stride_n + hk * p.pk_stride_h;
  const T* pv_head = static_cast<const T*>(p.pv) + entry * p.pv_stride_n + hk * p.pv_stride_h;
  const int64_t row_base = (static_cast<int64_t>(b) * p.num_kv_heads + hk) * p.rows_per_head;

  int bound[2];  // per fragment row (gid, gid + 8): the last visible virtual key
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = chunk * M_TILE + gid + 8 * h;
    const int i = r % p.seqlen_q;
    const int last_visible = imax(p.prefix_len - 1, p.prefix_len + seqlen - p.seqlen_q + i);
    bound[h] = imin(last_visible, t_end - 1);
  }

  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t sq_base = smem_base + C::STAGES * C::STAGE_BYTES;  // Q tile when Q_IN_SMEM

  // -- Q as mma A fragments: in registers, loaded once (rows gid, gid + 8 of the chunk), or
  //    staged in shared memory with the first tile's cp.async group --
  uint32_t qf[C::Q_IN_SMEM ? 1 : C::K_STEPS][4];
  if constexpr (C::Q_IN_SMEM) {
#pragma unroll
    for (int it = 0; it < M_TILE * C::CHUNKS_PER_ROW / NUM_THREADS; ++it) {
      const int c = tid + it * NUM_THREADS;
      const int row = c / C::CHUNKS_PER_ROW;
      const int col = (c % C::CHUNKS_PER_ROW) * 8;
      const int r = chunk * M_TILE + row;
      const bool ok = r < p.rows_per_head;
      const T* src = static_cast<const T*>(p.q) + (ok ? (row_base + r) * HEAD_DIM + col : 0);
      cp_async_16(sq_base + (row * C::ROW + col) * 2, src, ok ? 16 : 0);
    }
  } else {
    const int r0 = chunk * M_TILE + gid;
    const bool ok0 = r0 < p.rows_per_head;
    const bool ok1 = r0 + 8 < p.rows_per_head;
    const T* q0 = static_cast<const T*>(p.q) + (row_base + r0) * HEAD_DIM;
    const T* q1 = q0 + 8 * HEAD_DIM;
#pragma unroll
    for (int kk = 0; kk < C::K_STEPS; ++kk) {
      const int c = kk * 16 + 2 * tig;
      qf[kk][0] = ok0 ? load_u32(q0 + c) : 0u;
      qf[kk][1] = ok1 ? load_u32(q1 + c) : 0u;
      qf[kk][2] = ok0 ? load_u32(q0 + c + 8) : 0u;
      qf[kk][3] = ok1 ? load_u32(q1 + c + 8) : 0u;
    }
  }

  // -- one tile: 64 keys of K and V, 16 bytes per cp.async; a tile may straddle prefix/cache --
  auto load_tile = [&](int tile) {
    const uint32_t sk = smem_base + (tile % C::STAGES) * C::STAGE_BYTES;
    const uint32_t sv = sk + C::TILE_BYTES;
    const int key0 = t_begin + tile * BLOCK_N;
#pragma unroll C::LOAD_UNROLL
    for (int it = 0; it < C::LOADS_PER_THREAD; ++it) {
      const int c = tid + it * NUM_THREADS;
      const int row = c / C::CHUNKS_PER_ROW;
      const int col = (c % C::CHUNKS_PER_ROW) * 8;
      const int key = key0 + row;
      const T* ksrc = pk_head;  // any valid address: nothing is read when bytes = 0
      const T* vsrc = pv_head;
      int bytes = 0;
      if (key < t_end) {
        bytes = 16;
        if (key < p.prefix_len) {
          ksrc = pk_head + key * p.pk_stride_p + col;
          vsrc = pv_head + key * p.pv_stride_p + col;
        } else {
          const int64_t n = key - p.prefix_len;
          ksrc = k_head + n * p.k_stride_n + col;
          vsrc = v_head + n * p.v_stride_n + col;
        }
      }
      const uint32_t off = (row * C::ROW + col) * 2;
      cp_async_16(sk + off, ksrc, bytes);
      cp_async_16(sv + off, vsrc, bytes);
    }
  };

  float o[C::D_TILES][4];
#pragma unroll
  for (int nd = 0; nd < C::D_TILES; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's share; summed over the quad at the end

#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < num_tiles) load_tile(s);
    cp_async_commit();  // empty groups too: the wait count below stays exact
  }

  for (int tile = 0; tile < num_tiles; ++tile) {
    cp_async_wait<C::STAGES - 2>();  // this tile's group has landed (for this thread) ...
    __syncthreads();  // ... for all threads; and every warp is done with the stage reused next
    if (tile + C::STAGES - 1 < num_tiles) load_tile(tile + C::STAGES - 1);
    cp_async_commit();

    const int key0 = t_begin + tile * BLOCK_N + warp * WARP_N;
    if (key0 >= t_end) continue;  // warp-uniform: this warp's 16 keys are all past the split
    const uint32_t sk =
        smem_base + (tile % C::STAGES) * C::STAGE_BYTES + warp * WARP_N * C::ROW * 2;
    const uint32_t sv = sk + C::TILE_BYTES;

    // -- S = Q K^T: x4 ldmatrix gives the B fragments of both n8 key tiles for a k16 step --
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    {
      const int krow = (lane & 7) + ((lane >> 4) << 3);
      const int kcol = ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < C::K_STEPS; ++kk) {
        uint32_t kb[4];
        ldmatrix_x4(kb, sk + (krow * C::ROW + kk * 16 + kcol) * 2);
        if constexpr (C::Q_IN_SMEM) {
          // matrices (rows 0-7 | 8-15) x (cols k0 | k0+8) are the A fragment's a0, a1, a2, a3
          const int qrow = (lane & 7) + ((lane >> 3) & 1) * 8;
          const int qcol = (lane >> 4) * 8;
          ldmatrix_x4(qf[0], sq_base + (qrow * C::ROW + kk * 16 + qcol) * 2);
          Ops::mma(s[0], qf[0], kb[0], kb[1]);
          Ops::mma(s[1], qf[0], kb[2], kb[3]);
        } else {
          Ops::mma(s[0], qf[kk], kb[0], kb[1]);
          Ops::mma(s[1], qf[kk], kb[2], kb[3]);
        }
      }
    }

    // -- mask (split end, causal among the new queries), online softmax in base 2 --
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = key0 + nt * 8 + 2 * tig + (e & 1);
        s[nt][e] = key <= bound[e >> 1] ? s[nt][e] * p.scale_log2 : -INFINITY;
      }
    float m_use[2], alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(row_max[h], mx);
      // a row with nothing visible yet stays at -inf: exponentiate against 0, not -inf (NaN)
      m_use[h] = m_new == -INFINITY ? 0.f : m_new;
      alpha[h] = exp2f(row_max[h] - m_use[h]);
      row_max[h] = m_new;
      row_sum[h] *= alpha[h];
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] = exp2f(s[nt][e] - m_use[e >> 1]);
        row_sum[e >> 1] += s[nt][e];
      }
#pragma unroll
    for (int nd = 0; nd < C::D_TILES; ++nd) {
      o[nd][0] *= alpha[0];
      o[nd][1] *= alpha[0];
      o[nd][2] *= alpha[1];
      o[nd][3] *= alpha[1];
    }

    // -- O += P V: the S accumulators are already the A fragment layout of a k16 step --
    uint32_t pa[4];
    pa[0] = Ops::pack(s[0][0], s[0][1]);
    pa[1] = Ops::pack(s[0][2], s[0][3]);
    pa[2] = Ops::pack(s[1][0], s[1][1]);
    pa[3] = Ops::pack(s[1][2], s[1][3]);
    {
      const int vrow = (lane & 7) + ((lane >> 3) & 1) * 8;
      const int vcol = (lane >> 4) * 8;
#pragma unroll
      for (int nd = 0; nd < C::D_TILES / 2; ++nd) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, sv + (vrow * C::ROW + nd * 16 + vcol) * 2);
        Ops::mma(o[2 * nd], pa, vb[0], vb[1]);
        Ops::mma(o[2 * nd + 1], pa, vb[2], vb[3]);
      }
    }
  }

  // -- merge the 4 warps' states; the pipeline's shared memory is free from here --
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
    row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
  }
  if (tig == 0) {
    sm_max[warp][gid] = row_max[0];
    sm_max[warp][gid + 8] = row_max[1];
    sm_sum[warp][gid] = row_sum[0];
    sm_sum[warp][gid + 8] = row_sum[1];
  }
  __syncthreads();
  float* sm_o = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = gid + 8 * h;
    float m_blk = -INFINITY;
#pragma unroll
    for (int w = 0; w < NUM_WARPS; ++w) m_blk = fmaxf(m_blk, sm_max[w][row]);
    const float f = row_max[h] == -INFINITY ? 0.f : exp2f(row_max[h] - m_blk);
    float* dst = sm_o + (warp * M_TILE + row) * C::O_ROW + 2 * tig;
#pragma unroll
    for (int nd = 0; nd < C::D_TILES; ++nd)
      *reinterpret_cast<float2*>(dst + nd * 8) = make_float2(o[nd][2 * h] * f, o[nd][2 * h + 1] * f);
  }
  __syncthreads();

  const int row = tid / ROW_THREADS;
  const int part = tid % ROW_THREADS;
  float m_blk = -INFINITY;
#pragma unroll
  for (int w = 0; w < NUM_WARPS; ++w) m_blk = fmaxf(m_blk, sm_max[w][row]);
  float l_blk = 0.f;
#pragma unroll
  for (int w = 0; w < NUM_WARPS; ++w)
    if (sm_max[w][row] != -INFINITY) l_blk += sm_sum[w][row] * exp2f(sm_max[w][row] - m_blk);
  float acc[C::DIMS_PER_THREAD];
  if constexpr (C::F_VEC == 4) {
#pragma unroll
    for (int j = 0; j < C::DIMS_PER_THREAD; j += 4) {
      float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float4 x = *reinterpret_cast<const float4*>(
            sm_o + (w * M_TILE + row) * C::O_ROW + part * C::DIMS_PER_THREAD + j);
        a.x += x.x;
        a.y += x.y;
        a.z += x.z;
        a.w += x.w;
      }
      acc[j] = a.x;
      acc[j + 1] = a.y;
      acc[j + 2] = a.z;
      acc[j + 3] = a.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < C::DIMS_PER_THREAD; j += 2) {
      float2 a = make_float2(0.f, 0.f);
#pragma unroll
      for (int w = 0; w < NUM_WARPS; ++w) {
        const float2 x = *reinterpret_cast<const float2*>(
            sm_o + (w * M_TILE + row) * C::O_ROW + part * C::DIMS_PER_THREAD + j);
        a.x += x.x;
        a.y += x.y;
      }
      acc[j] = a.x;
      acc[j + 1] = a.y;
    }
  }
  const int r = chunk * M_TILE + row;
  const bool row_ok = r < p.rows_per_head;
  const int64_t row_id = row_base + r;

  if (p.num_splits == 1) {
    if (row_ok) {
      // split 0 holds the prefix, always visible: l_blk > 0 for every good row
      T* dst = static_cast<T*>(p.out) + row_id * HEAD_DIM + part * C::DIMS_PER_THREAD;
      store_row_chunk<T>(dst, acc, bad ? NAN : 1.f / l_blk);
    }
    return;
  }

  if (row_ok) {
    const int64_t slot = row_id * p.num_splits + split;
    const float mul = bad ? NAN : (l_blk > 0.f ? 1.f / l_blk : 0.f);
    float* dst0 = p.part_o + slot * HEAD_DIM + part * C::DIMS_PER_THREAD;
    if constexpr (C::F_VEC == 4) {
      float4* dst = reinterpret_cast<float4*>(dst0);
#pragma unroll
      for (int j = 0; j < C::DIMS_PER_THREAD / 4; ++j)
        dst[j] = make_float4(acc[4 * j] * mul, acc[4 * j + 1] * mul, acc[4 * j + 2] * mul,
                             acc[4 * j + 3] * mul);
    } else {
      float2* dst = reinterpret_cast<float2*>(dst0);
#pragma unroll
      for (int j = 0; j < C::DIMS_PER_THREAD / 2; ++j)
        dst[j] = make_float2(acc[2 * j] * mul, acc[2 * j + 1] * mul);
    }
    if (part == 0)  // a bad row: lse 0 and NaN values, so the combine returns NaN
      p.part_lse[slot] = bad ? 0.f : (l_blk > 0.f ? m_blk + log2f(l_blk) : -INFINITY);
  }
  if (p.counters == nullptr) return;  // block-uniform: the separate combine kernel merges

  // -- the last block of this (row, head, chunk) merges all splits (threadFenceReduction) --
  __threadfence();  // this block's partials are visible device-wide before it is counted
  __syncthreads();
  const int64_t counter = (static_cast<int64_t>(b) * p.num_kv_heads + hk) * p.m_chunks + chunk;
  if (tid == 0) sm_is_last = atomicAdd(p.counters + counter, 1) == p.num_splits - 1;
  __syncthreads();
  if (!sm_is_last) return;
  __threadfence();
  combine_chunk<T, HEAD_DIM>(p, row_base, chunk, sm_o + C::EPI_O_FLOATS);
  if (tid == 0) p.counters[counter] = 0;  // ready for the next launch on this stream
}

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(NUM_THREADS) decode_combine_kernel(const DecodeParams p) {
  __shared__ float sm_w[M_TILE * MAX_SPLITS];
  const int chunk = blockIdx.x;
  const int64_t row_base = (static_cast<int64_t>(blockIdx.z) * p.num_kv_heads + blockIdx.y) *
                           p.rows_per_head;
  combine_chunk<T, HEAD_DIM>(p, row_base, chunk, sm_w);
}

}  // namespace decode
}  // namespace prefix_kernels
