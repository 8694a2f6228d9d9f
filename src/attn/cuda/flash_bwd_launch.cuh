// Launcher of the backward step kernel: tile configuration per head_dim, grid, shared memory, launch check.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_bwd_kernel.cuh"
#include "ringattn/error.hpp"

namespace ringattn::cuda {

// Query rows per inner iteration, per head_dim (the block always owns 128 key rows with 8 warps).
template <int kHeadDim>
struct BwdTileConfig;
template <>
struct BwdTileConfig<64> { static constexpr int kBlockM = 64; };
template <>
struct BwdTileConfig<128> { static constexpr int kBlockM = 64; };

inline void bwd_check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  fail(ErrorKind::kCuda, std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")",
       "check that a CUDA device is visible and that the driver matches the toolkit");
}

template <typename Elem, int kHeadDim>
void launch_flash_bwd_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                           cudaStream_t stream) {
  using Traits = bwd::BwdTraits<Elem, kHeadDim, BwdTileConfig<kHeadDim>::kBlockM>;
  if (params.seq_q == 0 || params.seq_k == 0 || params.batch == 0) return;
  auto* kernel = &bwd::flash_bwd_kernel<Traits>;
  bwd_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
            "cudaFuncSetAttribute(flash_bwd_kernel)");
  const dim3 grid((params.seq_k + Traits::kBlockN - 1) / Traits::kBlockN, params.batch * params.kv_heads);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params, q_pos, k_pos);
  bwd_check(cudaGetLastError(), "launch of flash_bwd_kernel");
}

}  // namespace ringattn::cuda

// One translation unit per (dtype, head_dim).
#define RINGATTN_INSTANTIATE_FLASH_BWD(Elem, kHeadDim)                                                     \
  template void ::ringattn::cuda::launch_flash_bwd_step<Elem, kHeadDim>(const FlashBwdParams&,              \
                                                                        const ChunkPositions&,              \
                                                                        const ChunkPositions&, cudaStream_t);
