// The forward kernel: one query tile against the visible key tiles of one visiting K/V chunk,
// continuing the fp32 online softmax held in global memory (FlashAttention-2 structure, mma.sync).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "attn/cuda/flash_device.cuh"
#include "attn/cuda/flash_fwd_params.hpp"
#include "attn/cuda/flash_positions.cuh"
#include "attn/cuda/flash_softmax.cuh"

namespace ringattn::cuda {

// Element offset of 16-byte chunk c of row r in a swizzled tile.
template <typename T>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * T::kHeadDim + ((chunk ^ (row & T::kSwizzleMask)) * T::kChunkElems);
}

// The shared-memory addresses one lane hands to ldmatrix for a swizzled tile. The lane supplies row
// `row` (+ multiples of 8) and logical chunk 2 * step + half; since the XOR spans 8 chunks (4 steps),
// four per-lane bases plus compile-time offsets cover every (step, row offset) of the unrolled loops.
template <typename T>
struct LdmatrixLane {
  static constexpr int kBases = T::kSwizzleRows / 2;
  uint32_t base[kBases];

  __device__ __forceinline__ LdmatrixLane(uint32_t tile, int row, int half) {
#pragma unroll
    for (int k = 0; k < kBases; ++k)
      base[k] = tile + (row * T::kHeadDim + (((2 * k + half) ^ (row & T::kSwizzleMask)) * T::kChunkElems)) *
                           T::kElemBytes;
  }
  // row_offset: a multiple of 8, compile-time in the unrolled loops, like step.
  __device__ __forceinline__ uint32_t at(int step, int row_offset) const {
    return base[step % kBases] +
           ((step / kBases) * T::kSwizzleRows * T::kChunkElems + row_offset * T::kHeadDim) * T::kElemBytes;
  }
};

// Starts the copy of rows [row0, row0 + kRows) of one head into a swizzled shared tile; rows at or
// after `seq` are zero-filled so masked columns never multiply garbage.
// gmem: the head's row 0, rows `row_stride` elements apart, head_dim contiguous.
template <typename T, int kRows, typename Elem>
__device__ __forceinline__ void load_tile_async(Elem* smem, const Elem* gmem, int64_t row_stride, int row0, int seq) {
  static_assert(T::kThreads % T::kChunksPerRow == 0, "each thread copies one chunk column");
  constexpr int kRowsPerPass = T::kThreads / T::kChunksPerRow;
  const int row = static_cast<int>(threadIdx.x) / T::kChunksPerRow;
  const int chunk = static_cast<int>(threadIdx.x) % T::kChunksPerRow;
  // Rows row, row + kRowsPerPass, ...: the swizzle (row & 7) is the same for all of them.
  Elem* dst = smem + swizzled<T>(row, chunk);
  const Elem* src = gmem + static_cast<int64_t>(row0 + row) * row_stride + chunk * T::kChunkElems;
  const int64_t src_step = kRowsPerPass * row_stride;
#pragma unroll
  for (int i = 0; i < kRows / kRowsPerPass; ++i) {
    const bool valid = row0 + row + i * kRowsPerPass < seq;
    cp_async_16(dst + i * kRowsPerPass * T::kHeadDim, valid ? src : gmem, valid);
    src += src_step;
  }
}

// 1-d grid of (query tile, batch * head) pairs, blocks started in index order. The pairs run in
// sections of p.section_heads (batch, head) pairs, so the blocks in flight share the K/V of few
// heads in L2; inside a section the query tiles go from the last to the first, heads fastest, so
// under a causal mask the heaviest tiles (the last tiles see the most keys) start first and the
// light ones fill in at the end (longest first). fwd_section_heads() sizes the sections.
struct BlockCoords {
  int m_block;  // query tile
  int bh;       // b * H + h
};
__device__ __forceinline__ BlockCoords block_coords(const FlashFwdParams& p) {
  const int bh_count = p.batch * p.heads;
  const int m_count = static_cast<int>(gridDim.x) / bh_count;
  const int per_section = p.section_heads * m_count;
  const int idx = static_cast<int>(blockIdx.x);
  const int section = idx / per_section;
  const int within = idx - section * per_section;
  const int in_section = min(p.section_heads, bh_count - section * p.section_heads);
  const int m_rev = within / in_section;
  return {m_count - 1 - m_rev, section * p.section_heads + (within - m_rev * in_section)};
}

// (batch, head) pairs per section: as many as keep their K and V within kL2Budget bytes.
// RINGATTN_FWD_SECTION_HEADS overrides it (tests use it to check every block is visited).
inline int fwd_section_heads(const FlashFwdParams& p, int head_dim) {
  constexpr int64_t kL2Budget = int64_t{24} << 20;  // of the 50 MB L2 of H100 / H200
  const int64_t kv_bytes_per_head = 2 * static_cast<int64_t>(p.seq_k) * head_dim * 2 / p.kv_group;
  int64_t fit = kv_bytes_per_head > 0 ? kL2Budget / kv_bytes_per_head : 1;
  if (const char* env = std::getenv("RINGATTN_FWD_SECTION_HEADS")) fit = std::atoi(env);
  const int64_t bh_count = static_cast<int64_t>(p.batch) * p.heads;
  return static_cast<int>(fit < 1 ? 1 : (fit > bh_count ? bh_count : fit));
}

inline dim3 fwd_grid(const FlashFwdParams& p, int block_m) {
  const int64_t tiles = (p.seq_q + block_m - 1) / block_m;
  return dim3(static_cast<unsigned>(tiles * p.batch * p.heads));
}

// kMask: what the instantiation knows of the mask (flash_mask.hpp); kCausal is the dense / causal
// kernel, kGeneral applies p.mask.
template <typename T, typename Elem, MaskClass kMask = MaskClass::kCausal>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocksPerSm) flash_fwd_kernel(const __grid_constant__ FlashFwdParams p) {
  constexpr int kMTiles = T::kMTiles;
  constexpr int kNTilesS = T::kNTilesS;
  constexpr int kNTilesO = T::kNTilesO;
  constexpr int kRows = OnlineSoftmax<kMTiles>::kRowsPerThread;
  constexpr int kQuad = 4;            // lanes sharing one accumulator row
  constexpr int kHalfTileRows = 8;    // second row of a thread in an m16 tile
  constexpr int kLdmRows = 8;         // rows of one ldmatrix 8x8 matrix

  extern __shared__ __align__(128) unsigned char smem[];
  Elem* s_q = reinterpret_cast<Elem*>(smem);  // (kBlockM, D) swizzled
  Elem* s_k = s_q + T::kSmemQElems;           // (kBlockN, D) swizzled
  Elem* s_v = s_k + T::kSmemKElems;           // (kBlockN, D) swizzled

  const BlockCoords coords = block_coords(p);
  const int m_block = coords.m_block;
  const int bh = coords.bh;
  // The state index needs bh again after the main loop: keep it in shared memory, not a register.
  __shared__ int s_bh;
  if (threadIdx.x == 0) s_bh = bh;
  __syncthreads();
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int kv_h = h / p.kv_group;
  const int q_lo = m_block * T::kBlockM;
  const int q_hi = min(q_lo + T::kBlockM, p.seq_q);
  const int lane = static_cast<int>(threadIdx.x) % T::kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / T::kWarpSize;
  const int quad_row = lane / kQuad;
  const int quad_col = lane % kQuad;
  const int warp_row0 = warp * T::kRowsPerWarp;
  // ldmatrix.x4 row suppliers: Q as the A operand (16 rows x 2 chunks), K as B of S (two n8 key
  // tiles x 2 chunks), V transposed as B of P V (16 keys x two n8 column tiles).
  const LdmatrixLane<T> lane_q(smem_addr(s_q), lane % T::kMmaM, lane / T::kMmaM);
  const LdmatrixLane<T> lane_k(smem_addr(s_k), lane % kLdmRows + (lane / (2 * kLdmRows)) * kLdmRows,
                               (lane / kLdmRows) % 2);
  const LdmatrixLane<T> lane_v(smem_addr(s_v), lane % kLdmRows + ((lane / kLdmRows) % 2) * kLdmRows,
                               lane / (2 * kLdmRows));

  // q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D).
  const Elem* q_head = static_cast<const Elem*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Elem* k_head = static_cast<const Elem*>(p.k) + b * p.k_batch_stride + kv_h * p.k_head_stride;
  const Elem* v_head = static_cast<const Elem*>(p.v) + b * p.v_batch_stride + kv_h * p.v_head_stride;
  // State: acc (B, H, Sq, D), row_max / row_sum (B, H, Sq).
  // State index of query row `row` of this (batch, head): b * H + h. Recomputed where used (cheap:
  // special registers and parameters) rather than holding 64-bit pointers across the main loop.
  auto state_row = [&](int row) { return static_cast<int64_t>(s_bh) * p.seq_q + row; };

  const int64_t q_min = position_min(p.q_pos, q_lo, q_hi);
  const int64_t q_max = position_max(p.q_pos, q_lo, q_hi);
  const int num_n_tiles = (p.seq_k + T::kBlockN - 1) / T::kBlockN;
  const FwdTileRule<kMask> rule = make_fwd_tile_rule<kMask>(p.mask, p.causal, h, q_min, q_max);
  int tile = next_visible_tile(rule, p.k_pos, 0, num_n_tiles, T::kBlockN, p.seq_k);
  if (tile == num_n_tiles && !p.first_step) return;  // this chunk adds nothing: the state stays

  if (tile < num_n_tiles) {
    load_tile_async<T, T::kBlockM>(s_q, q_head, p.q_row_stride, q_lo, p.seq_q);
    load_tile_async<T, T::kBlockN>(s_k, k_head, p.k_row_stride, tile * T::kBlockN, p.seq_k);
    cp_async_commit();
  }

  // Accumulator fragment (m16n8): thread holds rows quad_row (+8) and columns 2*quad_col (+1).
  float acc[kMTiles][kNTilesO][4];
  OnlineSoftmax<kMTiles> softmax;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = q_lo + warp_row0 + mt * T::kMmaM + quad_row + r * kHalfTileRows;
      const bool load = row < p.seq_q && !p.first_step;
      softmax.row_max[mt][r] = load ? p.row_max[state_row(row)] : -INFINITY;
      softmax.row_sum[mt][r] = load && quad_col == 0 ? p.row_sum[state_row(row)] : 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt) {
        float2 v = make_float2(0.f, 0.f);
        if (load) v = *reinterpret_cast<const float2*>(p.acc + state_row(row) * T::kHeadDim +
                                                       nt * T::kMmaN + 2 * quad_col);
        acc[mt][nt][2 * r] = v.x;
        acc[mt][nt][2 * r + 1] = v.y;
      }
    }
  }

  while (tile < num_n_tiles) {
    const int k_lo = tile * T::kBlockN;
    const TileKind kind = classify_key_tile(rule, p.k_pos, k_lo, T::kBlockN, p.seq_k);

    cp_async_wait_all();  // K_tile (and Q) landed; every warp is done with V of the previous tile
    __syncthreads();
    load_tile_async<T, T::kBlockN>(s_v, v_head, p.v_row_stride, k_lo, p.seq_k);
    cp_async_commit();

    // S = Q K^T for this warp's rows.
    float s[kMTiles][kNTilesS][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nt][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < T::kKStepsS; ++ks) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(a[mt], lane_q.at(ks, warp_row0 + mt * T::kMmaM));
#pragma unroll
      for (int np = 0; np < kNTilesS / 2; ++np) {
        uint32_t bk[4];
        ldmatrix_x4(bk, lane_k.at(ks, np * 2 * T::kMmaN));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Elem>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<Elem>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    if constexpr (kMask == MaskClass::kGeneral) {
      if (kind == TileKind::kPartial) {
        // Any mask: per query row of the thread, a bit per key column of the tile (a loop, not
        // unrolled: the rule's 64-bit arithmetic then needs few registers beside the accumulators),
        // then the masking, unrolled. Key rows past seq_k are masked.
        static_assert(2 * kNTilesS <= 32, "one bit per key column of a thread");
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
            const int row = q_lo + warp_row0 + mt * T::kMmaM + quad_row + r * kHalfTileRows;
            const RowMask qm = row_mask(p.mask, position_at(p.q_pos, row), row < p.seq_q);
            uint32_t bits = 0;
#pragma unroll 1
            for (int i = 0; i < 2 * kNTilesS; ++i) {  // key column i: n8 tile i / 2, element i % 2
              const int key = k_lo + (i >> 1) * T::kMmaN + 2 * quad_col + (i & 1);
              if (key < p.seq_k && row_sees(p.mask, rule.patterned, qm, position_at(p.k_pos, key))) bits |= 1u << i;
            }
#pragma unroll
            for (int nt = 0; nt < kNTilesS; ++nt)
#pragma unroll
              for (int e = 0; e < 2; ++e)
                if (!((bits >> (2 * nt + e)) & 1u)) s[mt][nt][2 * r + e] = -INFINITY;
          }
        }
      }
    } else if (kind == TileKind::kPartial) {
      int64_t q_position[kMTiles][kRows];  // rows past seq_q are never stored; any value will do
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          q_position[mt][r] =
              position_at(p.q_pos, q_lo + warp_row0 + mt * T::kMmaM + quad_row + r * kHalfTileRows);
#pragma unroll
      for (int nt = 0; nt < kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = k_lo + nt * T::kMmaN + 2 * quad_col + e;
          // Missing tail keys sort after every query; without a causal mask real keys before all.
          const int64_t key_position = key >= p.seq_k ? INT64_MAX : (p.causal ? position_at(p.k_pos, key) : INT64_MIN);
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
            for (int r = 0; r < kRows; ++r)
              if (key_position > q_position[mt][r]) s[mt][nt][2 * r + e] = -INFINITY;
        }
      }
    }

    const int next = next_visible_tile(rule, p.k_pos, tile + 1, num_n_tiles, T::kBlockN, p.seq_k);
    cp_async_wait_all();  // V_tile landed; every warp is done with K_tile
    __syncthreads();
    if (next < num_n_tiles) {
      load_tile_async<T, T::kBlockN>(s_k, k_head, p.k_row_stride, next * T::kBlockN, p.seq_k);
      cp_async_commit();
    }

    softmax.update(s, acc, p.scale_log2);

    // P in the input dtype, laid out as the A operand of P V: two n8 score tiles form one k16 tile.
    uint32_t pa[T::kKStepsO][kMTiles][4];
#pragma unroll
    for (int kk = 0; kk < T::kKStepsO; ++kk) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        pa[kk][mt][0] = pack2<Elem>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[kk][mt][1] = pack2<Elem>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[kk][mt][2] = pack2<Elem>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[kk][mt][3] = pack2<Elem>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
    }

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < T::kKStepsO; ++kk) {
#pragma unroll
      for (int dp = 0; dp < kNTilesO / 2; ++dp) {
        uint32_t bv[4];
        ldmatrix_x4_trans(bv, lane_v.at(dp, kk * T::kMmaK));
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma_16816<Elem>(acc[mt][2 * dp], pa[kk][mt], bv[0], bv[1]);
          mma_16816<Elem>(acc[mt][2 * dp + 1], pa[kk][mt], bv[2], bv[3]);
        }
      }
    }
    tile = next;
  }

  softmax.reduce_sums();
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = q_lo + warp_row0 + mt * T::kMmaM + quad_row + r * kHalfTileRows;
      if (row >= p.seq_q) continue;
      if (quad_col == 0) {
        p.row_max[state_row(row)] = softmax.row_max[mt][r];
        p.row_sum[state_row(row)] = softmax.row_sum[mt][r];
      }
#pragma unroll
      for (int nt = 0; nt < kNTilesO; ++nt)
        *reinterpret_cast<float2*>(p.acc + state_row(row) * T::kHeadDim + nt * T::kMmaN + 2 * quad_col) =
            make_float2(acc[mt][nt][2 * r], acc[mt][nt][2 * r + 1]);
    }
  }
}

}  // namespace ringattn::cuda
