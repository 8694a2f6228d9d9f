// The masked ring on p CPU ranks in one process (loopback transport): results equal the fp64 reference, bytes equal the plan.
#include <gtest/gtest.h>

#include <cmath>
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

constexpr double kFp64Tolerance = 1e-12;
constexpr double kFp64GradTolerance = 1e-11;

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
    if (std::isinf(x) && std::isinf(y) && (x > 0) == (y > 0)) continue;  // -inf lse of a row that sees nothing
    const double d = std::fabs(x - y);
    e = std::isnan(d) ? INFINITY : std::max(e, d);
  }
  return e;
}

// Runs body(rank) on one thread per rank and rethrows the first failure.
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

// Forward and backward of `spec` on `world` loopback ranks against the global fp64 reference;
// also checks that the bytes each rank reports are the rows of the plan.
void check_ring(const AttentionSpec& spec, int world, const std::string& name) {
  const int64_t B = spec.batch, S = spec.seq_len, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  Host q = make_host({B, S, H, D}, 1, true), k = make_host({B, S, Hkv, D}, 2, true);
  Host v = make_host({B, S, Hkv, D}, 3, true), dout = make_host({B, S, H, D}, 4, true);
  Host ro = make_host({B, S, H, D}, 0, false), rl = make_host({B, H, S}, 0, false);
  const ChunkPositions all = identity_positions(S);
  reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
  Host rdq = make_host({B, S, H, D}, 0, false), rdk = make_host({B, S, Hkv, D}, 0, false);
  Host rdv = make_host({B, S, Hkv, D}, 0, false);
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rdq.view, rdk.view, rdv.view);

  auto transports = make_loopback_transports(world);
  const RingPlan plan = plan_ring(spec, world, true);
  const uint64_t row_bytes = kv_row_bytes(spec);
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
    ring.forward(lq.view, lk.view, lv.view, out.view, lse.view);
    uint64_t received = 0;
    for (const HopStats& h : ring.last_stats().hops) received += h.received_bytes;
    int64_t planned = 0;
    for (int s = 0; s < world; ++s) planned += plan.rows(plan.needed[r][s]);
    if (plan.route == Route::kRing) planned = (world - 1) * n;
    EXPECT_EQ(received, static_cast<uint64_t>(planned) * row_bytes) << name << " rank " << r;
    EXPECT_EQ(ring.last_stats().visible_pairs, plan.visible_pairs[r]) << name;
    EXPECT_LT(max_err(out.view, local(ro, H, 1).view), kFp64Tolerance) << name << " out, rank " << r << "/" << world;
    EXPECT_LT(max_err(lse.view, local(rl, H, 2).view), kFp64Tolerance) << name << " lse, rank " << r << "/" << world;
    Host dq = make_host({B, n, H, D}, 0, false), dk = make_host({B, n, Hkv, D}, 0, false);
    Host dv = make_host({B, n, Hkv, D}, 0, false);
    for (int pass = 0; pass < 2; ++pass) {  // the second pass reuses every buffer
      ring.backward(lq.view, lk.view, lv.view, out.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
    }
    EXPECT_LT(max_err(dq.view, local(rdq, H, 1).view), kFp64GradTolerance) << name << " dq, rank " << r;
    EXPECT_LT(max_err(dk.view, local(rdk, Hkv, 1).view), kFp64GradTolerance) << name << " dk, rank " << r;
    EXPECT_LT(max_err(dv.view, local(rdv, Hkv, 1).view), kFp64GradTolerance) << name << " dv, rank " << r;
  });
}

AttentionSpec base_spec(int64_t S, Layout layout) {
  AttentionSpec s;
  s.batch = 2;
  s.seq_len = S;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 4;
  s.dtype = DType::kF64;
  s.layout = layout;
  return s;
}

TEST(LoopbackRing, EveryMaskAndLayoutOnOneToFourRanks) {
  const int64_t S = 48;
  std::vector<MaskSpec> masks(1);  // dense first
  MaskSpec m;
  m.causal = true;
  masks.push_back(m);
  m.has_window = true;
  m.window_left = 7;
  m.window_right = 0;
  masks.push_back(m);
  m = MaskSpec{};
  m.has_window = true;
  m.window_left = 3;
  m.window_right = 5;
  m.global_tokens = 2;
  masks.push_back(m);
  m = MaskSpec{};
  m.causal = true;
  m.stride = 6;
  m.mask_heads = 2;
  masks.push_back(m);
  m = MaskSpec{};
  m.causal = true;
  m.doc_offsets = doc_offsets_from_lengths({5, 20, 11, 12}, S);
  masks.push_back(m);
  m.has_window = true;
  m.window_left = 3;
  m.window_right = 0;
  m.global_tokens = 1;
  masks.push_back(m);
  for (Layout layout : {Layout::kAuto, Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    for (int world = 1; world <= 4; ++world) {
      if (S % layout_divisor(layout, world) != 0) continue;
      for (const MaskSpec& mask : masks) {
        AttentionSpec spec = base_spec(S, layout);
        spec.mask = mask;
        check_ring(spec, world, std::string(layout_name(layout)) + " p=" + std::to_string(world) + " " + mask.describe());
      }
    }
  }
}

// The balanced layout needs kBalancedBlock-token blocks: 4 ranks x 2 blocks of packed documents.
TEST(LoopbackRing, BalancedLayoutOnPackedDocuments) {
  const int64_t S = 8 * kBalancedBlock;
  AttentionSpec spec = base_spec(S, Layout::kBalanced);
  spec.batch = 1;
  spec.heads = 2;
  spec.kv_heads = 1;
  spec.head_dim = 2;
  spec.mask.causal = true;
  spec.mask.doc_offsets = doc_offsets_from_lengths({100, 300, 50, 250, 324}, S);
  for (int world : {2, 4}) check_ring(spec, world, "balanced p=" + std::to_string(world));
}

}  // namespace
}  // namespace ringattn
