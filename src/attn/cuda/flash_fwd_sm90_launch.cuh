// Launcher of the Hopper forward kernel: tensor maps, shared memory, grid, launch check.
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/flash_fwd_sm90.hpp"
#include "attn/cuda/flash_fwd_sm90_kernel.cuh"

namespace ringattn::cuda {

template <typename Elem, int kHeadDim>
bool launch_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream) {
  using T = sm90::FwdTraits<kHeadDim>;
  if (params.seq_q == 0 || params.batch == 0) return true;
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
  const int chosen = sm90_fwd_variant();
  const int variant = chosen >= 0 ? chosen : (kHeadDim == 64 ? 2 : 1);
  auto* kernel = variant == 0   ? &sm90::flash_fwd_sm90_kernel<Elem, kHeadDim, 0>
                 : variant == 2 ? &sm90::flash_fwd_sm90_kernel<Elem, kHeadDim, 2>
                                : &sm90::flash_fwd_sm90_kernel<Elem, kHeadDim, 1>;
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, T::kSmemBytes));
  const dim3 grid = fwd_grid(params, T::kBlockM);
  kernel<<<grid, T::kThreads, T::kSmemBytes, stream>>>(args);
  RINGATTN_CUDA_CHECK_LAUNCH("flash_fwd_sm90_kernel");
  return true;
}

}  // namespace ringattn::cuda

// One translation unit per (dtype, head_dim).
#define RINGATTN_INSTANTIATE_FLASH_FWD_SM90(Elem, kHeadDim) \
  template bool ::ringattn::cuda::launch_flash_fwd_sm90<Elem, kHeadDim>(const FlashFwdParams&, cudaStream_t);
