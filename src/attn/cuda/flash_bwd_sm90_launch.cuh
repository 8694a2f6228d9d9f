// Launcher of the Hopper (wgmma) backward step kernel; one instantiation per (dtype) translation unit.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_bwd_launch.cuh"
#include "attn/cuda/flash_bwd_sm90_kernel.cuh"

namespace ringattn::cuda {

template <typename Elem, int kHeadDim>
void launch_flash_bwd_sm90_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                                cudaStream_t stream) {
  if (params.seq_q == 0 || params.seq_k == 0 || params.batch == 0) return;
  using Traits = bwd90::Sm90BwdTraits<Elem, kHeadDim>;
  // RINGATTN_BWD_SM90_VARIANT: 0 (default) wgmma dQ + red.global; 1 mma.sync dQ; 2 wgmma dQ + bulk
  // reductions; 3 as 0 with the dQ GEMM pipelined under the next tile (flash_bwd_sm90_kernel.cuh).
  const char* v = std::getenv("RINGATTN_BWD_SM90_VARIANT");
  const int variant = v ? std::atoi(v) : 0;
  auto* kernel = variant == 1   ? &bwd90::flash_bwd_sm90_kernel<Elem, kHeadDim, 1>
                 : variant == 2 ? &bwd90::flash_bwd_sm90_kernel<Elem, kHeadDim, 2>
                 : variant == 3 ? &bwd90::flash_bwd_sm90_kernel<Elem, kHeadDim, 3>
                                : &bwd90::flash_bwd_sm90_kernel<Elem, kHeadDim, 0>;
  bwd_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
            "cudaFuncSetAttribute(flash_bwd_sm90_kernel)");
  const dim3 grid((params.seq_k + Traits::kBlockN - 1) / Traits::kBlockN, params.batch * params.kv_heads);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params, q_pos, k_pos);
  bwd_check(cudaGetLastError(), "launch of flash_bwd_sm90_kernel");
}

}  // namespace ringattn::cuda

#define RINGATTN_INSTANTIATE_FLASH_BWD_SM90(Elem, kHeadDim)                                                    \
  template void ::ringattn::cuda::launch_flash_bwd_sm90_step<Elem, kHeadDim>(const FlashBwdParams&,             \
                                                                             const ChunkPositions&,             \
                                                                             const ChunkPositions&, cudaStream_t);
