// Backward step instantiation, any mask (MaskClass::kGeneral): head_dim 128, fp16 (its own translation unit to keep builds parallel).
#include "attn/cuda/flash_bwd_launch.cuh"

namespace ringattn::cuda {
RINGATTN_INSTANTIATE_FLASH_BWD_MASKED(__half, 128)
}  // namespace ringattn::cuda
