// Review of the masks issue (17): randomised properties of the visibility module and the ring plan
// against the semantics' own text (attn/reference), beyond the fixed cases of plan_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "attn/reference.hpp"
#include "plan/plan.hpp"
#include "ringattn/mask.hpp"

namespace ringattn {
namespace {

// A random mask over S positions for `heads` query heads of `kv_heads` kv heads.
MaskSpec random_mask(std::mt19937_64& rng, int64_t S, int heads, int kv_heads) {
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  MaskSpec m;
  m.causal = coin(0.5);
  if (coin(0.4)) {
    std::vector<int64_t> lengths;
    int64_t left = S;
    while (left > 0) {
      const int64_t l = std::min(left, pick(1, std::max<int64_t>(1, S / 3)));
      lengths.push_back(l);
      left -= l;
    }
    m.doc_offsets = doc_offsets_from_lengths(lengths, S);
  }
  if (coin(0.6)) {
    m.has_window = true;
    m.window_left = coin(0.2) ? -1 : pick(0, S / 3);
    m.window_right = coin(0.2) ? -1 : (coin(0.4) ? 0 : pick(0, S / 3));
  }
  if (coin(0.3)) m.stride = pick(1, S);
  if (coin(0.3)) m.global_tokens = pick(1, 6);
  if (m.has_pattern() && coin(0.3)) {
    const int group = heads / kv_heads;
    const int kinds = heads / group;  // multiples of group below heads
    if (kinds > 1) m.mask_heads = group * static_cast<int>(pick(1, kinds - 1));
  }
  return m;
}

AttentionSpec spec_of(const MaskSpec& mask, int64_t S, Layout layout) {
  AttentionSpec s;
  s.batch = 2;
  s.seq_len = S;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 8;
  s.dtype = DType::kF32;
  s.layout = layout;
  s.mask = mask;
  return s;
}

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

// classify on random boxes (incl. strided subsets, the kernels' tiles), the bounds and the
// counts, for random masks. `offset` shifts every position (large offsets: 16M-token sequences).
void check_module(const MaskSpec& spec_mask, int64_t S, int heads, std::mt19937_64& rng, const std::string& name) {
  const Mask m = spec_mask.view();
  std::uniform_int_distribution<int64_t> pos(0, S - 1);
  for (int h = 0; h < heads; ++h) {
    const bool pat = m.patterned_head(h);
    for (int64_t i = 0; i < S; ++i) {
      int64_t n = 0;
      for (int64_t j = 0; j < S; ++j) {
        const bool ref = reference_visible(spec_mask, i, j, h);
        ASSERT_EQ(visible(m, i, j, pat), ref) << name << " head " << h << " q " << i << " k " << j;
        n += ref ? 1 : 0;
      }
      ASSERT_EQ(count_visible_keys(m, S, i, pat), n) << name << " head " << h << " q " << i;
    }
    for (int t = 0; t < 200; ++t) {
      int64_t q0 = pos(rng), q1 = pos(rng), k0 = pos(rng), k1 = pos(rng);
      if (q0 > q1) std::swap(q0, q1);
      if (k0 > k1) std::swap(k0, k1);
      if (t % 2 == 0) q1 = std::min(S - 1, q0 + t % 9);
      if (t % 2 == 0) k1 = std::min(S - 1, k0 + t % 11);
      int64_t vis = 0, total = 0;
      for (int64_t i = q0; i <= q1; ++i) {
        for (int64_t j = k0; j <= k1; ++j) {
          ++total;
          vis += reference_visible(spec_mask, i, j, h) ? 1 : 0;
        }
      }
      const Visibility v = classify(m, q0, q1, k0, k1, pat);
      const std::string box = name + " head " + std::to_string(h) + " box " + std::to_string(q0) + ".." +
                              std::to_string(q1) + " x " + std::to_string(k0) + ".." + std::to_string(k1);
      if (v == Visibility::kEmpty) ASSERT_EQ(vis, 0) << box;
      if (v == Visibility::kFull) ASSERT_EQ(vis, total) << box;
      int64_t lo = 0, hi = 0;
      key_bounds(m, S, q0, q1, pat, &lo, &hi);
      for (int64_t i = q0; i <= q1; ++i) {
        for (int64_t j = 0; j < S; ++j) {
          if (reference_visible(spec_mask, i, j, h)) ASSERT_TRUE(j >= lo && j <= hi) << box << " key bound";
        }
      }
      query_bounds(m, S, k0, k1, pat, &lo, &hi);
      for (int64_t j = k0; j <= k1; ++j) {
        for (int64_t i = 0; i < S; ++i) {
          if (reference_visible(spec_mask, i, j, h)) ASSERT_TRUE(i >= lo && i <= hi) << box << " query bound";
        }
      }
    }
  }
}

TEST(ReviewMask, RandomMasksModuleEqualsTheText) {
  std::mt19937_64 rng(17);
  for (int trial = 0; trial < 150; ++trial) {
    const int64_t S = std::uniform_int_distribution<int64_t>(8, 72)(rng);
    const MaskSpec m = random_mask(rng, S, 4, 2);
    check_module(m, S, 4, rng, "trial " + std::to_string(trial) + " S=" + std::to_string(S) + " " + m.describe());
    if (HasFatalFailure()) return;
  }
}

// Near 2^24 (16M tokens) and 2^40: the module's box rule at large positions equals the text.
TEST(ReviewMask, LargePositions) {
  for (int64_t base : {int64_t{1} << 24, int64_t{1} << 40}) {
    MaskSpec ms;
    ms.causal = true;
    ms.has_window = true;
    ms.window_left = -1;
    ms.window_right = 3;
    ms.stride = 4096;
    ms.global_tokens = 5;
    ms.doc_offsets = {0, base - 7, base + 50, base + 100};
    const Mask m = ms.view();
    const int64_t S = base + 100;
    for (int64_t q0 = base - 20; q0 < base + 60; q0 += 7) {
      for (int64_t k0 = base - 20; k0 < base + 60; k0 += 5) {
        const int64_t q1 = q0 + 6, k1 = k0 + 4;
        int64_t vis = 0, total = 0;
        for (int64_t i = q0; i <= q1; ++i) {
          for (int64_t j = k0; j <= k1; ++j) {
            ++total;
            const bool ref = reference_visible(ms, i, j, 0);
            ASSERT_EQ(visible(m, i, j, true), ref) << i << " " << j;
            vis += ref;
          }
        }
        const Visibility v = classify(m, q0, q1, k0, k1, true);
        if (v == Visibility::kEmpty) ASSERT_EQ(vis, 0);
        if (v == Visibility::kFull) ASSERT_EQ(vis, total);
      }
      int64_t n = 0;
      for (int64_t j = base - 7; j <= q0; ++j) n += reference_visible(ms, q0, j, 0);
      if (q0 >= base - 7) ASSERT_EQ(count_visible_keys(m, S, q0, true), n) << q0;
    }
  }
}

// A window side of INT64_MAX (or any side >= seq_len) means "reaches every key on that side":
// validate() accepts it, but q + window_right overflows int64 in visible(), classify(),
// key_bounds(), count_visible_keys() and the plan (signed overflow, UB; in practice a negative
// bound, so the window sees nothing to the right and not even the query itself).
TEST(ReviewMask, HugeWindowSideActsAsUnbounded) {
  const int64_t S = 32;
  MaskSpec huge;
  huge.has_window = true;
  huge.window_left = 2;
  huge.window_right = std::numeric_limits<int64_t>::max();
  EXPECT_NO_THROW(huge.validate(S, 4, 2));
  MaskSpec unbounded = huge;
  unbounded.window_right = -1;
  const Mask mh = huge.view(), mu = unbounded.view();
  for (int64_t i = 0; i < S; ++i) {
    EXPECT_EQ(count_visible_keys(mh, S, i, true), count_visible_keys(mu, S, i, true)) << "q " << i;
    for (int64_t j = 0; j < S; ++j) {
      ASSERT_EQ(visible(mh, i, j, true), visible(mu, i, j, true)) << "q " << i << " k " << j;
    }
  }
}

// A stride of INT64_MAX (only the diagonal, legal per validate): holds_multiple overflows.
TEST(ReviewMask, HugeStrideClassify) {
  const int64_t S = 32;
  MaskSpec st;
  st.stride = std::numeric_limits<int64_t>::max();
  EXPECT_NO_THROW(st.validate(S, 4, 2));
  EXPECT_NE(classify(st.view(), 5, 5, 3, 3, true), Visibility::kFull);  // q - k = 2: no multiple
  EXPECT_EQ(classify(st.view(), 5, 5, 5, 5, true), Visibility::kFull);
}

// The plan's needed rows are a superset of what each reader's queries see, for random masks,
// every fixed layout and auto, 1..6 ranks; the balanced layout on 1..3 ranks.
TEST(ReviewPlan, RandomMasksNeededRowsAreASuperset) {
  std::mt19937_64 rng(23);
  for (int trial = 0; trial < 250; ++trial) {
    const int world = std::uniform_int_distribution<int>(1, 6)(rng);
    const Layout layouts[] = {Layout::kContiguous, Layout::kZigzag, Layout::kStriped, Layout::kAuto, Layout::kBalanced};
    const Layout layout = layouts[std::uniform_int_distribution<int>(0, trial % 10 == 0 ? 4 : 3)(rng)];
    if (layout == Layout::kBalanced && world > 3) continue;
    const int64_t div = layout_divisor(layout, world) * (layout == Layout::kBalanced ? 1 : 2 * world);
    const int64_t S = layout == Layout::kBalanced ? div : div * std::uniform_int_distribution<int64_t>(1, 4)(rng);
    if (S > 400) continue;
    const AttentionSpec spec = spec_of(random_mask(rng, S, 4, 2), S, layout);
    const RingPlan plan = plan_ring(spec, world, true);
    const std::string name = "trial " + std::to_string(trial) + " " + layout_name(layout) + " p=" +
                             std::to_string(world) + " S=" + std::to_string(S) + " " + spec.mask.describe();
    for (int r = 0; r < world; ++r) {
      const std::set<int64_t> need = truly_needed(spec, plan.ranks, r);
      std::set<int64_t> planned;
      for (int s = 0; s < world; ++s) {
        const ChunkPositions owner = plan.ranks.positions(s);
        for (const RowRange& rr : plan.needed[r][s]) {
          for (int64_t i = rr.lo; i < rr.hi; ++i) planned.insert(owner.at(i));
        }
      }
      for (int64_t j : need) ASSERT_TRUE(planned.count(j)) << name << " rank " << r << " misses key " << j;
    }
  }
}

int64_t true_rows(const AttentionSpec& spec, const RingPlan& plan) {
  int64_t n = 0;
  for (int r = 0; r < plan.world; ++r) n += static_cast<int64_t>(truly_needed(spec, plan.ranks, r).size());
  return n;
}

// The bound: K+V rows sent per forward <= 1.25 x the rows the readers truly need (from
// the semantics), at p <= 4 for contiguous, zigzag and striped. Two mask families break it:
// a window narrower than the ring on the striped layout (the plan takes the hull [a - left,
// b + right] of a strided query run, i.e. every row of every rank), and a stride larger than a
// contiguous chunk (keys_of_run takes the whole document when gcd(step, stride) = 1).
TEST(ReviewPlan, StripedNarrowWindowMovesAtMostAQuarterMore) {
  for (int64_t left : {0, 1}) {
    MaskSpec m;
    m.causal = true;
    m.has_window = true;
    m.window_left = left;  // 0: the query itself only: nothing travels
    m.window_right = 0;
    const AttentionSpec spec = spec_of(m, 64, Layout::kStriped);
    const RingPlan plan = plan_ring(spec, 4, true);
    const int64_t need = true_rows(spec, plan);
    EXPECT_LE(static_cast<double>(plan.rows_sent), 1.25 * static_cast<double>(need))
        << m.describe() << " striped p=4: sent " << plan.rows_sent << " rows, needed " << need << ", route "
        << route_name(plan.route);
  }
}

TEST(ReviewPlan, ContiguousStrideLongerThanAChunkMovesAtMostAQuarterMore) {
  MaskSpec m;
  m.causal = true;
  m.stride = 32;
  const AttentionSpec spec = spec_of(m, 64, Layout::kContiguous);
  const RingPlan plan = plan_ring(spec, 4, true);
  const int64_t need = true_rows(spec, plan);
  EXPECT_LE(static_cast<double>(plan.rows_sent), 1.25 * static_cast<double>(need))
      << m.describe() << " contiguous p=4: sent " << plan.rows_sent << " rows, needed " << need << ", route "
      << route_name(plan.route);
}

}  // namespace
}  // namespace ringattn
