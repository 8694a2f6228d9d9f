// Device-side global positions and the forward's tile visibility, by the mask module's rule (mask.hpp).
#pragma once

#include <cstdint>

#include "attn/cuda/flash_block.hpp"
#include "attn/cuda/flash_mask.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"

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

// What a forward block knows for classifying its key tiles: its query rows' position bounds and,
// by mask class, the causal flag (kCausal) or the mask, its head's kind and the hull of the key
// positions those queries may see (kGeneral; key_hull, once per block).
template <MaskClass kMask>
struct FwdTileRule {
  const Mask& mask;   // kGeneral: the step's mask, documents in device memory
  bool causal;        // kCausal: dense or causal
  bool patterned;     // kGeneral: Mask::patterned_head of the block's head
  int64_t q_min, q_max;
  int64_t hull_lo, hull_hi;  // kGeneral
};

template <MaskClass kMask>
__device__ __forceinline__ FwdTileRule<kMask> make_fwd_tile_rule(const Mask& mask, bool causal, int head,
                                                                 int64_t q_min, int64_t q_max) {
  FwdTileRule<kMask> r{mask, causal, false, q_min, q_max, 0, 0};
  if constexpr (kMask == MaskClass::kGeneral) {
    r.patterned = mask.patterned_head(head);
    key_hull(mask, r.patterned, q_min, q_max, &r.hull_lo, &r.hull_hi);
  }
  return r;
}

// Visibility of key rows [k_lo, k_lo + block_n) (clipped to seq_k) for the block's queries, by the
// module's rule (ringattn::classify). Tail tiles are partial even without a mask: their missing
// rows are masked.
template <MaskClass kMask>
__device__ __forceinline__ TileKind classify_key_tile(const FwdTileRule<kMask>& rule, const ChunkPositions& k_pos,
                                                      int k_lo, int block_n, int seq_k) {
  const int k_hi = k_lo + block_n < seq_k ? k_lo + block_n : seq_k;
  if (k_lo >= k_hi) return TileKind::kEmpty;
  const bool tail = k_hi - k_lo < block_n;
  Visibility v;
  if constexpr (kMask == MaskClass::kGeneral) {
    v = classify_key_rows(rule.mask, rule.patterned, rule.q_min, rule.q_max, k_pos, k_lo, k_hi);
  } else {
    // ringattn::classify for a mask of the causal rule alone, written out so that the bounds it
    // does not need are not computed (this is the dense / causal kernels' inner loop).
    if (!rule.causal) return tail ? TileKind::kPartial : TileKind::kFull;
    if (position_min(k_pos, k_lo, k_hi) > rule.q_max) return TileKind::kEmpty;
    v = !tail && position_max(k_pos, k_lo, k_hi) <= rule.q_min ? Visibility::kFull : Visibility::kPartial;
  }
  if (v == Visibility::kEmpty) return TileKind::kEmpty;
  return tail || v == Visibility::kPartial ? TileKind::kPartial : TileKind::kFull;
}

// First key tile at or after `tile` that is not empty, or num_tiles. kCausal: positions rise within
// each segment, so an empty tile inside the last segment ends the search, and an empty tile inside
// segment 0 lets the search jump to the tile where the last segment starts. kGeneral: tiles outside
// the block's key hull are jumped over, the others classified (next_visible_key_tile).
template <MaskClass kMask>
__device__ __forceinline__ int next_visible_tile(const FwdTileRule<kMask>& rule, const ChunkPositions& k_pos, int tile,
                                                 int num_tiles, int block_n, int seq_k) {
  if constexpr (kMask == MaskClass::kGeneral) {
    return next_visible_key_tile(rule.mask, rule.patterned, k_pos, tile, block_n, seq_k, rule.q_min, rule.q_max,
                                 rule.hull_lo, rule.hull_hi);
  } else {
    const int64_t last_base = k_pos.num_segments > 1 ? k_pos.seg[0].count : 0;
    while (tile < num_tiles) {
      const int k_lo = tile * block_n;
      if (classify_key_tile(rule, k_pos, k_lo, block_n, seq_k) != TileKind::kEmpty) return tile;
      if (k_lo >= last_base) return num_tiles;
      const int jump = static_cast<int>(last_base / block_n);
      tile = jump > tile + 1 ? jump : tile + 1;
    }
    return num_tiles;
  }
}

}  // namespace ringattn::cuda
