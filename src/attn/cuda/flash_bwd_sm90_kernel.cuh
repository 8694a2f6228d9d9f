// The Hopper (sm_90a) backward pieces shared with flash_bwd_sm90_tma_kernel.cuh, and the cp.async
// fallback kernel for tensors no tensor map can describe. Same algorithm and contract as
// flash_bwd_kernel.cuh (one block owns one K/V tile of one kv head, loops over the query heads of its
// group and all visible query tiles, dK/dV in registers added once into the travelling fp32
// accumulators, dQ added to the fp32 dq_accum), with the five GEMMs on wgmma:
//   per warpgroup w (key rows [64w, 64w + 64) of the 128-row K/V tile), per 64-row query tile:
//   S^T  = K_w Q^T      (m64 n64,  A = K, B = Q, both K-major from shared memory)
//   dP^T = V_w dO^T     (m64 n64,  A = V, B = dO, both K-major)
//   dV_w += P^T dO      (m64 n128, A = P^T from registers, B = dO MN-major)
//   dK_w += dS^T Q      (m64 n128, A = dS^T from registers, B = Q MN-major)
//   then dS^T (both warpgroups) goes to shared memory and warpgroup w computes
//   dQ[:, 64w, 64w + 64) = dS K[:, 64w..]  (m64 n64 k128, A = dS MN-major, B = K MN-major).
// Shared tiles use the layout the TMA writes with the 128-byte swizzle: column blocks of 64
// elements, row r at byte 128 r of its block, 16-byte chunk c stored at chunk c ^ (r % 8), blocks
// 1024-byte aligned. The fallback writes it with 16-byte cp.async (zero-filled tails, any strides),
// double-buffers Q/dO/lse/delta and takes two block barriers per query tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_block.hpp"
#include "attn/cuda/flash_bwd_kernel.cuh"
#include "attn/cuda/flash_mask.hpp"
#include "attn/cuda/flash_fwd_sm90_device.cuh"

namespace ringattn::cuda::bwd90 {

using bwd::cp_async_16;
using bwd::cp_async_commit;
using bwd::cp_async_wait_all;
using bwd::ex2;
using bwd::pack2;
using bwd::pos_at;
using bwd::QTileWalk;
using bwd::key_mask_pos;
using bwd::red_add_v2;
using bwd::smem_u32;
using bwd::BwdBlock;
using bwd::QTile;
using bwd::QTileBounds;
using bwd::store_q_tile_bounds;
using bwd::key_row_mask;
using bwd::make_q_walk;
using bwd::store_walk_bounds;
using sm90::make_desc_sw128;
using sm90::Wgmma;
using sm90::wgmma_commit;
using sm90::wgmma_fence;
using sm90::wgmma_wait;

// Makes this thread's generic-proxy shared-memory writes (cp.async, st.shared) visible to wgmma.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void cp_async_16_s(uint32_t smem_dst, const void* gmem_src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_dst), "l"(gmem_src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

template <int kN>
__device__ __forceinline__ void fence_regs(float (&d)[kN]) {
#pragma unroll
  for (int i = 0; i < kN; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_frags(uint32_t (&a)[4][4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(a[k][i])::"memory");
}

// m64n64k16 with both operands MN-major (transposed) from shared memory: the dQ = dS K GEMM.
template <typename Elem>
struct WgmmaTT64;
template <>
struct WgmmaTT64<__nv_bfloat16> {
  // d (+)= A B, A (m64 x k16, MN-major) and B (k16 x n64, MN-major) from shared memory.
  __device__ __forceinline__ static void ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <>
struct WgmmaTT64<__half> {
  // d (+)= A B, A (m64 x k16, MN-major) and B (k16 x n64, MN-major) from shared memory.
  __device__ __forceinline__ static void ss(float (&d)[32], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  }
};

template <typename Elem_, int kHeadDim_>
struct Sm90BwdTraits {
  using Elem = Elem_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;   // query rows per inner iteration
  static constexpr int kBlockN = 128;  // key rows per block: 64 per consumer warpgroup
  static constexpr int kWarpgroups = 2;
  static constexpr int kThreads = 128 * kWarpgroups;
  static constexpr int kRowBytes = 128;  // one row of a 64-column block
  static constexpr int kColBlocks = kHeadDim / 64;
  static constexpr int kKBlockBytes = kBlockN * kRowBytes;
  static constexpr int kKBytes = kKBlockBytes * kColBlocks;
  static constexpr int kQBlockBytes = kBlockM * kRowBytes;
  static constexpr int kQBytes = kQBlockBytes * kColBlocks;
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffQ = kOffV + kKBytes;       // two buffers
  static constexpr int kOffDo = kOffQ + 2 * kQBytes;  // two buffers
  static constexpr int kOffDs = kOffDo + 2 * kQBytes;  // dS^T: kBlockN key rows x kBlockM (= 64) query columns
  static constexpr int kOffRow = kOffDs + kBlockN * kRowBytes;  // lse_log2[2][M], delta[2][M] fp32
  static constexpr int kAlign = 1024;
  static constexpr int kSmemBytes = kOffRow + 4 * kBlockM * 4 + kAlign;
  static constexpr int kCoreRowBytes = 8 * kRowBytes;  // 8 rows: one swizzle atom
  static_assert(kHeadDim == 128, "the wgmma backward covers head_dim 128");
  static_assert(kBlockM == 64, "dS^T rows are one 64-column block");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory");
};

// ---- Pieces shared by the two Hopper backward kernels (this file's and flash_bwd_sm90_tma_kernel.cuh) ----

// S^T = K_w Q^T into s and dP^T = V_w dO^T into dp (m64n64k16, both operands K-major from shared
// memory), committed as two groups.
template <typename Elem, typename Tr>
__device__ __forceinline__ void issue_s_dp(float (&s)[32], float (&dp)[32], uint32_t sKw, uint32_t sVw, uint32_t sQ,
                                           uint32_t sDo) {
  fence_regs(s);
  fence_regs(dp);
  wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < Tr::kHeadDim / 16; ++ks) {
    const uint32_t off = (ks / 4) * Tr::kKBlockBytes + (ks % 4) * 32;
    const uint32_t offq = (ks / 4) * Tr::kQBlockBytes + (ks % 4) * 32;
    Wgmma<Elem, 64>::ss(s, make_desc_sw128(sKw + off, 16, Tr::kCoreRowBytes),
                        make_desc_sw128(sQ + offq, 16, Tr::kCoreRowBytes), ks > 0 ? 1 : 0);
  }
  wgmma_commit();
#pragma unroll
  for (int ks = 0; ks < Tr::kHeadDim / 16; ++ks) {
    const uint32_t off = (ks / 4) * Tr::kKBlockBytes + (ks % 4) * 32;
    const uint32_t offq = (ks / 4) * Tr::kQBlockBytes + (ks % 4) * 32;
    Wgmma<Elem, 64>::ss(dp, make_desc_sw128(sVw + off, 16, Tr::kCoreRowBytes),
                        make_desc_sw128(sDo + offq, 16, Tr::kCoreRowBytes), ks > 0 ? 1 : 0);
  }
  wgmma_commit();
}

// P^T in place of S^T (element 4j + e: key row g + 8 (e >> 1) of the warp, query column
// 8j + 2t + (e & 1)). kMasked (partial tiles): keys after the query are zeroed; a full tile takes
// kMasked = false and pays no per-element mask test (a branch and a select per element, issued while
// the tensor cores wait for these exponentials; docs/BACKWARD_NOTES.md v7).
template <bool kMasked>
__device__ __forceinline__ void softmax_p(float (&s)[32], const float* lse, float scale_log2, int64_t kpos0,
                                          int64_t kpos1, const ChunkPositions& q_pos, int q0, int t) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + 2 * t + (e & 1);
      float pv = ex2(fmaf(s[4 * j + e], scale_log2, -lse[col]));
      if constexpr (kMasked) {
        if (((e >> 1) ? kpos1 : kpos0) > pos_at(q_pos, q0 + col)) pv = 0.f;
      }
      s[4 * j + e] = pv;
    }
  }
}

// P^T of a partial tile under any mask (kGeneral): softmax_p<true> with the mask's rule per element
// (bwd::visible_bits: the thread's two key rows krow, krow + 8 of the tile at chunk row k0).
__device__ __forceinline__ void softmax_p_general(float (&s)[32], const float* lse, float scale_log2,
                                                  const FlashBwdParams& p, bool patterned, const ChunkPositions& k_pos,
                                                  int k0, int krow, const ChunkPositions& q_pos, int q0, int t) {
  const uint32_t bits = bwd::visible_bits<8>(p, patterned, k_pos, k0, krow, q_pos, q0, t);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + 2 * t + (e & 1);
      const float pv = ex2(fmaf(s[4 * j + e], scale_log2, -lse[col]));
      s[4 * j + e] = (bits >> (4 * j + e)) & 1u ? pv : 0.f;
    }
  }
}

// An m64 x k64 accumulator tile as the four k16 A fragments of an RS wgmma, rounded to Elem.
template <typename Elem>
__device__ __forceinline__ void pack_a(const float (&x)[32], uint32_t (&a)[4][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[kk][i] = pack2<Elem>(x[8 * kk + 2 * i], x[8 * kk + 2 * i + 1]);
  }
}

// acc (m64 x n kHeadDim) += A B with A = a (registers, k = kBlockM) and B MN-major from shared memory
// at sB (dV += P^T dO, dK += dS^T Q), committed as one group.
template <typename Elem, typename Tr>
__device__ __forceinline__ void issue_rs(float (&acc)[Tr::kHeadDim / 2], uint32_t (&a)[4][4], uint32_t sB) {
  fence_regs(acc);
  fence_frags(a);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < Tr::kBlockM / 16; ++kk) {
    Wgmma<Elem, 128>::rs(acc, a[kk], make_desc_sw128(sB + kk * 16 * Tr::kRowBytes, Tr::kQBlockBytes, Tr::kCoreRowBytes),
                         1);
  }
  wgmma_commit();
}

// dS^T (A fragments) to shared memory: row = key, the 64 query columns one swizzled 128-byte row.
// dsa[kk][i] holds rows g + 8 (i & 1), 16-byte chunk 2kk + (i >> 1) of the warp's 16 rows from wrow:
// per k16 block one stmatrix.m8n8.x4 of those four 8x8 matrices, lane l giving the address of row
// (l & 7) + 8 ((l >> 3) & 1), chunk 2kk + (l >> 4) (wrow is a multiple of 16, so the swizzle's
// row & 7 is l & 7). Four instructions instead of sixteen 32-bit stores.
template <typename Tr>
__device__ __forceinline__ void store_ds_t(uint32_t sDs, const uint32_t (&dsa)[4][4], int wrow, int lane) {
  const int x = lane & 7;
  const uint32_t row_addr = sDs + (wrow + x + 8 * ((lane >> 3) & 1)) * Tr::kRowBytes;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t addr = row_addr + (((2 * kk + (lane >> 4)) ^ x) << 4);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(dsa[kk][0]),
                 "r"(dsa[kk][1]), "r"(dsa[kk][2]), "r"(dsa[kk][3])
                 : "memory");
  }
}

// dQ[:, 64 wg .. 64 wg + 64) = dS K[:, 64 wg ..] (m64n64k16, A = dS as the MN-major view of the dS^T
// buffer ds, B = K MN-major), committed as one group. Warp (wg, wwarp) gets query rows 16 wwarp + g
// (+8), columns 64 wg + 8j + 2t (+1) in dq[4j .. 4j + 3].
template <typename Elem, typename Tr>
__device__ __forceinline__ void issue_dq(float (&dq)[32], uint32_t ds, uint32_t sK, int wg) {
  fence_regs(dq);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < Tr::kBlockN / 16; ++kk) {
    WgmmaTT64<Elem>::ss(dq, make_desc_sw128(ds + kk * 16 * Tr::kRowBytes, Tr::kBlockN * Tr::kRowBytes, Tr::kCoreRowBytes),
                        make_desc_sw128(sK + wg * Tr::kKBlockBytes + kk * 16 * Tr::kRowBytes, Tr::kKBlockBytes,
                                        Tr::kCoreRowBytes),
                        kk > 0 ? 1 : 0);
  }
  wgmma_commit();
}

// dK (scaled) and dV of the warp's key rows r0 + g (+8) added into the travelling fp32 accumulators;
// the block alone owns these rows.
template <typename Elem, int kHeadDim>
__device__ __forceinline__ void add_dk_dv(const FlashBwdParams& p, const float (&dk)[kHeadDim / 2],
                                          const float (&dv)[kHeadDim / 2], int b, int hkv, int r0, int g, int t) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + g + half * 8;
    if (r < p.seq_k) {
      bwd::add_row_to_accumulators<Elem, kHeadDim / 8>(
          p, b, hkv, r, t, [&](int j, int e) { return dk[4 * j + 2 * half + e]; },
          [&](int j, int e) { return dv[4 * j + 2 * half + e]; });
    }
  }
}

// Copies rows [row0, row0 + kRows) of a (rows, D) strided slab into the swizzled column-block layout
// at shared address dst; rows >= limit are zero-filled.
template <int kRows, int kCols, int kThreads, typename Elem>
__device__ __forceinline__ void load_tile_sw128(uint32_t dst, const Elem* src, int64_t row_stride, int row0,
                                                int limit) {
  constexpr int kChunks = kCols / 8;
  constexpr int kTotal = kRows * kChunks;
  static_assert(kTotal % kThreads == 0, "tile copy divides evenly");
#pragma unroll
  for (int i = 0; i < kTotal / kThreads; ++i) {
    const int idx = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = row0 + r < limit;
    const Elem* g = src + static_cast<int64_t>(valid ? row0 + r : 0) * row_stride + c * 8;
    const uint32_t s = dst + (c / 8) * (kRows * 128) + r * 128 + (((c % 8) ^ (r & 7)) << 4);
    cp_async_16_s(s, g, valid);
  }
}

// The fallback of the TMA kernel (flash_bwd_sm90_tma_kernel.cuh) for tensors no tensor map can
// describe: dQ = dS K on wgmma, added into the tiled dq_accum with red.global.add.v2; two block
// barriers per query tile.
// kMask: the mask class (flash_mask.hpp), as flash_bwd_kernel.
template <typename Elem, int kHeadDim, MaskClass kMask = MaskClass::kCausal>
__global__ void __launch_bounds__(Sm90BwdTraits<Elem, kHeadDim>::kThreads, 1)
    flash_bwd_sm90_kernel(const __grid_constant__ FlashBwdParams p, const __grid_constant__ ChunkPositions q_pos,
                          const __grid_constant__ ChunkPositions k_pos) {
#if RINGATTN_SM90A_ENABLED
  using Tr = Sm90BwdTraits<Elem, kHeadDim>;
  constexpr int D = kHeadDim, M = Tr::kBlockM, N = Tr::kBlockN;
  constexpr int kDT = D / 8;  // n8 tiles of a dK / dV row block
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + (Tr::kAlign - 1)) & ~static_cast<uint32_t>(Tr::kAlign - 1);
  unsigned char* gbase = smem_raw + (base - raw);
  const uint32_t sK = base + Tr::kOffK;
  const uint32_t sV = base + Tr::kOffV;
  const uint32_t sDs = base + Tr::kOffDs;
  float* sLse = reinterpret_cast<float*>(gbase + Tr::kOffRow);  // [2][M]
  float* sDelta = sLse + 2 * M;                                 // [2][M]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wg = warp >> 2, wwarp = warp & 3;
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
    bwd::write_invisible_rows<Elem, D>(p, b, hkv, k0, k_end);
    return;
  }

  const Elem* kg = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + hkv * p.k_head_stride;
  const Elem* vg = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + hkv * p.v_head_stride;
  load_tile_sw128<N, D, Tr::kThreads>(sK, kg, p.k_row_stride, k0, p.seq_k);
  load_tile_sw128<N, D, Tr::kThreads>(sV, vg, p.v_row_stride, k0, p.seq_k);

  auto load_q_side = [&](const QTile& tile, int buf) {
    const int h = hkv * group + tile.hg;
    const int q0 = tile.qt * M;
    const Elem* qg = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const Elem* dog = static_cast<const Elem*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
    load_tile_sw128<M, D, Tr::kThreads>(base + Tr::kOffQ + buf * Tr::kQBytes, qg, p.q_row_stride, q0, p.seq_q);
    load_tile_sw128<M, D, Tr::kThreads>(base + Tr::kOffDo + buf * Tr::kQBytes, dog, p.dout_row_stride, q0, p.seq_q);
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

  float dk[kDT * 4], dv[kDT * 4];
#pragma unroll
  for (int i = 0; i < kDT * 4; ++i) dk[i] = dv[i] = 0.f;
  const int wrow = wg * 64 + wwarp * 16;  // this warp's first key row inside the tile
  const int64_t kpos0 = key_mask_pos(p, k_pos, k0, wrow + g);
  const int64_t kpos1 = key_mask_pos(p, k_pos, k0, wrow + g + 8);
  const bool k_tail = k_end - k0 < N;
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const uint32_t sKw = sK + wg * 64 * Tr::kRowBytes;  // this warpgroup's 64 key rows (K-major A)
  const uint32_t sVw = sV + wg * 64 * Tr::kRowBytes;

  float dq[32];
  // Adds this warp's share of a finished dQ tile (query rows q0.., head h) into the tiled dq_accum
  // (flash_bwd_dq_tiled: the register order of the TMA kernel's staging).
  auto add_dq = [&](int q0_of, int h_of) {
    float* blk = p.dq_accum + ((static_cast<int64_t>(b) * p.heads + h_of) * pad_rows + q0_of) * D + wg * 64 * 64 +
                 (tid & 127) * 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      red_add_v2(blk + j * 512, dq[4 * j] * p.scale, dq[4 * j + 1] * p.scale);
      red_add_v2(blk + j * 512 + 2, dq[4 * j + 2] * p.scale, dq[4 * j + 3] * p.scale);
    }
  };

  int buf = 0;        // the Q/dO buffer of tile `cur`
  QTile next = cur;   // the visible tile after it
  int q0 = 0, h = 0;  // first query row and head of tile `cur`

  // First half of tile `cur`: everything up to its dS^T stored and its GEMMs done.
  auto first_half = [&]() {
    next = walk.after(cur, p.causal);
    cp_async_wait_all();
    fence_proxy_async();
    __syncthreads();  // this buffer landed; the previous iteration's GEMMs are done with sDs and the other buffer
    if (!walk.done(next)) {
      load_q_side(next, buf ^ 1);
      cp_async_commit();
    }
    const uint32_t sQ = base + Tr::kOffQ + buf * Tr::kQBytes;
    const uint32_t sDo = base + Tr::kOffDo + buf * Tr::kQBytes;
    const float* lse = sLse + buf * M;
    const float* delta = sDelta + buf * M;
    h = hkv * group + cur.hg;
    q0 = cur.qt * M;

    // S^T = K_w Q^T and dP^T = V_w dO^T, two groups.
    float s[32], dp[32];
    issue_s_dp<Elem, Tr>(s, dp, sKw, sVw, sQ, sDo);
    wgmma_wait<1>();
    fence_regs(s);

    // P^T in place of S^T (element 4j + e: key row wrow + g + 8 (e >> 1), query column 8j + 2t + (e & 1)).
    if constexpr (kMask == MaskClass::kGeneral) {
      if (k_tail || cur.kind == 1) {
        softmax_p_general(s, lse, scale_log2, p, p.mask.patterned_head(h), k_pos, k0, wrow + g, q_pos, q0, t);
      } else {
        softmax_p<false>(s, lse, scale_log2, 0, 0, q_pos, q0, t);
      }
    } else if (k_tail || cur.kind == 1) {
      softmax_p<true>(s, lse, scale_log2, kpos0, kpos1, q_pos, q0, t);
    } else {
      softmax_p<false>(s, lse, scale_log2, kpos0, kpos1, q_pos, q0, t);
    }
    uint32_t pa[4][4];
    pack_a<Elem>(s, pa);
    wgmma_wait<0>();
    fence_regs(dp);

    // dV += P^T dO.
    issue_rs<Elem, Tr>(dv, pa, sDo);

    // dS^T = P^T (dP^T - delta).
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[4 * j + e] *= dp[4 * j + e] - delta[j * 8 + 2 * t + (e & 1)];
    }
    uint32_t dsa[4][4];
    pack_a<Elem>(s, dsa);
    // dK += dS^T Q.
    issue_rs<Elem, Tr>(dk, dsa, sQ);
    store_ds_t<Tr>(sDs, dsa, wrow, lane);
    fence_proxy_async();
    wgmma_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
    fence_frags(pa);
    fence_frags(dsa);
  };

  // Second half of tile `cur`: dQ = dS K into dq_accum.
  auto second_half = [&]() {
    __syncthreads();  // dS^T of both warpgroups stored
    // dQ[:, 64 wg .. 64 wg + 64) = dS K[:, 64 wg ..]. Warp (wg, wwarp) holds query rows 16 wwarp + g (+8),
    // columns 64 wg + 8j + 2t (+1) in dq[4j..4j+3].
    issue_dq<Elem, Tr>(dq, sDs, sK, wg);
    wgmma_wait<0>();
    fence_regs(dq);
    add_dq(q0, h);  // vector reductions straight from registers
  };

  while (!walk.done(cur)) {
    first_half();
    second_half();
    cur = next;
    buf ^= 1;
  }

  add_dk_dv<Elem, kHeadDim>(p, dk, dv, b, hkv, k0 + wrow, g, t);
#endif  // RINGATTN_SM90A_ENABLED
}

}  // namespace ringattn::cuda::bwd90
