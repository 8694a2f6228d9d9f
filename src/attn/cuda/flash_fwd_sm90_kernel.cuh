// The Hopper forward kernel (sm_90a): one 128-row query tile against the visible 128-key tiles of
// one visiting K/V chunk, continuing the same fp32 running state in global memory as the mma.sync
// kernel (flash_fwd_kernel.cuh). Warp specialised: warpgroup 0 is the producer (one thread issues
// TMA loads of Q, K and V into 128-byte-swizzled tiles, 2 K/V stages, completing on mbarriers);
// warpgroups 1 and 2 are consumers, each owning 64 query rows: S = Q K^T with wgmma (both operands
// from shared memory, K-major), online softmax in registers, O += P V with wgmma (P from
// registers, V from shared memory, MN-major).
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing here calls the driver)
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attn/cuda/flash_device.cuh"
#include "attn/cuda/flash_fwd_kernel.cuh"
#include "attn/cuda/flash_fwd_params.hpp"
#include "attn/cuda/flash_fwd_sm90_device.cuh"
#include "attn/cuda/flash_positions.cuh"
#include "attn/cuda/flash_softmax.cuh"

namespace ringattn::cuda::sm90 {

// Tensor maps of q, k, v (4-d: head_dim, rows, heads, batch) and the step's parameters.
struct FwdArgs {
  CUtensorMap q;
  CUtensorMap k;
  CUtensorMap v;
  FlashFwdParams p;
};

// kProducerRegs_: the producer warpgroup's registers after setmaxnreg; the any-mask kernels'
// producer classifies tiles with the full rule (64-bit position bounds) and needs 48 not to spill.
template <int kHeadDim_, int kBlockN_ = 128, int kStages_ = 2, int kProducerRegs_ = 40>
struct FwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;      // query rows per block
  static constexpr int kBlockN = kBlockN_;  // key rows per tile (a multiple of 16, at most 256)
  static constexpr int kConsumers = 2;  // consumer warpgroups, 64 query rows each
  static constexpr int kWarpgroupThreads = 128;
  static constexpr int kThreads = kWarpgroupThreads * (1 + kConsumers);
  static constexpr int kConsumerThreads = kWarpgroupThreads * kConsumers;
  static constexpr int kRowsPerConsumer = kBlockM / kConsumers;
  static constexpr int kStages = kStages_;  // K/V tile buffers
  static constexpr int kProducerRegs = kProducerRegs_;
  static constexpr int kConsumerRegs = 232;

  // Tiles are stored as column blocks of 64 elements (128 bytes, the swizzle width); block c of a
  // tile of R rows holds columns [64c, 64c + 64) of every row, row r at byte 128 r of the block.
  static constexpr int kElemBytes = 2;
  static constexpr int kSwizzleBytes = 128;
  static constexpr int kBlockCols = kSwizzleBytes / kElemBytes;  // 64
  static constexpr int kColBlocks = kHeadDim / kBlockCols;
  static constexpr int kQBlockBytes = kBlockM * kSwizzleBytes;
  static constexpr int kKVBlockBytes = kBlockN * kSwizzleBytes;
  static constexpr int kQBytes = kQBlockBytes * kColBlocks;
  static constexpr int kKVBytes = kKVBlockBytes * kColBlocks;
  static constexpr int kOffK = kQBytes;
  static constexpr int kOffV = kOffK + kStages * kKVBytes;
  static constexpr int kOffBar = kOffV + kStages * kKVBytes;
  static constexpr int kNumBars = 1 + 4 * kStages;  // q_full, k_full[], v_full[], k_empty[], v_empty[]
  static constexpr int kAlign = 1024;  // the 128-byte swizzle atom: tiles start on 1024-byte boundaries
  static constexpr int kOffInfo = kOffBar + kNumBars * 8;  // int per stage: the K/V tile it holds
  static constexpr int kSmemBytes = kOffInfo + kStages * 4 + kAlign;

  // wgmma shapes: k16 steps.
  static constexpr int kKStepsS = kHeadDim / 16;
  static constexpr int kKStepsO = kBlockN / 16;
  static constexpr int kStepsPerColBlock = kBlockCols / 16;
  static constexpr int kCoreRowBytes = 8 * kSwizzleBytes;  // 8 rows: the stride between core matrices

  static_assert(kHeadDim % kBlockCols == 0, "head_dim: whole 64-element column blocks");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256 && (kBlockN * kSwizzleBytes) % kAlign == 0, "key tile rows");
  static_assert(kBlockM % (kConsumers * 64) == 0, "each consumer warpgroup owns m64 rows");
  static_assert(kSmemBytes <= 227 * 1024, "tiles must fit in Hopper shared memory");
  static_assert(kProducerRegs * kWarpgroupThreads + kConsumerRegs * kConsumerThreads <= 65536, "register file");
};

// kSchedule 1: S_{j+1} = Q K_{j+1}^T and O += P_j V_j in flight together while the softmax runs
// (FlashAttention-3's intra-warpgroup pipelining). 2: 1, and the two consumer warpgroups take turns
// issuing their GEMMs (named barriers), so one's softmax runs under the other's GEMMs ("ping-pong").
// (Schedule 0, each GEMM waited for at once, measured 5-12% slower and was dropped.)
// kMask: what the instantiation knows of the mask (flash_mask.hpp); kCausal is the dense / causal
// kernel, kGeneral applies p.mask.
template <int kHeadDim, int kBlockN, int kStages, MaskClass kMask>
using FwdTraitsFor = FwdTraits<kHeadDim, kBlockN, kStages, kMask == MaskClass::kGeneral ? 48 : 40>;

template <typename Elem, int kHeadDim, int kSchedule, int kBlockN, int kStages, MaskClass kMask = MaskClass::kCausal>
__global__ void __launch_bounds__(FwdTraitsFor<kHeadDim, kBlockN, kStages, kMask>::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ FwdArgs args) {
#if RINGATTN_SM90A_ENABLED
  using T = FwdTraitsFor<kHeadDim, kBlockN, kStages, kMask>;
  static_assert(kSchedule == 1 || kSchedule == 2, "schedules: 1 in-warpgroup overlap, 2 plus ping-pong");
  constexpr int kNTilesS = T::kBlockN / 8;  // n8 tiles of S per thread row pair
  constexpr int kNTilesO = T::kHeadDim / 8;
  constexpr int kRows = OnlineSoftmax<1>::kRowsPerThread;
  using WgmmaS = Wgmma<Elem, T::kBlockN>;
  using WgmmaO = Wgmma<Elem, T::kHeadDim>;
  const FlashFwdParams& p = args.p;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_addr(smem_raw) + (T::kAlign - 1)) & ~static_cast<uint32_t>(T::kAlign - 1);
  const uint32_t s_q = base;
  const uint32_t s_k = base + T::kOffK;
  const uint32_t s_v = base + T::kOffV;
  const uint32_t bars = base + T::kOffBar;
  auto q_full = [&]() { return bars; };
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + T::kStages + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + 2 * T::kStages + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * T::kStages + s); };
  // Tile info per stage, written by the producer before it arms k_full(stage), read by the
  // consumers after k_full(stage) completes: key tile index | kInfoPartial | kInfoMore.
  volatile int* tile_info = reinterpret_cast<volatile int*>(smem_raw + (base - smem_addr(smem_raw)) + T::kOffInfo);
  constexpr int kInfoPartial = 1 << 30;  // the tile needs the mask
  constexpr int kInfoMore = 1 << 29;     // another visible tile follows
  constexpr int kInfoTile = kInfoMore - 1;

  const BlockCoords coords = block_coords(p);  // block order: see flash_fwd_kernel.cuh
  const int m_block = coords.m_block;
  const int bh = coords.bh;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int kv_h = h / p.kv_group;
  const int q_lo = m_block * T::kBlockM;
  const int q_hi = min(q_lo + T::kBlockM, p.seq_q);
  const int64_t q_min = position_min(p.q_pos, q_lo, q_hi);
  const int64_t q_max = position_max(p.q_pos, q_lo, q_hi);
  const int num_n_tiles = (p.seq_k + T::kBlockN - 1) / T::kBlockN;
  const FwdTileRule<kMask> rule = make_fwd_tile_rule<kMask>(p.mask, p.causal, h, q_min, q_max);
  const int first_tile = next_visible_tile(rule, p.k_pos, 0, num_n_tiles, T::kBlockN, p.seq_k);
  if (first_tile == num_n_tiles && !p.first_step) return;  // this chunk adds nothing: the state stays

  if (threadIdx.x == 0) {
    mbar_init(q_full(), 1);
    for (int s = 0; s < T::kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), T::kConsumerThreads);
      mbar_init(v_empty(s), T::kConsumerThreads);
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = static_cast<int>(threadIdx.x) / T::kWarpgroupThreads;
  if (warpgroup == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<T::kProducerRegs>();
    if (threadIdx.x == 0 && first_tile < num_n_tiles) {
      prefetch_tmap(&args.q);
      prefetch_tmap(&args.k);
      prefetch_tmap(&args.v);
      mbar_arrive_expect_tx(q_full(), T::kQBytes);
#pragma unroll
      for (int c = 0; c < T::kColBlocks; ++c)
        tma_load_4d(s_q + c * T::kQBlockBytes, &args.q, q_full(), c * T::kBlockCols, q_lo, h, b);
      // The producer alone classifies the key tiles (64-bit position ranges): the consumers read
      // the result with the tile.
      int it = 0;
      for (int tile = first_tile; tile < num_n_tiles; ++it) {
        const int stage = it % T::kStages;
        const uint32_t phase = static_cast<uint32_t>(it / T::kStages) & 1u;
        const int k_lo = tile * T::kBlockN;
        const TileKind kind = classify_key_tile(rule, p.k_pos, k_lo, T::kBlockN, p.seq_k);
        const int next = next_visible_tile(rule, p.k_pos, tile + 1, num_n_tiles, T::kBlockN, p.seq_k);
        mbar_wait(k_empty(stage), phase ^ 1u);
        tile_info[stage] = tile | (kind == TileKind::kPartial ? kInfoPartial : 0) | (next < num_n_tiles ? kInfoMore : 0);
        mbar_arrive_expect_tx(k_full(stage), T::kKVBytes);  // release: orders the tile_info store
#pragma unroll
        for (int c = 0; c < T::kColBlocks; ++c)
          tma_load_4d(s_k + stage * T::kKVBytes + c * T::kKVBlockBytes, &args.k, k_full(stage), c * T::kBlockCols, k_lo,
                      kv_h, b);
        mbar_wait(v_empty(stage), phase ^ 1u);
        mbar_arrive_expect_tx(v_full(stage), T::kKVBytes);
#pragma unroll
        for (int c = 0; c < T::kColBlocks; ++c)
          tma_load_4d(s_v + stage * T::kKVBytes + c * T::kKVBlockBytes, &args.v, v_full(stage), c * T::kBlockCols, k_lo,
                      kv_h, b);
        tile = next;
      }
    }
  } else {
    // ---------------- consumers ----------------
    setmaxnreg_inc<T::kConsumerRegs>();
    const int consumer = warpgroup - 1;
    const int lane = static_cast<int>(threadIdx.x) % 32;
    const int warp = (static_cast<int>(threadIdx.x) / 32) % 4;  // warp within the warpgroup
    const int quad_row = lane / 4;
    const int quad_col = lane % 4;
    const int row0 = q_lo + consumer * T::kRowsPerConsumer + warp * 16 + quad_row;  // + 8 r
    auto state_row = [&](int row) { return static_cast<int64_t>(bh) * p.seq_q + row; };

    float acc[1][kNTilesO][4];
    float s[1][kNTilesS][4];
    float(&acc_flat)[kNTilesO * 4] = *reinterpret_cast<float(*)[kNTilesO * 4]>(&acc[0][0][0]);
    float(&s_flat)[kNTilesS * 4] = *reinterpret_cast<float(*)[kNTilesS * 4]>(&s[0][0][0]);
    OnlineSoftmax<1> softmax;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + 8 * r;
      const bool load = row < p.seq_q && !p.first_step;
      softmax.row_max[0][r] = load ? p.row_max[state_row(row)] : -INFINITY;
      softmax.row_sum[0][r] = load && quad_col == 0 ? p.row_sum[state_row(row)] : 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
        float2 v = make_float2(0.f, 0.f);
        if (load) v = *reinterpret_cast<const float2*>(p.acc + state_row(row) * T::kHeadDim + nt * 8 + 2 * quad_col);
        acc[0][nt][2 * r] = v.x;
        acc[0][nt][2 * r + 1] = v.y;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[0][nt][e] = 0.f;

    // Q rows of this consumer (K-major), K (K-major), V (MN-major: V is (keys, d) row-major).
    const uint32_t q_rows = s_q + consumer * T::kRowsPerConsumer * T::kSwizzleBytes;
    // Issues S = Q K^T on the tiles of `stage` (not waited for).
    auto issue_s = [&](int stage) {
      WgmmaS::fence_operands(s_flat);
      wgmma_fence();
      const uint32_t k_tile = s_k + stage * T::kKVBytes;
#pragma unroll
      for (int ks = 0; ks < T::kKStepsS; ++ks) {
        const uint32_t col = ks / T::kStepsPerColBlock;
        const uint32_t off = (ks % T::kStepsPerColBlock) * 32;
        const uint64_t da = make_desc_sw128(q_rows + col * T::kQBlockBytes + off, 16, T::kCoreRowBytes);
        const uint64_t db = make_desc_sw128(k_tile + col * T::kKVBlockBytes + off, 16, T::kCoreRowBytes);
        WgmmaS::ss(s_flat, da, db, ks > 0 ? 1 : 0);
      }
      wgmma_commit();
    };
    // Issues O += P V on the tiles of `stage` (not waited for).
    auto issue_pv = [&](int stage, const uint32_t(&pa)[T::kKStepsO][4]) {
      WgmmaO::fence_operands(acc_flat);
      wgmma_fence();
      const uint32_t v_tile = s_v + stage * T::kKVBytes;
#pragma unroll
      for (int kk = 0; kk < T::kKStepsO; ++kk) {
        const uint64_t db = make_desc_sw128(v_tile + kk * 16 * T::kSwizzleBytes, T::kKVBlockBytes, T::kCoreRowBytes);
        WgmmaO::rs(acc_flat, pa[kk], db, 1);
      }
      wgmma_commit();
    };
    // Masks S on a partial tile: causal by global positions (kCausal) or the mask's rule per element
    // (kGeneral, each query row's document looked up once per tile), and missing tail keys.
    auto mask = [&](int k_lo) {
      if constexpr (kMask == MaskClass::kGeneral) {
        const bool patterned = p.mask.patterned_head(h);
        RowMask qm[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r) qm[r] = row_mask(p.mask, position_at(p.q_pos, row0 + 8 * r), row0 + 8 * r < p.seq_q);
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = k_lo + nt * 8 + 2 * quad_col + e;
            const int64_t key_position = position_at(p.k_pos, key);
#pragma unroll
            for (int r = 0; r < kRows; ++r)  // rows past seq_k: masked
              if (key >= p.seq_k || !row_sees(p.mask, patterned, qm[r], key_position)) s[0][nt][2 * r + e] = -INFINITY;
          }
        }
      } else {
        int64_t q_position[kRows];  // rows past seq_q are never stored; any value will do
#pragma unroll
        for (int r = 0; r < kRows; ++r) q_position[r] = position_at(p.q_pos, row0 + 8 * r);
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = k_lo + nt * 8 + 2 * quad_col + e;
            // Missing tail keys sort after every query; without a causal mask real keys before all.
            const int64_t key_position =
                key >= p.seq_k ? INT64_MAX : (p.causal ? position_at(p.k_pos, key) : INT64_MIN);
#pragma unroll
            for (int r = 0; r < kRows; ++r)
              if (key_position > q_position[r]) s[0][nt][2 * r + e] = -INFINITY;
          }
        }
      }
    };
    // P in the input dtype as the A operand (registers) of P V: n8 tiles 2kk, 2kk+1 form k16 step kk.
    auto pack_p = [&](uint32_t(&pa)[T::kKStepsO][4]) {
#pragma unroll
      for (int kk = 0; kk < T::kKStepsO; ++kk) {
        pa[kk][0] = pack2<Elem>(s[0][2 * kk][0], s[0][2 * kk][1]);
        pa[kk][1] = pack2<Elem>(s[0][2 * kk][2], s[0][2 * kk][3]);
        pa[kk][2] = pack2<Elem>(s[0][2 * kk + 1][0], s[0][2 * kk + 1][1]);
        pa[kk][3] = pack2<Elem>(s[0][2 * kk + 1][2], s[0][2 * kk + 1][3]);
      }
    };
    auto fence_p = [&](uint32_t(&pa)[T::kKStepsO][4]) {
#pragma unroll
      for (int kk = 0; kk < T::kKStepsO; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+r"(pa[kk][i])::"memory");
    };

    if (first_tile < num_n_tiles) mbar_wait(q_full(), 0);
    uint32_t pa[T::kKStepsO][4];

    // Ping-pong turns (kSchedule 2): named barrier 1 + c is consumer c's turn to issue.
    constexpr int kTurnBarrier = 1;
    auto wait_turn = [&]() {
      if constexpr (kSchedule == 2)
        asm volatile("bar.sync %0, %1;\n" ::"r"(kTurnBarrier + consumer), "n"(T::kConsumerThreads) : "memory");
    };
    auto pass_turn = [&]() {
      if constexpr (kSchedule == 2)
        asm volatile("bar.arrive %0, %1;\n" ::"r"(kTurnBarrier + (1 - consumer)), "n"(T::kConsumerThreads) : "memory");
    };

    if (first_tile < num_n_tiles) {
      // Software pipeline inside the warpgroup: S_j = Q K_j^T and O += P_{j-1} V_{j-1} run on the
      // tensor cores while the softmax of S_j runs; O is rescaled once P_{j-1} V_{j-1} has landed.
      static_assert(T::kConsumers == 2 || kSchedule != 2, "ping-pong between two consumers");
      if (kSchedule == 2 && consumer == 1) pass_turn();  // consumer 0 goes first
      bool more;
      {
        mbar_wait(k_full(0), 0);
        const int info = tile_info[0];
        more = (info & kInfoMore) != 0;
        wait_turn();
        issue_s(0);
        pass_turn();
        wgmma_wait<0>();
        WgmmaS::fence_operands(s_flat);
        mbar_arrive(k_empty(0));
        if (info & kInfoPartial) mask((info & kInfoTile) * T::kBlockN);
        softmax.update(s, acc, p.scale_log2);
        pack_p(pa);
      }
      int prev_stage = 0;
      uint32_t prev_phase = 0;
      for (int it = 1; more; ++it) {
        const int stage = it % T::kStages;
        const uint32_t phase = static_cast<uint32_t>(it / T::kStages) & 1u;
        mbar_wait(k_full(stage), phase);
        const int info = tile_info[stage];
        more = (info & kInfoMore) != 0;
        mbar_wait(v_full(prev_stage), prev_phase);
        wait_turn();
        issue_s(stage);
        issue_pv(prev_stage, pa);
        pass_turn();
        wgmma_wait<1>();  // S_j landed (groups complete in order)
        WgmmaS::fence_operands(s_flat);
        mbar_arrive(k_empty(stage));
        if (info & kInfoPartial) mask((info & kInfoTile) * T::kBlockN);
        float rescale[1][kRows];
        softmax.update_scores(s, rescale, p.scale_log2);
        wgmma_wait<0>();  // P_{j-1} V_{j-1} landed
        WgmmaO::fence_operands(acc_flat);
        fence_p(pa);
        mbar_arrive(v_empty(prev_stage));
        OnlineSoftmax<1>::rescale_acc(acc, rescale);
        pack_p(pa);
        prev_stage = stage;
        prev_phase = phase;
      }
      mbar_wait(v_full(prev_stage), prev_phase);
      wait_turn();
      issue_pv(prev_stage, pa);
      pass_turn();
      wgmma_wait<0>();
      WgmmaO::fence_operands(acc_flat);
      fence_p(pa);
      mbar_arrive(v_empty(prev_stage));
      if (kSchedule == 2 && consumer == 0) wait_turn();  // takes consumer 1's last pass: barriers end clean
    }

    softmax.reduce_sums();
    if (p.out != nullptr) {  // the pass's only step: out = acc / sum and lse, as flash_finalize_kernel
      constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int row = row0 + 8 * r;
        if (row >= p.seq_q) continue;
        const float sum = softmax.row_sum[0][r];
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        Elem* o = static_cast<Elem*>(p.out) + b * p.out_batch_stride + static_cast<int64_t>(row) * p.out_row_stride +
                  h * p.out_head_stride + 2 * quad_col;
#pragma unroll
        for (int nt = 0; nt < kNTilesO; ++nt)
          *reinterpret_cast<uint32_t*>(o + nt * 8) = pack2<Elem>(acc[0][nt][2 * r] * inv, acc[0][nt][2 * r + 1] * inv);
        if (quad_col == 0) {
          p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + static_cast<int64_t>(row) * p.lse_row_stride] =
              sum > 0.f ? (softmax.row_max[0][r] + log2f(sum)) * kLn2 : -INFINITY;
        }
      }
      return;
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + 8 * r;
      if (row >= p.seq_q) continue;
      if (quad_col == 0) {
        p.row_max[state_row(row)] = softmax.row_max[0][r];
        p.row_sum[state_row(row)] = softmax.row_sum[0][r];
      }
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt)
        *reinterpret_cast<float2*>(p.acc + state_row(row) * T::kHeadDim + nt * 8 + 2 * quad_col) =
            make_float2(acc[0][nt][2 * r], acc[0][nt][2 * r + 1]);
    }
  }
#endif  // RINGATTN_SM90A_ENABLED
}

}  // namespace ringattn::cuda::sm90
