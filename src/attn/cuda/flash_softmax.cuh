// Online-softmax bookkeeping per thread: running max (scaled log2 units) and partial row sums.
#pragma once

#include <cmath>

#include "attn/cuda/flash_device.cuh"

namespace ringattn::cuda {

// Each thread holds 2 rows per m16 tile (lane/4 and lane/4 + 8) and, per n8 tile, 2 columns of each.
// row_max is the full row's max of score * scale_log2 (shared by the quad); row_sum is this
// thread's partial sum, reduced over the quad only when the state is stored.
template <int kMTiles>
struct OnlineSoftmax {
  static constexpr int kRowsPerThread = 2;
  float row_max[kMTiles][kRowsPerThread];
  float row_sum[kMTiles][kRowsPerThread];

  // Folds a score tile s (raw q.k, masked entries -inf) into the state: rescales acc, turns s into
  // unnormalised probabilities p = 2^(s * scale_log2 - max).
  template <int kNTilesS, int kNTilesO>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTilesS][4], float (&acc)[kMTiles][kNTilesO][4],
                                         float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[mt][r], tile_max * scale_log2);
        // A row with nothing visible yet keeps max -inf; subtract 0 instead so p = 2^-inf = 0, never NaN.
        const float base = new_max == -INFINITY ? 0.f : new_max;
        const float rescale = fast_exp2(row_max[mt][r] - base);
        row_max[mt][r] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          s[mt][nt][2 * r] = fast_exp2(fmaf(s[mt][nt][2 * r], scale_log2, -base));
          s[mt][nt][2 * r + 1] = fast_exp2(fmaf(s[mt][nt][2 * r + 1], scale_log2, -base));
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = fmaf(row_sum[mt][r], rescale, sum);
#pragma unroll
        for (int nt = 0; nt < kNTilesO; ++nt) {
          acc[mt][nt][2 * r] *= rescale;
          acc[mt][nt][2 * r + 1] *= rescale;
        }
      }
    }
  }

  // The same as update() for the scores alone: the factor that rescales acc is returned in
  // `rescale` and applied later by rescale_acc() (the Hopper kernel runs O += P V of the previous
  // tile on the tensor cores meanwhile).
  template <int kNTilesS>
  __device__ __forceinline__ void update_scores(float (&s)[kMTiles][kNTilesS][4], float (&rescale)[kMTiles][kRowsPerThread],
                                                float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float new_max = fmaxf(row_max[mt][r], tile_max * scale_log2);
        const float base = new_max == -INFINITY ? 0.f : new_max;
        rescale[mt][r] = fast_exp2(row_max[mt][r] - base);
        row_max[mt][r] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTilesS; ++nt) {
          s[mt][nt][2 * r] = fast_exp2(fmaf(s[mt][nt][2 * r], scale_log2, -base));
          s[mt][nt][2 * r + 1] = fast_exp2(fmaf(s[mt][nt][2 * r + 1], scale_log2, -base));
          sum += s[mt][nt][2 * r] + s[mt][nt][2 * r + 1];
        }
        row_sum[mt][r] = fmaf(row_sum[mt][r], rescale[mt][r], sum);
      }
    }
  }

  template <int kNTilesO>
  __device__ __forceinline__ static void rescale_acc(float (&acc)[kMTiles][kNTilesO][4],
                                                     const float (&rescale)[kMTiles][kRowsPerThread]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r)
#pragma unroll
        for (int nt = 0; nt < kNTilesO; ++nt) {
          acc[mt][nt][2 * r] *= rescale[mt][r];
          acc[mt][nt][2 * r + 1] *= rescale[mt][r];
        }
  }

  // Sums the partial row sums over the 4 lanes of each quad.
  __device__ __forceinline__ void reduce_sums() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int r = 0; r < kRowsPerThread; ++r) {
        row_sum[mt][r] += __shfl_xor_sync(0xffffffffu, row_sum[mt][r], 1);
        row_sum[mt][r] += __shfl_xor_sync(0xffffffffu, row_sum[mt][r], 2);
      }
    }
  }
};

}  // namespace ringattn::cuda
