// Ring over NCCL equals the one-GPU kernel on the gathered sequence (every layout, causal or not, GQA); check and hang safety.
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <exception>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attn/reference.hpp"
#include "comm/nccl/nccl_transport.hpp"
#include "gpu/gpu_test_util.hpp"
#include "mpi_gpu/mpi_gpu_env.hpp"
#include "mpi_gpu/ring_case.hpp"
#include "ringattn/ringattn.hpp"
#include "check/check.hpp"
#include "runtime/cuda/device_tensors.hpp"

namespace ringattn::test {

namespace {
std::unique_ptr<Session> g_session;
}  // namespace

Session& session() {
  if (!g_session) {
    SessionOptions o;
    o.backend = "cuda";
    o.timeout_ms = 60000.0;
    g_session = Session::create(nullptr, nullptr, o);
  }
  return *g_session;
}

void release_session() { g_session.reset(); }

namespace {

int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int mpi_world() {
  int w = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &w);
  return w;
}
double max_over_ranks(double v) {
  double out = v;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

// max |a - b| over rows of two (B, rows, H, D) host tensors, any dtype, with a fp64 reference scale.
struct Errors {
  double ring_vs_ref = 0.0;     // max |ring - ref64| / max |ref64|
  double single_vs_ref = 0.0;   // max |one-GPU - ref64| / max |ref64|
  double ring_vs_single = 0.0;  // max |ring - one-GPU| / max |ref64|
  double lse_ring_vs_ref = 0.0; // max |lse - ref| / max(1, |ref|)
  int64_t bad = 0;              // non-finite values
};

class RingVsOneGpu : public ::testing::TestWithParam<Case> {};

TEST_P(RingVsOneGpu, MatchesOneGpuKernelOnGatheredSequence) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  const Case c = GetParam();
  const AttentionSpec spec = spec_of(c);
  Session& s = session();
  const int rank = s.rank(), world = s.world();
  const int64_t B = c.batch, S = c.seq_len, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  const int64_t L = S / world;

  // The same global problem on every rank (fixed seed), on the host and on this rank's GPU.
  std::mt19937 rng(1234);
  HostTensor qg(c.dtype, {B, S, H, D}), kg(c.dtype, {B, S, Hkv, D}), vg(c.dtype, {B, S, Hkv, D});
  fill_normal(qg, rng);
  fill_normal(kg, rng);
  fill_normal(vg, rng);
  DeviceTensor dq(c.dtype, {B, S, H, D}), dk(c.dtype, {B, S, Hkv, D}), dv(c.dtype, {B, S, Hkv, D});
  dq.upload(qg);
  dk.upload(kg);
  dv.upload(vg);

  // This rank's chunks, cut on the device by the shard helper.
  const ChunkPositions pos = chunk_positions(c.layout, S, rank, world);
  DeviceTensor lq(c.dtype, {B, L, H, D}), lk(c.dtype, {B, L, Hkv, D}), lv(c.dtype, {B, L, Hkv, D});
  DeviceTensor lout(c.dtype, {B, L, H, D}), llse(DType::kF32, {B, H, L});
  cuda::shard_rows_async(dq.view, lq.view, pos, 1, nullptr);
  cuda::shard_rows_async(dk.view, lk.view, pos, 1, nullptr);
  cuda::shard_rows_async(dv.view, lv.view, pos, 1, nullptr);
  lout.poison();
  llse.poison();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  std::unique_ptr<RingAttention> ring = s.make_ring(spec);
  ring->forward(lq.view, lk.view, lv.view, lout.view, llse.view);
  check_transport(ring->transport());

  // The one-GPU kernel on the whole sequence (this rank's GPU), then its rows of this rank.
  std::unique_ptr<Backend> one = make_cuda_backend(nullptr);
  AttentionSpec one_spec = spec;
  one_spec.layout = Layout::kContiguous;
  one->prepare(one_spec, S, S);
  DeviceTensor gout(c.dtype, {B, S, H, D}), glse(DType::kF32, {B, H, S});
  gout.poison();
  const ChunkPositions all = identity_positions(S);
  one->forward_begin(dq.view, all);
  one->forward_step(dk.view, dv.view, all);
  one->forward_end(gout.view, glse.view);
  one->synchronize_and_read_marks();
  DeviceTensor sout(c.dtype, {B, L, H, D}), slse(DType::kF32, {B, H, L});
  cuda::shard_rows_async(gout.view, sout.view, pos, 1, one->stream());
  cuda::shard_rows_async(glse.view, slse.view, pos, 2, one->stream());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  HostTensor ring_out(c.dtype, {B, L, H, D}), ring_lse(DType::kF32, {B, H, L});
  HostTensor one_out(c.dtype, {B, L, H, D}), one_lse(DType::kF32, {B, H, L});
  lout.download(ring_out);
  llse.download(ring_lse);
  sout.download(one_out);
  slse.download(one_lse);

  // fp64 reference of this rank's rows.
  std::vector<int64_t> rows(L);
  for (int64_t i = 0; i < L; ++i) rows[i] = pos.at(i);
  HostTensor ref(DType::kF64, {B, S, H, D}), ref_lse(DType::kF64, {B, H, S});
  reference_attention(spec, qg.view, all, kg.view, vg.view, all, ref.view, ref_lse.view, &rows);

  Errors e;
  double max_ref = 0.0, d_ring = 0.0, d_one = 0.0, d_cross = 0.0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < L; ++i) {
      const int64_t g = rows[i];
      for (int64_t hd = 0; hd < H * D; ++hd) {
        const double r = ref.view.as<double>()[(b * S + g) * H * D + hd];
        const double x = load_as_double(ring_out.view, (b * L + i) * H * D + hd);
        const double y = load_as_double(one_out.view, (b * L + i) * H * D + hd);
        if (!std::isfinite(x)) ++e.bad;
        max_ref = std::max(max_ref, std::abs(r));
        d_ring = std::max(d_ring, std::abs(x - r));
        d_one = std::max(d_one, std::abs(y - r));
        d_cross = std::max(d_cross, std::abs(x - y));
      }
      for (int64_t h = 0; h < H; ++h) {
        const double r = ref_lse.view.as<double>()[(b * H + h) * S + g];
        const double x = ring_lse.view.as<float>()[(b * H + h) * L + i];
        if (!std::isfinite(x)) ++e.bad;
        e.lse_ring_vs_ref = std::max(e.lse_ring_vs_ref, std::abs(x - r) / std::max(1.0, std::abs(r)));
      }
    }
  }
  max_ref = max_over_ranks(max_ref);
  e.ring_vs_ref = max_over_ranks(d_ring) / max_ref;
  e.single_vs_ref = max_over_ranks(d_one) / max_ref;
  e.ring_vs_single = max_over_ranks(d_cross) / max_ref;
  e.lse_ring_vs_ref = max_over_ranks(e.lse_ring_vs_ref);
  const double bad = max_over_ranks(static_cast<double>(e.bad));
  if (rank == 0) {
    std::printf("[ ring p=%d ] %-44s ring-ref %.3e  one-GPU-ref %.3e  ring-one-GPU %.3e  lse %.2e\n", world,
                case_name(c).c_str(), e.ring_vs_ref, e.single_vs_ref, e.ring_vs_single, e.lse_ring_vs_ref);
  }
  const double tol = check_tolerance(c.dtype);
  EXPECT_EQ(bad, 0.0) << "non-finite values in the ring output";
  EXPECT_LE(e.ring_vs_ref, tol);
  // Exactness of the ring: fp32 state across hops, one rounding at the end, so the ring's error
  // is that of the one-GPU kernel (it must not grow with p): at most 1.5x, plus one output ulp.
  const double ulp = c.dtype == DType::kBF16 ? 1.0 / 128 : 1.0 / 1024;
  EXPECT_LE(e.ring_vs_ref, 1.5 * e.single_vs_ref + ulp * 0.5) << "ring error grows beyond the one-GPU kernel's";
  EXPECT_LE(e.ring_vs_single, ulp) << "ring and one-GPU kernel differ by more than one output rounding";
  EXPECT_LE(e.lse_ring_vs_ref, 1e-3);
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (Layout l : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    for (bool causal : {false, true}) {
      out.push_back({l, causal, 4, 4, 128, DType::kBF16, 2, 1024});  // MHA
      out.push_back({l, causal, 8, 2, 128, DType::kBF16, 1, 1024});  // GQA 4:1
    }
  }
  // Ragged chunks (not tile multiples), fp16, head_dim 64, MQA.
  out.push_back({Layout::kZigzag, true, 4, 1, 64, DType::kF16, 1, 1000});
  out.push_back({Layout::kStriped, true, 4, 2, 64, DType::kF16, 1, 1000});
  out.push_back({Layout::kContiguous, false, 4, 4, 128, DType::kBF16, 1, 1000});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, RingVsOneGpu, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& info) { return case_name(info.param); });

TEST(DeviceShard, RoundTripEveryLayout) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  const int rank = mpi_rank(), world = mpi_world();
  for (Layout l : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    const int64_t B = 2, S = 8 * world * 3, H = 3, D = 8;
    HostTensor g(DType::kF32, {B, S, H, D});
    for (int64_t i = 0; i < g.view.numel(); ++i) g.view.as<float>()[i] = static_cast<float>(i);
    const ChunkPositions pos = chunk_positions(l, S, rank, world);
    const int64_t L = S / world;
    HostTensor local(DType::kF32, {B, L, H, D}), back(DType::kF32, {B, S, H, D});
    // Host global -> device local -> host global (mixed host/device copies).
    DeviceTensor d(DType::kF32, {B, L, H, D});
    cuda::shard_rows_async(g.view, d.view, pos, 1, nullptr);
    std::fill(back.view.as<float>(), back.view.as<float>() + back.view.numel(), -1.0f);
    cuda::unshard_rows_async(d.view, back.view, pos, 1, nullptr);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    d.download(local);
    int64_t wrong = 0;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t e = 0; e < H * D; ++e) {
          const float want = static_cast<float>((b * S + pos.at(i)) * H * D + e);
          if (local.view.as<float>()[(b * L + i) * H * D + e] != want) ++wrong;
          if (back.view.as<float>()[(b * S + pos.at(i)) * H * D + e] != want) ++wrong;
        }
      }
    }
    EXPECT_EQ(wrong, 0) << layout_name(l);
  }
}

TEST(SampledCheck, PassesOnRingOutputAndCatchesCorruption) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  Session& s = session();
  AttentionSpec spec = spec_of({Layout::kZigzag, true, 8, 2, 128, DType::kBF16, 1, 2048});
  std::unique_ptr<RingAttention> ring = s.make_ring(spec);
  const int64_t L = ring->local_seq();
  DeviceTensor q(spec.dtype, {1, L, 8, 128}), k(spec.dtype, {1, L, 2, 128}), v(spec.dtype, {1, L, 2, 128});
  DeviceTensor out(spec.dtype, {1, L, 8, 128}), lse(DType::kF32, {1, 8, L});
  cuda::fill_random_rows_async(q.view, ring->positions(), spec.seq_len, 7, 1, nullptr);
  cuda::fill_random_rows_async(k.view, ring->positions(), spec.seq_len, 7, 2, nullptr);
  cuda::fill_random_rows_async(v.view, ring->positions(), spec.seq_len, 7, 3, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ring->forward(q.view, k.view, v.view, out.view, lse.view);
  SampledCheckOptions opt;
  opt.samples = 48;
  const SampledCheckResult good =
      distributed_sampled_check(spec, s, q.view, k.view, v.view, out.view, lse.view, opt);
  if (s.rank() == 0) {
    std::printf("[ check p=%d ] rows %lld max rel err %.3e rel l2 %.3e lse %.2e\n", s.world(),
                static_cast<long long>(good.rows), good.max_rel_err, good.rel_l2_err, good.max_lse_err);
  }
  EXPECT_TRUE(good.pass) << "max rel err " << good.max_rel_err << " lse " << good.max_lse_err;
  EXPECT_LT(good.max_rel_err, 1e-2);
  // Scale every output by 1.5 (bf16 0x3FC0 pattern would be a constant; scaling keeps it plausible).
  HostTensor h(spec.dtype, {1, L, 8, 128});
  out.download(h);
  for (int64_t i = 0; i < h.view.numel(); ++i) store_from_double(h.view, i, 1.5 * load_as_double(h.view, i));
  out.upload(h);
  const SampledCheckResult bad =
      distributed_sampled_check(spec, s, q.view, k.view, v.view, out.view, lse.view, opt);
  EXPECT_FALSE(bad.pass) << "a corrupted output passed the check (max rel err " << bad.max_rel_err << ")";
}

TEST(HangSafety, AbortOnEveryRankThrowsComm) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  Session& s = session();
  if (s.world() < 2) GTEST_SKIP() << "needs a ring of at least 2 ranks";
  AttentionSpec spec = spec_of({Layout::kZigzag, true, 4, 4, 128, DType::kBF16, 1, 1024});
  std::unique_ptr<RingAttention> ring = s.make_ring(spec);
  const int64_t L = ring->local_seq();
  DeviceTensor q(spec.dtype, {1, L, 4, 128}), k(spec.dtype, {1, L, 4, 128}), v(spec.dtype, {1, L, 4, 128});
  DeviceTensor out(spec.dtype, {1, L, 4, 128}), lse(DType::kF32, {1, 4, L});
  ring->transport().abort("test abort");
  bool threw = false;
  try {
    ring->forward(q.view, k.view, v.view, out.view, lse.view);
    check_transport(ring->transport());
  } catch (const Error& e) {
    threw = e.kind() == ErrorKind::kComm && std::string(e.what()).find("test abort") != std::string::npos;
  }
  EXPECT_TRUE(threw);
  MPI_Barrier(MPI_COMM_WORLD);
}

// The last test: one rank stays away from the ring; the others must time out, abort and throw an
// error naming the hop, instead of hanging.
TEST(HangSafety, SilentPeerTimesOutWithHopAndPeer) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  Session& s = session();
  if (s.world() < 2) GTEST_SKIP() << "needs a ring of at least 2 ranks";
  AttentionSpec spec = spec_of({Layout::kContiguous, false, 4, 4, 128, DType::kBF16, 1, 8192});
  std::unique_ptr<RingAttention> ring = s.make_ring(spec);
  const int64_t L = ring->local_seq();
  DeviceTensor q(spec.dtype, {1, L, 4, 128}), k(spec.dtype, {1, L, 4, 128}), v(spec.dtype, {1, L, 4, 128});
  DeviceTensor out(spec.dtype, {1, L, 4, 128}), lse(DType::kF32, {1, 4, L});
  cuda::fill_random_rows_async(q.view, ring->positions(), spec.seq_len, 3, 1, nullptr);
  cuda::fill_random_rows_async(k.view, ring->positions(), spec.seq_len, 3, 2, nullptr);
  cuda::fill_random_rows_async(v.view, ring->positions(), spec.seq_len, 3, 3, nullptr);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  ring->forward(q.view, k.view, v.view, out.view, lse.view);  // connections up, all healthy
  check_transport(ring->transport());
  MPI_Barrier(MPI_COMM_WORLD);

  constexpr int kSilent = 1;
  const auto t0 = std::chrono::steady_clock::now();
  std::string message;  // what this rank saw, whatever it was, so that a failure says what happened
  bool comm_error = false;
  if (s.rank() != kSilent) {
    ring->transport().set_timeout_ms(3000.0);
    try {
      ring->forward(q.view, k.view, v.view, out.view, lse.view);
      check_transport(ring->transport());
      message = "(the forward completed without an error)";
    } catch (const Error& e) {
      comm_error = e.kind() == ErrorKind::kComm;
      message = std::string(comm_error ? "" : "(not a communication error) ") + e.what();
    } catch (const std::exception& e) {
      message = std::string("(not a ringattn::Error) ") + e.what();
    }
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  MPI_Barrier(MPI_COMM_WORLD);
  if (s.rank() == kSilent) {
    ring->transport().abort("test: this rank stayed silent");
    return;
  }
  std::printf("[ hang p=%d rank %d ] after %.1f s: %s\n", s.world(), s.rank(), secs, message.c_str());
  EXPECT_TRUE(comm_error) << message;
  EXPECT_NE(message.find("hop"), std::string::npos) << message;
  EXPECT_TRUE(message.find("timed out") != std::string::npos || message.find("did not complete") != std::string::npos)
      << message;
  EXPECT_NE(message.find("rank "), std::string::npos) << message;
  EXPECT_LT(secs, 30.0);
}

}  // namespace
}  // namespace ringattn::test
