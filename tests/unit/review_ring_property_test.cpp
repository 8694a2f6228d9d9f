// Review of the masks issue (17): randomised masks, layouts and ring sizes on the loopback CPU ring
// (ring and direct routes) against the fp64 reference, forward and backward, plus telemetry bytes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <exception>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attn/reference.hpp"
#include "plan/plan.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn {
namespace {

struct Host {
  std::vector<double> data;
  TensorView view;
};

Host make_host(std::initializer_list<int64_t> shape, uint64_t seed, bool random) {
  Host h;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  h.data.assign(static_cast<std::size_t>(n), std::nan(""));
  if (random) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> u(-2.0, 2.0);
    for (auto& v : h.data) v = u(rng);
  }
  h.view = make_view(h.data.data(), DType::kF64, Device::kHost, shape);
  return h;
}

double max_err(const TensorView& a, const TensorView& b) {
  double e = 0.0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double x = load_as_double(a, i), y = load_as_double(b, i);
    if (std::isinf(x) && std::isinf(y) && (x > 0) == (y > 0)) continue;
    const double d = std::fabs(x - y);
    e = std::isnan(d) ? INFINITY : std::max(e, d);
  }
  return e;
}

void run_ranks(int world, const std::function<void(int)>& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

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
  if (coin(0.7)) {
    m.has_window = true;
    m.window_left = coin(0.15) ? -1 : pick(0, S / 4);
    m.window_right = coin(0.15) ? -1 : (coin(0.5) ? 0 : pick(0, S / 4));
  }
  if (coin(0.25)) m.stride = pick(1, S);
  if (coin(0.25)) m.global_tokens = pick(1, 5);
  if (m.has_pattern() && coin(0.3)) {
    const int group = heads / kv_heads;
    const int kinds = heads / group;
    if (kinds > 1) m.mask_heads = group * static_cast<int>(pick(1, kinds - 1));
  }
  return m;
}

// Forward and backward (twice: the second reuses every buffer) of `spec` on `world` loopback
// ranks against the global fp64 reference; the forward's and backward's byte telemetry against the plan.
void check_ring(const AttentionSpec& spec, int world, const std::string& name) {
  const int64_t B = spec.batch, S = spec.seq_len, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  Host q = make_host({B, S, H, D}, 11, true), k = make_host({B, S, Hkv, D}, 12, true);
  Host v = make_host({B, S, Hkv, D}, 13, true), dout = make_host({B, S, H, D}, 14, true);
  Host ro = make_host({B, S, H, D}, 0, false), rl = make_host({B, H, S}, 0, false);
  const ChunkPositions all = identity_positions(S);
  reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
  Host rdq = make_host({B, S, H, D}, 0, false), rdk = make_host({B, S, Hkv, D}, 0, false);
  Host rdv = make_host({B, S, Hkv, D}, 0, false);
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rdq.view, rdk.view, rdv.view);

  auto transports = make_loopback_transports(world, {}, 20000.0);
  const RingPlan plan = plan_ring(spec, world, true);
  const uint64_t row_bytes = kv_row_bytes(spec);
  const uint64_t grad_row_bytes = row_bytes / dtype_size(spec.dtype) * 8;  // fp64 accumulators here
  run_ranks(world, [&](int r) {
    RingAttention ring(spec, make_cpu_backend(), std::move(transports[r]));
    const int64_t n = ring.local_seq();
    const ChunkPositions pos = ring.positions();
    auto local = [&](const Host& g, int64_t heads, int seq_dim) {
      Host l = seq_dim == 1 ? make_host({B, n, heads, D}, 0, false) : make_host({B, heads, n}, 0, false);
      shard_rows(g.view, l.view, pos, seq_dim);
      return l;
    };
    Host lq = local(q, H, 1), lk = local(k, Hkv, 1), lv = local(v, Hkv, 1), ldo = local(dout, H, 1);
    Host out = make_host({B, n, H, D}, 0, false), lse = make_host({B, H, n}, 0, false);
    for (int pass = 0; pass < 2; ++pass) ring.forward(lq.view, lk.view, lv.view, out.view, lse.view);
    uint64_t received = 0, sent = 0;
    for (const HopStats& h : ring.last_stats().hops) {
      received += h.received_bytes;
      sent += h.sent_bytes;
    }
    int64_t planned_in = 0, planned_out = 0;
    for (int s = 0; s < world; ++s) {
      planned_in += plan.rows(plan.needed[r][s]);
      planned_out += plan.rows(plan.needed[s][r]);
    }
    if (plan.route == Route::kRing) planned_in = planned_out = (world - 1) * n;
    EXPECT_EQ(received, static_cast<uint64_t>(planned_in) * row_bytes) << name << " rank " << r;
    EXPECT_EQ(sent, static_cast<uint64_t>(planned_out) * row_bytes) << name << " rank " << r;
    EXPECT_LT(max_err(out.view, local(ro, H, 1).view), 1e-12) << name << " out, rank " << r;
    EXPECT_LT(max_err(lse.view, local(rl, H, 2).view), 1e-12) << name << " lse, rank " << r;
    Host dq = make_host({B, n, H, D}, 0, false), dk = make_host({B, n, Hkv, D}, 0, false);
    Host dv = make_host({B, n, Hkv, D}, 0, false);
    for (int pass = 0; pass < 2; ++pass) {
      ring.backward(lq.view, lk.view, lv.view, out.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
    }
    if (plan.route == Route::kDirect) {
      uint64_t kv_in = 0, kv_out = 0, g_in = 0, g_out = 0;
      for (const HopStats& h : ring.last_stats().hops) {
        kv_in += h.received_bytes;
        kv_out += h.sent_bytes;
        g_in += h.grad_received_bytes;
        g_out += h.grad_sent_bytes;
      }
      EXPECT_EQ(kv_in, static_cast<uint64_t>(planned_in) * row_bytes) << name << " backward K/V in, rank " << r;
      EXPECT_EQ(kv_out, static_cast<uint64_t>(planned_out) * row_bytes) << name << " backward K/V out, rank " << r;
      EXPECT_EQ(g_out, static_cast<uint64_t>(planned_in) * grad_row_bytes) << name << " dK/dV out, rank " << r;
      EXPECT_EQ(g_in, static_cast<uint64_t>(planned_out) * grad_row_bytes) << name << " dK/dV in, rank " << r;
    }
    EXPECT_LT(max_err(dq.view, local(rdq, H, 1).view), 1e-11) << name << " dq, rank " << r;
    EXPECT_LT(max_err(dk.view, local(rdk, Hkv, 1).view), 1e-11) << name << " dk, rank " << r;
    EXPECT_LT(max_err(dv.view, local(rdv, Hkv, 1).view), 1e-11) << name << " dv, rank " << r;
  });
}

struct Typed {
  std::vector<unsigned char> bytes;
  TensorView view;
};

Typed typed_like(const TensorView& src, DType dtype) {
  Typed t;
  t.bytes.assign(static_cast<std::size_t>(src.numel()) * dtype_size(dtype), 0);
  std::vector<int64_t> shape(src.shape.begin(), src.shape.begin() + src.rank);
  // shape[3] exists only for rank 4 (reading it for an lse of rank 3 overflowed: ASan).
  t.view = src.rank == 3 ? make_view(t.bytes.data(), dtype, Device::kHost, {shape[0], shape[1], shape[2]})
                         : make_view(t.bytes.data(), dtype, Device::kHost, {shape[0], shape[1], shape[2], shape[3]});
  for (int64_t i = 0; i < src.numel(); ++i) store_from_double(t.view, i, load_as_double(src, i));
  return t;
}

// fp32 and bf16 inputs (fp32 accumulators of another size than the K/V rows) on the direct route.
void check_ring_dtype(AttentionSpec spec, int world, DType dtype, double tol, const std::string& name) {
  spec.dtype = dtype;
  const int64_t B = spec.batch, S = spec.seq_len, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  Host q = make_host({B, S, H, D}, 21, true), k = make_host({B, S, Hkv, D}, 22, true);
  Host v = make_host({B, S, Hkv, D}, 23, true), dout = make_host({B, S, H, D}, 24, true);
  for (Host* h : {&q, &k, &v, &dout}) {  // the reference sees the rounded inputs
    Typed t = typed_like(h->view, dtype);
    for (int64_t i = 0; i < h->view.numel(); ++i) h->data[i] = load_as_double(t.view, i);
  }
  Host ro = make_host({B, S, H, D}, 0, false), rl = make_host({B, H, S}, 0, false);
  const ChunkPositions all = identity_positions(S);
  reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
  Host rdq = make_host({B, S, H, D}, 0, false), rdk = make_host({B, S, Hkv, D}, 0, false);
  Host rdv = make_host({B, S, Hkv, D}, 0, false);
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rdq.view, rdk.view, rdv.view);
  auto transports = make_loopback_transports(world, {}, 20000.0);
  run_ranks(world, [&](int r) {
    RingAttention ring(spec, make_cpu_backend(), std::move(transports[r]));
    const int64_t n = ring.local_seq();
    const ChunkPositions pos = ring.positions();
    auto local = [&](const Host& g, int64_t heads, int seq_dim) {
      Host l = seq_dim == 1 ? make_host({B, n, heads, D}, 0, false) : make_host({B, heads, n}, 0, false);
      shard_rows(g.view, l.view, pos, seq_dim);
      return l;
    };
    Typed lq = typed_like(local(q, H, 1).view, dtype), lk = typed_like(local(k, Hkv, 1).view, dtype);
    Typed lv = typed_like(local(v, Hkv, 1).view, dtype), ldo = typed_like(local(dout, H, 1).view, dtype);
    Typed out = typed_like(make_host({B, n, H, D}, 0, true).view, dtype);
    Typed lse = typed_like(make_host({B, H, n}, 0, true).view, DType::kF32);
    if (dtype == DType::kF32) {
      ring.forward(lq.view, lk.view, lv.view, out.view, lse.view);
    } else {
      lse = typed_like(make_host({B, H, n}, 0, true).view, DType::kF32);
      ring.forward(lq.view, lk.view, lv.view, out.view, lse.view);
    }
    EXPECT_LT(max_err(out.view, local(ro, H, 1).view), tol) << name << " out, rank " << r;
    Typed dq = typed_like(make_host({B, n, H, D}, 0, true).view, dtype);
    Typed dk = typed_like(make_host({B, n, Hkv, D}, 0, true).view, dtype);
    Typed dv = typed_like(make_host({B, n, Hkv, D}, 0, true).view, dtype);
    ring.backward(lq.view, lk.view, lv.view, out.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
    EXPECT_LT(max_err(dq.view, local(rdq, H, 1).view), 10 * tol) << name << " dq, rank " << r;
    EXPECT_LT(max_err(dk.view, local(rdk, Hkv, 1).view), 10 * tol) << name << " dk, rank " << r;
    EXPECT_LT(max_err(dv.view, local(rdv, Hkv, 1).view), 10 * tol) << name << " dv, rank " << r;
  });
}

AttentionSpec base_spec(int64_t S, Layout layout, int64_t B, int heads, int kv_heads) {
  AttentionSpec s;
  s.batch = B;
  s.seq_len = S;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = 3;
  s.dtype = DType::kF64;
  s.layout = layout;
  return s;
}

// RINGATTN_REVIEW_TRIALS scales the number of trials (a long sweep: 20).
int scaled(int trials) {
  const char* v = std::getenv("RINGATTN_REVIEW_TRIALS");
  return v ? trials * std::atoi(v) : trials;
}

void random_rings(uint64_t seed, int trials, const char* route) {
  trials = scaled(trials);
  if (route != nullptr) {
    setenv("RINGATTN_PLAN_ROUTE", route, 1);
  } else {
    unsetenv("RINGATTN_PLAN_ROUTE");
  }
  std::mt19937_64 rng(seed);
  const Layout layouts[] = {Layout::kContiguous, Layout::kZigzag, Layout::kStriped, Layout::kAuto};
  for (int trial = 0; trial < trials; ++trial) {
    const int world = std::uniform_int_distribution<int>(1, 6)(rng);
    const Layout layout = layouts[std::uniform_int_distribution<int>(0, 3)(rng)];
    const int64_t S = layout_divisor(layout, world) * std::uniform_int_distribution<int64_t>(1, 48 / world)(rng) *
                      (layout == Layout::kZigzag ? 1 : 2);
    const int64_t B = std::uniform_int_distribution<int64_t>(1, 3)(rng);
    const int kv = std::uniform_int_distribution<int>(1, 2)(rng);
    const int heads = kv * std::uniform_int_distribution<int>(1, 2)(rng);
    AttentionSpec spec = base_spec(S, layout, B, heads, kv);
    spec.mask = random_mask(rng, S, heads, kv);
    const std::string name = std::string("trial ") + std::to_string(trial) + " " + layout_name(layout) +
                             " p=" + std::to_string(world) + " S=" + std::to_string(S) + " B=" + std::to_string(B) +
                             " H=" + std::to_string(heads) + "/" + std::to_string(kv) + " " + spec.mask.describe() +
                             " route=" + (route ? route : "plan");
    check_ring(spec, world, name);
    if (::testing::Test::HasFailure()) break;
  }
  unsetenv("RINGATTN_PLAN_ROUTE");
}

TEST(ReviewRing, RandomMasksPlanRoute) { random_rings(101, 60, nullptr); }
TEST(ReviewRing, RandomMasksDirectRoute) { random_rings(202, 60, "direct"); }
TEST(ReviewRing, RandomMasksRingRoute) { random_rings(303, 30, "ring"); }

TEST(ReviewRing, DirectRouteFp32AndBf16) {
  setenv("RINGATTN_PLAN_ROUTE", "direct", 1);
  std::mt19937_64 rng(505);
  for (int trial = 0; trial < 12; ++trial) {
    const int world = 2 + trial % 3;
    const int64_t S = 8 * world;
    AttentionSpec spec = base_spec(S, trial % 2 ? Layout::kStriped : Layout::kContiguous, 2, 4, 2);
    spec.head_dim = 4;
    spec.mask = random_mask(rng, S, 4, 2);
    const DType dt = trial < 6 ? DType::kF32 : DType::kBF16;
    check_ring_dtype(spec, world, dt, dt == DType::kF32 ? 1e-5 : 2e-2,
                     std::string(dtype_name(dt)) + " trial " + std::to_string(trial) + " " + spec.mask.describe());
    if (HasFailure()) break;
  }
  unsetenv("RINGATTN_PLAN_ROUTE");
}

// Balanced layout with random masks on 2 and 3 ranks (blocks of kBalancedBlock tokens).
TEST(ReviewRing, BalancedRandomMasks) {
  std::mt19937_64 rng(404);
  for (int trial = 0; trial < 6; ++trial) {
    const int world = 2 + trial % 2;
    const int64_t S = kBalancedBlock * world * 2;
    AttentionSpec spec = base_spec(S, Layout::kBalanced, 1 + trial % 2, 2, 1);
    spec.head_dim = 2;
    spec.mask = random_mask(rng, S, 2, 1);
    if (trial < 2) spec.mask.doc_offsets = doc_offsets_from_lengths({100, 300, 50, S - 450}, S);
    check_ring(spec, world, "balanced trial " + std::to_string(trial) + " p=" + std::to_string(world) + " " +
                                spec.mask.describe());
    if (HasFailure()) return;
  }
}

}  // namespace
}  // namespace ringattn

namespace ringattn {
namespace {

// Telemetry: per hop, `peers` has one entry per peer rank (as the ring's record_ring_bytes does
// for p = 2, where next == prev). The direct route's record_peer_bytes pushes one entry per
// message, so a peer that this rank both sends to and receives from (p = 2, or a window on both
// sides) appears twice, and in the backward up to four times (K/V and dK/dV each way).
TEST(ReviewRing, DirectTelemetryOneEntryPerPeer) {
  AttentionSpec spec = base_spec(32, Layout::kContiguous, 1, 2, 1);
  spec.mask.has_window = true;
  spec.mask.window_left = 3;
  spec.mask.window_right = 3;
  const int world = 2;
  auto transports = make_loopback_transports(world, {}, 20000.0);
  run_ranks(world, [&](int r) {
    RingAttention ring(spec, make_cpu_backend(), std::move(transports[r]));
    const int64_t n = ring.local_seq(), H = spec.heads, D = spec.head_dim;
    Host q = make_host({1, n, H, D}, 1, true), k = make_host({1, n, 1, D}, 2, true), v = make_host({1, n, 1, D}, 3, true);
    Host out = make_host({1, n, H, D}, 0, false), lse = make_host({1, H, n}, 0, false);
    ring.forward(q.view, k.view, v.view, out.view, lse.view);
    for (const HopStats& h : ring.last_stats().hops) {
      std::vector<int> ranks;
      for (const auto& p : h.peers) ranks.push_back(p.rank);
      std::sort(ranks.begin(), ranks.end());
      EXPECT_TRUE(std::adjacent_find(ranks.begin(), ranks.end()) == ranks.end())
          << "rank " << r << " hop " << h.hop << ": " << h.peers.size() << " peer entries for one peer";
    }
  });
}

}  // namespace
}  // namespace ringattn
