// Launcher of the backward step kernel: tile configuration per head_dim, grid, shared memory, launch check.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_bwd_kernel.cuh"
#include "ringattn/error.hpp"

namespace ringattn::cuda {

// Tile shapes per (head_dim, variant): query rows per inner iteration, warps (16 key rows each), blocks per
// SM. Variant 0 is the default; 1 is a tuning alternative picked at run time with RINGATTN_BWD_VARIANT=1
// so one device call can time both. Defaults chosen on an H200 at 16k x 32 heads (docs/BACKWARD_NOTES.md):
// hd64 4 warps x 2 blocks/SM (+5% over 8 warps), hd128 8 warps x 1 block/SM (+6% over 4 x 2).
template <int kHeadDim, int kVariant>
struct BwdTileConfig;
template <>
struct BwdTileConfig<64, 0> { static constexpr int kBlockM = 64, kWarps = 4, kMinBlocks = 2; };
template <>
struct BwdTileConfig<64, 1> { static constexpr int kBlockM = 64, kWarps = 8, kMinBlocks = 1; };
template <>
struct BwdTileConfig<128, 0> { static constexpr int kBlockM = 64, kWarps = 8, kMinBlocks = 1; };
template <>
struct BwdTileConfig<128, 1> { static constexpr int kBlockM = 64, kWarps = 4, kMinBlocks = 2; };

inline void bwd_check(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  fail(ErrorKind::kCuda, std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")",
       "check that a CUDA device is visible and that the driver matches the toolkit");
}

inline int bwd_variant() {
  static const int variant = [] {
    const char* v = std::getenv("RINGATTN_BWD_VARIANT");
    if (v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0) return 0;
    RINGATTN_CHECK(std::strcmp(v, "1") == 0, ErrorKind::kInvalidArgument,
                   std::string("RINGATTN_BWD_VARIANT=") + v + " is not a tile shape of the mma.sync backward kernel",
                   "unset it, or set 0 (the default shape) or 1 (the alternative, docs/BACKWARD_NOTES.md)");
    return 1;
  }();
  return variant;
}

template <typename Elem, int kHeadDim, int kVariant, MaskClass kMask>
void launch_flash_bwd_variant(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                              cudaStream_t stream) {
  using Cfg = BwdTileConfig<kHeadDim, kVariant>;
  using Traits = bwd::BwdTraits<Elem, kHeadDim, Cfg::kBlockM, Cfg::kWarps, Cfg::kMinBlocks>;
  auto* kernel = &bwd::flash_bwd_kernel<Traits, kMask>;
  bwd_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes),
            "cudaFuncSetAttribute(flash_bwd_kernel)");
  const dim3 grid((params.seq_k + Traits::kBlockN - 1) / Traits::kBlockN, params.batch * params.kv_heads);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(params, q_pos, k_pos);
  bwd_check(cudaGetLastError(), "launch of flash_bwd_kernel");
}

// kGeneral (any mask) has the default tile shape only.
template <typename Elem, int kHeadDim, MaskClass kMask>
void launch_flash_bwd_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                           cudaStream_t stream) {
  if (params.seq_q == 0 || params.seq_k == 0 || params.batch == 0) return;
  if constexpr (kMask == MaskClass::kGeneral) {
    launch_flash_bwd_variant<Elem, kHeadDim, 0, kMask>(params, q_pos, k_pos, stream);
  } else if (bwd_variant() == 1) {
    launch_flash_bwd_variant<Elem, kHeadDim, 1, kMask>(params, q_pos, k_pos, stream);
  } else {
    launch_flash_bwd_variant<Elem, kHeadDim, 0, kMask>(params, q_pos, k_pos, stream);
  }
}

}  // namespace ringattn::cuda

// One translation unit per (dtype, head_dim, mask class).
#define RINGATTN_INSTANTIATE_FLASH_BWD_CLASS(Elem, kHeadDim, kMask)                                            \
  template void ::ringattn::cuda::launch_flash_bwd_step<Elem, kHeadDim, ::ringattn::cuda::MaskClass::kMask>( \
      const FlashBwdParams&, const ChunkPositions&, const ChunkPositions&, cudaStream_t);
#define RINGATTN_INSTANTIATE_FLASH_BWD(Elem, kHeadDim) RINGATTN_INSTANTIATE_FLASH_BWD_CLASS(Elem, kHeadDim, kCausal)
#define RINGATTN_INSTANTIATE_FLASH_BWD_MASKED(Elem, kHeadDim) RINGATTN_INSTANTIATE_FLASH_BWD_CLASS(Elem, kHeadDim, kGeneral)
