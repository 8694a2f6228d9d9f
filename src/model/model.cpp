// The scaling model: per-step compute from visible pairs, transfers over the links they cross, overlap as the scheduler does it.
#include "model/model.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"

namespace ringattn::model {
namespace {

// A forward pass costs 4 d FLOPs per visible pair; forward + backward 3.5x that (bench's count).
constexpr double kForwardFlopsPerPairPerDim = 4.0;
constexpr double kForwardBackwardFactor = 3.5;
// Query rows below which a partially visible box is counted query by query.
constexpr int64_t kLeafRows = 64;
// Queries sampled from a strided run that stays partially visible at every split (striped layout).
constexpr int64_t kStridedSamples = 64;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// The hide search evaluates this many ranks per step, and masked problems on this many ranks.
constexpr int kHideSampleRanks = 32;
constexpr int kHideMaskedRanks = 16;

// Keys j = res (mod mod) in [a, b].
int64_t count_residue(int64_t a, int64_t b, int64_t res, int64_t mod) {
  if (a > b) return 0;
  auto floor_div = [](int64_t x, int64_t y) { return x >= 0 ? x / y : -((-x + y - 1) / y); };
  return floor_div(b - res, mod) - floor_div(a - 1 - res, mod);
}

// Keys of the run k0, k0 + ks, ..., k1 that query q sees under one head kind: exact for ks = 1, the
// patterns' share scaled by 1 / ks for strided key runs.
double keys_seen(const Mask& m, int64_t q, int64_t k0, int64_t k1, int64_t ks, bool patterned) {
  int64_t lo = k0, hi = k1, ds = 0;
  if (m.doc_offsets != nullptr) {
    const int d = doc_index(m, q);
    ds = m.doc_offsets[d];
    lo = std::max(lo, ds);
    hi = std::min(hi, m.doc_offsets[d + 1] - 1);
  }
  if (m.causal) hi = std::min(hi, q);
  if (lo > hi) return 0.0;
  if (ks > 1) {  // members of the run within [lo, hi]
    const int64_t res = ((k0 % ks) + ks) % ks;
    const double members = static_cast<double>(count_residue(lo, hi, res, ks));
    if (!patterned || !m.has_pattern()) return members;
    return members * keys_seen(m, q, lo, hi, 1, true) / static_cast<double>(hi - lo + 1);
  }
  if (!patterned || !m.has_pattern()) return static_cast<double>(hi - lo + 1);
  // The union of the window and global intervals, then the strided keys outside it.
  int64_t iv[2][2];
  int n = 0;
  if (m.has_window) {
    const int64_t a = m.window_left < 0 ? lo : std::max(lo, q - m.window_left);
    const int64_t b = m.window_right < 0 ? hi : std::min(hi, q + m.window_right);
    if (a <= b) iv[n][0] = a, iv[n][1] = b, ++n;
  }
  if (m.global_tokens > 0) {
    int64_t a = lo, b = hi;
    if (q - ds >= m.global_tokens) b = std::min(hi, ds + m.global_tokens - 1);
    if (a <= b) {
      if (n == 1 && a <= iv[0][1] + 1 && iv[0][0] <= b + 1) {
        iv[0][0] = std::min(iv[0][0], a);
        iv[0][1] = std::max(iv[0][1], b);
      } else {
        iv[n][0] = a, iv[n][1] = b, ++n;
      }
    }
  }
  double seen = 0.0;
  for (int i = 0; i < n; ++i) seen += static_cast<double>(iv[i][1] - iv[i][0] + 1);
  if (m.stride > 0) {
    const int64_t res = ((q % m.stride) + m.stride) % m.stride;
    seen += static_cast<double>(count_residue(lo, hi, res, m.stride));
    for (int i = 0; i < n; ++i) seen -= static_cast<double>(count_residue(iv[i][0], iv[i][1], res, m.stride));
  }
  return seen;
}

// Pairs of queries [q0, q1] against keys [k0, k1] (contiguous) when the keys a query sees form at
// most two intervals bounded by constants and q plus constants (causal, window, documents, global):
// the count is linear in q between the points where two bounds cross, summed piece by piece (a
// piece that is not linear after all, checked at its middle, is counted query by query).
double linear_pieces(const Mask& m, int64_t q0, int64_t q1, int64_t k0, int64_t k1, bool patterned) {
  std::vector<int64_t> cuts = {q0, q1 + 1};
  std::vector<int64_t> consts = {k0, k1};
  if (m.doc_offsets != nullptr) {
    const int d0 = doc_index(m, std::min(q0, k0)), d1 = doc_index(m, std::max(q1, k1));
    for (int d = d0; d <= d1 + 1 && d <= m.num_docs; ++d) {
      consts.push_back(m.doc_offsets[d]);
      if (patterned && m.global_tokens > 0) consts.push_back(m.doc_offsets[d] + m.global_tokens);
    }
  } else if (patterned && m.global_tokens > 0) {
    consts.push_back(m.global_tokens);
  }
  std::vector<int64_t> offsets = {0};
  if (patterned && m.has_window) {
    if (m.window_left >= 0) offsets.push_back(m.window_left);
    if (m.window_right >= 0) offsets.push_back(-m.window_right);
  }
  for (int64_t c : consts) {
    for (int64_t o : offsets) {
      for (int64_t e = -1; e <= 1; ++e) {
        const int64_t x = c + o + e;
        if (x > q0 && x <= q1) cuts.push_back(x);
      }
    }
  }
  std::sort(cuts.begin(), cuts.end());
  cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  double n = 0.0;
  for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
    const int64_t a = cuts[i], b = cuts[i + 1] - 1;
    const double fa = keys_seen(m, a, k0, k1, 1, patterned), fb = keys_seen(m, b, k0, k1, 1, patterned);
    const int64_t mid = a + (b - a) / 2;
    const double fm = keys_seen(m, mid, k0, k1, 1, patterned);
    const double lerp = b > a ? fa + (fb - fa) * static_cast<double>(mid - a) / static_cast<double>(b - a) : fa;
    if (std::abs(fm - lerp) < 0.5) {
      n += (fa + fb) * static_cast<double>(b - a + 1) / 2.0;
    } else {
      for (int64_t qq = a; qq <= b; ++qq) n += keys_seen(m, qq, k0, k1, 1, patterned);
    }
  }
  return n;
}

// Pairs of the query run q (one head kind) against the key run k.
double box_pairs(const Mask& m, const Segment& q, const Segment& k, bool patterned) {
  if (q.count <= 0 || k.count <= 0) return 0.0;
  const int64_t q_last = q.start + q.stride * (q.count - 1), k_last = k.start + k.stride * (k.count - 1);
  const Visibility v = classify(m, q.start, q_last, k.start, k_last, patterned);
  if (v == Visibility::kEmpty) return 0.0;
  if (v == Visibility::kFull) return static_cast<double>(q.count) * static_cast<double>(k.count);
  if (q.stride == 1 && k.stride == 1 && !(patterned && m.stride > 0) && q.count > kLeafRows) {
    return linear_pieces(m, q.start, q_last, k.start, k_last, patterned);
  }
  if (q.count <= kLeafRows) {
    double n = 0.0;
    for (int64_t i = 0; i < q.count; ++i) n += keys_seen(m, q.start + q.stride * i, k.start, k_last, k.stride, patterned);
    return n;
  }
  const bool both_strided = q.stride > 1 && k.stride > 1;
  if (both_strided) {  // every split stays partial: sample evenly and scale
    double n = 0.0;
    for (int64_t j = 0; j < kStridedSamples; ++j) {
      const int64_t i = (2 * j + 1) * q.count / (2 * kStridedSamples);
      n += keys_seen(m, q.start + q.stride * i, k.start, k_last, k.stride, patterned);
    }
    return n * static_cast<double>(q.count) / static_cast<double>(kStridedSamples);
  }
  const int64_t half = q.count / 2;
  return box_pairs(m, {q.start, q.stride, half}, k, patterned) +
         box_pairs(m, {q.start + q.stride * half, q.stride, q.count - half}, k, patterned);
}

double compute_ms(double pairs, const AttentionSpec& spec, const RateTable* fwd, const RateTable* fb, int64_t rows,
                  bool backward_step, double share) {
  if (pairs <= 0.0) return 0.0;
  const double fwd_flops = kForwardFlopsPerPairPerDim * spec.head_dim * pairs;
  const double t_fwd = fwd_flops / (fwd->at(rows) * 1e12) * 1e3;
  if (!backward_step) return t_fwd / share;
  const double t_both = kForwardBackwardFactor * fwd_flops / (fb->at(rows) * 1e12) * 1e3;
  return std::max(0.0, t_both - t_fwd) / share;
}

std::vector<Segment> segments_of_rows(const RingPlan& plan, int owner, const std::vector<RowRange>& ranges) {
  std::vector<Segment> out;
  const ChunkPositions pos = plan.ranks.positions(owner);
  for (const RowRange& rr : ranges) {
    for (const Segment& g : slice_segments(pos, rr.lo, rr.hi)) out.push_back(g);
  }
  return out;
}

// What one evaluation needs: the problem, the machine, rates, and the ranks to evaluate.
struct Context {
  const AttentionSpec& spec;
  const Machine& machine;
  int world;
  const RateTable* fwd;
  const RateTable* fb;
  double share;  // compute rate factor from ranks sharing a host's compute slots
  std::vector<int> ranks;  // evaluated ranks (all, or a sample)
  bool all_ranks;
  double kv_bytes, grad_bytes;  // one chunk's K+V, and its fp32 dK+dV
  double step_overhead_ms;
  // Visible pairs of evaluated rank j against source s at [j * world + s] (< 0: not counted yet),
  // shared by the forward and backward passes and both strategies.
  mutable std::vector<double> pairs;
};

// One exchange of a step: rank r receives `bytes` from `from[r]` over the link between them.
struct Exchange {
  double bytes = 0.0;
  int offset = 0;  // receive from r - offset within the group, send to r + offset
  int group = 0;   // 0: the whole ring; g: within blocks of g ranks (inner ring)
};

int peer(int r, int offset, int group, int world) {
  if (group <= 0) return ((r + offset) % world + world) % world;
  const int base = r / group * group;
  return base + ((r - base + offset) % group + group) % group;
}

// Advances every evaluated rank through one step: compute `c[r]`, then the exchange; returns the
// step's summary. `start` holds each rank's time at the step's begin and is advanced.
StepPrediction advance(const Context& ctx, int step, const std::vector<double>& c, const Exchange& ex,
                       std::vector<double>& start, std::vector<double>& exposed, std::vector<double>& busy) {
  StepPrediction sp;
  sp.step = step;
  const int p = ctx.world;
  std::vector<double> end(start.size());
  std::vector<double> arrive;
  if (ex.bytes > 0.0 && ctx.all_ranks) {
    arrive.assign(p, 0.0);
    for (int r = 0; r < p; ++r) {  // from r - offset to r, once both have posted
      const int from = peer(r, -ex.offset, ex.group, p);
      const Link& l = ctx.machine.link(from, r);
      arrive[r] = std::max(start[from], start[r]) + l.ms(ex.bytes);
    }
  }
  for (std::size_t i = 0; i < ctx.ranks.size(); ++i) {
    const int r = ctx.ranks[i];
    const double comp_end = start[i] + c[i];
    double e = comp_end;
    if (ex.bytes > 0.0) {
      const int from = peer(r, -ex.offset, ex.group, p), to = peer(r, ex.offset, ex.group, p);
      const Link& lin = ctx.machine.link(from, r);
      const Link& lout = ctx.machine.link(r, to);
      const double t = std::max(lin.ms(ex.bytes), lout.ms(ex.bytes));
      if (ctx.all_ranks) {
        e = std::max({comp_end, arrive[r], arrive[to]});
      } else {
        e = std::max(comp_end, start[i] + t);
      }
      if (t > sp.transfer_ms) {
        sp.transfer_ms = t;
        sp.link = (lin.gbs <= lout.gbs ? lin : lout).name;
      }
    }
    sp.compute_ms = std::max(sp.compute_ms, c[i]);
    sp.exposed_ms = std::max(sp.exposed_ms, e - comp_end);
    exposed[i] += e - comp_end;
    busy[i] += c[i];
    end[i] = e;
  }
  if (!ctx.all_ranks) {  // sampled: the ring moves in lockstep at its slowest member
    const double step_end = *std::max_element(end.begin(), end.end());
    for (std::size_t i = 0; i < end.size(); ++i) {
      exposed[i] += step_end - end[i];
      end[i] = step_end;
    }
  }
  sp.bytes = ex.bytes;
  start = end;
  return sp;
}

PassPrediction finish(const std::vector<double>& start, const std::vector<double>& exposed, const std::vector<double>& busy,
                      std::vector<StepPrediction> steps) {
  PassPrediction p;
  p.total_ms = *std::max_element(start.begin(), start.end());
  p.baseline_ms = *std::max_element(busy.begin(), busy.end());
  p.exposed_ms = *std::max_element(exposed.begin(), exposed.end());
  p.steps = std::move(steps);
  return p;
}

// Compute of evaluated rank j at a ring step whose chunk comes from `src` (skipped steps cost nothing).
double ring_step_ms(const Context& ctx, const RankLayout& ranks, std::size_t j, int src, bool backward_step) {
  double& pairs = ctx.pairs[j * static_cast<std::size_t>(ctx.world) + static_cast<std::size_t>(src)];
  if (pairs < 0.0) pairs = pairs_between(ctx.spec.mask.view(), ctx.spec, ranks.segments[ctx.ranks[j]], ranks.segments[src]);
  if (pairs <= 0.0) return 0.0;
  return compute_ms(pairs, ctx.spec, ctx.fwd, ctx.fb, ctx.spec.local_seq(ctx.world), backward_step, ctx.share) +
         ctx.step_overhead_ms;
}

// The neighbour ring (flat) or the double ring (two-level, inner groups of g ranks), one pass.
PassPrediction ring_pass(const Context& ctx, const RankLayout& ranks, bool backward_pass, int g) {
  const int p = ctx.world;
  const int inner = g > 0 ? g : p;
  const int outer = p / inner;
  const std::size_t n = ctx.ranks.size();
  std::vector<double> start(n, 0.0), exposed(n, 0.0), busy(n, 0.0), c(n, 0.0);
  std::vector<StepPrediction> steps;
  const double msg = backward_pass ? ctx.kv_bytes + ctx.grad_bytes : ctx.kv_bytes;
  for (int o = 0; o < outer; ++o) {
    std::vector<double> round_start = start;
    for (int i = 0; i < inner; ++i) {
      const int s = o * inner + i;
      for (std::size_t j = 0; j < n; ++j) {
        const int r = ctx.ranks[j];
        const int h = r / inner, l = r % inner;
        const int src = ((h - o) % outer + outer) % outer * inner + ((l - i) % inner + inner) % inner;
        c[j] = ring_step_ms(ctx, ranks, j, src, backward_pass);
      }
      Exchange ex;
      if (g > 0) {  // inner ring: g - 1 rotations inside the host per round
        ex.group = inner;
        ex.offset = 1;
        ex.bytes = i + 1 < inner ? msg : 0.0;
      } else {  // backward: hop 0 carries K/V alone, the last hop the last partial alone
        ex.offset = 1;
        ex.bytes = s + 1 < p ? msg : 0.0;
        if (backward_pass && s == 0 && p > 1) ex.bytes = ctx.kv_bytes;
        if (backward_pass && s >= 1 && s + 1 == p) ex.bytes = ctx.grad_bytes;
      }
      steps.push_back(advance(ctx, s, c, ex, start, exposed, busy));
    }
    if (g > 0 && o + 1 < outer) {  // the outer ring: each rank's round block to the same rank of the next host
      for (std::size_t j = 0; j < n; ++j) {
        const int r = ctx.ranks[j];
        const Link& l = ctx.machine.link(r, (r + inner) % p);
        const double arrival = round_start[j] + l.ms(msg);
        if (arrival > start[j]) {
          exposed[j] += arrival - start[j];
          steps.back().exposed_ms = std::max(steps.back().exposed_ms, arrival - start[j]);
          start[j] = arrival;
        }
        steps.back().transfer_ms = std::max(steps.back().transfer_ms, l.ms(msg));
        steps.back().link = l.name;
      }
    }
  }
  if (backward_pass && p > 1) {  // the home hop: finished dK/dV in the input dtype, nothing beside it
    std::fill(c.begin(), c.end(), 0.0);
    Exchange ex;
    ex.bytes = ctx.kv_bytes;
    ex.offset = g > 0 && outer > 1 ? inner : 1;
    steps.push_back(advance(ctx, p, c, ex, start, exposed, busy));
  }
  return finish(start, exposed, busy, std::move(steps));
}

// The direct plan: own block, then the plan's hops (the owner sends each reader its rows), double
// buffered; a backward pass returns dK/dV one step later and has one more step to bring them home.
PassPrediction direct_pass(const Context& ctx, const RingPlan& plan, bool backward_pass) {
  const int H = static_cast<int>(plan.hops.size());
  const std::size_t n = ctx.ranks.size();
  std::vector<double> start(n, 0.0), exposed(n, 0.0), busy(n, 0.0), c(n, 0.0);
  std::vector<StepPrediction> steps;
  const double row_bytes = static_cast<double>(kv_row_bytes(ctx.spec));
  const double grad_row_bytes = row_bytes * (ctx.spec.dtype == DType::kF64 ? 1.0 : 4.0 / dtype_size(ctx.spec.dtype));
  const int last = backward_pass ? H + 2 : H + 1;
  const int64_t rows = ctx.spec.local_seq(ctx.world);
  const Mask m = ctx.spec.mask.view();
  for (int j = 0; j < last; ++j) {
    StepPrediction sp;
    sp.step = j;
    std::vector<double> end(n);
    for (std::size_t i = 0; i < n; ++i) {
      const int r = ctx.ranks[i];
      double pairs = 0.0;
      if (j == 0) {
        pairs = pairs_between(m, ctx.spec, plan.ranks.segments[r], plan.ranks.segments[r]);
      } else if (j <= H) {
        const int owner = plan.owner_at(r, plan.hops[j - 1]);
        const auto& need = plan.needed[r][owner];
        if (!need.empty()) pairs = pairs_between(m, ctx.spec, plan.ranks.segments[r], segments_of_rows(plan, owner, need));
      }
      // A backward remote step runs even where nothing is visible (its owner waits for the zeros).
      const bool runs = pairs > 0.0 || (backward_pass && j >= 1 && j <= H);
      c[i] = runs ? compute_ms(pairs, ctx.spec, ctx.fwd, ctx.fb, rows, backward_pass, ctx.share) + ctx.step_overhead_ms
                         : 0.0;
      // This step's exchange: hop j's K/V, and in a backward pass hop j-2's dK/dV going home.
      double t = 0.0;
      std::string link;
      auto add = [&](int a, int b, double bytes) {
        if (bytes <= 0.0) return;
        const Link& l = ctx.machine.link(a, b);
        const double ms = l.ms(bytes);
        if (ms > t) t = ms, link = l.name;
        sp.bytes = std::max(sp.bytes, bytes);
      };
      if (j < H) {
        const int tt = plan.hops[j];
        const int owner = plan.owner_at(r, tt), reader = plan.reader_at(r, tt);
        add(owner, r, row_bytes * static_cast<double>(plan.rows(plan.needed[r][owner])));
        add(r, reader, row_bytes * static_cast<double>(plan.rows(plan.needed[reader][r])));
      }
      if (backward_pass && j >= 2 && j - 2 < H) {
        const int tt = plan.hops[j - 2];
        const int owner = plan.owner_at(r, tt), reader = plan.reader_at(r, tt);
        add(r, owner, grad_row_bytes * static_cast<double>(plan.rows(plan.needed[r][owner])));
        add(reader, r, grad_row_bytes * static_cast<double>(plan.rows(plan.needed[reader][r])));
      }
      // The wait for this rank's own exchange is exposed communication.
      const double waited = std::max(0.0, t - c[i]);
      sp.compute_ms = std::max(sp.compute_ms, c[i]);
      if (t > sp.transfer_ms) sp.transfer_ms = t, sp.link = link;
      sp.exposed_ms = std::max(sp.exposed_ms, waited);
      exposed[i] += waited;
      busy[i] += c[i];
      end[i] = start[i] + c[i] + waited;
    }
    // Each exchange pairs a rank with peers that wait for it in turn: the step ends together
    // (lockstep); a rank that finished early idles, which the time counts and the waits do not.
    const double step_end = *std::max_element(end.begin(), end.end());
    for (std::size_t i = 0; i < n; ++i) start[i] = step_end;
    steps.push_back(sp);
  }
  return finish(start, exposed, busy, std::move(steps));
}

std::vector<int> chosen_ranks(int world, int sample) {
  std::vector<int> out;
  if (sample <= 0 || world <= sample) {
    for (int r = 0; r < world; ++r) out.push_back(r);
    return out;
  }
  for (int i = 0; i < sample; ++i) out.push_back(static_cast<int>(static_cast<int64_t>(i) * (world - 1) / (sample - 1)));
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool ring_only(const MaskSpec& m) { return !m.has_pattern() && !m.has_documents(); }

// The plan without the all-pairs needs when the route is the ring anyway (dense and causal masks:
// the scheduler keeps the tuned ring for them), so that p = 1024 answers at once.
RingPlan ring_plan_fast(const AttentionSpec& spec, int world) {
  RingPlan plan;
  plan.world = world;
  plan.ranks = layout_ranks(spec, world);
  plan.route = Route::kRing;
  for (int t = 1; t < world; ++t) plan.hops.push_back(t);
  plan.rows_sent = static_cast<int64_t>(world - 1) * spec.seq_len;
  return plan;
}

}  // namespace

const char* mask_class_name(MaskClass c) {
  switch (c) {
    case MaskClass::kDense: return "dense";
    case MaskClass::kCausal: return "causal";
    case MaskClass::kMasked: return "masked";
  }
  return "?";
}

MaskClass mask_class_of(const MaskSpec& mask) {
  if (mask.has_pattern() || mask.has_documents()) return MaskClass::kMasked;
  return mask.causal ? MaskClass::kCausal : MaskClass::kDense;
}

double RateTable::at(int64_t rows) const {
  if (tokens.empty()) return 1.0;
  if (rows <= tokens.front()) return tflops.front();
  if (rows >= tokens.back()) return tflops.back();
  for (std::size_t i = 1; i < tokens.size(); ++i) {
    if (rows <= tokens[i]) {
      const double x0 = std::log(static_cast<double>(tokens[i - 1])), x1 = std::log(static_cast<double>(tokens[i]));
      const double w = (std::log(static_cast<double>(rows)) - x0) / (x1 - x0);
      return tflops[i - 1] + w * (tflops[i] - tflops[i - 1]);
    }
  }
  return tflops.back();
}

const RateTable* Machine::rate_for(bool backward, int head_dim, DType dtype, MaskClass mask) const {
  const RateTable* best = nullptr;
  int best_score = -1;
  for (const RateTable& t : rates) {
    if (t.backward != backward) continue;
    // Mask class first (the shape of the work), then head_dim, then dtype.
    const int score = (t.mask == mask ? 4 : (mask == MaskClass::kMasked && t.mask == MaskClass::kCausal ? 1 : 0)) +
                      (t.head_dim == head_dim ? 2 : 0) + (t.dtype == dtype ? 1 : 0);
    if (score > best_score) best = &t, best_score = score;
  }
  return best;
}

Strategy parse_strategy(const std::string& name) {
  if (name == "flat") return Strategy::kFlat;
  if (name == "two-level") return Strategy::kTwoLevel;
  if (name == "auto") return Strategy::kAuto;
  fail(ErrorKind::kInvalidArgument, "--strategy '" + name + "' is not a strategy", "pass flat, two-level or auto");
}

const char* strategy_name(Strategy s) {
  switch (s) {
    case Strategy::kFlat: return "flat";
    case Strategy::kTwoLevel: return "two-level";
    case Strategy::kAuto: return "auto";
  }
  return "?";
}

double pairs_between(const Mask& m, const AttentionSpec& spec, const std::vector<Segment>& q,
                     const std::vector<Segment>& k) {
  const int heads = spec.heads;
  const int patterned = !m.has_pattern() ? 0 : (m.mask_heads > 0 ? std::min(m.mask_heads, heads) : heads);
  const int plain = heads - patterned;
  double n = 0.0;
  for (const Segment& a : q) {
    for (const Segment& b : k) {
      if (patterned > 0) n += patterned * box_pairs(m, a, b, true);
      if (plain > 0) n += plain * box_pairs(m, a, b, false);
    }
  }
  return n * static_cast<double>(spec.batch);
}

double memory_per_rank(const AttentionSpec& spec, int world, bool backward, Route route, Strategy strategy,
                       const RingPlan* plan) {
  const double B = static_cast<double>(spec.batch), c = static_cast<double>(spec.local_seq(world));
  const double H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const double e = static_cast<double>(dtype_size(spec.dtype));
  const double acc = spec.dtype == DType::kF64 ? 8.0 : 4.0;
  const double qo = 2.0 * B * c * H * D * e;             // q, out
  const double kv = 2.0 * B * c * Hkv * D * e;           // k, v
  const double lse = B * H * c * acc;
  const double state = B * c * H * D * acc + 2.0 * B * H * c * acc;  // the running output, max and sum
  const double kv_acc = 2.0 * B * c * Hkv * D * acc;     // fp32 dK + dV of one chunk
  const double grads = qo + kv;                          // dO, dQ; dK, dV
  const double dq_acc = B * c * H * D * acc + 2.0 * B * H * c * acc;  // fp32 dQ, lse_log2, delta
  const double base = qo + kv + lse + state;
  if (world == 1) return backward ? base + grads + dq_acc : base;
  if (route == Route::kDirect && plan != nullptr) {
    double max_recv = 0.0, max_send = 0.0;
    for (int r = 0; r < world; ++r) {
      for (int t : plan->hops) {
        max_recv = std::max(max_recv, static_cast<double>(plan->rows(plan->needed[r][plan->owner_at(r, t)])));
        max_send = std::max(max_send, static_cast<double>(plan->rows(plan->needed[plan->reader_at(r, t)][r])));
      }
    }
    const double row = 2.0 * B * Hkv * D;  // K+V elements of one row over the batch
    const double bufs = (plan->hops.size() > 1 ? 2.0 : 1.0);
    double m = base + bufs * max_recv * row * e;
    if (!backward) return m;
    m += grads + dq_acc + bufs * max_recv * row * acc + max_send * row * acc + kv_acc;  // own fp32 sums
    return m;
  }
  const double buffers = (world > 2 ? 2.0 : 1.0) * kv;  // the travelling K/V buffers
  const bool two = strategy == Strategy::kTwoLevel;
  const double forward = base + buffers + (two ? 2.0 * kv : 0.0);
  if (!backward) return forward;
  const double messages = 2.0 * (kv + kv_acc) + (two ? 2.0 * (kv + kv_acc) : 0.0);
  const double local_grad = (world > 2 ? 2.0 : 1.0) * kv_acc;
  return forward + grads + messages + local_grad + dq_acc;
}

Prediction predict(const AttentionSpec& spec_in, int world, const Machine& machine, const Options& options) {
  AttentionSpec spec = spec_in;
  if (spec.kv_heads == 0) spec.kv_heads = spec.heads;
  RINGATTN_CHECK(world >= 1, ErrorKind::kInvalidArgument, "--np " + std::to_string(world) + " must be at least 1",
                 "pass the number of ranks, e.g. --np 8");
  const int g = std::max(1, machine.gpus_per_host);
  const int hosts = (world + g - 1) / g;
  RINGATTN_CHECK(machine.max_hosts <= 0 || hosts <= machine.max_hosts, ErrorKind::kInvalidArgument,
                 "--np " + std::to_string(world) + " needs " + std::to_string(hosts) + " hosts of " + std::to_string(g) +
                     " ranks; machine '" + machine.name + "' has " + std::to_string(machine.max_hosts),
                 "pass at most --np " + std::to_string(machine.max_hosts * g) + " or a machine with more hosts");
  spec.validate(world);
  Prediction out;
  out.world = world;
  out.hosts = hosts;
  out.backward = options.backward;
  out.tokens_per_gpu = spec.local_seq(world);
  const MaskClass mc = mask_class_of(spec.mask);
  const RateTable* fwd = machine.rate_for(false, spec.head_dim, spec.dtype, mc);
  const RateTable* fb = machine.rate_for(true, spec.head_dim, spec.dtype, mc);
  RINGATTN_CHECK(fwd != nullptr && (fb != nullptr || !options.backward), ErrorKind::kInvalidArgument,
                 "machine '" + machine.name + "' has no " + (fwd ? "forward+backward" : "forward") + " kernel rates",
                 "add [rates.fwd...] and [rates.fwd_bwd...] tables, e.g. from `ringattn bench --calibrate`");
  if (fwd->mask != mc || fwd->head_dim != spec.head_dim || fwd->dtype != spec.dtype) {
    out.notes.push_back(std::string("no ") + mask_class_name(mc) + " d" + std::to_string(spec.head_dim) + " " +
                        dtype_name(spec.dtype) + " rates: used " + mask_class_name(fwd->mask) + " d" +
                        std::to_string(fwd->head_dim) + " " + dtype_name(fwd->dtype));
  }
  // The device scheduler keeps the neighbour ring for dense and causal masks; masked problems take the plan's route.
  const bool fast = ring_only(spec.mask);
  const RingPlan plan = fast ? ring_plan_fast(spec, world) : plan_ring(spec, world, true);
  out.route = plan.route;
  out.layout = plan.ranks.layout;
  out.rows_sent = static_cast<double>(plan.rows_sent);
  const int ranks_here = std::min(world, g);
  const double share = machine.compute_slots > 0.0 ? std::min(1.0, machine.compute_slots / ranks_here) : 1.0;
  if (share < 1.0) {
    char buf[160];
    std::snprintf(buf, sizeof(buf), "%d ranks share %.2f compute slots per host: each computes at %.2fx", ranks_here,
                  machine.compute_slots, share);
    out.notes.push_back(buf);
  }
  const double kv = static_cast<double>(kv_row_bytes(spec)) * static_cast<double>(spec.local_seq(world));
  const double grad = kv * (spec.dtype == DType::kF64 ? 1.0 : 4.0 / dtype_size(spec.dtype));
  Context ctx{spec, machine, world, fwd, fb ? fb : fwd, share, chosen_ranks(world, options.sample_ranks),
              options.sample_ranks <= 0 || world <= options.sample_ranks, kv, grad, machine.step_overhead_us * 1e-3, {}};
  if (plan.route == Route::kRing) ctx.pairs.assign(ctx.ranks.size() * static_cast<std::size_t>(world), -1.0);

  Strategy s = options.strategy;
  const bool two_possible = plan.route == Route::kRing && hosts > 1 && world % g == 0;
  if (s == Strategy::kTwoLevel && !two_possible) {
    out.notes.push_back(hosts <= 1 ? "one host: the two-level ring is the flat ring"
                                   : "two-level needs the neighbour-ring route and whole hosts: evaluated flat");
    s = Strategy::kFlat;
  }
  const double visible_flops = options.count_visible
                                   ? visible_forward_flops(spec) * (options.backward ? kForwardBackwardFactor : 1.0)
                                   : 0.0;
  auto evaluate = [&](Strategy st) {
    const int inner = st == Strategy::kTwoLevel ? g : 0;
    Prediction p = out;
    p.strategy = st;
    if (plan.route == Route::kRing) {
      p.forward = ring_pass(ctx, plan.ranks, false, inner);
      if (options.backward) p.backward_pass = ring_pass(ctx, plan.ranks, true, inner);
    } else {
      p.forward = direct_pass(ctx, plan, false);
      if (options.backward) p.backward_pass = direct_pass(ctx, plan, true);
    }
    p.total_ms = p.forward.total_ms + p.backward_pass.total_ms;
    p.baseline_ms = p.forward.baseline_ms + p.backward_pass.baseline_ms;
    p.exposed_ms = p.forward.exposed_ms + p.backward_pass.exposed_ms;
    p.efficiency = p.total_ms > 0.0 ? p.baseline_ms / p.total_ms : 1.0;
    const double flops = forward_flops(spec) * (options.backward ? kForwardBackwardFactor : 1.0);
    p.tflops_per_gpu = p.total_ms > 0.0 ? flops / world / (p.total_ms * 1e-3) / 1e12 : 0.0;
    p.visible_tflops_per_gpu = p.total_ms > 0.0 ? visible_flops / world / (p.total_ms * 1e-3) / 1e12 : 0.0;
    p.memory_bytes = memory_per_rank(spec, world, options.backward, plan.route, st, &plan);
    if (machine.memory_gib > 0.0 && p.memory_bytes > machine.memory_gib * kGiB) {
      p.notes.push_back("needs " + std::to_string(p.memory_bytes / kGiB) + " GiB per rank, more than the " +
                        std::to_string(machine.memory_gib) + " GiB of one");
    }
    return p;
  };
  if (s == Strategy::kAuto) {
    Prediction flat = evaluate(Strategy::kFlat);
    if (!two_possible) return flat;
    Prediction two = evaluate(Strategy::kTwoLevel);
    return two.total_ms < flat.total_ms ? two : flat;
  }
  return evaluate(s);
}

int64_t hiding_tokens_per_gpu(const AttentionSpec& spec_in, int world, const Machine& machine, const Options& options) {
  if (spec_in.mask.has_documents() || world == 1) return -1;
  AttentionSpec spec = spec_in;
  const int64_t unit = std::max<int64_t>(1, layout_divisor(spec.resolved_layout(world), world) / world) *
                       (spec.resolved_layout(world) == Layout::kBalanced ? kBalancedBlock : 1);
  Options o = options;
  if (o.sample_ranks <= 0) o.sample_ranks = kHideSampleRanks;
  o.count_visible = false;
  // A masked problem's plan counts every query's keys (O(tokens)): its search runs on fewer ranks,
  // two hosts' worth, where the pattern of needs repeats (a window's halo, the documents' spans).
  const int g = std::max(1, machine.gpus_per_host);
  const int eval_world = ring_only(spec.mask) ? world : std::min(world, std::max(kHideMaskedRanks, 2 * g));
  auto hides = [&](int64_t c) {
    spec.seq_len = c * eval_world;
    const Prediction p = predict(spec, eval_world, machine, o);
    double waits = p.forward.exposed_ms;
    double total = p.total_ms;
    if (o.backward) {  // the home hop hides behind nothing at any size
      double home = p.backward_pass.steps.empty() ? 0.0 : p.backward_pass.steps.back().exposed_ms;
      if (p.route == Route::kDirect) home = 0.0;
      waits += std::max(0.0, p.backward_pass.exposed_ms - home);
      total -= home;
    }
    return waits <= kHideFraction * total;
  };
  int64_t lo = 0, hi = 0;
  for (int64_t c = std::max<int64_t>(unit, 128) / unit * unit; c <= kMaxHideTokens; c *= 2) {
    if (hides(c)) {
      hi = c;
      break;
    }
    lo = c;
  }
  if (hi == 0) return 0;
  while (hi - lo > std::max<int64_t>(unit, hi / 32)) {  // to about 3%
    const int64_t mid = (lo + hi) / 2 / unit * unit;
    if (mid <= lo) break;
    (hides(mid) ? hi : lo) = mid;
  }
  return hi;
}

}  // namespace ringattn::model
