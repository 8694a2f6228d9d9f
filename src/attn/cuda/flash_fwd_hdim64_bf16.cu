// Forward kernel instantiation: head_dim 64, bf16 (its own translation unit to keep builds parallel).
#include "attn/cuda/flash_fwd_launch.cuh"

namespace ringattn::cuda {
RINGATTN_INSTANTIATE_FLASH_FWD(__nv_bfloat16, 64, 0)
RINGATTN_INSTANTIATE_FLASH_FWD(__nv_bfloat16, 64, 1)
RINGATTN_INSTANTIATE_FLASH_FWD(__nv_bfloat16, 64, 2)
}  // namespace ringattn::cuda
