// The ring plan: rank layouts (auto, balanced), the K/V rows each reader needs from each owner, route and hops.
#include "plan/plan.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <queue>
#include <string>

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

// RINGATTN_PLAN_ROUTE=ring|direct forces a route where the transport allows it (timing only).
constexpr const char* kRouteEnv = "RINGATTN_PLAN_ROUTE";
// The ring is kept while it moves at most this many times the rows the readers need: it is the
// tuned path (copy engines, folds beside the compute) and needs no gathers.
constexpr double kRingSlack = 1.25;
// A run shorter than the stride needs shifted copies of itself; beyond this many per run the plan
// takes the run's whole document instead (a superset, and a bounded plan).
constexpr int64_t kMaxStrideCopies = 4096;

// A closed interval of global positions; with mod > 1 only the positions = res (mod mod).
struct Span {
  int64_t lo, hi;
  int64_t mod = 1, res = 0;
};

void merge_spans(std::vector<Span>& v) {
  std::sort(v.begin(), v.end(), [](const Span& a, const Span& b) {
    return a.mod != b.mod ? a.mod < b.mod : a.res != b.res ? a.res < b.res : a.lo < b.lo;
  });
  std::vector<Span> out;
  for (const Span& s : v) {
    if (s.lo > s.hi) continue;
    if (!out.empty() && out.back().mod == s.mod && out.back().res == s.res && s.lo <= out.back().hi + 1) {
      out.back().hi = std::max(out.back().hi, s.hi);
    } else {
      out.push_back(s);
    }
  }
  v.swap(out);
}

// Keys some query of the run [a, b] (positions a, a + step, ..., all in one document [ds, de))
// may see, for one head kind. A superset where per-query sets have gaps (strided runs, the
// strided pattern); exact for contiguous runs under window, documents, causal and global.
void keys_of_run(const Mask& m, int64_t a, int64_t b, int64_t step, int64_t ds, int64_t de, bool patterned,
                 std::vector<Span>& out) {
  const int64_t base_hi = m.causal ? std::min(b, de - 1) : de - 1;
  if (!patterned || !m.has_pattern()) {
    out.push_back({ds, base_hi});
    return;
  }
  if (m.has_window) {
    const int64_t lo = m.window_left < 0 ? ds : std::max(ds, a - m.window_left);
    const int64_t hi = m.window_right < 0 ? base_hi : std::min(base_hi, b + m.window_right);
    const bool bounded = m.window_left >= 0 && m.window_right >= 0;
    if (step > 1 && bounded && m.window_left + m.window_right + 1 < step && b > a) {
      // A strided run whose windows leave gaps (a narrow window on the striped layout): the keys
      // are the residues a + o (mod step) for the offsets o of the window, not the hull.
      for (int64_t o = -m.window_left; o <= m.window_right; ++o) out.push_back({lo, hi, step, ((a + o) % step + step) % step});
    } else {
      out.push_back({lo, hi});
    }
  }
  if (m.stride > 0) {
    // Queries a, a + step, ... reach the residues a + k gcd(step, stride) (mod stride) once the run
    // is long enough; their keys are the positions of those residues.
    const int64_t d = std::gcd(step, m.stride);
    const int64_t members = (b - a) / step + 1;
    const bool all_residues = members >= m.stride / d;
    if (d > 1 && all_residues) {
      out.push_back({ds, base_hi, d, ((a % d) + d) % d});
    } else if (!all_residues && step == 1 && (base_hi - ds) / m.stride < kMaxStrideCopies) {
      // A contiguous run shorter than the stride: its keys are the run shifted by multiples of
      // the stride (the copies before it when causal), clipped to the document.
      const int64_t c_lo = -((a - ds) / m.stride) - 1, c_hi = (de - 1 - a) / m.stride + 1;
      for (int64_t c = c_lo; c <= c_hi; ++c) {
        const int64_t lo = std::max(ds, a + c * m.stride), hi = std::min(base_hi, b + c * m.stride);
        if (lo <= hi) out.push_back({lo, hi});
      }
    } else {
      out.push_back({ds, base_hi});
    }
  }
  if (m.global_tokens > 0) {
    out.push_back({ds, std::min(base_hi, ds + m.global_tokens - 1)});  // the document's global keys
    if (a - ds < m.global_tokens) {  // global queries see their whole document (up to themselves when causal)
      const int64_t last_global_q = std::min(b, ds + m.global_tokens - 1);
      out.push_back({ds, m.causal ? std::min(last_global_q, de - 1) : de - 1});
    }
  }
}

// Every key position some query of `rank_segments` sees under some of `heads` heads, merged.
std::vector<Span> needed_keys(const Mask& m, int64_t seq_len, int heads, const std::vector<Segment>& rank_segments) {
  std::vector<Span> spans;
  const bool kinds[2] = {true, false};
  for (const Segment& g : rank_segments) {
    if (g.count == 0) continue;
    int64_t a = g.start;
    const int64_t last = g.start + g.stride * (g.count - 1);
    while (a <= last) {  // split the run at document ends
      const int d = doc_index(m, a);
      const int64_t ds = doc_begin(m, d), de = std::min(doc_end(m, d), seq_len);
      int64_t b = std::min(last, de - 1);
      b = a + (b - a) / g.stride * g.stride;  // last member of the run in this document
      for (bool patterned : kinds) {
        if (patterned && !m.has_pattern()) continue;
        if (!patterned && m.has_pattern() && !m.mixed_heads(heads)) continue;
        keys_of_run(m, a, b, g.stride, ds, de, patterned, spans);
      }
      a = b + g.stride;
    }
  }
  merge_spans(spans);
  return spans;
}

// Local rows of `owner` whose positions fall in `spans`, as merged row ranges. A residue span
// selects rows exactly when the owner's run steps by a multiple of its modulus (the striped
// layout under a strided pattern), else it counts as its whole interval (a superset).
std::vector<RowRange> rows_in(const std::vector<Segment>& owner, const std::vector<Span>& spans) {
  std::vector<RowRange> found;
  int64_t base = 0;
  for (const Segment& g : owner) {
    const int64_t first = g.start, last = g.start + g.stride * (g.count - 1);
    for (const Span& sp : spans) {
      if (sp.hi < first || sp.lo > last) continue;
      if (sp.mod > 1 && g.stride % sp.mod == 0 && ((first - sp.res) % sp.mod + sp.mod) % sp.mod != 0) continue;
      const int64_t lo_pos = std::max(sp.lo, first), hi_pos = std::min(sp.hi, last);
      const int64_t i0 = (lo_pos - first + g.stride - 1) / g.stride, i1 = (hi_pos - first) / g.stride;
      if (i0 <= i1) found.push_back({base + i0, base + i1 + 1});
    }
    base += g.count;
  }
  std::sort(found.begin(), found.end(), [](const RowRange& x, const RowRange& y) { return x.lo < y.lo; });
  std::vector<RowRange> out;
  for (const RowRange& r : found) {
    if (!out.empty() && out.back().hi >= r.lo) {
      out.back().hi = std::max(out.back().hi, r.hi);
    } else {
      out.push_back(r);
    }
  }
  return out;
}

std::vector<Segment> segments_of(const ChunkPositions& p) {
  std::vector<Segment> v;
  for (int s = 0; s < p.num_segments; ++s) v.push_back(p.segment(s));
  return v;
}

double pairs_of(const Mask& m, const AttentionSpec& spec, const std::vector<Segment>& segs) {
  double n = 0.0;
  for (const Segment& g : segs) {
    n += count_visible_pairs(m, spec.seq_len, g.start, g.start + g.stride * g.count, g.stride, spec.heads, spec.batch);
  }
  return n;
}

// Balanced layout: kBalancedBlock-token blocks, each costing its visible pairs, go largest first
// to the least loaded rank that still has room (every rank gets the same number of blocks).
std::vector<std::vector<Segment>> balanced_segments(const AttentionSpec& spec, const Mask& m, int world) {
  const int64_t blocks = spec.seq_len / kBalancedBlock;
  const int64_t per_rank = blocks / world;
  std::vector<double> cost(static_cast<std::size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    cost[b] = count_visible_pairs(m, spec.seq_len, b * kBalancedBlock, (b + 1) * kBalancedBlock, 1, spec.heads, 1);
  }
  std::vector<int64_t> order(static_cast<std::size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  using Load = std::pair<double, int>;  // (load, rank), least loaded first, lowest rank on ties
  std::priority_queue<Load, std::vector<Load>, std::greater<Load>> heap;
  for (int r = 0; r < world; ++r) heap.push({0.0, r});
  std::vector<std::vector<int64_t>> owned(static_cast<std::size_t>(world));
  for (int64_t b : order) {
    Load l = heap.top();
    heap.pop();
    owned[l.second].push_back(b);
    l.first += cost[b];
    if (static_cast<int64_t>(owned[l.second].size()) < per_rank) heap.push(l);
  }
  std::vector<std::vector<Segment>> segs(static_cast<std::size_t>(world));
  for (int r = 0; r < world; ++r) {
    std::sort(owned[r].begin(), owned[r].end());
    for (int64_t b : owned[r]) {
      const int64_t start = b * kBalancedBlock;
      if (!segs[r].empty() && segs[r].back().start + segs[r].back().count == start) {
        segs[r].back().count += kBalancedBlock;
      } else {
        segs[r].push_back({start, 1, kBalancedBlock});
      }
    }
  }
  return segs;
}

}  // namespace

const char* route_name(Route route) { return route == Route::kRing ? "ring" : "direct"; }

uint64_t kv_row_bytes(const AttentionSpec& spec) {
  return 2ull * static_cast<uint64_t>(spec.batch) * static_cast<uint64_t>(spec.effective_kv_heads()) *
         static_cast<uint64_t>(spec.head_dim) * dtype_size(spec.dtype);
}

RankLayout layout_ranks(const AttentionSpec& spec, int world) {
  spec.validate(world);
  RankLayout out;
  out.layout = spec.resolved_layout(world);
  if (out.layout == Layout::kBalanced) {
    out.segments = balanced_segments(spec, spec.mask.view(), world);
  } else {
    for (int r = 0; r < world; ++r) out.segments.push_back(segments_of(chunk_positions(out.layout, spec.seq_len, r, world)));
  }
  return out;
}

RingPlan plan_ring(const AttentionSpec& spec, int world, bool peer_exchange) {
  RingPlan plan;
  plan.world = world;
  plan.ranks = layout_ranks(spec, world);
  const Mask m = spec.mask.view();
  const std::size_t p = static_cast<std::size_t>(world);
  plan.needed.assign(p, std::vector<std::vector<RowRange>>(p));
  plan.visible_pairs.assign(p, 0.0);
  for (int r = 0; r < world; ++r) {
    plan.visible_pairs[r] = pairs_of(m, spec, plan.ranks.segments[r]);
    if (world == 1) break;
    const std::vector<Span> keys = needed_keys(m, spec.seq_len, spec.heads, plan.ranks.segments[r]);
    for (int s = 0; s < world; ++s) {
      if (s == r) continue;
      plan.needed[r][s] = rows_in(plan.ranks.segments[s], keys);
      plan.rows_needed += plan.rows(plan.needed[r][s]);
    }
  }
  const int64_t ring_rows = static_cast<int64_t>(world - 1) * spec.seq_len;
  bool ring = !peer_exchange || world == 1 || m.dense() ||
              static_cast<double>(ring_rows) <= kRingSlack * static_cast<double>(plan.rows_needed);
  if (const char* v = std::getenv(kRouteEnv); v != nullptr && peer_exchange && world > 1) {
    if (std::strcmp(v, "ring") == 0) {
      ring = true;
    } else if (std::strcmp(v, "direct") == 0) {
      ring = false;
    } else {
      fail(ErrorKind::kInvalidArgument, std::string(kRouteEnv) + "='" + v + "' is not a route",
           "set it to ring or direct, or unset it");
    }
  }
  plan.route = ring ? Route::kRing : Route::kDirect;
  if (ring) {
    for (int t = 1; t < world; ++t) plan.hops.push_back(t);
    plan.rows_sent = ring_rows;
  } else {
    for (int t = 1; t < world; ++t) {
      bool any = false;
      for (int r = 0; r < world && !any; ++r) any = !plan.needed[r][plan.owner_at(r, t)].empty();
      if (any) plan.hops.push_back(t);
    }
    plan.rows_sent = plan.rows_needed;
  }
  return plan;
}

std::vector<PlanStep> plan_steps(const RingPlan& plan, int rank) {
  std::vector<PlanStep> steps;
  auto add = [&](int hop, int owner, std::vector<RowRange> rows) {
    PlanStep st;
    st.hop = hop;
    st.owner = rows.empty() ? -1 : owner;
    st.rows = std::move(rows);
    const ChunkPositions pos = plan.ranks.positions(owner);
    for (const RowRange& rr : st.rows) {
      for (const Segment& g : slice_segments(pos, rr.lo, rr.hi)) {
        if (!st.positions.empty()) {
          Segment& last = st.positions.back();
          if (last.stride == g.stride && last.start + last.stride * last.count == g.start) {
            last.count += g.count;
            continue;
          }
        }
        st.positions.push_back(g);
      }
    }
    steps.push_back(std::move(st));
  };
  const int64_t own_rows = plan.ranks.positions(rank).size();
  add(0, rank, {RowRange{0, own_rows}});
  for (int t : plan.hops) {
    const int owner = plan.owner_at(rank, t);
    if (plan.route == Route::kRing) {
      add(t, owner, {RowRange{0, plan.ranks.positions(owner).size()}});
    } else {
      add(t, owner, plan.needed[rank][owner]);
    }
  }
  return steps;
}

}  // namespace ringattn
