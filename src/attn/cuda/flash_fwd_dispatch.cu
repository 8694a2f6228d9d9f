// Runtime dispatch of the forward step (dtype, head_dim, tile variant), the finalize pass and casts.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/flash_device.cuh"
#include "attn/cuda/flash_fwd.hpp"
#include "attn/cuda/flash_fwd_sm90.hpp"

namespace ringattn::cuda {
namespace {

constexpr int kElemsPerVector = 8;  // 16-byte vectors of 2-byte elements
constexpr int kFinalizeThreads = 256;
constexpr int kCastThreads = 256;
constexpr float kLn2 = 0.6931471805599453f;

// RINGATTN_FWD_VARIANT (0 .. kFwdVariants-1) selects a tuning variant of the bf16 tiles; 0 when unset.
int fwd_variant() {
  static const int variant = [] {
    const char* env = std::getenv("RINGATTN_FWD_VARIANT");
    const int v = env != nullptr ? std::atoi(env) : 0;
    return v >= 0 && v < kFwdVariants ? v : 0;
  }();
  return variant;
}

// RINGATTN_FWD_KERNEL: "mma" forces the mma.sync kernel, "wgmma" (or unset) uses the Hopper kernel
// where it runs (sm_90a binary on an sm_90 device, TMA-compatible tensors) and mma.sync elsewhere.
// Read at every step (a getenv is cheap next to a kernel) so tests can time or check both paths.
bool wgmma_allowed() {
  const char* env = std::getenv("RINGATTN_FWD_KERNEL");
  return env == nullptr || std::string(env) != "mma";
}

// Launches the Hopper kernel when it applies; false means "use the mma.sync kernel".
bool try_sm90(const FlashFwdParams& params, DType dtype, int head_dim, cudaStream_t stream) {
  if (!wgmma_allowed() || (head_dim != 64 && head_dim != 128)) return false;
  if (dtype != DType::kBF16 && dtype != DType::kF16) return false;
  if (!sm90_fwd_supported()) return false;
  if (mask_class(params.mask) == MaskClass::kGeneral) {
    if (dtype == DType::kBF16)
      return head_dim == 128 ? launch_flash_fwd_sm90_masked<__nv_bfloat16, 128>(params, stream)
                             : launch_flash_fwd_sm90_masked<__nv_bfloat16, 64>(params, stream);
    return head_dim == 128 ? launch_flash_fwd_sm90_masked<__half, 128>(params, stream)
                           : launch_flash_fwd_sm90_masked<__half, 64>(params, stream);
  }
  if (dtype == DType::kBF16)
    return head_dim == 128 ? launch_flash_fwd_sm90<__nv_bfloat16, 128>(params, stream)
                           : launch_flash_fwd_sm90<__nv_bfloat16, 64>(params, stream);
  return head_dim == 128 ? launch_flash_fwd_sm90<__half, 128>(params, stream)
                         : launch_flash_fwd_sm90<__half, 64>(params, stream);
}

template <typename Elem, int kHeadDim>
void launch_variant(const FlashFwdParams& params, cudaStream_t stream, int variant) {
  static_assert(kFwdVariants == 3, "one branch per variant");
  if (variant == 2) return launch_flash_fwd<Elem, kHeadDim, 2>(params, stream);
  if (variant == 1) return launch_flash_fwd<Elem, kHeadDim, 1>(params, stream);
  launch_flash_fwd<Elem, kHeadDim, 0>(params, stream);
}

// One thread per 8 output elements: out = acc / sum, lse = (max + log2(sum)) * ln 2.
template <typename Elem>
__global__ void flash_finalize_kernel(const FlashFinalizeParams p) {
  const int vectors_per_row = p.head_dim / kElemsPerVector;
  const int64_t total = static_cast<int64_t>(p.batch) * p.heads * p.seq_q * vectors_per_row;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int vec = static_cast<int>(idx % vectors_per_row);
    const int64_t state_row = idx / vectors_per_row;  // (b * H + h) * Sq + row
    const int row = static_cast<int>(state_row % p.seq_q);
    const int bh = static_cast<int>(state_row / p.seq_q);
    const int b = bh / p.heads;
    const int h = bh % p.heads;
    const float sum = p.nothing_visible ? 0.f : p.row_sum[state_row];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    float values[kElemsPerVector];
    if (sum > 0.f) {
      const float4* src = reinterpret_cast<const float4*>(p.acc + state_row * p.head_dim + vec * kElemsPerVector);
      const float4 lo = src[0], hi = src[1];
      values[0] = lo.x; values[1] = lo.y; values[2] = lo.z; values[3] = lo.w;
      values[4] = hi.x; values[5] = hi.y; values[6] = hi.z; values[7] = hi.w;
    } else {
#pragma unroll
      for (int i = 0; i < kElemsPerVector; ++i) values[i] = 0.f;
    }
    uint4 packed;
    uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
    for (int i = 0; i < kElemsPerVector / 2; ++i) words[i] = pack2<Elem>(values[2 * i] * inv, values[2 * i + 1] * inv);
    Elem* out = static_cast<Elem*>(p.out) + b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride +
                vec * kElemsPerVector;
    *reinterpret_cast<uint4*>(out) = packed;
    if (vec == 0) {
      p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + row * p.lse_row_stride] =
          sum > 0.f ? (p.row_max[state_row] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// dst = round(src): with `vec8` (src and dst 16-byte aligned) 8 elements per thread and iteration,
// two 16-byte loads and one 16-byte store (one element per thread ran at a third of the bandwidth:
// 290 us per dK or dV cast at 16K tokens, 2026-11-28); the tail and unaligned buffers one by one.
template <typename Elem>
__global__ void cast_f32_kernel(const float* __restrict__ src, Elem* __restrict__ dst, int64_t n, bool vec8) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t done = 0;
  if (vec8) {
    const int64_t n8 = n / kElemsPerVector;
    for (int64_t i = first; i < n8; i += stride) {
      const float4 lo = reinterpret_cast<const float4*>(src)[2 * i];
      const float4 hi = reinterpret_cast<const float4*>(src)[2 * i + 1];
      uint4 packed;
      packed.x = pack2<Elem>(lo.x, lo.y);
      packed.y = pack2<Elem>(lo.z, lo.w);
      packed.z = pack2<Elem>(hi.x, hi.y);
      packed.w = pack2<Elem>(hi.z, hi.w);
      reinterpret_cast<uint4*>(dst)[i] = packed;
    }
    done = n8 * kElemsPerVector;
  }
  for (int64_t i = done + first; i < n; i += stride) dst[i] = from_float<Elem>(src[i]);
}

unsigned grid_for(int64_t work, int threads) {
  constexpr int64_t kMaxBlocks = 1 << 16;
  const int64_t blocks = (work + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

[[noreturn]] void unsupported(DType dtype, int head_dim) {
  fail(ErrorKind::kInvalidArgument,
       std::string("the CUDA backend has no kernel for ") + dtype_name(dtype) + " with head_dim " +
           std::to_string(head_dim),
       "use --dtype bf16 or fp16 with head_dim 64 or 128, or the CPU backend");
}

}  // namespace

void flash_fwd_step(const FlashFwdParams& params, DType dtype, int head_dim, cudaStream_t stream) {
  if (try_sm90(params, dtype, head_dim, stream)) return;
  if (params.out != nullptr) {  // the mma.sync kernels write the state: step, then the finalize pass
    FlashFwdParams step = params;
    step.out = nullptr;
    step.lse = nullptr;
    flash_fwd_step(step, dtype, head_dim, stream);
    FlashFinalizeParams f;
    f.acc = params.acc;
    f.row_max = params.row_max;
    f.row_sum = params.row_sum;
    f.out = params.out;
    f.out_batch_stride = params.out_batch_stride;
    f.out_row_stride = params.out_row_stride;
    f.out_head_stride = params.out_head_stride;
    f.lse = params.lse;
    f.lse_batch_stride = params.lse_batch_stride;
    f.lse_head_stride = params.lse_head_stride;
    f.lse_row_stride = params.lse_row_stride;
    f.batch = params.batch;
    f.heads = params.heads;
    f.seq_q = params.seq_q;
    f.head_dim = head_dim;
    flash_fwd_finalize(f, dtype, stream);
    return;
  }
  if (mask_class(params.mask) == MaskClass::kGeneral) {  // any mask: one tile variant per head_dim
    constexpr MaskClass kAny = MaskClass::kGeneral;
    constexpr int k64 = kFwdMaskedVariant<64>, k128 = kFwdMaskedVariant<128>;
    if (dtype == DType::kBF16 && head_dim == 64) return launch_flash_fwd<__nv_bfloat16, 64, k64, kAny>(params, stream);
    if (dtype == DType::kBF16 && head_dim == 128) return launch_flash_fwd<__nv_bfloat16, 128, k128, kAny>(params, stream);
    if (dtype == DType::kF16 && head_dim == 64) return launch_flash_fwd<__half, 64, k64, kAny>(params, stream);
    if (dtype == DType::kF16 && head_dim == 128) return launch_flash_fwd<__half, 128, k128, kAny>(params, stream);
    unsupported(dtype, head_dim);
  }
  const int variant = dtype == DType::kBF16 ? fwd_variant() : 0;
  if (dtype == DType::kBF16 && head_dim == 64) return launch_variant<__nv_bfloat16, 64>(params, stream, variant);
  if (dtype == DType::kBF16 && head_dim == 128) return launch_variant<__nv_bfloat16, 128>(params, stream, variant);
  if (dtype == DType::kF16 && head_dim == 64) return launch_flash_fwd<__half, 64, 0>(params, stream);
  if (dtype == DType::kF16 && head_dim == 128) return launch_flash_fwd<__half, 128, 0>(params, stream);
  unsupported(dtype, head_dim);
}

void flash_fwd_finalize(const FlashFinalizeParams& params, DType dtype, cudaStream_t stream) {
  const int64_t work = static_cast<int64_t>(params.batch) * params.heads * params.seq_q * (params.head_dim / kElemsPerVector);
  if (work == 0) return;
  const unsigned grid = grid_for(work, kFinalizeThreads);
  if (dtype == DType::kBF16) {
    flash_finalize_kernel<__nv_bfloat16><<<grid, kFinalizeThreads, 0, stream>>>(params);
  } else if (dtype == DType::kF16) {
    flash_finalize_kernel<__half><<<grid, kFinalizeThreads, 0, stream>>>(params);
  } else {
    unsupported(dtype, params.head_dim);
  }
  RINGATTN_CUDA_CHECK_LAUNCH("flash_finalize_kernel");
}

void cast_f32(const float* src, void* dst, DType dtype, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const bool vec8 = reinterpret_cast<std::uintptr_t>(src) % 16 == 0 && reinterpret_cast<std::uintptr_t>(dst) % 16 == 0;
  const unsigned grid = grid_for(vec8 ? (n + kElemsPerVector - 1) / kElemsPerVector : n, kCastThreads);
  if (dtype == DType::kBF16) {
    cast_f32_kernel<<<grid, kCastThreads, 0, stream>>>(src, static_cast<__nv_bfloat16*>(dst), n, vec8);
  } else if (dtype == DType::kF16) {
    cast_f32_kernel<<<grid, kCastThreads, 0, stream>>>(src, static_cast<__half*>(dst), n, vec8);
  } else if (dtype == DType::kF32) {
    RINGATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
    return;
  } else {
    fail(ErrorKind::kInvalidArgument, std::string("cannot cast an fp32 accumulator to ") + dtype_name(dtype),
         "use bf16, fp16 or fp32");
  }
  RINGATTN_CUDA_CHECK_LAUNCH("cast_f32_kernel");
}

}  // namespace ringattn::cuda
