// RingAttention on one GPU (local transport): forward + backward through the CudaBackend against the fp64 reference.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "attn/reference.hpp"
#include "gpu_test_util.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn::test {
namespace {

// Relative to max|ref|: bf16 keeps 8 significant bits (unit roundoff 2^-8 = 3.9e-3); a plain bf16
// implementation that rounds P and dS to bf16 before the matrix products lands at a few units of
// that on these sizes (see flash_bwd_test.cpp for the measured same-precision errors).
constexpr double kBf16GradTolerance = 4.0 * 3.9e-3;
constexpr double kBf16OutTolerance = 2.0 * 3.9e-3;

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

void run_case(bool causal, int heads, int kv_heads, int head_dim, int64_t batch, int64_t seq) {
  AttentionSpec spec;
  spec.batch = batch;
  spec.seq_len = seq;
  spec.heads = heads;
  spec.kv_heads = kv_heads;
  spec.head_dim = head_dim;
  spec.mask.causal = causal;
  spec.dtype = DType::kBF16;
  spec.layout = Layout::kZigzag;
  std::mt19937 rng(static_cast<unsigned>(seq * 31 + heads + (causal ? 7 : 0)));
  HostTensor q(DType::kBF16, {batch, seq, heads, head_dim}), k(DType::kBF16, {batch, seq, kv_heads, head_dim});
  HostTensor v(DType::kBF16, {batch, seq, kv_heads, head_dim}), dout(DType::kBF16, {batch, seq, heads, head_dim});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  fill_normal(dout, rng);

  RingAttention ring(spec, make_cuda_backend(nullptr), make_local_transport());
  DeviceTensor dq_(DType::kBF16, {batch, seq, heads, head_dim}), dk_(DType::kBF16, {batch, seq, kv_heads, head_dim});
  DeviceTensor dv_(DType::kBF16, {batch, seq, kv_heads, head_dim}), d_q(DType::kBF16, {batch, seq, heads, head_dim});
  DeviceTensor d_k(DType::kBF16, {batch, seq, kv_heads, head_dim}), d_v(DType::kBF16, {batch, seq, kv_heads, head_dim});
  DeviceTensor d_do(DType::kBF16, {batch, seq, heads, head_dim}), d_out(DType::kBF16, {batch, seq, heads, head_dim});
  DeviceTensor d_lse(DType::kF32, {batch, heads, seq});
  d_q.upload(q);
  d_k.upload(k);
  d_v.upload(v);
  d_do.upload(dout);
  for (DeviceTensor* t : {&d_out, &d_lse, &dq_, &dk_, &dv_}) t->poison();
  ring.forward(d_q.view, d_k.view, d_v.view, d_out.view, d_lse.view);
  ring.backward(d_q.view, d_k.view, d_v.view, d_out.view, d_lse.view, d_do.view, dq_.view, dk_.view, dv_.view);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  HostTensor out(DType::kBF16, {batch, seq, heads, head_dim}), gdq(DType::kBF16, {batch, seq, heads, head_dim});
  HostTensor gdk(DType::kBF16, {batch, seq, kv_heads, head_dim}), gdv(DType::kBF16, {batch, seq, kv_heads, head_dim});
  d_out.download(out);
  dq_.download(gdq);
  dk_.download(gdk);
  dv_.download(gdv);

  // Positions: world 1 means the local chunk is the whole sequence in order.
  HostTensor ro(DType::kF64, {batch, seq, heads, head_dim}), rl(DType::kF64, {batch, heads, seq});
  const ChunkPositions all = identity_positions(seq);
  reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
  HostTensor rq(DType::kF64, {batch, seq, heads, head_dim}), rk(DType::kF64, {batch, seq, kv_heads, head_dim});
  HostTensor rv(DType::kF64, {batch, seq, kv_heads, head_dim});
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rq.view, rk.view, rv.view);
  const std::string what = std::string(causal ? "causal" : "full") + " H=" + std::to_string(heads) + "/" +
                           std::to_string(kv_heads) + " d=" + std::to_string(head_dim) + " S=" + std::to_string(seq);
  EXPECT_LT(rel_error(out, ro), kBf16OutTolerance) << "out " << what;
  EXPECT_LT(rel_error(gdq, rq), kBf16GradTolerance) << "dq " << what;
  EXPECT_LT(rel_error(gdk, rk), kBf16GradTolerance) << "dk " << what;
  EXPECT_LT(rel_error(gdv, rv), kBf16GradTolerance) << "dv " << what;
}

TEST(RingGpuBackward, ForwardBackwardThroughTheSchedulerMatchesFp64Reference) {
  RINGATTN_SKIP_WITHOUT_GPU();
  for (bool causal : {false, true}) {
    run_case(causal, 4, 4, 128, 1, 256);
    run_case(causal, 8, 2, 64, 2, 200);
  }
}

}  // namespace
}  // namespace ringattn::test
