// Launcher of the Hopper forward kernel: tensor maps, shared memory, grid, launch check.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/flash_fwd_sm90.hpp"
#include "attn/cuda/flash_fwd_sm90_kernel.cuh"

namespace ringattn::cuda {

// Variants (RINGATTN_SM90_VARIANT), numbered as measured in docs/KERNEL_NOTES.md (v4):
//   1 = schedule 1 (in-warpgroup overlap), 128-key tiles, 2 K/V stages;
//   4 = schedule 2 (overlap + ping-pong), 176-key tiles (FlashAttention-3's hd128 non-causal tile);
//   5 = schedule 1, 128-key tiles, 3 K/V stages.
// Default: 4 without a causal mask (and for head_dim 64), 5 with one (diagonal tiles are cheaper
// in 128-key tiles). Variants 0, 2 and 3 were measured slower and are no longer compiled.
template <typename Elem, int kHeadDim, int kSchedule, int kBlockN, int kStages = 2, MaskClass kMask = MaskClass::kCausal>
bool launch_sm90_tiles(const FlashFwdParams& params, cudaStream_t stream) {
  using T = sm90::FwdTraitsFor<kHeadDim, kBlockN, kStages, kMask>;
  constexpr bool kBf16 = std::is_same_v<Elem, __nv_bfloat16>;
  const int kv_heads = params.heads / params.kv_group;
  sm90::FwdArgs args;
  args.p = params;
  args.p.section_heads = fwd_section_heads(params, kHeadDim);
  if (!encode_tile_map(&args.q, kBf16, params.q, kHeadDim, params.seq_q, params.heads, params.batch,
                       params.q_row_stride, params.q_head_stride, params.q_batch_stride, T::kBlockM) ||
      !encode_tile_map(&args.k, kBf16, params.k, kHeadDim, params.seq_k, kv_heads, params.batch,
                       params.k_row_stride, params.k_head_stride, params.k_batch_stride, T::kBlockN) ||
      !encode_tile_map(&args.v, kBf16, params.v, kHeadDim, params.seq_k, kv_heads, params.batch,
                       params.v_row_stride, params.v_head_stride, params.v_batch_stride, T::kBlockN))
    return false;
  auto* kernel = &sm90::flash_fwd_sm90_kernel<Elem, kHeadDim, kSchedule, kBlockN, kStages, kMask>;
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
  const dim3 grid = fwd_grid(params, T::kBlockM);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(args);
  RINGATTN_CUDA_CHECK_LAUNCH("flash_fwd_sm90_kernel");
  return true;
}

template <typename Elem, int kHeadDim>
bool launch_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream) {
  if (params.seq_q == 0 || params.batch == 0) return true;
  // The causal class only: flash_fwd_sm90_masked<> takes every other mask.
  const int chosen = sm90_fwd_variant();
  const int variant = chosen >= 0 ? chosen : (params.causal && kHeadDim == 128 ? 5 : 4);
  switch (variant) {
    case 1: return launch_sm90_tiles<Elem, kHeadDim, 1, 128>(params, stream);
    case 5: return launch_sm90_tiles<Elem, kHeadDim, 1, 128, 3>(params, stream);
    default: return launch_sm90_tiles<Elem, kHeadDim, 2, 176>(params, stream);
  }
}

}  // namespace ringattn::cuda

namespace ringattn::cuda {

// Any mask (MaskClass::kGeneral): one shape, variant 5's (schedule 1, 128-key tiles, 3 K/V
// stages): masks skip tiles and mask some, as causal does, which that shape serves best.
template <typename Elem, int kHeadDim>
bool launch_flash_fwd_sm90_masked(const FlashFwdParams& params, cudaStream_t stream) {
  if (params.seq_q == 0 || params.batch == 0) return true;
  return launch_sm90_tiles<Elem, kHeadDim, 1, 128, 3, MaskClass::kGeneral>(params, stream);
}

}  // namespace ringattn::cuda

// One translation unit per (dtype, head_dim, mask class).
#define RINGATTN_INSTANTIATE_FLASH_FWD_SM90(Elem, kHeadDim) \
  template bool ::ringattn::cuda::launch_flash_fwd_sm90<Elem, kHeadDim>(const FlashFwdParams&, cudaStream_t);
#define RINGATTN_INSTANTIATE_FLASH_FWD_SM90_MASKED(Elem, kHeadDim) \
  template bool ::ringattn::cuda::launch_flash_fwd_sm90_masked<Elem, kHeadDim>(const FlashFwdParams&, cudaStream_t);
