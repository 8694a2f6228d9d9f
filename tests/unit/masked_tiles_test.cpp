// The kernels' tile bounds under any mask (flash_block.hpp, MaskedQTileWalk) against every pair's visibility from the semantics' text.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "attn/cuda/flash_block.hpp"
#include "attn/cuda/flash_bwd_walk.hpp"
#include "attn/reference.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"

namespace ringattn::cuda {
namespace {

constexpr int kBlockM = 64;   // backward query tile
constexpr int kBlockN = 128;  // key tile

// A random mask over `seq` positions: each pattern, documents, causal and mask_heads at random.
MaskSpec random_mask(std::mt19937_64& rng, int64_t seq, int heads) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  MaskSpec m;
  m.causal = uni(0, 1) == 1;
  if (uni(0, 1)) {
    m.has_window = true;
    m.window_left = uni(0, 3) == 0 ? -1 : uni(0, 300);
    m.window_right = uni(0, 3) == 0 ? -1 : uni(0, 300);
  }
  if (uni(0, 3) == 0) m.stride = uni(1, 100);
  if (uni(0, 3) == 0) m.global_tokens = uni(1, 40);
  if (m.has_pattern() && uni(0, 2) == 0) m.mask_heads = static_cast<int>(uni(1, heads));
  if (uni(0, 1)) {
    std::vector<int64_t> lengths;
    int64_t left = seq;
    while (left > 0) {
      const int64_t l = std::min(left, uni(1, 400));
      lengths.push_back(l);
      left -= l;
    }
    m.doc_offsets = doc_offsets_from_lengths(lengths, seq);
  }
  return m;
}

ChunkPositions random_positions(std::mt19937_64& rng, int64_t seq, int64_t* rows) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  ChunkPositions p;
  p.num_segments = static_cast<int>(uni(1, 2));
  int64_t n = 0;
  for (int s = 0; s < p.num_segments; ++s) {
    p.seg[s].stride = uni(1, 4);
    p.seg[s].count = uni(1, 400);
    p.seg[s].start = uni(0, std::max<int64_t>(0, seq - 1 - p.seg[s].stride * (p.seg[s].count - 1)));
    if (p.seg[s].start + p.seg[s].stride * (p.seg[s].count - 1) >= seq) p.seg[s].count = (seq - 1 - p.seg[s].start) / p.seg[s].stride + 1;
    n += p.seg[s].count;
  }
  *rows = n;
  return p;
}

// 0: no pair visible, 2: every pair, 1: some.
int exact_kind(const MaskSpec& m, int head, const ChunkPositions& q, int64_t q0, int64_t q1, const ChunkPositions& k,
               int64_t k0, int64_t k1) {
  bool any = false, all = true;
  for (int64_t i = q0; i < q1; ++i)
    for (int64_t j = k0; j < k1; ++j) {
      const bool v = reference_visible(m, q.at(i), k.at(j), head);
      any = any || v;
      all = all && v;
    }
  return any ? (all ? 2 : 1) : 0;
}

TEST(MaskedTiles, ForwardKeyTileScanSkipsOnlyEmptyTiles) {
  std::mt19937_64 rng(11);
  int skipped = 0, full = 0;
  for (int c = 0; c < 4000; ++c) {
    const int64_t seq = std::uniform_int_distribution<int64_t>(64, 3000)(rng);
    const int heads = 4;
    const MaskSpec spec = random_mask(rng, seq, heads);
    const Mask m = spec.view();
    int64_t sq = 0, sk = 0;
    const ChunkPositions q = random_positions(rng, seq, &sq), k = random_positions(rng, seq, &sk);
    const int head = static_cast<int>(rng() % heads);
    const bool patterned = m.patterned_head(head);
    const int64_t q0 = static_cast<int64_t>(rng() % sq), q1 = std::min<int64_t>(q0 + 1 + rng() % 32, sq);
    int64_t q_min = 0, q_max = 0, lo = 0, hi = 0;
    rows_position_range(q, q0, q1, &q_min, &q_max);
    key_hull(m, patterned, q_min, q_max, &lo, &hi);
    const int seq_k = static_cast<int>(sk);
    const int tiles = (seq_k + kBlockN - 1) / kBlockN;
    int next = next_visible_key_tile(m, patterned, k, 0, kBlockN, seq_k, q_min, q_max, lo, hi);
    for (int t = 0; t < tiles; ++t) {
      const int64_t k0 = static_cast<int64_t>(t) * kBlockN, k1 = std::min<int64_t>(k0 + kBlockN, sk);
      const int want = exact_kind(spec, head, q, q0, q1, k, k0, k1);
      const std::string what = "case " + std::to_string(c) + " " + spec.describe() + " tile " + std::to_string(t);
      if (t < next) {
        ASSERT_EQ(want, 0) << what << ": skipped a visible tile";
        ++skipped;
        continue;
      }
      ASSERT_EQ(t, next) << what;
      if (classify_key_rows(m, patterned, q_min, q_max, k, k0, k1) == Visibility::kFull) {
        ASSERT_EQ(want, 2) << what << ": classified full, not every pair is visible";
        ++full;
      }
      next = next_visible_key_tile(m, patterned, k, t + 1, kBlockN, seq_k, q_min, q_max, lo, hi);
    }
    ASSERT_EQ(next, tiles);
  }
  EXPECT_GT(skipped, 1000);
  EXPECT_GT(full, 100);
}

TEST(MaskedTiles, BackwardWalkVisitsEveryVisibleQueryTile) {
  std::mt19937_64 rng(12);
  int skipped = 0, full = 0;
  for (int c = 0; c < 4000; ++c) {
    const int64_t seq = std::uniform_int_distribution<int64_t>(64, 3000)(rng);
    const int heads = 4, group = static_cast<int>(1 + rng() % 2), kv_heads = heads / group;
    MaskSpec spec = random_mask(rng, seq, heads);
    if (spec.mask_heads % group != 0) spec.mask_heads = 0;
    const Mask m = spec.view();
    int64_t sq = 0, sk = 0;
    const ChunkPositions q = random_positions(rng, seq, &sq), k = random_positions(rng, seq, &sk);
    const int hkv = static_cast<int>(rng() % kv_heads);
    const int64_t k0 = static_cast<int64_t>(rng() % sk), k1 = std::min<int64_t>(k0 + 1 + rng() % 32, sk);
    int64_t k_min = 0, k_max = 0;
    rows_position_range(k, k0, k1, &k_min, &k_max);
    const int seq_q = static_cast<int>(sq), tiles = (seq_q + kBlockM - 1) / kBlockM;
    const bwd::MaskedQTileWalk<kBlockM> walk{m, q, seq_q, tiles, group, hkv * group, k_min, k_max};
    bwd::QTile cur = walk.first();
    for (int hg = 0; hg < group; ++hg) {
      for (int t = 0; t < tiles; ++t) {
        const int64_t r0 = static_cast<int64_t>(t) * kBlockM, r1 = std::min<int64_t>(r0 + kBlockM, sq);
        const int want = exact_kind(spec, hkv * group + hg, q, r0, r1, k, k0, k1);
        const std::string what = "case " + std::to_string(c) + " " + spec.describe() + " head " + std::to_string(hg) +
                                 " tile " + std::to_string(t);
        const bool walked = !walk.done(cur) && cur.hg == hg && cur.qt == t;
        if (!walked) {
          ASSERT_EQ(want, 0) << what << ": skipped a visible tile";
          ++skipped;
          continue;
        }
        ASSERT_NE(cur.kind, 0) << what;
        if (cur.kind == 2) {
          ASSERT_EQ(want, 2) << what << ": walked as full, not every pair is visible";
          ++full;
        }
        cur = walk.after(cur);
      }
    }
    ASSERT_TRUE(walk.done(cur)) << "case " << c << ": the walk goes on past the last tile";
  }
  EXPECT_GT(skipped, 1000);
  EXPECT_GT(full, 100);
}

// first_row_in against a scan of the rows.
TEST(MaskedTiles, FirstRowInHullMatchesAScan) {
  std::mt19937_64 rng(13);
  for (int c = 0; c < 20000; ++c) {
    int64_t n = 0;
    const ChunkPositions p = random_positions(rng, 4000, &n);
    const int64_t from = static_cast<int64_t>(rng() % (n + 1));
    const int64_t lo = static_cast<int64_t>(rng() % 4200) - 100, hi = lo + static_cast<int64_t>(rng() % 600) - 50;
    int64_t want = n;
    for (int64_t i = from; i < n; ++i)
      if (p.at(i) >= lo && p.at(i) <= hi) {
        want = i;
        break;
      }
    ASSERT_EQ(first_row_in(p, from, lo, hi), want) << "case " << c;
  }
}

}  // namespace
}  // namespace ringattn::cuda
