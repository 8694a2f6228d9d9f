// Launcher of the forward kernel: tile configuration per head_dim, grid, shared memory, launch check.
#pragma once

#include <cuda_runtime.h>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/flash_fwd.hpp"
#include "attn/cuda/flash_fwd_kernel.cuh"
#include "attn/cuda/flash_fwd_traits.hpp"

namespace ringattn::cuda {

// Tile shapes per head_dim: (head_dim, query rows, key rows, warps, blocks per SM). Variant 0 is
// the default; 1 and 2 are tuning alternatives picked at run time with RINGATTN_FWD_VARIANT
// (bf16 only) so one device call can time all of them.
template <int kHeadDim, int kVariant>
struct FwdTileConfig;
template <>
struct FwdTileConfig<64, 0> { using Traits = FlashFwdTraits<64, 128, 128, 4, 2>; };
template <>
struct FwdTileConfig<64, 1> { using Traits = FlashFwdTraits<64, 128, 64, 4, 2>; };
template <>
struct FwdTileConfig<64, 2> { using Traits = FlashFwdTraits<64, 128, 32, 4, 2>; };
template <>
struct FwdTileConfig<128, 0> { using Traits = FlashFwdTraits<128, 128, 64, 4, 2>; };
template <>
struct FwdTileConfig<128, 1> { using Traits = FlashFwdTraits<128, 128, 32, 4, 2>; };
template <>
struct FwdTileConfig<128, 2> { using Traits = FlashFwdTraits<128, 128, 48, 4, 2>; };

template <typename Elem, int kHeadDim, int kVariant, MaskClass kMask>
void launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream) {
  using Traits = typename FwdTileConfig<kHeadDim, kVariant>::Traits;
  if (params.seq_q == 0 || params.batch == 0) return;
  auto* kernel = &flash_fwd_kernel<Traits, Elem, kMask>;
  RINGATTN_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes));
  FlashFwdParams p = params;
  p.section_heads = fwd_section_heads(p, kHeadDim);
  const dim3 grid = fwd_grid(p, Traits::kBlockM);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p);
  RINGATTN_CUDA_CHECK_LAUNCH("flash_fwd_kernel");
}

}  // namespace ringattn::cuda

// One translation unit per (dtype, head_dim): explicit instantiations of the variants it serves.
#define RINGATTN_INSTANTIATE_FLASH_FWD(Elem, kHeadDim, kVariant)                                                \
  template void ::ringattn::cuda::launch_flash_fwd<Elem, kHeadDim, kVariant, ::ringattn::cuda::MaskClass::kCausal>( \
      const FlashFwdParams&, cudaStream_t);
// The any-mask kernel: one tile variant per head_dim (kFwdMaskedVariant).
#define RINGATTN_INSTANTIATE_FLASH_FWD_MASKED(Elem, kHeadDim)                                                    \
  template void ::ringattn::cuda::launch_flash_fwd<Elem, kHeadDim, ::ringattn::cuda::kFwdMaskedVariant<kHeadDim>, \
                                                   ::ringattn::cuda::MaskClass::kGeneral>(const FlashFwdParams&,   \
                                                                                          cudaStream_t);
