// Hopper forward kernel instantiation, any mask (MaskClass::kGeneral): head_dim 64, bf16 (its own translation unit to keep builds parallel).
#include "attn/cuda/flash_fwd_sm90_launch.cuh"

namespace ringattn::cuda {
RINGATTN_INSTANTIATE_FLASH_FWD_SM90_MASKED(__nv_bfloat16, 64)
}  // namespace ringattn::cuda
