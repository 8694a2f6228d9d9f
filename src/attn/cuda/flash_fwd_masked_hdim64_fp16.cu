// Forward kernel instantiation, any mask (MaskClass::kGeneral): head_dim 64, fp16 (its own translation unit to keep builds parallel).
#include "attn/cuda/flash_fwd_launch.cuh"

namespace ringattn::cuda {
RINGATTN_INSTANTIATE_FLASH_FWD_MASKED(__half, 64)
}  // namespace ringattn::cuda
