// A p-rank ring on one GPU (loopback transport, one thread and stream per rank): forward + backward against fp64.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attn/reference.hpp"
#include "gpu_test_util.hpp"
#include "plan/plan.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn::test {
namespace {

// As ring_backward_gpu_test.cpp: relative to max|ref|, a few bf16 units (2^-8).
constexpr double kBf16OutTolerance = 2.0 * 3.9e-3;
constexpr double kBf16GradTolerance = 4.0 * 3.9e-3;

double rel_error(const HostTensor& got, const HostTensor& want) {
  double max_ref = 0.0, max_err = 0.0;
  for (int64_t i = 0; i < want.view.numel(); ++i) {
    const double w = load_as_double(want.view, i), g = load_as_double(got.view, i);
    max_ref = std::max(max_ref, std::fabs(w));
    const double d = std::fabs(g - w);
    if (std::isnan(d)) return INFINITY;
    max_err = std::max(max_err, d);
  }
  return max_err / std::max(max_ref, 1e-30);
}

// Rows of rank r's chunk of a global host tensor (seq along dim 1 or 2).
HostTensor shard(const HostTensor& g, const ChunkPositions& pos, int seq_dim) {
  const auto& s = g.view.shape;
  HostTensor l = g.view.rank == 3 ? HostTensor(g.view.dtype, {s[0], s[1], pos.size()})
                                  : HostTensor(g.view.dtype, {s[0], pos.size(), s[2], s[3]});
  shard_rows(g.view, l.view, pos, seq_dim);
  return l;
}

// `route`: "" (the plan's choice) or a forced RINGATTN_PLAN_ROUTE.
void run_ring(int world, bool causal, Layout layout, const char* route) {
  if (route[0] != '\0') {
    setenv("RINGATTN_PLAN_ROUTE", route, 1);
  } else {
    unsetenv("RINGATTN_PLAN_ROUTE");
  }
  const int64_t B = 1, S = 512, H = 4, Hkv = 2, D = 128;
  AttentionSpec spec;
  spec.batch = B;
  spec.seq_len = S;
  spec.heads = H;
  spec.kv_heads = Hkv;
  spec.head_dim = D;
  spec.mask.causal = causal;
  spec.layout = layout;
  spec.dtype = DType::kBF16;
  std::mt19937 rng(static_cast<unsigned>(world * 7 + (causal ? 1 : 0)));
  HostTensor q(DType::kBF16, {B, S, H, D}), k(DType::kBF16, {B, S, Hkv, D}), v(DType::kBF16, {B, S, Hkv, D});
  HostTensor dout(DType::kBF16, {B, S, H, D});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  fill_normal(dout, rng);
  HostTensor ro(DType::kF64, {B, S, H, D}), rl(DType::kF64, {B, H, S});
  const ChunkPositions all = identity_positions(S);
  reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
  HostTensor rq(DType::kF64, {B, S, H, D}), rk(DType::kF64, {B, S, Hkv, D}), rv(DType::kF64, {B, S, Hkv, D});
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rq.view, rk.view, rv.view);

  std::vector<void*> streams(static_cast<std::size_t>(world));
  for (auto& s : streams) {
    cudaStream_t st = nullptr;
    ASSERT_EQ(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), cudaSuccess);
    s = st;
  }
  auto transports = make_loopback_transports(world, streams);
  const RankLayout ranks = layout_ranks(spec, world);
  std::vector<std::string> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  const std::string what = std::to_string(world) + " ranks " + layout_name(layout) + (causal ? " causal" : " full") +
                           " route " + (route[0] ? route : "auto");
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        const ChunkPositions pos = ranks.positions(r);
        RingAttention ring(spec, make_cuda_backend(streams[r]), std::move(transports[r]));
        const int64_t n = ring.local_seq();
        HostTensor lq = shard(q, pos, 1), lk = shard(k, pos, 1), lv = shard(v, pos, 1), ldo = shard(dout, pos, 1);
        DeviceTensor d_q(DType::kBF16, {B, n, H, D}), d_k(DType::kBF16, {B, n, Hkv, D}), d_v(DType::kBF16, {B, n, Hkv, D});
        DeviceTensor d_do(DType::kBF16, {B, n, H, D}), d_out(DType::kBF16, {B, n, H, D}), d_lse(DType::kF32, {B, H, n});
        DeviceTensor d_dq(DType::kBF16, {B, n, H, D}), d_dk(DType::kBF16, {B, n, Hkv, D}), d_dv(DType::kBF16, {B, n, Hkv, D});
        d_q.upload(lq);
        d_k.upload(lk);
        d_v.upload(lv);
        d_do.upload(ldo);
        for (DeviceTensor* t : {&d_out, &d_lse, &d_dq, &d_dk, &d_dv}) t->poison();
        ring.forward(d_q.view, d_k.view, d_v.view, d_out.view, d_lse.view);
        ring.backward(d_q.view, d_k.view, d_v.view, d_out.view, d_lse.view, d_do.view, d_dq.view, d_dk.view, d_dv.view);
        cudaStreamSynchronize(static_cast<cudaStream_t>(streams[r]));
        HostTensor out(DType::kBF16, {B, n, H, D}), gq(DType::kBF16, {B, n, H, D});
        HostTensor gk(DType::kBF16, {B, n, Hkv, D}), gv(DType::kBF16, {B, n, Hkv, D});
        d_out.download(out);
        d_dq.download(gq);
        d_dk.download(gk);
        d_dv.download(gv);
        const std::string at = what + " rank " + std::to_string(r) + " (" + route_name(ring.plan().route) + ")";
        if (route[0] != '\0' && std::string(route_name(ring.plan().route)) != route) errors[r] = at + ": route not taken";
        if (rel_error(out, shard(ro, pos, 1)) >= kBf16OutTolerance) errors[r] += at + ": out; ";
        if (rel_error(gq, shard(rq, pos, 1)) >= kBf16GradTolerance) errors[r] += at + ": dq; ";
        if (rel_error(gk, shard(rk, pos, 1)) >= kBf16GradTolerance) errors[r] += at + ": dk; ";
        if (rel_error(gv, shard(rv, pos, 1)) >= kBf16GradTolerance) errors[r] += at + ": dv; ";
      } catch (const std::exception& e) {
        errors[r] = what + " rank " + std::to_string(r) + ": " + e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (void* s : streams) cudaStreamDestroy(static_cast<cudaStream_t>(s));
  unsetenv("RINGATTN_PLAN_ROUTE");
  for (const auto& e : errors) EXPECT_TRUE(e.empty()) << e;
}

TEST(LoopbackRingGpu, RingAndDirectRoutesMatchFp64Reference) {
  RINGATTN_SKIP_WITHOUT_GPU();
  for (int world : {2, 4}) {
    for (bool causal : {false, true}) {
      run_ring(world, causal, causal ? Layout::kZigzag : Layout::kContiguous, "");
      run_ring(world, causal, causal ? Layout::kZigzag : Layout::kContiguous, "direct");
    }
    run_ring(world, true, Layout::kContiguous, "direct");  // readers need whole chunks of lower ranks only
  }
}

}  // namespace
}  // namespace ringattn::test
