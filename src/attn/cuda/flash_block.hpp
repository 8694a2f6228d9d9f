// Tile bounds of the kernels under any mask (host and device, unit-tested on the CPU): a tile's
// position range, the first row of a chunk inside a position hull, the forward's next visible key
// tile and the backward's walk over the query tiles a key tile sees. The rule itself is
// ringattn::classify / key_bounds / query_bounds (include/ringattn/mask.hpp); this file only maps
// chunk rows to the positions those functions take.
#pragma once

#include <cstdint>

#include "attn/cuda/flash_mask.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"

#if defined(__CUDACC__)
#define RINGATTN_BLOCK_HD __host__ __device__ __forceinline__
#else
#define RINGATTN_BLOCK_HD inline
#endif

namespace ringattn::cuda {

// Smallest and largest position among local rows [lo, hi) of `p`, hi > lo. The kernels read the
// inline segments (`seg`, stride > 0): the CUDA backend refuses longer lists.
RINGATTN_BLOCK_HD void rows_position_range(const ChunkPositions& p, int64_t lo, int64_t hi, int64_t* mn, int64_t* mx) {
  int64_t best_lo = INT64_MAX, best_hi = INT64_MIN;
  int64_t base = 0;
  for (int s = 0; s < kMaxSegments; ++s) {
    if (s >= p.num_segments) break;
    const Segment& g = p.seg[s];
    const int64_t a = lo > base ? lo : base;
    const int64_t b = hi < base + g.count ? hi : base + g.count;
    if (a < b) {
      const int64_t first = g.start + g.stride * (a - base), last = g.start + g.stride * (b - 1 - base);
      best_lo = first < best_lo ? first : best_lo;
      best_hi = last > best_hi ? last : best_hi;
    }
    base += g.count;
  }
  *mn = best_lo;
  *mx = best_hi;
}

// The first local row at or after `from` whose position lies in [lo, hi], or the chunk's row
// count when there is none (positions rise within each segment).
RINGATTN_BLOCK_HD int64_t first_row_in(const ChunkPositions& p, int64_t from, int64_t lo, int64_t hi) {
  int64_t base = 0;
  for (int s = 0; s < kMaxSegments; ++s) {
    if (s >= p.num_segments) break;
    const Segment& g = p.seg[s];
    if (from < base + g.count && lo <= hi && hi >= g.start) {
      // First row at or after lo, last row at or before hi (hi >= start here).
      const int64_t r0 = lo <= g.start ? 0 : mask_detail::quot(lo - g.start + g.stride - 1, g.stride);
      const int64_t r1 = mask_detail::quot(hi - g.start, g.stride);
      const int64_t a = r0 > from - base ? r0 : from - base;
      const int64_t b = r1 < g.count - 1 ? r1 : g.count - 1;
      if (a <= b) return base + a;
    }
    base += g.count;
  }
  return base;
}

// Visibility of query positions [q_min, q_max] against key rows [k_lo, k_hi) of `k_pos` (kEmpty
// when the row range is empty).
RINGATTN_BLOCK_HD Visibility classify_key_rows(const Mask& m, bool patterned, int64_t q_min, int64_t q_max,
                                               const ChunkPositions& k_pos, int64_t k_lo, int64_t k_hi) {
  if (k_lo >= k_hi) return Visibility::kEmpty;
  int64_t mn = 0, mx = 0;
  rows_position_range(k_pos, k_lo, k_hi, &mn, &mx);
  return classify(m, q_min, q_max, mn, mx, patterned);
}

// Forward, any mask: the first key tile at or after `tile` (tiles of block_n rows, seq_k rows in
// all) that a query of [q_min, q_max] at a head of kind `patterned` may see, or the tile count.
// [hull_lo, hull_hi] is key_bounds of those queries: tiles with no row inside it are jumped over
// (a window's far tiles cost nothing), the others are classified one by one.
RINGATTN_BLOCK_HD int next_visible_key_tile(const Mask& m, bool patterned, const ChunkPositions& k_pos, int tile,
                                            int block_n, int seq_k, int64_t q_min, int64_t q_max, int64_t hull_lo,
                                            int64_t hull_hi) {
  const int num_tiles = (seq_k + block_n - 1) / block_n;
  while (tile < num_tiles) {
    const int64_t row = first_row_in(k_pos, static_cast<int64_t>(tile) * block_n, hull_lo, hull_hi);
    if (row >= seq_k) return num_tiles;
    const int jump = static_cast<int>(row / block_n);
    tile = jump > tile ? jump : tile;
    const int64_t k_lo = static_cast<int64_t>(tile) * block_n;
    const int64_t k_hi = k_lo + block_n < seq_k ? k_lo + block_n : seq_k;
    if (classify_key_rows(m, patterned, q_min, q_max, k_pos, k_lo, k_hi) != Visibility::kEmpty) return tile;
    ++tile;
  }
  return num_tiles;
}

// One row's position and document, for the per-element rule of a partial tile (looked up once per
// row and tile, not per pair). A row past its chunk gets the empty document [0, 0): no pair with
// it is visible.
struct RowMask {
  int64_t pos, doc_lo, doc_hi;
};
RINGATTN_BLOCK_HD RowMask row_mask(const Mask& m, int64_t pos, bool valid) {
  if (!valid) return {pos, 0, 0};
  if (m.doc_offsets == nullptr) return {pos, 0, INT64_MAX};
  const int d = doc_index(m, pos);
  return {pos, m.doc_offsets[d], m.doc_offsets[d + 1]};
}
// Query row q sees key position k / query position q sees key row k (ringattn::visible_in_doc).
RINGATTN_BLOCK_HD bool row_sees(const Mask& m, bool patterned, const RowMask& q, int64_t k) {
  return visible_in_doc(m, q.pos, k, q.doc_lo, q.doc_hi, patterned);
}
RINGATTN_BLOCK_HD bool seen_by(const Mask& m, bool patterned, int64_t q, const RowMask& k) {
  return visible_in_doc(m, q, k.pos, k.doc_lo, k.doc_hi, patterned);
}

// The key positions queries of [q_min, q_max] may see at a head of kind `patterned` (key_bounds,
// without a sequence bound: the chunk's rows bound it).
RINGATTN_BLOCK_HD void key_hull(const Mask& m, bool patterned, int64_t q_min, int64_t q_max, int64_t* lo, int64_t* hi) {
  key_bounds(m, INT64_MAX, q_min, q_max, patterned, lo, hi);
}

}  // namespace ringattn::cuda

#undef RINGATTN_BLOCK_HD
