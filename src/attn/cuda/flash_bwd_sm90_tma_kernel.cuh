// The Hopper (sm_90a) backward step kernel: TMA loads, one barrier per query tile, dQ by bulk reductions.
//
// Same contract, tiles and GEMMs as flash_bwd_sm90_kernel.cuh (2 consumer warpgroups, 128 key rows
// per block, 64-row query tiles, S^T = K_w Q^T, dP^T = V_w dO^T, dV_w += P^T dO, dK_w += dS^T Q,
// dQ = dS K), organised as FlashAttention-3's backward:
//   - warp specialised: a producer warpgroup (24 registers) in which one thread loads the Q/dO tiles
//     by TMA (lse_log2/delta rows by bulk copies) into 3 stages (full/empty mbarriers) and another
//     adds the consumers' staged dQ blocks into the tiled dq_accum (flash_bwd_dq_tiled) with one
//     16 KB bulk reduction per warpgroup and tile; two consumer warpgroups (240 registers) compute;
//   - per tile: S^T, dP^T; P^T = exp2(...) under dP^T; dS^T; dS^T stored (double-buffered); dV
//     issued; the one consumer barrier (dS^T of both warpgroups visible); dQ issued (runs under the
//     dV GEMM); dK issued once dV is done; dQ, once it lands, staged in shared memory in register
//     order for the dQ thread, while dK stays in flight into the next tile's S^T/dP^T GEMMs.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <cuda_runtime.h>

#include <cstdint>

#include "attn/cuda/flash_bwd_sm90_kernel.cuh"

namespace ringattn::cuda::bwd90 {

using sm90::fence_barrier_init;
using sm90::mbar_arrive;
using sm90::mbar_arrive_expect_tx;
using sm90::mbar_init;
using sm90::mbar_wait;
using sm90::prefetch_tmap;
using sm90::setmaxnreg_dec;
using sm90::setmaxnreg_inc;
using sm90::tma_load_4d;

// Kernel arguments: tensor maps (64-byte aligned, first) of the four 2-byte inputs and the params.
struct TmaBwdArgs {
  CUtensorMap q;     // (D, Sq, H, B), box 64 x kBlockM
  CUtensorMap dout;  // (D, Sq, H, B), box 64 x kBlockM
  CUtensorMap k;     // (D, Sk, Hkv, B), box 64 x kBlockN
  CUtensorMap v;     // (D, Sk, Hkv, B), box 64 x kBlockN
  FlashBwdParams p;
};

__device__ __forceinline__ void st_shared_v4(uint32_t addr, float a, float b, float c, float d) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
}

// kProducerRegs_, kConsumerRegs_: registers after setmaxnreg. The any-mask kernel's producer walks
// the query tiles with the full rule (64-bit position bounds): 56 / 224 (40 bytes of producer spills
// left, one thread's; 32 / 240 spilled 160), the causal kernel's 24 / 240.
template <typename Elem, int kHeadDim_, int kProducerRegs_ = 24, int kConsumerRegs_ = 240>
struct TmaBwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;   // query rows per tile
  static constexpr int kBlockN = 128;  // key rows per block: 64 per warpgroup
  static constexpr int kConsumers = 2;  // consumer warpgroups, 64 key rows each
  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kConsumerThreads = kConsumers * kWarpgroupThreads;
  static constexpr int kThreads = kWarpgroupThreads + kConsumerThreads;  // producer warpgroup first
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = kConsumerRegs_;
  static constexpr int kStages = 3;    // Q/dO/lse/delta tiles: current, next, the one being loaded
  static constexpr int kDsStages = 2;  // dS^T: this tile's, the previous tile's (its dQ may still read it)
  static constexpr int kRowBytes = 128;
  static constexpr int kColBlocks = kHeadDim / 64;
  static constexpr int kKBlockBytes = kBlockN * kRowBytes;
  static constexpr int kKBytes = kKBlockBytes * kColBlocks;
  static constexpr int kQBlockBytes = kBlockM * kRowBytes;
  static constexpr int kQBytes = kQBlockBytes * kColBlocks;
  static constexpr int kDsBytes = kBlockN * kRowBytes;  // kBlockN key rows x 64 query columns
  static constexpr int kRowVecBytes = kBlockM * 4;      // one tile of lse_log2 or delta (fp32)
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffQ = kOffV + kKBytes;
  static constexpr int kOffDo = kOffQ + kStages * kQBytes;
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;
  static constexpr int kDqStageBytes = 64 * 64 * 4;  // one warpgroup's fp32 dQ block
  static constexpr int kOffDqStage = kOffDs + kDsStages * kDsBytes;
  static constexpr int kOffLse = kOffDqStage + 2 * kDqStageBytes;
  static constexpr int kOffDelta = kOffLse + kStages * kRowVecBytes;
  static constexpr int kOffBar = kOffDelta + kStages * kRowVecBytes;
  static constexpr int kNumBars = 1 + 2 * kStages + 2 * kConsumers;  // kv, full[], empty[], dq_full[], dq_empty[]
  static constexpr int kAlign = 1024;
  static constexpr int kSmemBytes = kOffBar + 8 * kNumBars + kAlign;
  static constexpr uint32_t kTileTx = 2 * kQBytes + 2 * kRowVecBytes;  // bytes landing per tile
  static constexpr int kCoreRowBytes = 8 * kRowBytes;
  static_assert(kHeadDim == 128, "the wgmma backward covers head_dim 128");
  // Static shared memory beside: the causal walk's bounds, the any-mask walk's tile and dQ slots.
  static_assert(kSmemBytes + static_cast<int>(sizeof(QTileBounds)) + 4 * kStages + 8 * kConsumers <= 227 * 1024,
                "shared memory");
  static_assert(kProducerRegs * kWarpgroupThreads + kConsumerRegs * kConsumerThreads <= 65536, "register file");
};

// Bulk (non-tensor) reduction of `bytes` fp32 from shared to global memory: *dst += *src elementwise.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, uint32_t src, uint32_t bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(src),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most kPending bulk groups of this thread still read their shared-memory source.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
}
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// 1-d bulk copy of `bytes` (multiple of 16, 16-byte aligned) from global to shared memory, completing on `bar`.
__device__ __forceinline__ void bulk_load(uint32_t smem_dst, const void* src, uint32_t bytes, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}

template <typename Elem, int kHeadDim, MaskClass kMask>
using TmaBwdTraitsFor = TmaBwdTraits<Elem, kHeadDim, kMask == MaskClass::kGeneral ? 56 : 24,
                                     kMask == MaskClass::kGeneral ? 224 : 240>;

// kMask: the mask class (flash_mask.hpp), as flash_bwd_kernel.
template <typename Elem, int kHeadDim, MaskClass kMask = MaskClass::kCausal>
__global__ void __launch_bounds__(TmaBwdTraitsFor<Elem, kHeadDim, kMask>::kThreads, 1)
    flash_bwd_sm90_tma_kernel(const __grid_constant__ TmaBwdArgs args, const __grid_constant__ ChunkPositions q_pos,
                              const __grid_constant__ ChunkPositions k_pos) {
#if RINGATTN_SM90A_ENABLED
  using Tr = TmaBwdTraitsFor<Elem, kHeadDim, kMask>;
  const FlashBwdParams& p = args.p;
  constexpr int D = kHeadDim, M = Tr::kBlockM, N = Tr::kBlockN;
  constexpr int kDT = D / 8;  // n8 tiles of a dK / dV row block
  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + (Tr::kAlign - 1)) & ~static_cast<uint32_t>(Tr::kAlign - 1);
  unsigned char* gbase = smem_raw + (base - raw);
  const uint32_t sK = base + Tr::kOffK;
  const uint32_t sV = base + Tr::kOffV;
  const float* sLse = reinterpret_cast<const float*>(gbase + Tr::kOffLse);      // [kStages][M]
  const float* sDelta = reinterpret_cast<const float*>(gbase + Tr::kOffDelta);  // [kStages][M]
  const uint32_t bar_kv = base + Tr::kOffBar;
  auto bar_full = [&](int stage) -> uint32_t { return bar_kv + 8 * (1 + stage); };
  auto bar_empty = [&](int stage) -> uint32_t { return bar_kv + 8 * (1 + Tr::kStages + stage); };
  auto bar_dq_full = [&](int cwg) -> uint32_t { return bar_kv + 8 * (1 + 2 * Tr::kStages + cwg); };
  auto bar_dq_empty = [&](int cwg) -> uint32_t { return bar_kv + 8 * (3 + 2 * Tr::kStages + cwg); };

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const BwdBlock<M, N> blk(p);
  const int b = blk.b, hkv = blk.hkv, group = blk.group, k0 = blk.k0, k_end = blk.k_end;
  const int num_q_tiles = blk.num_q_tiles;
  const int64_t pad_rows = blk.pad_rows;

  __shared__ QTileBounds bounds;
  store_walk_bounds<kMask, M>(bounds, p, q_pos, k_pos, k0, k_end);
  if (tid == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < Tr::kStages; ++s) {
      mbar_init(bar_full(s), 1);
      mbar_init(bar_empty(s), Tr::kConsumerThreads);
    }
    for (int c = 0; c < Tr::kConsumers; ++c) {
      mbar_init(bar_dq_full(c), Tr::kWarpgroupThreads);
      mbar_init(bar_dq_empty(c), 1);
    }
    fence_barrier_init();
  }
  __syncthreads();
  const auto walk = make_q_walk<kMask, M>(bounds, p, q_pos, k_pos, k0, k_end, num_q_tiles, group, hkv);
  const QTile first = walk.first();
  if (walk.done(first)) {  // this K/V tile is invisible to every query: its dK/dV get nothing
    bwd::write_invisible_rows<Elem, D>(p, b, hkv, k0, k_end);
    return;
  }
  // Row offset of a tile's lse_log2/delta slice and of its dq_accum rows.
  auto tile_rows = [&](const QTile& tile) {
    return (static_cast<int64_t>(b) * p.heads + hkv * group + tile.hg) * pad_rows + tile.qt * M;
  };
  // kGeneral: only the producer walks (the any-mask walk is 64-bit work the consumers have no
  // registers for). It hands each tile to the consumers with the stage (written before it arms the
  // stage's full barrier, read after that barrier completes), and the consumers hand each tile's
  // dq_accum rows to the dQ thread with their staged block (written before they arrive on
  // bar_dq_full, read after it completes; rewritten only after bar_dq_empty).
  __shared__ int s_tile_info[Tr::kStages];
  __shared__ int64_t s_dq_rows[Tr::kConsumers];
  volatile int* tile_info = s_tile_info;
  volatile int64_t* dq_rows = s_dq_rows;
  constexpr int kInfoHgShift = 20, kInfoKindShift = 28, kInfoMore = 1 << 30;  // qt | hg | kind | more
  constexpr int64_t kDqLast = int64_t{1} << 62;  // s_dq_rows: the walk's last tile
  auto encode_tile = [&](const QTile& tile, bool more) {
    return tile.qt | (tile.hg << kInfoHgShift) | (tile.kind << kInfoKindShift) | (more ? kInfoMore : 0);
  };

  if (warp < Tr::kWarpgroupThreads / 32) {
    // ---------------- producer warpgroup: warp 0 loads, warp 1 adds dQ ----------------
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (warp == 0 && lane == 0) {
      prefetch_tmap(&args.q);
      prefetch_tmap(&args.dout);
      mbar_arrive_expect_tx(bar_kv, 2 * Tr::kKBytes);
#pragma unroll
      for (int c = 0; c < Tr::kColBlocks; ++c) {
        tma_load_4d(sK + c * Tr::kKBlockBytes, &args.k, bar_kv, c * 64, k0, hkv, b);
        tma_load_4d(sV + c * Tr::kKBlockBytes, &args.v, bar_kv, c * 64, k0, hkv, b);
      }
      // Tile number n goes to stage n % kStages once the consumers have released that stage's
      // previous tile (number n - kStages).
      int stage = 0;
      uint32_t parity = 0;
      for (QTile tile = first; !walk.done(tile);) {
        QTile next{};
        if constexpr (kMask == MaskClass::kGeneral) next = walk.after(tile, p.causal);
        mbar_wait(bar_empty(stage), parity ^ 1u);
        if constexpr (kMask == MaskClass::kGeneral) tile_info[stage] = encode_tile(tile, !walk.done(next));
        const uint32_t bar = bar_full(stage);
        const int h = hkv * group + tile.hg;
        const int q0 = tile.qt * M;
        mbar_arrive_expect_tx(bar, Tr::kTileTx);
#pragma unroll
        for (int c = 0; c < Tr::kColBlocks; ++c) {
          tma_load_4d(base + Tr::kOffQ + stage * Tr::kQBytes + c * Tr::kQBlockBytes, &args.q, bar, c * 64, q0, h, b);
          tma_load_4d(base + Tr::kOffDo + stage * Tr::kQBytes + c * Tr::kQBlockBytes, &args.dout, bar, c * 64, q0, h,
                      b);
        }
        const int64_t rv = tile_rows(tile);
        bulk_load(base + Tr::kOffLse + stage * Tr::kRowVecBytes, p.lse_log2 + rv, Tr::kRowVecBytes, bar);
        bulk_load(base + Tr::kOffDelta + stage * Tr::kRowVecBytes, p.delta + rv, Tr::kRowVecBytes, bar);
        if (++stage == Tr::kStages) {
          stage = 0;
          parity ^= 1u;
        }
        if constexpr (kMask == MaskClass::kGeneral) {
          tile = next;
        } else {
          tile = walk.after(tile, p.causal);
        }
      }
    } else if (warp == 1 && lane == 0) {
      // Each consumer warpgroup's staged dQ block of a tile is added into the tiled dq_accum by one
      // bulk reduction; the staging is handed back once the reduction has read it.
      uint32_t parity = 0;
      bool last = false;  // kGeneral: the tile just reduced was the walk's last
      for (QTile tile = first; kMask == MaskClass::kGeneral ? !last : !walk.done(tile);) {
        float* rows = p.dq_accum + tile_rows(tile) * D;
#pragma unroll
        for (int c = 0; c < Tr::kConsumers; ++c) {
          mbar_wait(bar_dq_full(c), parity);
          if constexpr (kMask == MaskClass::kGeneral) {
            const int64_t info = dq_rows[c];
            last = (info & kDqLast) != 0;
            rows = p.dq_accum + (info & ~kDqLast) * D;
          }
          bulk_reduce_add_f32(rows + c * 64 * 64, base + Tr::kOffDqStage + c * Tr::kDqStageBytes, Tr::kDqStageBytes);
          bulk_commit();
        }
        bulk_wait_read<1>();
        mbar_arrive(bar_dq_empty(0));
        bulk_wait_read<0>();
        mbar_arrive(bar_dq_empty(1));
        parity ^= 1u;
        if constexpr (kMask == MaskClass::kCausal) tile = walk.after(tile, p.causal);
      }
      bulk_wait_all();  // the reductions have landed in global memory
    }
    return;
  }

  // ---------------- consumer warpgroups ----------------
  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int g = lane >> 2, t = lane & 3;
  // Consumer warpgroup 0 / 1 (key rows [64 wg, 64 wg + 64)), broadcast so that the compiler knows it
  // is warp-uniform: the shared-memory descriptors derived from it then live in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0) - 1, wwarp = warp & 3;
  float dk[kDT * 4], dv[kDT * 4];
#pragma unroll
  for (int i = 0; i < kDT * 4; ++i) dk[i] = dv[i] = 0.f;
  const int wrow = wg * 64 + wwarp * 16;  // this warp's first key row inside the tile
  const bool k_tail = k_end - k0 < N;
  const float scale_log2 = p.scale * 1.4426950408889634f;
  const uint32_t sKw = sK + wg * 64 * Tr::kRowBytes;  // this warpgroup's 64 key rows (K-major A)
  const uint32_t sVw = sV + wg * 64 * Tr::kRowBytes;
  const int tw = tid & 127;
  const uint32_t stage_dq = base + Tr::kOffDqStage + wg * Tr::kDqStageBytes;

  mbar_wait(bar_kv, 0);
  int stage = 0;        // tile number n's stage: n % kStages
  uint32_t parity = 0;  // and its phase: (n / kStages) & 1
  uint32_t n = 0;
  for (QTile cur = first; !walk.done(cur); ++n) {
    const uint32_t sQ = base + Tr::kOffQ + stage * Tr::kQBytes;
    const uint32_t sDo = base + Tr::kOffDo + stage * Tr::kQBytes;
    const uint32_t sDs = base + Tr::kOffDs + (n & 1) * Tr::kDsBytes;
    const float* lse = sLse + stage * M;
    const float* delta = sDelta + stage * M;
    mbar_wait(bar_full(stage), parity);
    bool more = true;  // kGeneral: another tile follows (the producer's tile info)
    if constexpr (kMask == MaskClass::kGeneral) {
      const int info = tile_info[stage];
      cur = QTile{(info >> kInfoHgShift) & 0xff, info & ((1 << kInfoHgShift) - 1), (info >> kInfoKindShift) & 3};
      more = (info & kInfoMore) != 0;
    }
    const int q0 = cur.qt * M;

    // S^T = K_w Q^T and dP^T = V_w dO^T, two groups (the previous tile's dK may still be in flight).
    float s[32], dp[32];
    issue_s_dp<Elem, Tr>(s, dp, sKw, sVw, sQ, sDo);
    wgmma_wait<1>();
    fence_regs(s);
    fence_regs(dk);
    if (n > 0) mbar_arrive(bar_empty(stage == 0 ? Tr::kStages - 1 : stage - 1));  // the previous tile's dK is done

    // P^T in place of S^T (element 4j + e: key row wrow + g + 8 (e >> 1), query column 8j + 2t + (e & 1)).
    // The key rows' mask positions are looked up in partial tiles only (registers are short).
    const bool partial = k_tail || cur.kind == 1;
    if constexpr (kMask == MaskClass::kGeneral) {
      if (partial) {
        softmax_p_general(s, lse, scale_log2, p, p.mask.patterned_head(hkv * group + cur.hg), k_pos, k0, wrow + g,
                          q_pos, q0, t);
      } else {
        softmax_p<false>(s, lse, scale_log2, 0, 0, q_pos, q0, t);
      }
    } else {
      const int64_t kpos0 = partial ? key_mask_pos(p, k_pos, k0, wrow + g) : 0;
      const int64_t kpos1 = partial ? key_mask_pos(p, k_pos, k0, wrow + g + 8) : 0;
      if (partial) {
        softmax_p<true>(s, lse, scale_log2, kpos0, kpos1, q_pos, q0, t);
      } else {
        softmax_p<false>(s, lse, scale_log2, kpos0, kpos1, q_pos, q0, t);
      }
    }
    uint32_t pa[4][4];
    pack_a<Elem>(s, pa);
    wgmma_wait<0>();
    fence_regs(dp);

    // dS^T = P^T (dP^T - delta), then to shared memory (row = key, 64 query columns = one swizzled
    // 128-byte row; dsa[kk][i]: n8 tile 2kk + (i >> 1), row g + 8 (i & 1)).
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[4 * j + e] = s[4 * j + e] * (dp[4 * j + e] - delta[j * 8 + 2 * t + (e & 1)]);
    }
    uint32_t dsa[4][4];
    pack_a<Elem>(dp, dsa);
    store_ds_t<Tr>(sDs, dsa, wrow, lane);

    // dV += P^T dO.
    issue_rs<Elem, Tr>(dv, pa, sDo);

    // The one barrier of the tile (consumers only): dS^T of both warpgroups visible to the dQ GEMM,
    // and both past the dQ GEMM of the tile before, so the other dS^T buffer may be overwritten next.
    fence_proxy_async();
    named_barrier_sync(1, Tr::kConsumerThreads);
    // The dQ staging is free once the reduction of the tile before has read it (long since, by now;
    // waited for here, where fewer registers are live than once dQ lands).
    mbar_wait(bar_dq_empty(wg), (n & 1) ^ 1u);

    // dQ[:, 64 wg .. 64 wg + 64) = dS K[:, 64 wg ..] (A = dS, the MN-major view of dS^T; B = K MN-major).
    float dq[32];
    issue_dq<Elem, Tr>(dq, sDs, sK, wg);
    wgmma_wait<1>();  // dV done: P^T's registers are free
    fence_regs(dv);
    fence_frags(pa);

    // dK += dS^T Q.
    issue_rs<Elem, Tr>(dk, dsa, sQ);
    wgmma_wait<1>();  // dQ done
    fence_regs(dq);

    // Thread tw's float4 number j holds dq[4j .. 4j + 3] at float offset (128 j + tw) 4 of the
    // warpgroup's block; flash_bwd_finalize reads the same order back.
#pragma unroll
    for (int j = 0; j < 8; ++j)
      st_shared_v4(stage_dq + (j * 128 + tw) * 16, dq[4 * j] * p.scale, dq[4 * j + 1] * p.scale,
                   dq[4 * j + 2] * p.scale, dq[4 * j + 3] * p.scale);
    fence_proxy_async();
    if constexpr (kMask == MaskClass::kGeneral) {
      if (tw == 0) dq_rows[wg] = tile_rows(cur) | (more ? 0 : kDqLast);
    }
    mbar_arrive(bar_dq_full(wg));
    if (++stage == Tr::kStages) {
      stage = 0;
      parity ^= 1;
    }
    if constexpr (kMask == MaskClass::kGeneral) {
      if (!more) cur = QTile{group, 0, 0};  // the walk is done
    } else {
      cur = walk.after(cur, p.causal);
    }
  }
  wgmma_wait<0>();
  fence_regs(dk);
  add_dk_dv<Elem, kHeadDim>(p, dk, dv, b, hkv, k0 + wrow, g, t);
#endif  // RINGATTN_SM90A_ENABLED
}

}  // namespace ringattn::cuda::bwd90
