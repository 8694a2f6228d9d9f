// Embedding: a host program's own NCCL communicator, CUDA stream and device pointers drive the ring (fwd + bwd).
#include <cuda_runtime.h>
#include <gtest/gtest.h>
#include <mpi.h>
#include <nccl.h>

#include <cmath>
#include <optional>
#include <random>
#include <vector>

#include "attn/reference.hpp"
#include "gpu/gpu_test_util.hpp"
#include "mpi_gpu/grad_compare.hpp"
#include "mpi_gpu/mpi_gpu_env.hpp"
#include "ringattn/ringattn.hpp"
#include "runtime/cuda/device_tensors.hpp"

namespace ringattn::test {
namespace {

TEST(Embedding, HostCommunicatorStreamAndPointersDriveForwardAndBackward) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  session();  // the device of this rank is chosen (cudaSetDevice) as for every MPI+GPU test
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);

  // What a training stack already has: its NCCL communicator and its stream.
  ncclUniqueId id;
  if (rank == 0) ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclComm_t comm = nullptr;
  ASSERT_EQ(ncclCommInitRank(&comm, world, id, rank), ncclSuccess);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);

  AttentionSpec spec;
  spec.batch = 1;
  spec.seq_len = 512;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 128;
  spec.mask.causal = true;
  spec.layout = Layout::kZigzag;
  spec.dtype = DType::kBF16;
  const int64_t B = spec.batch, S = spec.seq_len, H = spec.heads, Hkv = spec.kv_heads, D = spec.head_dim;
  const int64_t L = S / world;
  std::mt19937 rng(99);
  HostTensor q(DType::kBF16, {B, S, H, D}), k(DType::kBF16, {B, S, Hkv, D}), v(DType::kBF16, {B, S, Hkv, D});
  HostTensor dout(DType::kBF16, {B, S, H, D});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  fill_normal(dout, rng);
  const ChunkPositions pos = chunk_positions(spec.layout, S, rank, world);
  auto local = [&](const HostTensor& g, int64_t heads) {
    HostTensor h(DType::kBF16, {B, L, heads, D});
    shard_rows(g.view, h.view, pos, 1);
    return h;
  };
  const HostTensor lq = local(q, H), lk = local(k, Hkv), lv = local(v, Hkv), ldo = local(dout, H);
  // The host program's device pointers.
  DeviceTensor dq_in(DType::kBF16, {B, L, H, D}), dk_in(DType::kBF16, {B, L, Hkv, D});
  DeviceTensor dv_in(DType::kBF16, {B, L, Hkv, D}), ddo(DType::kBF16, {B, L, H, D});
  DeviceTensor dout_t(DType::kBF16, {B, L, H, D}), dlse(DType::kF32, {B, H, L});
  DeviceTensor gq(DType::kBF16, {B, L, H, D}), gk(DType::kBF16, {B, L, Hkv, D}), gv(DType::kBF16, {B, L, Hkv, D});
  dq_in.upload(lq);
  dk_in.upload(lk);
  dv_in.upload(lv);
  ddo.upload(ldo);
  for (DeviceTensor* t : {&dout_t, &dlse, &gq, &gk, &gv}) t->poison();
  {
    RingAttention ring(spec, make_cuda_backend(stream), make_nccl_transport_borrowed(comm, stream));
    ASSERT_EQ(ring.world(), world);
    ASSERT_EQ(ring.rank(), rank);
    ring.forward(dq_in.view, dk_in.view, dv_in.view, dout_t.view, dlse.view);
    ring.backward(dq_in.view, dk_in.view, dv_in.view, dout_t.view, dlse.view, ddo.view, gq.view, gk.view, gv.view);
  }
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);

  HostTensor out(DType::kBF16, {B, L, H, D}), hq(DType::kBF16, {B, L, H, D});
  HostTensor hk(DType::kBF16, {B, L, Hkv, D}), hv(DType::kBF16, {B, L, Hkv, D});
  dout_t.download(out);
  gq.download(hq);
  gk.download(hk);
  gv.download(hv);
  const ChunkPositions all = identity_positions(S);
  HostTensor ro(DType::kF64, {B, S, H, D}), rl(DType::kF64, {B, H, S});
  reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
  HostTensor rq(DType::kF64, {B, S, H, D}), rk(DType::kF64, {B, S, Hkv, D}), rv(DType::kF64, {B, S, Hkv, D});
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rq.view, rk.view, rv.view);
  EXPECT_LT(rel_error(out, ro, pos, B, L, S, H * D), kOutTolerance);
  EXPECT_LT(rel_error(hq, rq, pos, B, L, S, H * D), kGradTolerance);
  EXPECT_LT(rel_error(hk, rk, pos, B, L, S, Hkv * D), kGradTolerance);
  EXPECT_LT(rel_error(hv, rv, pos, B, L, S, Hkv * D), kGradTolerance);

  // The communicator is still the host program's, and still works.
  DeviceTensor one(DType::kF32, {1});
  const float value = 1.0f;
  ASSERT_EQ(cudaMemcpy(one.data, &value, sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(ncclAllReduce(one.data, one.data, 1, ncclFloat, ncclSum, comm, stream), ncclSuccess);
  float sum = 0.0f;
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(&sum, one.data, sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(sum, static_cast<float>(world));
  ncclCommDestroy(comm);
  cudaStreamDestroy(stream);
}

// Embedded passes over the host program's communicator: a stream per call (not the one the ring
// was built with), the caller's workspace, calls that return before the pass ends; the bits equal
// a blocking ring's, and the end-of-pass agreement runs on the device (poll() stays clean).
TEST(Embedding, EmbeddedPassesOnTheCallersStreamEqualBlockingBits) {
  RINGATTN_SKIP_WITHOUT_GPU_PER_RANK();
  session();
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  ncclUniqueId id;
  if (rank == 0) ASSERT_EQ(ncclGetUniqueId(&id), ncclSuccess);
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclComm_t comm = nullptr;
  ASSERT_EQ(ncclCommInitRank(&comm, world, id, rank), ncclSuccess);
  cudaStream_t built = nullptr, call = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&built, cudaStreamNonBlocking), cudaSuccess);
  ASSERT_EQ(cudaStreamCreateWithFlags(&call, cudaStreamNonBlocking), cudaSuccess);

  AttentionSpec spec;
  spec.batch = 1;
  spec.seq_len = 2048;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 128;
  spec.mask.causal = true;
  spec.layout = Layout::kZigzag;
  spec.dtype = DType::kBF16;
  const int64_t B = spec.batch, H = spec.heads, Hkv = spec.kv_heads, D = spec.head_dim, L = spec.seq_len / world;
  std::mt19937 rng(7 + rank);
  HostTensor hq(DType::kBF16, {B, L, H, D}), hk(DType::kBF16, {B, L, Hkv, D}), hv(DType::kBF16, {B, L, Hkv, D});
  HostTensor hdo(DType::kBF16, {B, L, H, D});
  fill_normal(hq, rng);
  fill_normal(hk, rng);
  fill_normal(hv, rng);
  fill_normal(hdo, rng);
  DeviceTensor q(DType::kBF16, {B, L, H, D}), k(DType::kBF16, {B, L, Hkv, D}), v(DType::kBF16, {B, L, Hkv, D});
  DeviceTensor dout(DType::kBF16, {B, L, H, D});
  q.upload(hq);
  k.upload(hk);
  v.upload(hv);
  dout.upload(hdo);
  struct Outputs {
    DeviceTensor out, lse, dq, dk, dv;
    Outputs(int64_t B, int64_t L, int64_t H, int64_t Hkv, int64_t D)
        : out(DType::kBF16, {B, L, H, D}), lse(DType::kF32, {B, H, L}), dq(DType::kBF16, {B, L, H, D}),
          dk(DType::kBF16, {B, L, Hkv, D}), dv(DType::kBF16, {B, L, Hkv, D}) {}
    std::vector<std::vector<unsigned char>> bits() const {
      std::vector<std::vector<unsigned char>> all;
      for (const DeviceTensor* t : {&out, &lse, &dq, &dk, &dv}) {
        std::vector<unsigned char> h(t->view.nbytes());
        cudaMemcpy(h.data(), t->data, h.size(), cudaMemcpyDeviceToHost);
        all.push_back(std::move(h));
      }
      return all;
    }
  };
  Outputs blocking_out(B, L, H, Hkv, D), embedded_out(B, L, H, Hkv, D);
  {
    RingAttention ring(spec, make_cuda_backend(built), make_nccl_transport_borrowed(comm, built));
    ring.forward(q.view, k.view, v.view, blocking_out.out.view, blocking_out.lse.view);
    ring.backward(q.view, k.view, v.view, blocking_out.out.view, blocking_out.lse.view, dout.view,
                  blocking_out.dq.view, blocking_out.dk.view, blocking_out.dv.view);
  }
  ASSERT_EQ(cudaStreamSynchronize(built), cudaSuccess);
  {
    RingAttention ring(spec, make_cuda_backend(built), make_nccl_transport_borrowed(comm, built), RingOptions{true});
    void* fws = nullptr;
    void* bws = nullptr;
    const std::size_t fb = ring.workspace_bytes(Pass::kForward), bb = ring.workspace_bytes(Pass::kBackward);
    ASSERT_EQ(cudaMalloc(&fws, fb), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&bws, bb), cudaSuccess);
    for (int pass = 0; pass < 2; ++pass) {
      for (DeviceTensor* t : {&embedded_out.out, &embedded_out.lse, &embedded_out.dq, &embedded_out.dk, &embedded_out.dv}) {
        t->poison();
      }
      cudaDeviceSynchronize();
      ring.forward(q.view, k.view, v.view, embedded_out.out.view, embedded_out.lse.view, PassOptions{call, fws, fb, false});
      ring.backward(q.view, k.view, v.view, embedded_out.out.view, embedded_out.lse.view, dout.view,
                    embedded_out.dq.view, embedded_out.dk.view, embedded_out.dv.view, PassOptions{call, bws, bb, false});
      ASSERT_EQ(cudaStreamSynchronize(call), cudaSuccess);
      const std::optional<Error> failure = ring.poll();
      EXPECT_FALSE(failure.has_value()) << (failure ? failure->what() : "");
      EXPECT_TRUE(embedded_out.bits() == blocking_out.bits()) << "rank " << rank << " pass " << pass
                                                              << ": embedded bits differ from blocking";
    }
    cudaFree(fws);
    cudaFree(bws);
  }
  ncclCommDestroy(comm);
  cudaStreamDestroy(built);
  cudaStreamDestroy(call);
}

}  // namespace
}  // namespace ringattn::test
