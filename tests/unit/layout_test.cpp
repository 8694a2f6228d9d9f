// Layouts: positions cover the sequence once, shard/unshard round trips, tile classification vs brute force.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "ringattn/layout.hpp"

namespace ringattn {
namespace {

constexpr Layout kLayouts[] = {Layout::kContiguous, Layout::kZigzag, Layout::kStriped};

TEST(Layout, EveryPositionOwnedByExactlyOneRank) {
  for (Layout layout : kLayouts) {
    for (int world = 1; world <= 6; ++world) {
      const int64_t seq = layout_divisor(layout, world) * 5;
      std::vector<int> owner(seq, -1);
      for (int r = 0; r < world; ++r) {
        const ChunkPositions p = chunk_positions(layout, seq, r, world);
        ASSERT_EQ(p.size(), seq / world);
        for (int64_t i = 0; i < p.size(); ++i) {
          const int64_t g = p.at(i);
          ASSERT_GE(g, 0);
          ASSERT_LT(g, seq);
          ASSERT_EQ(owner[g], -1) << layout_name(layout) << " world " << world << " position " << g;
          owner[g] = r;
        }
      }
      for (int64_t g = 0; g < seq; ++g) ASSERT_GE(owner[g], 0);
    }
  }
}

TEST(Layout, KnownShapes) {
  // zigzag on 4 ranks, 16 tokens: 8 pieces of 2; rank 1 owns pieces 1 and 6.
  const ChunkPositions z = chunk_positions(Layout::kZigzag, 16, 1, 4);
  std::vector<int64_t> got;
  for (int64_t i = 0; i < z.size(); ++i) got.push_back(z.at(i));
  EXPECT_EQ(got, (std::vector<int64_t>{2, 3, 12, 13}));
  const ChunkPositions s = chunk_positions(Layout::kStriped, 12, 2, 4);
  got.clear();
  for (int64_t i = 0; i < s.size(); ++i) got.push_back(s.at(i));
  EXPECT_EQ(got, (std::vector<int64_t>{2, 6, 10}));
  const ChunkPositions c = chunk_positions(Layout::kContiguous, 12, 2, 3);
  EXPECT_EQ(c.at(0), 8);
  EXPECT_EQ(c.at(3), 11);
}

TEST(Layout, MinMaxInMatchBruteForce) {
  for (Layout layout : kLayouts) {
    const int world = 3;
    const int64_t seq = 36;
    for (int r = 0; r < world; ++r) {
      const ChunkPositions p = chunk_positions(layout, seq, r, world);
      for (int64_t lo = 0; lo < p.size(); ++lo) {
        for (int64_t hi = lo + 1; hi <= p.size(); ++hi) {
          int64_t mn = INT64_MAX, mx = INT64_MIN;
          for (int64_t i = lo; i < hi; ++i) {
            mn = std::min(mn, p.at(i));
            mx = std::max(mx, p.at(i));
          }
          ASSERT_EQ(p.min_in(lo, hi), mn);
          ASSERT_EQ(p.max_in(lo, hi), mx);
        }
      }
    }
  }
}

// shard then unshard on every rank rebuilds the global tensor, for (B,S,H,D) and (B,H,S) tensors.
TEST(Layout, ShardUnshardRoundTripEveryLayoutAndWorld) {
  for (Layout layout : kLayouts) {
    for (int world : {1, 2, 3, 4, 5}) {
      const int64_t B = 2, H = 3, D = 5, S = layout_divisor(layout, world) * 3;
      std::vector<float> global(B * S * H * D), rebuilt(global.size(), -1.0f);
      std::iota(global.begin(), global.end(), 0.0f);
      std::vector<double> lse(B * H * S), lse_rebuilt(lse.size(), -1.0);
      std::iota(lse.begin(), lse.end(), 0.5);
      const TensorView g = make_view(global.data(), DType::kF32, Device::kHost, {B, S, H, D});
      const TensorView gr = make_view(rebuilt.data(), DType::kF32, Device::kHost, {B, S, H, D});
      const TensorView l = make_view(lse.data(), DType::kF64, Device::kHost, {B, H, S});
      const TensorView lr = make_view(lse_rebuilt.data(), DType::kF64, Device::kHost, {B, H, S});
      for (int r = 0; r < world; ++r) {
        const ChunkPositions p = chunk_positions(layout, S, r, world);
        const int64_t c = p.size();
        std::vector<float> local(B * c * H * D);
        std::vector<double> local_lse(B * H * c);
        const TensorView lv = make_view(local.data(), DType::kF32, Device::kHost, {B, c, H, D});
        const TensorView llv = make_view(local_lse.data(), DType::kF64, Device::kHost, {B, H, c});
        shard_rows(g, lv, p, 1);
        shard_rows(l, llv, p, 2);
        // Local row i of batch b is global row p.at(i).
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = 0; i < c; ++i) {
            ASSERT_EQ(local[((b * c + i) * H) * D], global[((b * S + p.at(i)) * H) * D]);
            ASSERT_EQ(local_lse[(b * H + 1) * c + i], lse[(b * H + 1) * S + p.at(i)]);
          }
        }
        unshard_rows(lv, gr, p, 1);
        unshard_rows(llv, lr, p, 2);
      }
      ASSERT_EQ(rebuilt, global) << layout_name(layout) << " world " << world;
      ASSERT_EQ(lse_rebuilt, lse) << layout_name(layout) << " world " << world;
    }
  }
}

Visibility brute_force(const ChunkPositions& q, int64_t q_lo, int64_t q_hi, const ChunkPositions& k, int64_t k_lo,
                       int64_t k_hi, bool causal) {
  if (q_lo >= q_hi || k_lo >= k_hi) return Visibility::kEmpty;
  int64_t visible = 0, total = 0;
  for (int64_t i = q_lo; i < q_hi; ++i) {
    for (int64_t j = k_lo; j < k_hi; ++j) {
      ++total;
      if (!causal || k.at(j) <= q.at(i)) ++visible;
    }
  }
  if (visible == 0) return Visibility::kEmpty;
  return visible == total ? Visibility::kFull : Visibility::kPartial;
}

// Min/max positions decide exactly: a tile is empty iff its smallest key is after its largest
// query, full iff its largest key is at or before its smallest query. So classification must
// equal brute force over all position pairs, for every layout, tile and rank pair.
TEST(Layout, TileClassificationAgreesWithBruteForce) {
  std::mt19937 rng(42);
  for (Layout layout : kLayouts) {
    for (int world : {1, 2, 3, 4}) {
      const int64_t S = layout_divisor(layout, world) * 4;
      for (int qr = 0; qr < world; ++qr) {
        for (int kr = 0; kr < world; ++kr) {
          const ChunkPositions q = chunk_positions(layout, S, qr, world);
          const ChunkPositions k = chunk_positions(layout, S, kr, world);
          for (bool causal : {false, true}) {
            ASSERT_EQ(classify_chunks(q, k, causal), brute_force(q, 0, q.size(), k, 0, k.size(), causal));
            for (int t = 0; t < 60; ++t) {
              std::uniform_int_distribution<int64_t> d(0, q.size());
              int64_t a = d(rng), b = d(rng), c = d(rng), e = d(rng);
              if (a > b) std::swap(a, b);
              if (c > e) std::swap(c, e);
              Mask m;
              m.causal = causal;
              ASSERT_EQ(classify_tile(m, false, q, a, b, k, c, e), brute_force(q, a, b, k, c, e, causal))
                  << layout_name(layout) << " world " << world << " q rows [" << a << "," << b << ") k rows [" << c
                  << "," << e << ") causal " << causal;
            }
          }
        }
      }
    }
  }
}

TEST(Layout, CausalContiguousHidesLaterRanksEntirely) {
  const ChunkPositions r0 = chunk_positions(Layout::kContiguous, 64, 0, 4);
  const ChunkPositions r3 = chunk_positions(Layout::kContiguous, 64, 3, 4);
  EXPECT_EQ(classify_chunks(r0, r3, true), Visibility::kEmpty);
  EXPECT_EQ(classify_chunks(r3, r0, true), Visibility::kFull);
  EXPECT_EQ(classify_chunks(r0, r0, true), Visibility::kPartial);
  EXPECT_EQ(classify_chunks(r0, r3, false), Visibility::kFull);
}

}  // namespace
}  // namespace ringattn
