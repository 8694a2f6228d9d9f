// Device-side global positions and tile visibility, the same rules as layout.cpp (classify_tile).
#pragma once

#include <cstdint>

#include "ringattn/layout.hpp"

namespace ringattn::cuda {

// Global position of local row i (0 <= i < size).
__device__ __forceinline__ int64_t position_at(const ChunkPositions& p, int64_t i) {
  if (p.num_segments > 1 && i >= p.seg[0].count) return p.seg[1].start + p.seg[1].stride * (i - p.seg[0].count);
  return p.seg[0].start + p.seg[0].stride * i;
}

// Smallest / largest position among local rows [lo, hi), hi > lo; segments have stride > 0.
__device__ __forceinline__ int64_t position_min(const ChunkPositions& p, int64_t lo, int64_t hi) {
  int64_t best = INT64_MAX;
  int64_t base = 0;
  for (int s = 0; s < kMaxSegments; ++s) {
    if (s >= p.num_segments) break;
    const int64_t a = lo > base ? lo : base;
    const int64_t b = hi < base + p.seg[s].count ? hi : base + p.seg[s].count;
    if (a < b) {
      const int64_t v = p.seg[s].start + p.seg[s].stride * (a - base);
      best = v < best ? v : best;
    }
    base += p.seg[s].count;
  }
  return best;
}

__device__ __forceinline__ int64_t position_max(const ChunkPositions& p, int64_t lo, int64_t hi) {
  int64_t best = INT64_MIN;
  int64_t base = 0;
  for (int s = 0; s < kMaxSegments; ++s) {
    if (s >= p.num_segments) break;
    const int64_t a = lo > base ? lo : base;
    const int64_t b = hi < base + p.seg[s].count ? hi : base + p.seg[s].count;
    if (a < b) {
      const int64_t v = p.seg[s].start + p.seg[s].stride * (b - 1 - base);
      best = v > best ? v : best;
    }
    base += p.seg[s].count;
  }
  return best;
}

enum class TileKind { kEmpty, kPartial, kFull };

// Visibility of key rows [k_lo, k_lo + block_n) (clipped to seq_k) for queries with positions in
// [q_min, q_max]. Tail tiles are partial even without a causal mask: their missing rows are masked.
__device__ __forceinline__ TileKind classify_key_tile(const ChunkPositions& k_pos, int k_lo, int block_n, int seq_k,
                                                      int64_t q_min, int64_t q_max, bool causal) {
  const int k_hi = k_lo + block_n < seq_k ? k_lo + block_n : seq_k;
  if (k_lo >= k_hi) return TileKind::kEmpty;
  const bool tail = k_hi - k_lo < block_n;
  if (!causal) return tail ? TileKind::kPartial : TileKind::kFull;
  if (position_min(k_pos, k_lo, k_hi) > q_max) return TileKind::kEmpty;
  if (!tail && position_max(k_pos, k_lo, k_hi) <= q_min) return TileKind::kFull;
  return TileKind::kPartial;
}

// First key tile at or after `tile` that is not empty, or num_tiles. Positions rise within each
// segment, so an empty tile inside the last segment ends the search, and an empty tile inside
// segment 0 lets the search jump to the tile where the last segment starts.
__device__ __forceinline__ int next_visible_tile(const ChunkPositions& k_pos, int tile, int num_tiles, int block_n,
                                                 int seq_k, int64_t q_min, int64_t q_max, bool causal) {
  const int64_t last_base = k_pos.num_segments > 1 ? k_pos.seg[0].count : 0;
  while (tile < num_tiles) {
    const int k_lo = tile * block_n;
    if (classify_key_tile(k_pos, k_lo, block_n, seq_k, q_min, q_max, causal) != TileKind::kEmpty) return tile;
    if (k_lo >= last_base) return num_tiles;
    const int jump = static_cast<int>(last_base / block_n);
    tile = jump > tile + 1 ? jump : tile + 1;
  }
  return num_tiles;
}

}  // namespace ringattn::cuda
