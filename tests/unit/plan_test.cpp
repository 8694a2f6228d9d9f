// The visibility module and the ring plan against brute force over the semantics' own text (attn/reference).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "attn/reference.hpp"
#include "plan/plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/mask.hpp"

namespace ringattn {
namespace {

struct MaskCase {
  std::string name;
  MaskSpec mask;
};

// Every pattern alone and combined, with and without causal and documents.
std::vector<MaskCase> mask_cases(int64_t seq_len) {
  std::vector<MaskCase> out;
  const std::vector<int64_t> docs = doc_offsets_from_lengths({seq_len / 4, seq_len / 8, seq_len / 2, seq_len / 8}, seq_len);
  for (int causal = 0; causal < 2; ++causal) {
    for (int with_docs = 0; with_docs < 2; ++with_docs) {
      for (int pattern = 0; pattern < 9; ++pattern) {
        MaskCase c;
        c.mask.causal = causal == 1;
        if (with_docs) c.mask.doc_offsets = docs;
        switch (pattern) {
          case 0: break;
          case 1: c.mask.has_window = true; c.mask.window_left = 5; c.mask.window_right = 0; break;
          case 2: c.mask.has_window = true; c.mask.window_left = 3; c.mask.window_right = 7; break;
          case 3: c.mask.has_window = true; c.mask.window_left = -1; c.mask.window_right = 2; break;
          case 4: c.mask.stride = 4; break;
          case 5: c.mask.global_tokens = 3; break;
          case 6: c.mask.has_window = true; c.mask.window_left = 4; c.mask.window_right = 4; c.mask.global_tokens = 2; break;
          case 7: c.mask.has_window = true; c.mask.window_left = 6; c.mask.window_right = 0; c.mask.stride = 5; break;
          case 8:  // patterns on the first heads only
            c.mask.has_window = true; c.mask.window_left = 2; c.mask.window_right = 2; c.mask.mask_heads = 2; break;
        }
        c.name = c.mask.describe();
        out.push_back(c);
      }
    }
  }
  return out;
}

constexpr int kHeads = 4;

TEST(Mask, VisibleEqualsTheSemanticsText) {
  const int64_t S = 64;
  for (const MaskCase& c : mask_cases(S)) {
    const Mask m = c.mask.view();
    for (int h = 0; h < kHeads; ++h) {
      for (int64_t i = 0; i < S; ++i) {
        for (int64_t j = 0; j < S; ++j) {
          ASSERT_EQ(visible(m, i, j, m.patterned_head(h)), reference_visible(c.mask, i, j, h))
              << c.name << " head " << h << " q " << i << " k " << j;
        }
      }
    }
  }
}

TEST(Mask, ClassifyIsSoundAndCountsAreExact) {
  const int64_t S = 64;
  std::mt19937 rng(7);
  std::uniform_int_distribution<int64_t> pos(0, S - 1);
  for (const MaskCase& c : mask_cases(S)) {
    const Mask m = c.mask.view();
    for (int h = 0; h < kHeads; ++h) {
      const bool pat = m.patterned_head(h);
      for (int64_t i = 0; i < S; ++i) {
        int64_t n = 0;
        for (int64_t j = 0; j < S; ++j) n += reference_visible(c.mask, i, j, h) ? 1 : 0;
        ASSERT_EQ(count_visible_keys(m, S, i, pat), n) << c.name << " head " << h << " q " << i;
      }
      for (int t = 0; t < 300; ++t) {
        int64_t q0 = pos(rng), q1 = pos(rng), k0 = pos(rng), k1 = pos(rng);
        if (q0 > q1) std::swap(q0, q1);
        if (k0 > k1) std::swap(k0, k1);
        if (t % 3 == 0) q1 = std::min(S - 1, q0 + t % 7);  // small tiles, where full and empty occur
        if (t % 3 == 0) k1 = std::min(S - 1, k0 + t % 5);
        int64_t vis = 0, total = 0;
        for (int64_t i = q0; i <= q1; ++i) {
          for (int64_t j = k0; j <= k1; ++j) {
            ++total;
            vis += reference_visible(c.mask, i, j, h) ? 1 : 0;
          }
        }
        const Visibility v = classify(m, q0, q1, k0, k1, pat);
        if (v == Visibility::kEmpty) ASSERT_EQ(vis, 0) << c.name << " box " << q0 << ".." << q1 << " x " << k0 << ".." << k1;
        if (v == Visibility::kFull) ASSERT_EQ(vis, total) << c.name << " box " << q0 << ".." << q1 << " x " << k0 << ".." << k1;
        int64_t lo = 0, hi = 0;
        key_bounds(m, S, q0, q1, pat, &lo, &hi);
        for (int64_t i = q0; i <= q1; ++i) {
          for (int64_t j = 0; j < S; ++j) {
            if (reference_visible(c.mask, i, j, h)) ASSERT_TRUE(j >= lo && j <= hi) << c.name << " key bound";
          }
        }
        query_bounds(m, S, k0, k1, pat, &lo, &hi);
        for (int64_t j = k0; j <= k1; ++j) {
          for (int64_t i = 0; i < S; ++i) {
            if (reference_visible(c.mask, i, j, h)) ASSERT_TRUE(i >= lo && i <= hi) << c.name << " query bound";
          }
        }
      }
    }
  }
}

AttentionSpec spec_of(const MaskSpec& mask, int64_t S, Layout layout) {
  AttentionSpec s;
  s.batch = 2;
  s.seq_len = S;
  s.heads = kHeads;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.dtype = DType::kF32;
  s.layout = layout;
  s.mask = mask;
  return s;
}

// Key positions not on r that some query of r sees under any head, from the semantics' text.
std::set<int64_t> truly_needed(const AttentionSpec& spec, const RankLayout& ranks, int r) {
  std::set<int64_t> mine, need;
  const ChunkPositions q = ranks.positions(r);
  for (int64_t i = 0; i < q.size(); ++i) mine.insert(q.at(i));
  for (int64_t i = 0; i < q.size(); ++i) {
    for (int64_t j = 0; j < spec.seq_len; ++j) {
      if (mine.count(j)) continue;
      for (int h = 0; h < spec.heads; ++h) {
        if (reference_visible(spec.mask, q.at(i), j, h)) {
          need.insert(j);
          break;
        }
      }
    }
  }
  return need;
}

// The plan never leaves out a row a reader needs (else results are wrong), and moves at most 1.25x
// the rows the readers need (forwarding included), for every layout, mask and ring of 1..4.
TEST(Plan, MovesEveryNeededRowAndAtMostAQuarterMore) {
  const int64_t S = 64;
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped, Layout::kAuto}) {
    for (int world = 1; world <= 4; ++world) {
      if (S % layout_divisor(layout, world) != 0) continue;
      for (const MaskCase& c : mask_cases(S)) {
        const AttentionSpec spec = spec_of(c.mask, S, layout);
        const RingPlan plan = plan_ring(spec, world, /*peer_exchange=*/true);
        int64_t needed = 0;
        for (int r = 0; r < world; ++r) {
          const std::set<int64_t> need = truly_needed(spec, plan.ranks, r);
          needed += static_cast<int64_t>(need.size());
          std::set<int64_t> planned;
          for (int s = 0; s < world; ++s) {
            const ChunkPositions owner = plan.ranks.positions(s);
            for (const RowRange& rr : plan.needed[r][s]) {
              for (int64_t i = rr.lo; i < rr.hi; ++i) planned.insert(owner.at(i));
            }
          }
          if (plan.route == Route::kRing) {  // every chunk visits every rank
            for (int64_t j = 0; j < S; ++j) planned.insert(j);
          }
          for (int64_t j : need) {
            ASSERT_TRUE(planned.count(j)) << c.name << " " << layout_name(layout) << " p=" << world << " rank " << r
                                          << " misses key " << j;
          }
        }
        EXPECT_LE(static_cast<double>(plan.rows_sent), 1.25 * static_cast<double>(needed))
            << c.name << " " << layout_name(layout) << " p=" << world << " route " << route_name(plan.route);
        double pairs = 0.0;
        for (double v : plan.visible_pairs) pairs += v;
        double want = 0.0;
        for (int64_t i = 0; i < S; ++i) {
          for (int64_t j = 0; j < S; ++j) {
            for (int h = 0; h < spec.heads; ++h) want += reference_visible(spec.mask, i, j, h) ? 1.0 : 0.0;
          }
        }
        EXPECT_EQ(pairs, want * spec.batch) << c.name;
      }
    }
  }
}

// The masks issue's example: causal --window 100,0, contiguous, p = 4 of 256 tokens moves the
// window's halo (264 rows: 64 + 100 + 100) instead of the ring's 3 x 256.
TEST(Plan, WindowMovesOnlyTheHalo) {
  MaskSpec m;
  m.causal = true;
  m.has_window = true;
  m.window_left = 100;
  m.window_right = 0;
  const AttentionSpec spec = spec_of(m, 256, Layout::kAuto);
  const RingPlan plan = plan_ring(spec, 4, true);
  EXPECT_EQ(plan.ranks.layout, Layout::kContiguous);
  EXPECT_EQ(plan.route, Route::kDirect);
  EXPECT_EQ(plan.rows_sent, 264);
  EXPECT_EQ(plan.hops, (std::vector<int>{1, 2}));
  // Without peer sends the plan is the ring, which moves every chunk everywhere.
  EXPECT_EQ(plan_ring(spec, 4, false).rows_sent, 3 * 256);
}

TEST(Plan, AutoLayout) {
  MaskSpec causal;
  causal.causal = true;
  EXPECT_EQ(spec_of(causal, 64, Layout::kAuto).resolved_layout(4), Layout::kZigzag);
  EXPECT_EQ(spec_of(causal, 68, Layout::kAuto).resolved_layout(4), Layout::kContiguous);  // 68 % 8 != 0
  MaskSpec window = causal;
  window.has_window = true;
  window.window_left = 7;
  window.window_right = 0;
  EXPECT_EQ(spec_of(window, 64, Layout::kAuto).resolved_layout(4), Layout::kContiguous);
  EXPECT_EQ(spec_of(MaskSpec{}, 64, Layout::kAuto).resolved_layout(4), Layout::kContiguous);
}

// Packed documents of log-normal lengths (mean 2K) over 64K tokens on 4 ranks: the balanced
// layout evens out visible pairs (max/mean <= 1.05) with equal tokens per rank.
TEST(Plan, BalancedLayoutEvensOutPackedDocuments) {
  const int64_t S = 64 * 1024;
  std::mt19937 rng(2026);
  std::lognormal_distribution<double> len(std::log(2048.0) - 0.5, 1.0);  // mean exp(mu + sigma^2 / 2) = 2048
  std::vector<int64_t> lengths;
  int64_t sum = 0;
  while (sum < S) {
    const int64_t l = std::min<int64_t>(S - sum, std::max<int64_t>(1, static_cast<int64_t>(len(rng))));
    lengths.push_back(l);
    sum += l;
  }
  MaskSpec m;
  m.causal = true;
  m.doc_offsets = doc_offsets_from_lengths(lengths, S);
  const AttentionSpec spec = spec_of(m, S, Layout::kBalanced);
  const RingPlan plan = plan_ring(spec, 4, true);
  double total = 0.0, most = 0.0;
  for (int r = 0; r < 4; ++r) {
    EXPECT_EQ(plan.ranks.positions(r).size(), S / 4);
    total += plan.visible_pairs[r];
    most = std::max(most, plan.visible_pairs[r]);
  }
  EXPECT_LE(most / (total / 4), 1.05);
  std::vector<bool> seen(S, false);  // every position on exactly one rank
  for (int r = 0; r < 4; ++r) {
    const ChunkPositions p = plan.ranks.positions(r);
    for (int64_t i = 0; i < p.size(); ++i) {
      ASSERT_FALSE(seen[p.at(i)]);
      seen[p.at(i)] = true;
    }
  }
  // The contiguous layout of the same problem is far less even (the reason for balanced).
  const RingPlan contiguous = plan_ring(spec_of(m, S, Layout::kContiguous), 4, true);
  double c_most = 0.0;
  for (double v : contiguous.visible_pairs) c_most = std::max(c_most, v);
  EXPECT_GT(c_most / (total / 4), most / (total / 4));
}

TEST(Mask, BadValuesNameTheFlag) {
  auto message = [](const MaskSpec& m) {
    try {
      m.validate(64, 8, 2);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  MaskSpec w;
  w.has_window = true;
  w.window_left = -2;
  EXPECT_NE(message(w).find("--window"), std::string::npos);
  MaskSpec s;
  s.stride = -1;
  EXPECT_NE(message(s).find("--stride"), std::string::npos);
  MaskSpec g;
  g.global_tokens = -3;
  EXPECT_NE(message(g).find("--global-tokens"), std::string::npos);
  MaskSpec h;
  h.mask_heads = 2;
  EXPECT_NE(message(h).find("without a pattern"), std::string::npos);
  h.stride = 3;
  h.mask_heads = 3;  // heads / kv_heads = 4
  EXPECT_NE(message(h).find("multiple"), std::string::npos);
  h.mask_heads = 12;
  EXPECT_NE(message(h).find("exceeds"), std::string::npos);
  EXPECT_THROW(doc_offsets_from_lengths({10, 0, 54}, 64), Error);
  EXPECT_THROW(doc_offsets_from_lengths({10, 20}, 64), Error);
  EXPECT_EQ(doc_offsets_from_lengths({10, 54}, 64), (std::vector<int64_t>{0, 10, 64}));
}

}  // namespace
}  // namespace ringattn
