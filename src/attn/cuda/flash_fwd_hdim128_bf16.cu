// Forward kernel instantiation: head_dim 128, bf16 (its own translation unit to keep builds parallel).
#include "attn/cuda/flash_fwd_launch.cuh"

namespace ringattn::cuda {
RINGATTN_INSTANTIATE_FLASH_FWD(__nv_bfloat16, 128, 0)
RINGATTN_INSTANTIATE_FLASH_FWD(__nv_bfloat16, 128, 1)
RINGATTN_INSTANTIATE_FLASH_FWD(__nv_bfloat16, 128, 2)
}  // namespace ringattn::cuda
