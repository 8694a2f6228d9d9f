// Hopper forward kernel instantiation, any mask (MaskClass::kGeneral): head_dim 64, fp16 (its own translation unit to keep builds parallel).
#include "attn/cuda/flash_fwd_sm90_launch.cuh"

namespace ringattn::cuda {
RINGATTN_INSTANTIATE_FLASH_FWD_SM90_MASKED(__half, 64)
}  // namespace ringattn::cuda
