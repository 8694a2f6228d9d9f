// Entry points of the Hopper (sm_90a, wgmma + TMA) forward kernel; host-only declarations.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only; the driver is reached through the runtime)
#include <cuda_runtime.h>

#include <cstdint>

#include "attn/cuda/flash_fwd_params.hpp"

namespace ringattn::cuda {

// True when the current device is sm_90 and this binary holds the sm_90a code of the kernel
// (checked once per device, then cached).
bool sm90_fwd_supported();

// RINGATTN_SM90_VARIANT (1, 4 or 5; see flash_fwd_sm90_launch.cuh), or -1 when unset (then the
// measured best per case). Read once.
int sm90_fwd_variant();

// Fills `map` with a 4-d tiled tensor map (head_dim, rows, heads, batch) over 2-byte elements,
// box = 64 columns x box_rows rows, 128-byte swizzle, out-of-bounds rows read as zeros. Strides in
// elements. False when the driver entry point is missing or the layout is not TMA-compatible.
bool encode_tile_map(CUtensorMap* map, bool bf16, const void* base, int head_dim, int64_t rows, int64_t heads,
                     int64_t batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows);

// Folds one K/V chunk into the running state with the wgmma kernel. Returns false (having launched
// nothing) when the tensors cannot be described by tensor maps; the caller then uses the mma.sync kernel.
// Dense or causal (params.causal: MaskClass::kCausal).
template <typename Elem, int kHeadDim>
bool launch_flash_fwd_sm90(const FlashFwdParams& params, cudaStream_t stream);
// Any mask (params.mask: MaskClass::kGeneral); same contract.
template <typename Elem, int kHeadDim>
bool launch_flash_fwd_sm90_masked(const FlashFwdParams& params, cudaStream_t stream);

}  // namespace ringattn::cuda
