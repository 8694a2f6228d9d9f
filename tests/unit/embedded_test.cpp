// Embedded passes on the CPU backend (world 1 and loopback rings): equal to the blocking passes, workspace-only, kept errors with NaN outputs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "plan/plan.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn {
namespace {

constexpr double kShortTimeoutMs = 200.0;   // the failure test: a peer that never posts
constexpr double kTestTimeoutMs = 20000.0;  // a ring whose ranks all run: fails fast if one does not

struct Host {
  std::vector<double> data;
  TensorView view;
};

Host make_host(std::initializer_list<int64_t> shape, uint64_t seed) {
  Host h;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  h.data.assign(static_cast<std::size_t>(n), 0.0);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  for (auto& v : h.data) v = seed == 0 ? 0.0 : u(rng);
  h.view = make_view(h.data.data(), DType::kF64, Device::kHost, shape);
  return h;
}

bool bit_equal(const Host& a, const Host& b) {
  return a.data.size() == b.data.size() && std::memcmp(a.data.data(), b.data.data(), a.data.size() * sizeof(double)) == 0;
}

bool all_nan(const Host& a) {
  for (double x : a.data) {
    if (!std::isnan(x)) return false;
  }
  return true;
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

AttentionSpec small_spec(bool causal) {
  AttentionSpec s;
  s.batch = 2;
  s.seq_len = 48;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 4;
  s.dtype = DType::kF64;
  s.mask.causal = causal;
  return s;
}

// One rank's local tensors and both runs' outputs.
struct RankRun {
  Host q, k, v, dout;
  Host out[2], lse[2], dq[2], dk[2], dv[2];  // [blocking, embedded]
};

// The blocking ring and the embedded ring of the same spec on `world` loopback ranks (the
// embedded one twice, with a fresh workspace each time) write the same bits.
void check_same_as_blocking(const AttentionSpec& spec, int world, const std::string& name) {
  auto blocking = make_loopback_transports(world);
  auto embedded = make_loopback_transports(world);
  run_ranks(world, [&](int r) {
    RingAttention a(spec, make_cpu_backend(), std::move(blocking[r]));
    RingAttention b(spec, make_cpu_backend(), std::move(embedded[r]), RingOptions{true});
    ASSERT_TRUE(b.embedded());
    EXPECT_EQ(a.plan().route, b.plan().route);
    const int64_t B = spec.batch, n = a.local_seq(), H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
    RankRun x;
    x.q = make_host({B, n, H, D}, 11 + r);
    x.k = make_host({B, n, Hkv, D}, 21 + r);
    x.v = make_host({B, n, Hkv, D}, 31 + r);
    x.dout = make_host({B, n, H, D}, 41 + r);
    for (int i = 0; i < 2; ++i) {
      x.out[i] = make_host({B, n, H, D}, 0);
      x.lse[i] = make_host({B, H, n}, 0);
      x.dq[i] = make_host({B, n, H, D}, 0);
      x.dk[i] = make_host({B, n, Hkv, D}, 0);
      x.dv[i] = make_host({B, n, Hkv, D}, 0);
    }
    a.forward(x.q.view, x.k.view, x.v.view, x.out[0].view, x.lse[0].view);
    a.backward(x.q.view, x.k.view, x.v.view, x.out[0].view, x.lse[0].view, x.dout.view, x.dq[0].view, x.dk[0].view,
               x.dv[0].view);
    for (int call = 0; call < 2; ++call) {
      for (Pass pass : {Pass::kForward, Pass::kBackward}) {
        const std::size_t bytes = b.workspace_bytes(pass);
        std::vector<double> ws(bytes / sizeof(double) + kWorkspaceAlignment, std::nan(""));
        char* base = reinterpret_cast<char*>(ws.data());
        base += (kWorkspaceAlignment - reinterpret_cast<std::uintptr_t>(base) % kWorkspaceAlignment) % kWorkspaceAlignment;
        PassOptions o;
        o.workspace = base;
        o.workspace_bytes = bytes;
        o.timeline = call == 1;
        if (pass == Pass::kForward) {
          b.forward(x.q.view, x.k.view, x.v.view, x.out[1].view, x.lse[1].view, o);
        } else {
          b.backward(x.q.view, x.k.view, x.v.view, x.out[1].view, x.lse[1].view, x.dout.view, x.dq[1].view,
                     x.dk[1].view, x.dv[1].view, o);
        }
      }
      EXPECT_FALSE(b.poll().has_value()) << name;
      EXPECT_TRUE(bit_equal(x.out[0], x.out[1])) << name << " out, rank " << r << ", call " << call;
      EXPECT_TRUE(bit_equal(x.lse[0], x.lse[1])) << name << " lse, rank " << r;
      EXPECT_TRUE(bit_equal(x.dq[0], x.dq[1])) << name << " dq, rank " << r;
      EXPECT_TRUE(bit_equal(x.dk[0], x.dk[1])) << name << " dk, rank " << r;
      EXPECT_TRUE(bit_equal(x.dv[0], x.dv[1])) << name << " dv, rank " << r;
    }
  });
}

TEST(Embedded, SameBitsAsBlockingOnOneToFourRanks) {
  for (int world = 1; world <= 4; ++world) {
    for (bool causal : {false, true}) {
      AttentionSpec spec = small_spec(causal);
      check_same_as_blocking(spec, world, "p=" + std::to_string(world) + (causal ? " causal" : " dense"));
      spec.mask.has_window = true;  // a masked problem: the direct route on more than one rank
      spec.mask.window_left = 5;
      spec.mask.window_right = 0;
      check_same_as_blocking(spec, world, "p=" + std::to_string(world) + " window");
    }
  }
}

TEST(Embedded, RingRouteForcedSameBitsAsBlocking) {
  ::setenv("RINGATTN_PLAN_ROUTE", "ring", 1);
  for (int world = 2; world <= 4; ++world) {
    AttentionSpec spec = small_spec(true);
    spec.layout = Layout::kZigzag;
    check_same_as_blocking(spec, world, "ring route p=" + std::to_string(world));
  }
  ::unsetenv("RINGATTN_PLAN_ROUTE");
}

TEST(Embedded, RefusesBadWorkspaceAndBlockingRings) {
  const AttentionSpec spec = small_spec(false);  // dense: both ranks receive rows, so both need a workspace
  auto transports = make_loopback_transports(2, {}, kTestTimeoutMs);
  run_ranks(2, [&](int r) {
    RingAttention ring(spec, make_cpu_backend(), std::move(transports[r]), RingOptions{true});
    const int64_t n = ring.local_seq();
    Host q = make_host({2, n, 4, 4}, 1 + r), k = make_host({2, n, 2, 4}, 3 + r), v = make_host({2, n, 2, 4}, 5 + r);
    Host out = make_host({2, n, 4, 4}, 0), lse = make_host({2, 4, n}, 0);
    const std::size_t bytes = ring.workspace_bytes(Pass::kForward);
    ASSERT_GT(bytes, 0u);
    EXPECT_EQ(bytes % kWorkspaceAlignment, 0u);
    std::vector<unsigned char> ws(bytes + kWorkspaceAlignment);
    char* base = reinterpret_cast<char*>(ws.data());
    base += (kWorkspaceAlignment - reinterpret_cast<std::uintptr_t>(base) % kWorkspaceAlignment) % kWorkspaceAlignment;
    PassOptions o;
    o.workspace = base;
    o.workspace_bytes = bytes - 1;  // too small: refused before anything runs, and not kept
    try {
      ring.forward(q.view, k.view, v.view, out.view, lse.view, o);
      ADD_FAILURE() << "a too small workspace was accepted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kInvalidArgument);
      EXPECT_NE(std::string(e.what()).find("workspace"), std::string::npos) << e.what();
    }
    o.workspace = base + 8;  // misaligned
    o.workspace_bytes = bytes;
    EXPECT_THROW(ring.forward(q.view, k.view, v.view, out.view, lse.view, o), Error);
    Host bad_lse = make_host({2, 4, n + 1}, 0);
    o.workspace = base;
    EXPECT_THROW(ring.forward(q.view, k.view, v.view, out.view, bad_lse.view, o), Error);
    EXPECT_FALSE(ring.poll().has_value());
    ring.forward(q.view, k.view, v.view, out.view, lse.view, o);  // both ranks get here: the ring still works
    EXPECT_FALSE(ring.poll().has_value());
  });
  RingAttention blocking(spec, make_cpu_backend(), make_local_transport());
  EXPECT_FALSE(blocking.embedded());
  Host q = make_host({2, 48, 4, 4}, 1), k = make_host({2, 48, 2, 4}, 2), v = make_host({2, 48, 2, 4}, 3);
  Host out = make_host({2, 48, 4, 4}, 0), lse = make_host({2, 4, 48}, 0);
  EXPECT_THROW(blocking.forward(q.view, k.view, v.view, out.view, lse.view, PassOptions{}), Error);
}

// A peer that never posts: the pass fails with kComm, its outputs are NaN, the error is kept and
// comes back from poll() and from the next call.
TEST(Embedded, FailedPassWritesNanAndKeepsTheError) {
  const AttentionSpec spec = small_spec(false);
  auto transports = make_loopback_transports(2, {}, kShortTimeoutMs);
  RingAttention ring(spec, make_cpu_backend(), std::move(transports[0]), RingOptions{true});
  const int64_t n = ring.local_seq();
  Host q = make_host({2, n, 4, 4}, 1), k = make_host({2, n, 2, 4}, 2), v = make_host({2, n, 2, 4}, 3);
  Host out = make_host({2, n, 4, 4}, 0), lse = make_host({2, 4, n}, 0);
  std::vector<unsigned char> ws(ring.workspace_bytes(Pass::kForward) + kWorkspaceAlignment);
  char* base = reinterpret_cast<char*>(ws.data());
  base += (kWorkspaceAlignment - reinterpret_cast<std::uintptr_t>(base) % kWorkspaceAlignment) % kWorkspaceAlignment;
  PassOptions o;
  o.workspace = base;
  o.workspace_bytes = ring.workspace_bytes(Pass::kForward);
  try {
    ring.forward(q.view, k.view, v.view, out.view, lse.view, o);
    ADD_FAILURE() << "a pass with a silent peer succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kComm) << e.what();
  }
  EXPECT_TRUE(all_nan(out));
  EXPECT_TRUE(all_nan(lse));
  const std::optional<Error> kept = ring.poll();
  ASSERT_TRUE(kept.has_value());
  EXPECT_EQ(kept->kind(), ErrorKind::kComm);
  EXPECT_NE(std::string(kept->what()).find("timed out"), std::string::npos) << kept->what();
  try {
    ring.forward(q.view, k.view, v.view, out.view, lse.view, o);
    ADD_FAILURE() << "a failed ring ran another pass";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), kept->what());
  }
}

}  // namespace
}  // namespace ringattn
