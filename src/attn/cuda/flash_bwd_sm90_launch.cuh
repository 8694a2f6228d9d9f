// Launcher of the Hopper (wgmma) backward step kernel; one instantiation per (dtype) translation unit.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_bwd_launch.cuh"
#include "attn/cuda/flash_bwd_sm90_kernel.cuh"
#include "attn/cuda/flash_bwd_sm90_tma_kernel.cuh"
#include "attn/cuda/flash_fwd_sm90.hpp"  // encode_tile_map

namespace ringattn::cuda {

// The TMA kernel (flash_bwd_sm90_tma_kernel.cuh). False (nothing launched) when a tensor cannot be
// described by a tensor map; the caller then takes the cp.async kernel.
template <typename Elem, int kHeadDim, MaskClass kMask>
bool launch_flash_bwd_sm90_tma(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                               cudaStream_t stream) {
  using Traits = bwd90::TmaBwdTraitsFor<Elem, kHeadDim, kMask>;
  constexpr bool kBf16 = std::is_same_v<Elem, __nv_bfloat16>;
  // The any-mask kernel hands tiles over as (query tile < 2^20, group head < 2^8): else the cp.async kernel.
  constexpr int64_t kMaxTiles = int64_t{1} << 20, kMaxGroup = 1 << 8;
  if (kMask == MaskClass::kGeneral && ((params.seq_q + Traits::kBlockM - 1) / Traits::kBlockM >= kMaxTiles ||
                                       params.heads / params.kv_heads >= kMaxGroup))
    return false;
  bwd90::TmaBwdArgs args;
  args.p = params;
  if (!encode_tile_map(&args.q, kBf16, params.q, kHeadDim, params.seq_q, params.heads, params.batch, params.q_row_stride,
                       params.q_head_stride, params.q_batch_stride, Traits::kBlockM) ||
      !encode_tile_map(&args.dout, kBf16, params.dout, kHeadDim, params.seq_q, params.heads, params.batch,
                       params.dout_row_stride, params.dout_head_stride, params.dout_batch_stride, Traits::kBlockM) ||
      !encode_tile_map(&args.k, kBf16, params.k, kHeadDim, params.seq_k, params.kv_heads, params.batch,
                       params.k_row_stride, params.k_head_stride, params.k_batch_stride, Traits::kBlockN) ||
      !encode_tile_map(&args.v, kBf16, params.v, kHeadDim, params.seq_k, params.kv_heads, params.batch,
                       params.v_row_stride, params.v_head_stride, params.v_batch_stride, Traits::kBlockN))
    return false;
  auto* kernel = &bwd90::flash_bwd_sm90_tma_kernel<Elem, kHeadDim, kMask>;
  bwd_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
            "cudaFuncSetAttribute(flash_bwd_sm90_tma_kernel)");
  const dim3 grid((params.seq_k + Traits::kBlockN - 1) / Traits::kBlockN, params.batch * params.kv_heads);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(args, q_pos, k_pos);
  bwd_check(cudaGetLastError(), "launch of flash_bwd_sm90_tma_kernel");
  return true;
}

template <typename Elem, int kHeadDim, MaskClass kMask>
void launch_flash_bwd_sm90_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                                cudaStream_t stream) {
  if (params.seq_q == 0 || params.seq_k == 0 || params.batch == 0) return;
  // RINGATTN_BWD_SM90_NO_TMA=1 (tests) takes the fallback that strides no tensor map can describe take.
  const char* no_tma = std::getenv("RINGATTN_BWD_SM90_NO_TMA");
  const bool tma = no_tma == nullptr || std::strcmp(no_tma, "1") != 0;
  if (tma && launch_flash_bwd_sm90_tma<Elem, kHeadDim, kMask>(params, q_pos, k_pos, stream)) return;
  using Traits = bwd90::Sm90BwdTraits<Elem, kHeadDim>;
  auto* kernel = &bwd90::flash_bwd_sm90_kernel<Elem, kHeadDim, kMask>;
  bwd_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
            "cudaFuncSetAttribute(flash_bwd_sm90_kernel)");
  const dim3 grid((params.seq_k + Traits::kBlockN - 1) / Traits::kBlockN, params.batch * params.kv_heads);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params, q_pos, k_pos);
  bwd_check(cudaGetLastError(), "launch of flash_bwd_sm90_kernel");
}

}  // namespace ringattn::cuda

#define RINGATTN_INSTANTIATE_FLASH_BWD_SM90_CLASS(Elem, kHeadDim, kMask)                                            \
  template void ::ringattn::cuda::launch_flash_bwd_sm90_step<Elem, kHeadDim, ::ringattn::cuda::MaskClass::kMask>( \
      const FlashBwdParams&, const ChunkPositions&, const ChunkPositions&, cudaStream_t);
#define RINGATTN_INSTANTIATE_FLASH_BWD_SM90(Elem, kHeadDim) RINGATTN_INSTANTIATE_FLASH_BWD_SM90_CLASS(Elem, kHeadDim, kCausal)
#define RINGATTN_INSTANTIATE_FLASH_BWD_SM90_MASKED(Elem, kHeadDim) \
  RINGATTN_INSTANTIATE_FLASH_BWD_SM90_CLASS(Elem, kHeadDim, kGeneral)
