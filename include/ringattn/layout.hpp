// Global token positions of each rank's chunk, tile visibility, and shard/unshard between global and local tensors.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ringattn/mask.hpp"
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
// segment 0 while i < seg[0].count, then in segment 1, ... Plain data so it can be passed to
// kernels by value. Up to kMaxSegments segments live inline (`seg`); a longer list (the balanced
// layout's token blocks, a halo gathered from several runs) is `list`, owned by whoever built it
// (the ring plan), and host-only: device code reads `seg` and the CUDA backend refuses a list.
struct ChunkPositions {
  Segment seg[kMaxSegments];
  int num_segments = 0;
  const Segment* list = nullptr;  // when set, the segments are list[0 .. num_segments)

  const Segment& segment(int s) const { return list ? list[s] : seg[s]; }
  int64_t size() const {
    int64_t n = 0;
    for (int s = 0; s < num_segments; ++s) n += segment(s).count;
    return n;
  }
  // Global position of local row i (0 <= i < size()).
  int64_t at(int64_t i) const {
    for (int s = 0; s < num_segments - 1; ++s) {
      const Segment& g = segment(s);
      if (i < g.count) return g.start + g.stride * i;
      i -= g.count;
    }
    const Segment& g = segment(num_segments - 1);
    return g.start + g.stride * i;
  }
  // Smallest and largest global position among local rows [lo, hi); hi > lo.
  int64_t min_in(int64_t lo, int64_t hi) const;
  int64_t max_in(int64_t lo, int64_t hi) const;
};

// The sequence length must be a multiple of this many for the layout on `world` ranks.
int64_t layout_divisor(Layout layout, int world);
// Positions of rank `rank`'s chunk of a `seq_len`-token sequence under a fixed layout
// (contiguous, zigzag, striped); seq_len % layout_divisor == 0. Auto and balanced layouts depend
// on the mask: the ring plan (src/plan/) resolves them.
ChunkPositions chunk_positions(Layout layout, int64_t seq_len, int rank, int world);
// Positions from a segment list: inline when it fits, else a view of `segments` (kept alive by the caller).
ChunkPositions positions_from(const std::vector<Segment>& segments);
// Local rows [lo, hi) of `p` as a segment list (for a slice of a chunk).
std::vector<Segment> slice_segments(const ChunkPositions& p, int64_t lo, int64_t hi);

// Visibility of query rows [q_lo, q_hi) against key rows [k_lo, k_hi) for one head kind
// (`patterned`: a head the mask's patterns apply to), from the rows' position bounds.
Visibility classify_tile(const Mask& mask, bool patterned, const ChunkPositions& q, int64_t q_lo, int64_t q_hi,
                         const ChunkPositions& k, int64_t k_lo, int64_t k_hi);
// Visibility of whole chunks for any of `heads` query heads, used to skip a step's compute.
Visibility classify_chunks(const Mask& mask, int heads, const ChunkPositions& q, const ChunkPositions& k);
// The causal-only form (tests; the kernels and the backends take the Mask form above).
Visibility classify_chunks(const ChunkPositions& q, const ChunkPositions& k, bool causal);

// Copies rank `rank`'s rows of a global host tensor (seq along dimension `seq_dim`) into `local`.
// Both views must have the same dtype; local.shape[seq_dim] == positions.size().
void shard_rows(const TensorView& global, const TensorView& local, const ChunkPositions& positions,
                int seq_dim);
// The inverse: writes local rows into their global positions.
void unshard_rows(const TensorView& local, const TensorView& global, const ChunkPositions& positions,
                  int seq_dim);

}  // namespace ringattn
