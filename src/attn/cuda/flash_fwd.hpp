// Entry points of the CUDA forward kernels, one instantiation per (head_dim, dtype) translation unit.
#pragma once

#include <cuda_runtime.h>

#include "attn/cuda/flash_fwd_params.hpp"
#include "attn/cuda/flash_mask.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::cuda {

// Tile-shape variants compiled for bf16 (flash_fwd_launch.cuh lists them).
inline constexpr int kFwdVariants = 3;

// The tile variant of the any-mask kernel (MaskClass::kGeneral) per head_dim: at 128, the 32-key
// tile, whose smaller score tile leaves the registers the per-element rule needs (the 64-key tile
// spilled 320 bytes with it).
template <int kHeadDim>
inline constexpr int kFwdMaskedVariant = kHeadDim == 128 ? 1 : 0;

// Folds one K/V chunk into the running state; element type, head_dim, tile variant and mask class
// (flash_mask.hpp: kCausal reads params.causal, kGeneral params.mask; variant 0 only) are compile-time.
template <typename Elem, int kHeadDim, int kVariant, MaskClass kMask = MaskClass::kCausal>
void launch_flash_fwd(const FlashFwdParams& params, cudaStream_t stream);

// Dispatches on dtype (bf16, fp16) and head_dim (64, 128); throws for anything else.
void flash_fwd_step(const FlashFwdParams& params, DType dtype, int head_dim, cudaStream_t stream);

// Writes out (params.out dtype) and lse from the running state.
void flash_fwd_finalize(const FlashFinalizeParams& params, DType dtype, cudaStream_t stream);

// dst[i] = round(src[i]) for n contiguous fp32 elements into bf16/fp16.
void cast_f32(const float* src, void* dst, DType dtype, int64_t n, cudaStream_t stream);

}  // namespace ringattn::cuda
