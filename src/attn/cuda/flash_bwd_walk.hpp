// The backward kernels' walk over the query tiles a key tile sees (host and device: unit-tested on the CPU).
#pragma once

#include <cstdint>

#include "attn/cuda/flash_block.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"

#if defined(__CUDACC__)
#define RINGATTN_HD __host__ __device__ __forceinline__
#else
#define RINGATTN_HD inline
#endif

namespace ringattn::cuda::bwd {

// Where a block's key tile (positions [k_min, k_max]) sees the query tiles of one head. Query
// positions rise within each segment of the chunk, so along the tiles wholly inside one segment the
// kind only rises (0 empty, 1 partial: apply the causal mask, 2 full): each such run of tiles is
// empty below e, partial below f and full from f on. The tile holding rows of both segments (`mid`)
// gets its kind from its rows. Computed once per block, stepping through the tiles then costs a few
// integer compares instead of 64-bit position ranges per tile.
struct QTileBounds {
  int run0_end;       // tiles [0, run0_end) hold rows of segment 0 only
  int e0, f0;         // segment 0's run: empty below e0, partial below f0, full from f0
  int mid, mid_kind;  // the tile holding rows of both segments and its kind (mid = -1: none)
  int e1, f1;         // segment 1's run (the tiles after run0_end and mid): the same
};

// Ceiling of a / b for b > 0.
RINGATTN_HD int64_t ceil_div_i64(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }
RINGATTN_HD int64_t clamp_i64(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Query rows: seq_q, positions q_pos (segments of stride > 0), tiles of kBlockM rows.
template <int kBlockM>
RINGATTN_HD QTileBounds q_tile_bounds(const ChunkPositions& q_pos, int seq_q, bool causal, int64_t k_min,
                                      int64_t k_max) {
  const int num_q_tiles = (seq_q + kBlockM - 1) / kBlockM;
  const int64_t c0 = q_pos.num_segments > 1 ? q_pos.seg[0].count : seq_q;  // rows of segment 0
  const bool straddle = c0 % kBlockM != 0 && c0 < seq_q;
  QTileBounds bd{};
  // A short last tile of a one-segment chunk belongs to the run.
  bd.run0_end = c0 >= seq_q ? num_q_tiles : static_cast<int>(c0 / kBlockM);
  const int run1_begin = straddle ? bd.run0_end + 1 : bd.run0_end;
  bd.mid = straddle ? bd.run0_end : -1;
  bd.mid_kind = 2;
  if (!causal) {
    bd.e0 = bd.f0 = 0;
    bd.e1 = bd.f1 = run1_begin;
    return bd;
  }
  // Tile qt of the run of segment s (first row `base`, positions start + stride (row - base)) is
  // visible once its last row reaches k_min and full once its first row reaches k_max. A short last
  // tile's last row is taken as kBlockM - 1 rows on: at worst it is masked as partial, never skipped.
  auto run_bounds = [&](int s, int64_t base, int lo, int hi, int& e, int& f) {
    const int64_t st = q_pos.seg[s].start, sd = q_pos.seg[s].stride;
    const int64_t tile_step = sd * kBlockM;
    e = static_cast<int>(clamp_i64(ceil_div_i64(k_min - st + sd * (base - (kBlockM - 1)), tile_step), lo, hi));
    f = static_cast<int>(clamp_i64(ceil_div_i64(k_max - st + sd * base, tile_step), e, hi));
  };
  run_bounds(0, 0, 0, bd.run0_end, bd.e0, bd.f0);
  if (q_pos.num_segments > 1) {
    run_bounds(1, c0, run1_begin, num_q_tiles, bd.e1, bd.f1);
  } else {
    bd.e1 = bd.f1 = num_q_tiles;
  }
  if (straddle) {
    const Segment& s0 = q_pos.seg[0];
    const Segment& s1 = q_pos.seg[1];
    const int64_t hi = static_cast<int64_t>(bd.mid + 1) * kBlockM < seq_q ? static_cast<int64_t>(bd.mid + 1) * kBlockM
                                                                           : seq_q;
    const int64_t a0 = s0.start + s0.stride * (static_cast<int64_t>(bd.mid) * kBlockM);  // first row, segment 0
    const int64_t b0 = s0.start + s0.stride * (c0 - 1);                                   // last row, segment 0
    const int64_t a1 = s1.start, b1 = s1.start + s1.stride * (hi - 1 - c0);
    const int64_t q_min = a0 < a1 ? a0 : a1, q_max = b0 > b1 ? b0 : b1;
    bd.mid_kind = k_min > q_max ? 0 : (k_max <= q_min ? 2 : 1);
  }
  return bd;
}

// A query tile of the walk: head hg of the block's query-head group, tile qt, its kind.
struct QTile {
  int hg, qt, kind;
};

// The query tiles a block's key tile sees, in order: every visible tile of the group's first head,
// then of the next. On the GPU bd lives in shared memory (one thread computes it per block).
struct QTileWalk {
  const QTileBounds& bd;
  int num_q_tiles, group;
  RINGATTN_HD int kind(int qt) const {
    if (qt < bd.run0_end) return qt < bd.e0 ? 0 : (qt < bd.f0 ? 1 : 2);
    if (qt == bd.mid) return bd.mid_kind;
    return qt < bd.e1 ? 0 : (qt < bd.f1 ? 1 : 2);
  }
  RINGATTN_HD QTile first() const { return visible_from(0, 0); }
  // `causal` false: every tile is full, the step reads no bound (the kernels pass the kernel
  // parameter, which stays in the constant bank instead of taking a register).
  RINGATTN_HD QTile after(const QTile& c, bool causal) const {
    if (!causal) return c.qt + 1 < num_q_tiles ? QTile{c.hg, c.qt + 1, 2} : QTile{c.hg + 1, 0, 2};
    return c.qt + 1 < num_q_tiles ? visible_from(c.hg, c.qt + 1) : visible_from(c.hg + 1, 0);
  }
  RINGATTN_HD bool done(const QTile& c) const { return c.hg >= group; }

 private:
  // The first visible tile at or after tile qt of head hg; a head with none passes to the next.
  RINGATTN_HD QTile visible_from(int hg, int qt) const {
    for (; hg < group; ++hg, qt = 0) {
      if (qt < bd.run0_end) {
        const int q = qt > bd.e0 ? qt : bd.e0;
        if (q < bd.run0_end) return {hg, q, kind(q)};
        qt = bd.run0_end;
      }
      if (qt == bd.mid) {
        if (bd.mid_kind != 0) return {hg, qt, bd.mid_kind};
        ++qt;
      }
      const int q = qt > bd.e1 ? qt : bd.e1;
      if (q < num_q_tiles) return {hg, q, kind(q)};
    }
    return {group, 0, 0};
  }
};

// Backward, any mask: the query tiles (kBlockM rows) a block's key tile (positions [k_min,
// k_max]) sees, in order: every visible tile of the group's first head, then of the next. Each
// head takes its own kind (Mask::patterned_head) and hull (query_bounds); tiles outside the hull
// are jumped over, the others classified. Unlike the causal walk above, a tile's
// kind may fall and rise again along the tiles (windows, strides, documents). Holds references:
// on the GPU, to kernel parameters (__grid_constant__), so nothing is copied.
template <int kBlockM>
struct MaskedQTileWalk {
  const Mask& mask;
  const ChunkPositions& q_pos;
  int seq_q, num_q_tiles, group, head0;  // head0: the group's first query head
  int64_t k_min, k_max;

  RINGATTN_HD QTile first() const { return visible_from(0, 0); }
  // The second argument matches the causal walk's signature; the mask decides here.
  RINGATTN_HD QTile after(const QTile& c, bool = true) const {
    return c.qt + 1 < num_q_tiles ? visible_from(c.hg, c.qt + 1) : visible_from(c.hg + 1, 0);
  }
  RINGATTN_HD bool done(const QTile& c) const { return c.hg >= group; }

 private:
  RINGATTN_HD QTile visible_from(int hg, int qt) const {
    for (; hg < group; ++hg, qt = 0) {
      const bool patterned = mask.patterned_head(head0 + hg);
      int64_t lo = 0, hi = 0;
      query_bounds(mask, INT64_MAX, k_min, k_max, patterned, &lo, &hi);
      while (qt < num_q_tiles) {
        const int64_t row = first_row_in(q_pos, static_cast<int64_t>(qt) * kBlockM, lo, hi);
        if (row >= seq_q) break;
        const int jump = static_cast<int>(row / kBlockM);
        qt = jump > qt ? jump : qt;
        const int64_t r0 = static_cast<int64_t>(qt) * kBlockM;
        const int64_t r1 = r0 + kBlockM < seq_q ? r0 + kBlockM : seq_q;
        int64_t mn = 0, mx = 0;
        rows_position_range(q_pos, r0, r1, &mn, &mx);
        const Visibility v = classify(mask, mn, mx, k_min, k_max, patterned);
        if (v != Visibility::kEmpty) return {hg, qt, v == Visibility::kFull ? 2 : 1};
        ++qt;
      }
    }
    return {group, 0, 0};
  }
};

}  // namespace ringattn::cuda::bwd

#undef RINGATTN_HD
