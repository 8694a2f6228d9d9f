// The backward kernels' query-tile walk (flash_bwd_walk.hpp) against tile kinds from every row's position.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "attn/cuda/flash_bwd_walk.hpp"
#include "ringattn/layout.hpp"

namespace ringattn::cuda::bwd {
namespace {

constexpr int kBlockM = 64;   // query rows per tile (the kernels' tile)
constexpr int kBlockN = 128;  // key rows per block
constexpr Layout kLayouts[] = {Layout::kContiguous, Layout::kZigzag, Layout::kStriped};

struct Range {
  int64_t lo, hi;
};
Range positions_of(const ChunkPositions& pos, int64_t first, int64_t end) {
  Range r{INT64_MAX, INT64_MIN};
  for (int64_t i = first; i < end; ++i) {
    r.lo = std::min(r.lo, pos.at(i));
    r.hi = std::max(r.hi, pos.at(i));
  }
  return r;
}

// Kind of query tile qt for keys [k.lo, k.hi] from every row: 0 empty, 1 partial, 2 full.
int exact_kind(const ChunkPositions& q_pos, int seq_q, int qt, Range k, bool causal) {
  if (!causal) return 2;
  const Range q = positions_of(q_pos, static_cast<int64_t>(qt) * kBlockM, std::min<int64_t>((qt + 1) * kBlockM, seq_q));
  if (k.lo > q.hi) return 0;
  return k.hi <= q.lo ? 2 : 1;
}

// The walk of one block equals the tiles of nonzero kind from every row (a short last tile that no
// row of sees the keys may be walked as partial); returns the partial tiles met.
int expect_walk(const ChunkPositions& q_pos, Range k, bool causal, int group, const std::string& what) {
  const int seq_q = static_cast<int>(q_pos.size());
  const int num_q_tiles = (seq_q + kBlockM - 1) / kBlockM;
  const QTileBounds bd = q_tile_bounds<kBlockM>(q_pos, seq_q, causal, k.lo, k.hi);
  const QTileWalk walk{bd, num_q_tiles, group};
  std::vector<QTile> want;
  int partial = 0;
  for (int hg = 0; hg < group; ++hg) {
    for (int qt = 0; qt < num_q_tiles; ++qt) {
      const int kd = exact_kind(q_pos, seq_q, qt, k, causal);
      const bool short_last = qt == num_q_tiles - 1 && seq_q % kBlockM != 0;
      const int walked = kd == 0 && short_last && walk.kind(qt) == 1 ? 1 : kd;
      if (walked != 0) want.push_back({hg, qt, walked});
      partial += kd == 1;
    }
  }
  std::vector<QTile> got;
  for (QTile c = walk.first(); !walk.done(c); c = walk.after(c, causal)) {
    got.push_back(c);
    if (got.size() > static_cast<size_t>(group * num_q_tiles)) {
      ADD_FAILURE() << what << ": the walk does not end";
      return partial;
    }
  }
  EXPECT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < std::min(got.size(), want.size()); ++i) {
    EXPECT_TRUE(got[i].hg == want[i].hg && got[i].qt == want[i].qt && got[i].kind == want[i].kind)
        << what << ": step " << i << " walked (head " << got[i].hg << ", tile " << got[i].qt << ", kind "
        << got[i].kind << "), want (" << want[i].hg << ", " << want[i].qt << ", " << want[i].kind << ")";
  }
  return partial;
}

TEST(BwdWalk, RandomSegmentsAndKeyRanges) {
  std::mt19937_64 rng(7);
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  int partial_tiles = 0;
  for (int c = 0; c < 20000; ++c) {
    ChunkPositions q;
    q.num_segments = static_cast<int>(uni(1, 2));
    for (int s = 0; s < q.num_segments; ++s) {
      q.seg[s].start = uni(0, 2000);
      q.seg[s].stride = uni(1, 4);
      q.seg[s].count = uni(1, 300);
    }
    const int64_t k_lo = uni(-100, 3000);
    const Range k{k_lo, k_lo + uni(0, 4 * kBlockN)};
    partial_tiles += expect_walk(q, k, uni(0, 3) != 0, static_cast<int>(uni(1, 2)), "case " + std::to_string(c));
    if (HasFailure()) return;
  }
  EXPECT_GT(partial_tiles, 1000);
}

TEST(BwdWalk, EveryLayoutRankPairAndKeyTile) {
  int checked_blocks = 0, partial_tiles = 0;
  for (Layout layout : kLayouts) {
    for (int world = 1; world <= 4; ++world) {
      // Chunks from under one tile to many, multiples of the tile and not.
      for (int64_t mult : {1, 3, 37, 64, 101}) {
        const int64_t seq = layout_divisor(layout, world) * mult;
        for (bool causal : {false, true}) {
          for (int qr = 0; qr < world; ++qr) {
            const ChunkPositions q_pos = chunk_positions(layout, seq, qr, world);
            for (int kr = 0; kr < world; ++kr) {
              const ChunkPositions k_pos = chunk_positions(layout, seq, kr, world);
              for (int64_t k0 = 0; k0 < k_pos.size(); k0 += kBlockN) {
                const Range k = positions_of(k_pos, k0, std::min<int64_t>(k0 + kBlockN, k_pos.size()));
                const std::string what = std::string(layout_name(layout)) + " p=" + std::to_string(world) +
                                         " seq=" + std::to_string(seq) + " causal=" + std::to_string(causal) +
                                         " ranks " + std::to_string(qr) + "/" + std::to_string(kr) +
                                         " k0=" + std::to_string(k0);
                partial_tiles += expect_walk(q_pos, k, causal, 3, what);
                if (HasFailure()) return;
                ++checked_blocks;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(checked_blocks, 500);
  EXPECT_GT(partial_tiles, 100);  // the mask boundary was exercised
}

}  // namespace
}  // namespace ringattn::cuda::bwd
