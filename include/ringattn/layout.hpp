// Global token positions of each rank's chunk, tile visibility, and shard/unshard between global and local tensors.
#pragma once

#include <algorithm>
#include <cstdint>

#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// `count` rows whose global positions are start, start + stride, ...
struct Segment {
  int64_t start = 0;
  int64_t stride = 1;
  int64_t count = 0;
};

inline constexpr int kMaxSegments = 2;

// How the local rows of one chunk map to global positions: row i of the chunk lives in
// segment 0 while i < seg[0].count, then in segment 1. Plain data so it can be passed to kernels.
struct ChunkPositions {
  Segment seg[kMaxSegments];
  int num_segments = 0;

  int64_t size() const {
    int64_t n = 0;
    for (int s = 0; s < num_segments; ++s) n += seg[s].count;
    return n;
  }
  // Global position of local row i (0 <= i < size()).
  int64_t at(int64_t i) const {
    for (int s = 0; s < num_segments - 1; ++s) {
      if (i < seg[s].count) return seg[s].start + seg[s].stride * i;
      i -= seg[s].count;
    }
    return seg[num_segments - 1].start + seg[num_segments - 1].stride * i;
  }
  // Smallest and largest global position among local rows [lo, hi); hi > lo.
  int64_t min_in(int64_t lo, int64_t hi) const;
  int64_t max_in(int64_t lo, int64_t hi) const;
};

// Rows per rank must be a multiple of this many for the layout on `world` ranks.
int64_t layout_divisor(Layout layout, int world);
// Positions of rank `rank`'s chunk of a `seq_len`-token sequence; seq_len % layout_divisor == 0.
ChunkPositions chunk_positions(Layout layout, int64_t seq_len, int rank, int world);

enum class Visibility { kEmpty, kPartial, kFull };

// Visibility of query rows [q_lo, q_hi) against key rows [k_lo, k_hi) under the causal rule
// (key visible when key position <= query position). Non-causal tiles are always full.
Visibility classify_tile(const ChunkPositions& q, int64_t q_lo, int64_t q_hi,
                         const ChunkPositions& k, int64_t k_lo, int64_t k_hi, bool causal);
// Visibility of whole chunks, used to skip a ring step's compute.
Visibility classify_chunks(const ChunkPositions& q, const ChunkPositions& k, bool causal);

// Copies rank `rank`'s rows of a global host tensor (seq along dimension `seq_dim`) into `local`.
// Both views must have the same dtype; local.shape[seq_dim] == positions.size().
void shard_rows(const TensorView& global, const TensorView& local, const ChunkPositions& positions,
                int seq_dim);
// The inverse: writes local rows into their global positions.
void unshard_rows(const TensorView& local, const TensorView& global, const ChunkPositions& positions,
                  int seq_dim);

}  // namespace ringattn
