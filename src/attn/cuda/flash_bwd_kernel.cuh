// The backward step kernel (FA2 structure, mma.sync m16n8k16): one block owns one K/V tile of one kv head.
//
// Block = kWarps warps (8 by default); warp w owns key rows [16w, 16w+16) of the block's kBlockN = 16 kWarps row K/V tile and
// keeps their dK, dV in fp32 registers for the whole kernel. The block loops over the query heads of
// its kv head's group and over all visible query tiles of kBlockM rows:
//   S^T = K Q^T, P^T = exp2(S^T scale_log2 - lse_log2), dV += P^T dO, dP^T = V dO^T,
//   dS^T = P^T (dP^T - delta), dK += dS^T Q, then dS^T goes to shared memory and the block computes
//   dQ_tile = dS K, added to the fp32 dq_accum with atomics (other K/V tiles add to the same rows).
// Q/dO tiles are double-buffered with cp.async. Only partially visible tiles apply the causal mask.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attn/cuda/flash_block.hpp"
#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_bwd_walk.hpp"
#include "attn/cuda/flash_mask.hpp"

namespace ringattn::cuda::bwd {

// ---------------------------------------------------------------------------------------------
// Device primitives (kept local to the backward so it builds independently of the forward).

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills the destination when !valid.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename Elem>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename Elem>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// *addr += (a, b) as one 8-byte vector reduction in L2 (sm_90); addr 8-byte aligned.
__device__ __forceinline__ void red_add_v2(float* addr, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
}

__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Global position of local row i; smallest / largest position among rows [lo, hi) (layout.cpp rules).
__device__ __forceinline__ int64_t pos_at(const ChunkPositions& p, int64_t i) {
  if (p.num_segments > 1 && i >= p.seg[0].count) return p.seg[1].start + p.seg[1].stride * (i - p.seg[0].count);
  return p.seg[0].start + p.seg[0].stride * i;
}
__device__ __forceinline__ void pos_range(const ChunkPositions& p, int64_t lo, int64_t hi, int64_t& mn, int64_t& mx) {
  mn = INT64_MAX;
  mx = INT64_MIN;
  int64_t base = 0;
#pragma unroll
  for (int s = 0; s < kMaxSegments; ++s) {
    if (s < p.num_segments) {
      const int64_t a = lo > base ? lo : base;
      const int64_t b = hi < base + p.seg[s].count ? hi : base + p.seg[s].count;
      if (a < b) {
        const int64_t first = p.seg[s].start + p.seg[s].stride * (a - base);
        const int64_t last = p.seg[s].start + p.seg[s].stride * (b - 1 - base);
        const int64_t lo_v = first < last ? first : last, hi_v = first < last ? last : first;
        mn = lo_v < mn ? lo_v : mn;
        mx = hi_v > mx ? hi_v : mx;
      }
      base += p.seg[s].count;
    }
  }
}

// Writes one thread's part of key row r (kv head hkv, batch entry b): dk(j, e) * scale at column
// 8 j + 2 t + e of dK, dv(j, e) of dV, j < kPairs, e < 2, as p.dkv_write says: added into or stored
// over the fp32 accumulators, or rounded to Elem and stored into dk_out/dv_out. When adding, every
// load comes first, then every store: dk_accum and dv_accum may alias as far as the compiler knows,
// so a load-add-store per pair serialises, one memory round trip per pair (64 in a row per thread at
// head_dim 128, some 30 us per block, the SASS showed).
template <typename Elem, int kPairs, typename DkAt, typename DvAt>
__device__ __forceinline__ void add_row_to_accumulators(const FlashBwdParams& p, int b, int hkv, int r, int t, DkAt dk,
                                                        DvAt dv) {
  const int64_t ko = b * p.dk_batch_stride + static_cast<int64_t>(r) * p.dk_row_stride + hkv * p.dk_head_stride + 2 * t;
  const int64_t vo = b * p.dv_batch_stride + static_cast<int64_t>(r) * p.dv_row_stride + hkv * p.dv_head_stride + 2 * t;
  if (p.dkv_write == DkvWrite::kFinal) {
    Elem* dkp = static_cast<Elem*>(p.dk_out) + ko;
    Elem* dvp = static_cast<Elem*>(p.dv_out) + vo;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      *reinterpret_cast<uint32_t*>(dkp + j * 8) = pack2<Elem>(dk(j, 0) * p.scale, dk(j, 1) * p.scale);
      *reinterpret_cast<uint32_t*>(dvp + j * 8) = pack2<Elem>(dv(j, 0), dv(j, 1));
    }
    return;
  }
  float* dkp = p.dk_accum + ko;
  float* dvp = p.dv_accum + vo;
  float2 a[kPairs], c[kPairs];
  const bool add = p.dkv_write == DkvWrite::kAdd;
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    a[j] = add ? *reinterpret_cast<const float2*>(dkp + j * 8) : make_float2(0.f, 0.f);
    c[j] = add ? *reinterpret_cast<const float2*>(dvp + j * 8) : make_float2(0.f, 0.f);
  }
#pragma unroll
  for (int j = 0; j < kPairs; ++j) {
    a[j].x += dk(j, 0) * p.scale;
    a[j].y += dk(j, 1) * p.scale;
    c[j].x += dv(j, 0);
    c[j].y += dv(j, 1);
    *reinterpret_cast<float2*>(dkp + j * 8) = a[j];
    *reinterpret_cast<float2*>(dvp + j * 8) = c[j];
  }
}

// A key tile no query sees (rows [k0, k_end) of kv head hkv, batch entry b): nothing to add, but in
// the store modes its dK/dV rows are written as zeros (the buffer holds no earlier values to keep).
// Called by every thread of the block.
template <typename Elem, int kHeadDim>
__device__ __forceinline__ void write_invisible_rows(const FlashBwdParams& p, int b, int hkv, int k0, int k_end) {
  if (p.dkv_write == DkvWrite::kAdd) return;
  constexpr int kPairsPerRow = kHeadDim / 2;
  const int pairs = (k_end - k0) * kPairsPerRow;
  for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
    const int64_t r = k0 + i / kPairsPerRow, col = 2 * (i % kPairsPerRow);
    const int64_t ko = b * p.dk_batch_stride + r * p.dk_row_stride + hkv * p.dk_head_stride + col;
    const int64_t vo = b * p.dv_batch_stride + r * p.dv_row_stride + hkv * p.dv_head_stride + col;
    if (p.dkv_write == DkvWrite::kFinal) {
      *reinterpret_cast<uint32_t*>(static_cast<Elem*>(p.dk_out) + ko) = 0u;
      *reinterpret_cast<uint32_t*>(static_cast<Elem*>(p.dv_out) + vo) = 0u;
    } else {
      *reinterpret_cast<float2*>(p.dk_accum + ko) = make_float2(0.f, 0.f);
      *reinterpret_cast<float2*>(p.dv_accum + vo) = make_float2(0.f, 0.f);
    }
  }
}

// Where a backward block works: key tile blockIdx.x (kBlockN rows) of kv head hkv of batch entry b,
// against the query tiles (kBlockM rows) of the group of query heads sharing that kv head.
template <int kBlockM, int kBlockN>
struct BwdBlock {
  int b, hkv, group;  // batch entry, kv head, query heads per kv head
  int k0, k_end;      // the key tile's chunk rows [k0, k_end)
  int num_q_tiles;
  int64_t pad_rows;   // rows of each (b, h) slice of lse_log2 / delta / dq_accum
  __device__ __forceinline__ explicit BwdBlock(const FlashBwdParams& p)
      : b(blockIdx.y / p.kv_heads),
        hkv(blockIdx.y % p.kv_heads),
        group(p.heads / p.kv_heads),
        k0(blockIdx.x * kBlockN),
        k_end(min(k0 + kBlockN, p.seq_k)),
        num_q_tiles((p.seq_q + kBlockM - 1) / kBlockM),
        pad_rows(flash_bwd_padded_rows(p.seq_q)) {}
};

// Computes the walk's bounds for this block into shared memory; call from every thread, then
// __syncthreads() before walking.
template <int kBlockM>
__device__ __forceinline__ void store_q_tile_bounds(QTileBounds& dst, const FlashBwdParams& p, const ChunkPositions& q_pos,
                                                    const ChunkPositions& k_pos, int k0, int k_end) {
  if (threadIdx.x == 0) {
    int64_t k_min = 0, k_max = 0;
    pos_range(k_pos, k0, k_end, k_min, k_max);
    dst = q_tile_bounds<kBlockM>(q_pos, p.seq_q, p.causal, k_min, k_max);
  }
}

// The query-tile walk of a block by mask class: kCausal the bounds-based walk over `bd` (filled by
// store_walk_bounds), kGeneral the per-tile classification of MaskedQTileWalk (no shared state).
template <MaskClass kMask, int kBlockM>
__device__ __forceinline__ auto make_q_walk(const QTileBounds& bd, const FlashBwdParams& p, const ChunkPositions& q_pos,
                                            const ChunkPositions& k_pos, int k0, int k_end, int num_q_tiles, int group,
                                            int hkv) {
  if constexpr (kMask == MaskClass::kGeneral) {
    int64_t k_min = 0, k_max = 0;
    pos_range(k_pos, k0, k_end, k_min, k_max);
    return MaskedQTileWalk<kBlockM>{p.mask, q_pos, p.seq_q, num_q_tiles, group, hkv * group, k_min, k_max};
  } else {
    return QTileWalk{bd, num_q_tiles, group};
  }
}
// The causal walk's bounds (kCausal only); call from every thread, then __syncthreads() before walking.
template <MaskClass kMask, int kBlockM>
__device__ __forceinline__ void store_walk_bounds(QTileBounds& dst, const FlashBwdParams& p, const ChunkPositions& q_pos,
                                                  const ChunkPositions& k_pos, int k0, int k_end) {
  if constexpr (kMask == MaskClass::kCausal) store_q_tile_bounds<kBlockM>(dst, p, q_pos, k_pos, k0, k_end);
}

// kGeneral, partial tiles: the key row r of the K/V tile starting at chunk row k0, with its
// document, for the per-element rule (rows past the chunk see nothing).
__device__ __forceinline__ RowMask key_row_mask(const FlashBwdParams& p, const ChunkPositions& k_pos, int k0, int r) {
  return row_mask(p.mask, pos_at(k_pos, k0 + r), k0 + r < p.seq_k);
}

// kGeneral, partial tiles: bit 4j + e set when the thread's score element (j, e) is visible: key row
// krow + 8 (e >> 1) of the K/V tile at chunk row k0, query column 8j + 2t + (e & 1) of the query
// tile at row q0. A loop, not unrolled: the rule's 64-bit arithmetic then needs few registers next
// to the accumulators (unrolled over the 32 elements, it spilled).
template <int kNT>
__device__ __forceinline__ uint32_t visible_bits(const FlashBwdParams& p, bool patterned, const ChunkPositions& k_pos,
                                                 int k0, int krow, const ChunkPositions& q_pos, int q0, int t) {
  static_assert(kNT * 4 <= 32, "one bit per element");
  const RowMask km0 = key_row_mask(p, k_pos, k0, krow), km1 = key_row_mask(p, k_pos, k0, krow + 8);
  uint32_t bits = 0;
#pragma unroll 1
  for (int i = 0; i < 2 * kNT; ++i) {  // query column 8 (i / 2) + 2t + i % 2
    const int j = i >> 1, c = i & 1;
    const int64_t q = pos_at(q_pos, q0 + j * 8 + 2 * t + c);
    if (seen_by(p.mask, patterned, q, km0)) bits |= 1u << (4 * j + c);
    if (seen_by(p.mask, patterned, q, km1)) bits |= 1u << (4 * j + 2 + c);
  }
  return bits;
}

// Position of row r of the K/V tile starting at chunk row k0, for the mask: INT64_MAX past the chunk
// (always masked), INT64_MIN without a causal mask (never masked).
__device__ __forceinline__ int64_t key_mask_pos(const FlashBwdParams& p, const ChunkPositions& k_pos, int k0, int r) {
  if (k0 + r >= p.seq_k) return INT64_MAX;
  return p.causal ? pos_at(k_pos, k0 + r) : INT64_MIN;
}

// ---------------------------------------------------------------------------------------------
// Compile-time shape of the kernel.

template <typename Elem_, int kHeadDim_, int kBlockM_, int kWarps_ = 8, int kMinBlocks_ = 1>
struct BwdTraits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // query rows per inner iteration
  static constexpr int kWarps = kWarps_;
  static constexpr int kMinBlocks = kMinBlocks_;  // blocks per SM the register budget is cut for
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps;  // key rows per block: 16 per warp
  static constexpr int kNT = kBlockM / 8;      // n8 tiles of a warp's S^T / dP^T row block
  static constexpr int kDT = kHeadDim / 8;     // n8 tiles of a warp's dK / dV row block
  // dQ = dS K: warps tile the (kBlockM x kHeadDim) result as kWarpsM x kWarpsN blocks of 16 rows.
  static constexpr int kWarpsM = kBlockM / 16;
  static constexpr int kWarpsN = kWarps / kWarpsM;
  static constexpr int kDqCols = kHeadDim / kWarpsN;
  static constexpr int kDqT = kDqCols / 8;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head_dim 64 or 128");
  static_assert(kBlockM % 16 == 0 && kWarpsN >= 1 && kWarps % kWarpsM == 0 && kDqCols % 16 == 0, "dQ warp tiling");
  static_assert(kBlockM >= 32 && kBlockM <= kBwdRowPad && kBwdRowPad % kBlockM == 0, "query tile vs padding");

  // Shared memory (Elem units, each region a multiple of 128 bytes).
  static constexpr int kTileK = kBlockN * kHeadDim;
  static constexpr int kTileQ = kBlockM * kHeadDim;
  static constexpr int kTileS = kBlockN * kBlockM;  // dS^T: key rows x query columns
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kTileK;
  static constexpr int kOffQ = kOffV + kTileK;       // two buffers
  static constexpr int kOffDo = kOffQ + 2 * kTileQ;  // two buffers
  static constexpr int kOffDs = kOffDo + 2 * kTileQ;
  static constexpr int kElemsEnd = kOffDs + kTileS;
  static constexpr int kOffRowVecBytes = kElemsEnd * 2;  // lse_log2[2][kBlockM], delta[2][kBlockM] fp32
  static constexpr int kSmemBytes = kOffRowVecBytes + 4 * kBlockM * 4;
};

// Swizzled offset (elements) of (row, col) in a row-major tile of kCols b16 elements per row: the
// 16-byte chunk index is XORed with the row so that 8 consecutive rows at one logical chunk fall in
// 8 different bank groups (ldmatrix and the dS^T stores are conflict-free).
template <int kCols>
__device__ __forceinline__ int swz(int row, int col) {
  constexpr int kChunks = kCols / 8;
  constexpr int kRowsPerLine = kChunks >= 8 ? 1 : 8 / kChunks;
  constexpr int kMask = kChunks >= 8 ? 7 : kChunks - 1;
  const int chunk = (col >> 3) ^ ((row / kRowsPerLine) & kMask);
  return row * kCols + (chunk << 3) + (col & 7);
}

// Copies rows [row0, row0 + kRows) of a (rows, D) strided slab into a swizzled tile; rows >= limit are zero.
template <int kRows, int kCols, int kThreads, typename Elem>
__device__ __forceinline__ void load_tile(Elem* dst, const Elem* src, int64_t row_stride, int row0, int limit) {
  constexpr int kChunks = kCols / 8;
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0, "tile copy divides evenly");
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < limit;
    const Elem* g = src + static_cast<int64_t>(valid ? row0 + r : 0) * row_stride + c * 8;
    cp_async_16(dst + swz<kCols>(r, c * 8), g, valid);
  }
}

// acc[16 x (kNT*8)] += A[16 x kK] * B^T, A rows from a swizzled row-major tile (row offset a_row0), B
// given as B^T rows (n) of a swizzled row-major tile with kK columns.
template <typename Elem, int kK, int kNT>
__device__ __forceinline__ void gemm_a_bt(float (&acc)[kNT][4], const Elem* sA, int a_row0, const Elem* sBt) {
  const int lane = threadIdx.x & 31;
  const int i = lane >> 3;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, smem_u32(sA + swz<kK>(a_row0 + (lane & 15), kk * 16 + (lane >> 4) * 8)));
#pragma unroll
    for (int nn = 0; nn < kNT / 2; ++nn) {
      uint32_t b[4];
      ldsm_x4(b, smem_u32(sBt + swz<kK>(nn * 16 + (i >> 1) * 8 + (lane & 7), kk * 16 + (i & 1) * 8)));
      mma16816<Elem>(acc[2 * nn], a, b[0], b[1]);
      mma16816<Elem>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x (kNT*8)] += A[16 x kK] * B, A from registers in accumulator layout (kK/8 n8 tiles of fp32,
// rounded to Elem), B a swizzled row-major (kK x kN) tile read with ldmatrix.trans from column b_col0.
template <typename Elem, int kK, int kN, int kNT>
__device__ __forceinline__ void gemm_rega_b(float (&acc)[kNT][4], const float (&a_acc)[kK / 8][4], const Elem* sB,
                                            int b_col0) {
  const int lane = threadIdx.x & 31;
  const int i = lane >> 3;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack2<Elem>(a_acc[2 * kk][0], a_acc[2 * kk][1]);
    a[1] = pack2<Elem>(a_acc[2 * kk][2], a_acc[2 * kk][3]);
    a[2] = pack2<Elem>(a_acc[2 * kk + 1][0], a_acc[2 * kk + 1][1]);
    a[3] = pack2<Elem>(a_acc[2 * kk + 1][2], a_acc[2 * kk + 1][3]);
#pragma unroll
    for (int nn = 0; nn < kNT / 2; ++nn) {
      uint32_t b[4];
      ldsm_x4_t(b, smem_u32(sB + swz<kN>(kk * 16 + (i & 1) * 8 + (lane & 7), b_col0 + nn * 16 + (i >> 1) * 8)));
      mma16816<Elem>(acc[2 * nn], a, b[0], b[1]);
      mma16816<Elem>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// ---------------------------------------------------------------------------------------------

// kMask: what the instantiation knows of the mask (flash_mask.hpp); kCausal is the dense / causal
// kernel, kGeneral applies p.mask. Parameters are __grid_constant__: the masked walk holds
// references to them.
template <typename Tr, MaskClass kMask = MaskClass::kCausal>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks)
    flash_bwd_kernel(const __grid_constant__ FlashBwdParams p, const __grid_constant__ ChunkPositions q_pos,
                     const __grid_constant__ ChunkPositions k_pos) {
  using Elem = typename Tr::Elem;
  constexpr int D = Tr::kHeadDim, M = Tr::kBlockM, N = Tr::kBlockN;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  Elem* smem = reinterpret_cast<Elem*>(smem_raw);
  Elem* sK = smem + Tr::kOffK;
  Elem* sV = smem + Tr::kOffV;
  Elem* sDs = smem + Tr::kOffDs;
  float* sLse = reinterpret_cast<float*>(smem_raw + Tr::kOffRowVecBytes);  // [2][M]
  float* sDelta = sLse + 2 * M;                                            // [2][M]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const BwdBlock<M, N> blk(p);
  const int b = blk.b, hkv = blk.hkv, group = blk.group, k0 = blk.k0, k_end = blk.k_end;
  const int num_q_tiles = blk.num_q_tiles;
  const int64_t pad_rows = blk.pad_rows;

  __shared__ QTileBounds bounds;
  store_walk_bounds<kMask, M>(bounds, p, q_pos, k_pos, k0, k_end);
  __syncthreads();
  const auto walk = make_q_walk<kMask, M>(bounds, p, q_pos, k_pos, k0, k_end, num_q_tiles, group, hkv);
  QTile cur = walk.first();
  if (walk.done(cur)) {  // this K/V tile is invisible to every query: its dK/dV get nothing
    write_invisible_rows<Elem, D>(p, b, hkv, k0, k_end);
    return;
  }

  const Elem* kg = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Elem* vg = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  load_tile<N, D, Tr::kThreads>(sK, kg, p.k_row_stride, k0, p.seq_k);
  load_tile<N, D, Tr::kThreads>(sV, vg, p.v_row_stride, k0, p.seq_k);

  // Issues the copies of the Q, dO tiles of `tile` and its lse_log2/delta slices into buffer `buf`.
  auto load_q_side = [&](const QTile& tile, int buf) {
    const int h = hkv * group + tile.hg;
    const int q0 = tile.qt * M;
    const Elem* qg = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const Elem* dog = static_cast<const Elem*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    load_tile<M, D, Tr::kThreads>(smem + Tr::kOffQ + buf * Tr::kTileQ, qg, p.q_row_stride, q0, p.seq_q);
    load_tile<M, D, Tr::kThreads>(smem + Tr::kOffDo + buf * Tr::kTileQ, dog, p.dout_row_stride, q0, p.seq_q);
    const int64_t rv = (static_cast<int64_t>(b) * p.heads + h) * pad_rows + q0;
    if (tid < M / 4) {
      cp_async_16(sLse + buf * M + tid * 4, p.lse_log2 + rv + tid * 4, true);
    } else if (tid < M / 2) {
      const int c = tid - M / 4;
      cp_async_16(sDelta + buf * M + c * 4, p.delta + rv + c * 4, true);
    }
  };
  load_q_side(cur, 0);
  cp_async_commit();

  float dk[Tr::kDT][4], dv[Tr::kDT][4];
#pragma unroll
  for (int j = 0; j < Tr::kDT; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[j][e] = dv[j][e] = 0.f;
  }
  const int wrow = warp * 16;  // this warp's first key row inside the tile
  // Key positions of this thread's two rows for the mask: rows past seq_k are masked everywhere (their
  // zero-filled K would otherwise give P = exp(-lse), which may overflow); without causality valid rows
  // are never masked.
  const int64_t kpos0 = key_mask_pos(p, k_pos, k0, wrow + g);
  const int64_t kpos1 = key_mask_pos(p, k_pos, k0, wrow + g + 8);
  const bool k_tail = k_end - k0 < N;
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const int wm = warp % Tr::kWarpsM, wn = warp / Tr::kWarpsM;

  int buf = 0;
  while (!walk.done(cur)) {
    const QTile next = walk.after(cur, p.causal);
    cp_async_wait_all();
    __syncthreads();  // this buffer landed; the previous dQ GEMM is done with sDs
    if (!walk.done(next)) {
      load_q_side(next, buf ^ 1);
      cp_async_commit();
    }
    const Elem* sQ = smem + Tr::kOffQ + buf * Tr::kTileQ;
    const Elem* sDo = smem + Tr::kOffDo + buf * Tr::kTileQ;
    const float* lse = sLse + buf * M;
    const float* delta = sDelta + buf * M;
    const int h = hkv * group + cur.hg;
    const int q0 = cur.qt * M;

    // S^T = K Q^T, then P^T in place.
    float s[Tr::kNT][4];
#pragma unroll
    for (int j = 0; j < Tr::kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
    gemm_a_bt<Elem, D, Tr::kNT>(s, sK, wrow, sQ);
    const bool partial = k_tail || cur.kind == 1;
    if constexpr (kMask == MaskClass::kGeneral) {
      // Any mask: the rule per element on partial tiles (visible_bits), none on full ones.
      const uint32_t bits =
          partial ? visible_bits<Tr::kNT>(p, p.mask.patterned_head(h), k_pos, k0, wrow + g, q_pos, q0, t) : ~0u;
#pragma unroll
      for (int j = 0; j < Tr::kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + 2 * t + (e & 1);
          const float pv = ex2(fmaf(s[j][e], scale_log2, -lse[col]));
          s[j][e] = (bits >> (4 * j + e)) & 1u ? pv : 0.f;
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < Tr::kNT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = j * 8 + 2 * t + (e & 1);
          float pv = ex2(fmaf(s[j][e], scale_log2, -lse[col]));
          if (partial && ((e >> 1) ? kpos1 : kpos0) > pos_at(q_pos, q0 + col)) pv = 0.f;
          s[j][e] = pv;
        }
      }
    }
    // dV += P^T dO.
    gemm_rega_b<Elem, M, D, Tr::kDT>(dv, s, sDo, 0);
    // dP^T = V dO^T.
    float dp[Tr::kNT][4];
#pragma unroll
    for (int j = 0; j < Tr::kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = 0.f;
    }
    gemm_a_bt<Elem, D, Tr::kNT>(dp, sV, wrow, sDo);
    // dS^T = P^T (dP^T - delta), in place of P^T.
#pragma unroll
    for (int j = 0; j < Tr::kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= dp[j][e] - delta[j * 8 + 2 * t + (e & 1)];
    }
    // dK += dS^T Q.
    gemm_rega_b<Elem, M, D, Tr::kDT>(dk, s, sQ, 0);
    // dS^T -> shared memory for the dQ GEMM.
#pragma unroll
    for (int j = 0; j < Tr::kNT; ++j) {
      *reinterpret_cast<uint32_t*>(sDs + swz<M>(wrow + g, j * 8 + 2 * t)) = pack2<Elem>(s[j][0], s[j][1]);
      *reinterpret_cast<uint32_t*>(sDs + swz<M>(wrow + g + 8, j * 8 + 2 * t)) = pack2<Elem>(s[j][2], s[j][3]);
    }
    __syncthreads();

    // dQ tile (rows 16*wm.., cols wn*kDqCols..) = dS K: A = dS from the stored dS^T (ldmatrix.trans).
    float dq[Tr::kDqT][4];
#pragma unroll
    for (int j = 0; j < Tr::kDqT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[j][e] = 0.f;
    }
    {
      const int i = lane >> 3;
#pragma unroll
      for (int kk = 0; kk < N / 16; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, smem_u32(sDs + swz<M>(kk * 16 + (i >> 1) * 8 + (lane & 7), wm * 16 + (i & 1) * 8)));
#pragma unroll
        for (int nn = 0; nn < Tr::kDqT / 2; ++nn) {
          uint32_t bb[4];
          ldsm_x4_t(bb, smem_u32(sK + swz<D>(kk * 16 + (i & 1) * 8 + (lane & 7),
                                              wn * Tr::kDqCols + nn * 16 + (i >> 1) * 8)));
          mma16816<Elem>(dq[2 * nn], a, bb[0], bb[1]);
          mma16816<Elem>(dq[2 * nn + 1], a, bb[2], bb[3]);
        }
      }
    }
    {
      const int r0 = q0 + wm * 16 + g;
      float* base = p.dq_accum + ((static_cast<int64_t>(b) * p.seq_q) * p.heads + h) * D + wn * Tr::kDqCols + 2 * t;
      const int64_t row_stride = static_cast<int64_t>(p.heads) * D;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = r0 + half * 8;
        if (r < p.seq_q) {
          float* rowp = base + r * row_stride;
#pragma unroll
          for (int j = 0; j < Tr::kDqT; ++j) red_add_v2(rowp + j * 8, dq[j][2 * half] * p.scale, dq[j][2 * half + 1] * p.scale);
        }
      }
    }
    cur = next;
    buf ^= 1;
  }

  // dK (scaled), dV += into the travelling fp32 accumulators; this block alone owns these rows.
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = k0 + wrow + g + half * 8;
    if (r < p.seq_k) {
      add_row_to_accumulators<Elem, Tr::kDT>(
          p, b, hkv, r, t, [&](int j, int e) { return dk[j][2 * half + e]; },
          [&](int j, int e) { return dv[j][2 * half + e]; });
    }
  }
}

}  // namespace ringattn::cuda::bwd
