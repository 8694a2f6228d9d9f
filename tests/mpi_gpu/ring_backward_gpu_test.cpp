// The ring backward over NCCL equals the fp64 reference for every layout (skipped steps included), twice on one ring.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attn/reference.hpp"
#include "gpu/gpu_test_util.hpp"
#include "mpi_gpu/grad_compare.hpp"
#include "mpi_gpu/mpi_gpu_env.hpp"
#include "mpi_gpu/ring_case.hpp"
#include "ringattn/ringattn.hpp"
#include "runtime/cuda/device_tensors.hpp"

namespace ringattn::test {
namespace {

class RingBackwardGpu : public ::testing::TestWithParam<Case> {};

// Two backward passes on one ring with different dO: the second must equal the reference of its
// own dO (a share or partial left over from the first, or a share buffer the exchange stream had
// not zeroed, would show). Contiguous causal rings skip steps (no share, the partial passes on).
TEST_P(RingBackwardGpu, MatchesFp64ReferenceTwiceOnOneRing) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  const Case c = GetParam();
  const AttentionSpec spec = spec_of(c);
  Session& s = session();
  const int rank = s.rank(), world = s.world();
  const int64_t B = c.batch, S = c.seq_len, H = c.heads, Hkv = c.kv_heads, D = c.head_dim, L = S / world;

  std::mt19937 rng(4321);
  HostTensor q(c.dtype, {B, S, H, D}), k(c.dtype, {B, S, Hkv, D}), v(c.dtype, {B, S, Hkv, D});
  HostTensor dout1(c.dtype, {B, S, H, D}), dout2(c.dtype, {B, S, H, D});
  for (HostTensor* t : {&q, &k, &v, &dout1, &dout2}) fill_normal(*t, rng);
  const ChunkPositions pos = chunk_positions(c.layout, S, rank, world);
  auto upload_local = [&](const HostTensor& g, int64_t heads, DeviceTensor& d) {
    HostTensor h(c.dtype, {B, L, heads, D});
    shard_rows(g.view, h.view, pos, 1);
    d.upload(h);
  };
  DeviceTensor lq(c.dtype, {B, L, H, D}), lk(c.dtype, {B, L, Hkv, D}), lv(c.dtype, {B, L, Hkv, D});
  DeviceTensor ldo1(c.dtype, {B, L, H, D}), ldo2(c.dtype, {B, L, H, D});
  upload_local(q, H, lq);
  upload_local(k, Hkv, lk);
  upload_local(v, Hkv, lv);
  upload_local(dout1, H, ldo1);
  upload_local(dout2, H, ldo2);
  DeviceTensor out(c.dtype, {B, L, H, D}), lse(DType::kF32, {B, H, L});
  DeviceTensor gq(c.dtype, {B, L, H, D}), gk(c.dtype, {B, L, Hkv, D}), gv(c.dtype, {B, L, Hkv, D});
  for (DeviceTensor* t : {&out, &lse, &gq, &gk, &gv}) t->poison();

  std::unique_ptr<RingAttention> ring = s.make_ring(spec);
  ring->forward(lq.view, lk.view, lv.view, out.view, lse.view);
  for (int pass = 0; pass < 2; ++pass) {
    const HostTensor& dout = pass == 0 ? dout1 : dout2;
    ring->backward(lq.view, lk.view, lv.view, out.view, lse.view, (pass == 0 ? ldo1 : ldo2).view, gq.view, gk.view,
                   gv.view);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    HostTensor hq(c.dtype, {B, L, H, D}), hk(c.dtype, {B, L, Hkv, D}), hv(c.dtype, {B, L, Hkv, D});
    gq.download(hq);
    gk.download(hk);
    gv.download(hv);
    HostTensor rq(DType::kF64, {B, S, H, D}), rk(DType::kF64, {B, S, Hkv, D}), rv(DType::kF64, {B, S, Hkv, D});
    reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rq.view, rk.view, rv.view);
    const double eq = rel_error(hq, rq, pos, B, L, S, H * D);
    const double ek = rel_error(hk, rk, pos, B, L, S, Hkv * D);
    const double ev = rel_error(hv, rv, pos, B, L, S, Hkv * D);
    if (rank == 0) {
      std::printf("[ ring bwd p=%d ] %-36s pass %d  dq %.2e  dk %.2e  dv %.2e\n", world, case_name(c).c_str(),
                  pass, eq, ek, ev);
    }
    EXPECT_LT(eq, kGradTolerance) << "dq, pass " << pass;
    EXPECT_LT(ek, kGradTolerance) << "dk, pass " << pass;
    EXPECT_LT(ev, kGradTolerance) << "dv, pass " << pass;
  }
}

std::vector<Case> bwd_cases() {
  std::vector<Case> out;
  for (Layout l : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    out.push_back({l, true, 4, 2, 128, DType::kBF16, 1, 512});  // GQA 2:1, causal (contiguous skips steps)
  }
  out.push_back({Layout::kContiguous, false, 4, 4, 128, DType::kBF16, 2, 512});  // every step full, batch 2
  out.push_back({Layout::kZigzag, true, 4, 1, 64, DType::kF16, 1, 488});          // ragged chunks, MQA, hd 64
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, RingBackwardGpu, ::testing::ValuesIn(bwd_cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return case_name(info.param); });

}  // namespace
}  // namespace ringattn::test
