// Backward entry points: argument checks, dtype/head_dim dispatch, and the small preprocess/finalize kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_device.cuh"  // pack2
#include "attn/cuda/flash_fwd_sm90.hpp"  // sm90_fwd_supported(): sm_90 device and sm_90a code in this binary
#include "ringattn/error.hpp"

namespace ringattn::cuda {
namespace {

constexpr int kRowsPerBlock = 8;  // preprocess: one warp per row
constexpr int kElementwiseThreads = 256;       // accumulate / fold / cast_sum blocks
constexpr int64_t kMaxElementwiseBlocks = 65535;  // grid-stride beyond
constexpr int kFoldThreads = 1024;  // fold_vec4_kernel
constexpr int kFoldUnroll = 4;

// delta[b, h, i] = sum_d dout * out (fp32); lse_log2 = lse * log2(e), +inf where lse = -inf and on padding rows.
template <typename Elem, int D>
__global__ void __launch_bounds__(kRowsPerBlock * 32) flash_bwd_preprocess_kernel(const FlashBwdParams p) {
  const int64_t pad = flash_bwd_padded_rows(p.seq_q);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= static_cast<int64_t>(p.batch) * p.heads * pad) return;
  const int64_t i = row % pad;
  const int64_t bh = row / pad;
  const int h = static_cast<int>(bh % p.heads), b = static_cast<int>(bh / p.heads);
  float sum = 0.f;
  float lse2 = INFINITY;
  if (i < p.seq_q) {
    const Elem* o = static_cast<const Elem*>(p.out) + b * p.out_batch_stride + i * p.out_row_stride +
                    h * p.out_head_stride;
    const Elem* d = static_cast<const Elem*>(p.dout) + b * p.dout_batch_stride + i * p.dout_row_stride +
                    h * p.dout_head_stride;
#pragma unroll
    for (int c = lane; c < D; c += 32) sum += static_cast<float>(o[c]) * static_cast<float>(d[c]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const float lse = p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i * p.lse_row_stride];
    lse2 = lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f;
  }
  if (lane == 0) {
    p.delta[row] = sum;
    p.lse_log2[row] = lse2;
  }
}

template <typename Elem>
struct __align__(16) Vec8 {
  Elem v[8];
};

// dq = round(dq_accum), 8 elements (16 bytes) per thread.
template <typename Elem>
__global__ void flash_bwd_finalize_kernel(const FlashBwdParams p) {
  const int64_t chunks_per_row = p.head_dim / 8;
  const int64_t total = static_cast<int64_t>(p.batch) * p.seq_q * p.heads * chunks_per_row;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= total) return;
  const int64_t dc = c % chunks_per_row;
  int64_t rest = c / chunks_per_row;
  const int64_t h = rest % p.heads;
  rest /= p.heads;
  const int64_t i = rest % p.seq_q;
  const int64_t b = rest / p.seq_q;
  const float4* src = reinterpret_cast<const float4*>(p.dq_accum + c * 8);
  const float4 x = src[0], y = src[1];
  const float f[8] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
  Vec8<Elem> out;
#pragma unroll
  for (int e = 0; e < 8; ++e) out.v[e] = static_cast<Elem>(f[e]);
  Elem* dst = static_cast<Elem*>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride + dc * 8;
  *reinterpret_cast<Vec8<Elem>*>(dst) = out;
}

// As flash_bwd_finalize_kernel, from the tiled dq_accum (head_dim 128), one block per 64-row tile of
// one (b, h): query row r of the tile and column c belong to warpgroup c / 64, whose thread
// tw = 32 (r / 16) + 4 (r % 8) + t holds them as float 2 (r % 16 / 8) + (c % 2) of its float4 number
// j = c % 64 / 8, at float4 128 j + tw of the warpgroup's 64 x 64 block (c % 8 = 2 t + c % 2). The
// block reads the tile's float4s in order (coalesced), rounds each into two (row, column pair) words
// of a shared tile, then writes whole rows. Reading the rows directly (8-byte pieces 16 bytes apart,
// each sector fetched twice) ran at a third of the bandwidth: 384 us at 16K tokens, 2026-11-28.
constexpr int kDqTileRows = 64;
constexpr int kDqTileThreads = 256;
constexpr int kDqTileWords = 64 + 4;  // bf16x2 words per shared row (64 + 4: the 32 lanes' writes hit 32 banks)

template <typename Elem>
__global__ void __launch_bounds__(kDqTileThreads) flash_bwd_finalize_tiled_kernel(const FlashBwdParams p) {
  constexpr int kD = 128, kF4PerWg = 64 * 64 / 4, kF4PerTile = kDqTileRows * kD / 4;
  __shared__ __align__(16) uint32_t tile[kDqTileRows][kDqTileWords];
  const int tiles_per_slice = static_cast<int>((p.seq_q + kDqTileRows - 1) / kDqTileRows);
  const int64_t bh = blockIdx.x / tiles_per_slice;
  const int tile_idx = static_cast<int>(blockIdx.x % tiles_per_slice);
  const float4* src = reinterpret_cast<const float4*>(
      p.dq_accum + (bh * flash_bwd_padded_rows(p.seq_q) + static_cast<int64_t>(tile_idx) * kDqTileRows) * kD);
#pragma unroll
  for (int k = 0; k < kF4PerTile / kDqTileThreads; ++k) {
    const int f = threadIdx.x + k * kDqTileThreads;
    const float4 x = src[f];
    const int wg = f / kF4PerWg, quad = f % kF4PerWg;
    const int j = quad / 128, tw = quad % 128;
    const int r = 16 * (tw / 32) + (tw / 4) % 8;
    const int word = wg * 32 + 4 * j + tw % 4;  // column pair (c / 2) of columns 64 wg + 8 j + 2 t
    tile[r][word] = pack2<Elem>(x.x, x.y);
    tile[r + 8][word] = pack2<Elem>(x.z, x.w);
  }
  __syncthreads();
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
  constexpr int kChunksPerRow = kD / 8;  // 16-byte pieces of a bf16/fp16 row
#pragma unroll
  for (int k = 0; k < kDqTileRows * kChunksPerRow / kDqTileThreads; ++k) {
    const int idx = threadIdx.x + k * kDqTileThreads;
    const int r = idx / kChunksPerRow, c = idx % kChunksPerRow;
    const int64_t i = static_cast<int64_t>(tile_idx) * kDqTileRows + r;
    if (i >= p.seq_q) continue;
    Elem* dst = static_cast<Elem*>(p.dq) + b * p.dq_batch_stride + i * p.dq_row_stride + h * p.dq_head_stride + c * 8;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(&tile[r][4 * c]);
  }
}

void check_cuda(cudaError_t status, const char* what) {
  if (status == cudaSuccess) return;
  fail(ErrorKind::kCuda, std::string(what) + " failed: " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")",
       "check that a CUDA device is visible and that the driver matches the toolkit");
}

// dst += src, four floats per thread per iteration when both are 16-byte aligned, grid-stride.
__global__ void accumulate_kernel(float* __restrict__ dst, const float* __restrict__ src, int64_t n, bool vec4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    for (int64_t i = first; i < n / 4; i += stride) {
      float4 a = reinterpret_cast<float4*>(dst)[i];
      const float4 b = reinterpret_cast<const float4*>(src)[i];
      a.x += b.x;
      a.y += b.y;
      a.z += b.z;
      a.w += b.w;
      reinterpret_cast<float4*>(dst)[i] = a;
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) dst[i] += src[i];
}

// The fold of 16-byte aligned buffers (dst += src): kFoldUnroll float4 pairs in flight per thread, so
// that a grid capped to a few SMs (beside the attention kernel) still keeps their memory pipes busy.
template <int kUnroll>
__global__ void __launch_bounds__(kFoldThreads) fold_vec4_kernel(float4* __restrict__ dst,
                                                                 const float4* __restrict__ src, int64_t n4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t base = first; base < n4; base += stride * kUnroll) {
    float4 a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < n4) {
        a[u] = dst[i];
        b[u] = src[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * stride;
      if (i < n4) dst[i] = make_float4(a[u].x + b[u].x, a[u].y + b[u].y, a[u].z + b[u].z, a[u].w + b[u].w);
    }
  }
}

__device__ __forceinline__ void store_rounded(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_rounded(__half* p, float x) { *p = __float2half_rn(x); }

// dst = round(a + b): four elements per thread per iteration when a, b are 16-byte and dst 8-byte aligned.
template <typename Elem>
__global__ void cast_sum_kernel(const float* __restrict__ a, const float* __restrict__ b, Elem* __restrict__ dst,
                                int64_t n, bool vec4) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec4) {
    for (int64_t i = first; i < n / 4; i += stride) {
      const float4 x = reinterpret_cast<const float4*>(a)[i];
      const float4 y = reinterpret_cast<const float4*>(b)[i];
      alignas(8) Elem out[4];
      store_rounded(&out[0], x.x + y.x);
      store_rounded(&out[1], x.y + y.y);
      store_rounded(&out[2], x.z + y.z);
      store_rounded(&out[3], x.w + y.w);
      reinterpret_cast<uint2*>(dst)[i] = *reinterpret_cast<const uint2*>(out);
    }
    done = n / 4 * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) store_rounded(dst + i, a[i] + b[i]);
}

void require(bool cond, const std::string& what) {
  if (!cond) fail(ErrorKind::kInternal, "flash backward: " + what, "");
}

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

void check_common(const FlashBwdParams& p) {
  require(p.dtype == DType::kBF16 || p.dtype == DType::kF16,
          std::string("dtype ") + dtype_name(p.dtype) + " unsupported (bf16 or fp16)");
  require(p.head_dim == 64 || p.head_dim == 128,
          "head_dim " + std::to_string(p.head_dim) + " unsupported (64 or 128)");
  require(p.heads > 0 && p.kv_heads > 0 && p.heads % p.kv_heads == 0, "heads must be a multiple of kv_heads");
  require(p.dq_accum && p.lse_log2 && p.delta, "workspace pointers (dq_accum, lse_log2, delta) not set");
  require(aligned16(p.dq_accum) && aligned16(p.lse_log2) && aligned16(p.delta), "workspace not 16-byte aligned");
}

void check_tensor(const void* ptr, int64_t bs, int64_t rs, int64_t hs, const char* name) {
  require(ptr != nullptr, std::string(name) + " not set");
  require(aligned16(ptr) && bs % 8 == 0 && rs % 8 == 0 && hs % 8 == 0,
          std::string(name) + " must be 16-byte aligned with strides that are multiples of 8 elements");
}

template <typename Elem>
void launch_preprocess(const FlashBwdParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * flash_bwd_padded_rows(p.seq_q);
  const unsigned blocks = static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
  if (p.head_dim == 64) {
    flash_bwd_preprocess_kernel<Elem, 64><<<blocks, kRowsPerBlock * 32, 0, stream>>>(p);
  } else {
    flash_bwd_preprocess_kernel<Elem, 128><<<blocks, kRowsPerBlock * 32, 0, stream>>>(p);
  }
  check_cuda(cudaGetLastError(), "launch of flash_bwd_preprocess_kernel");
}

// Blocks of kElementwiseThreads for n elements handled vec4 (four per thread) or one per thread.
unsigned elementwise_blocks(int64_t n, bool vec4) {
  const int64_t want = ((vec4 ? n / 4 : n) + kElementwiseThreads - 1) / kElementwiseThreads;
  return static_cast<unsigned>(want < 1 ? 1 : (want > kMaxElementwiseBlocks ? kMaxElementwiseBlocks : want));
}

// The step kernel for the dtype, head_dim and kernel choice (flash_bwd_uses_wgmma) of p.
template <MaskClass kMask>
void launch_step(const FlashBwdParams& p, const ChunkPositions& q_pos, const ChunkPositions& k_pos, cudaStream_t stream) {
  if (flash_bwd_uses_wgmma(p.head_dim)) {
    if (p.dtype == DType::kBF16) {
      launch_flash_bwd_sm90_step<__nv_bfloat16, 128, kMask>(p, q_pos, k_pos, stream);
    } else {
      launch_flash_bwd_sm90_step<__half, 128, kMask>(p, q_pos, k_pos, stream);
    }
    return;
  }
  if (p.dtype == DType::kBF16) {
    p.head_dim == 64 ? launch_flash_bwd_step<__nv_bfloat16, 64, kMask>(p, q_pos, k_pos, stream)
                     : launch_flash_bwd_step<__nv_bfloat16, 128, kMask>(p, q_pos, k_pos, stream);
  } else {
    p.head_dim == 64 ? launch_flash_bwd_step<__half, 64, kMask>(p, q_pos, k_pos, stream)
                     : launch_flash_bwd_step<__half, 128, kMask>(p, q_pos, k_pos, stream);
  }
}

}  // namespace

BwdKernel flash_bwd_kernel_choice() {
  const char* v = std::getenv("RINGATTN_BWD_KERNEL");
  return v && std::strcmp(v, "mma") == 0 ? BwdKernel::kMma : BwdKernel::kWgmma;
}

bool flash_bwd_uses_wgmma(int head_dim) {
  return head_dim == 128 && flash_bwd_kernel_choice() == BwdKernel::kWgmma && sm90_fwd_supported();
}

bool flash_bwd_dq_tiled(int head_dim) { return flash_bwd_uses_wgmma(head_dim); }

void flash_bwd_preprocess(const FlashBwdParams& p, cudaStream_t stream) {
  check_common(p);
  if (p.batch == 0 || p.seq_q == 0) return;
  require(p.out != nullptr && p.dout != nullptr && p.lse != nullptr, "out, dout and lse must be set");
  check_cuda(cudaMemsetAsync(p.dq_accum, 0, flash_bwd_dq_accum_bytes(p.batch, p.heads, p.head_dim, p.seq_q), stream),
            "cudaMemsetAsync(dq_accum)");
  if (p.dtype == DType::kBF16) {
    launch_preprocess<__nv_bfloat16>(p, stream);
  } else {
    launch_preprocess<__half>(p, stream);
  }
}

void flash_bwd_step(const FlashBwdParams& p, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                    cudaStream_t stream) {
  check_common(p);
  if (p.batch == 0 || p.seq_q == 0 || p.seq_k == 0) return;
  require(q_pos.size() == p.seq_q && k_pos.size() == p.seq_k, "positions do not match seq_q / seq_k");
  // Nothing visible: nothing to add. The store modes still launch: every block writes its zeros.
  require(mask_class(p.mask) == mask_class(p.mask_host), "mask and mask_host are not the same mask");
  Mask rule = p.mask_host;  // the kernels' mask, readable here
  if (mask_class(rule) == MaskClass::kCausal) rule.causal = p.causal;  // what the kCausal kernels read
  if (classify_chunks(rule, p.heads, q_pos, k_pos) == Visibility::kEmpty && p.dkv_write == DkvWrite::kAdd) return;
  check_tensor(p.q, p.q_batch_stride, p.q_row_stride, p.q_head_stride, "q");
  check_tensor(p.dout, p.dout_batch_stride, p.dout_row_stride, p.dout_head_stride, "dout");
  check_tensor(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, "k");
  check_tensor(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, "v");
  const bool final_out = p.dkv_write == DkvWrite::kFinal;
  const void* dk_dst = final_out ? p.dk_out : static_cast<const void*>(p.dk_accum);
  const void* dv_dst = final_out ? p.dv_out : static_cast<const void*>(p.dv_accum);
  require(dk_dst && dv_dst, final_out ? "dk_out and dv_out must be set" : "dk_accum and dv_accum must be set");
  require(reinterpret_cast<std::uintptr_t>(dk_dst) % 8 == 0 && reinterpret_cast<std::uintptr_t>(dv_dst) % 8 == 0 &&
              p.dk_batch_stride % 2 == 0 && p.dk_row_stride % 2 == 0 && p.dk_head_stride % 2 == 0 &&
              p.dv_batch_stride % 2 == 0 && p.dv_row_stride % 2 == 0 && p.dv_head_stride % 2 == 0,
          "the dK/dV outputs must be 8-byte aligned with even strides");
  if (mask_class(p.mask) == MaskClass::kGeneral) {
    launch_step<MaskClass::kGeneral>(p, q_pos, k_pos, stream);
  } else {
    launch_step<MaskClass::kCausal>(p, q_pos, k_pos, stream);
  }
}

void flash_bwd_finalize(const FlashBwdParams& p, cudaStream_t stream) {
  check_common(p);
  if (p.batch == 0 || p.seq_q == 0) return;
  check_tensor(p.dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride, "dq");
  const int64_t chunks = static_cast<int64_t>(p.batch) * p.seq_q * p.heads * (p.head_dim / 8);
  const int threads = 256;
  const unsigned blocks = static_cast<unsigned>((chunks + threads - 1) / threads);
  if (flash_bwd_dq_tiled(p.head_dim)) {
    require(p.head_dim == 128, "the tiled dQ accumulator has head_dim 128");
    const int64_t tiles = static_cast<int64_t>(p.batch) * p.heads * ((p.seq_q + kDqTileRows - 1) / kDqTileRows);
    require(tiles <= INT32_MAX, "too many dQ tiles for one grid");
    const unsigned grid = static_cast<unsigned>(tiles);
    p.dtype == DType::kBF16 ? flash_bwd_finalize_tiled_kernel<__nv_bfloat16><<<grid, kDqTileThreads, 0, stream>>>(p)
                            : flash_bwd_finalize_tiled_kernel<__half><<<grid, kDqTileThreads, 0, stream>>>(p);
  } else if (p.dtype == DType::kBF16) {
    flash_bwd_finalize_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p);
  } else {
    flash_bwd_finalize_kernel<__half><<<blocks, threads, 0, stream>>>(p);
  }
  check_cuda(cudaGetLastError(), "launch of flash_bwd_finalize_kernel");
}

void flash_bwd_accumulate(float* dst, const float* src, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  require(dst != nullptr && src != nullptr, "accumulate of a null buffer");
  const bool vec4 = aligned16(dst) && aligned16(src);
  accumulate_kernel<<<elementwise_blocks(n, vec4), kElementwiseThreads, 0, stream>>>(dst, src, n, vec4);
  check_cuda(cudaGetLastError(), "launch of accumulate_kernel");
}

void flash_bwd_fold(float* dst, const float* src, int64_t n, unsigned max_blocks, cudaStream_t stream) {
  if (n <= 0) return;
  require(dst != nullptr && src != nullptr, "fold of a null buffer");
  if (!aligned16(dst) || !aligned16(src) || n % 4 != 0) {
    unsigned blocks = elementwise_blocks(n, false);
    if (max_blocks > 0 && max_blocks < blocks) blocks = max_blocks;
    accumulate_kernel<<<blocks, kElementwiseThreads, 0, stream>>>(dst, src, n, false);
    check_cuda(cudaGetLastError(), "launch of the fold kernel");
    return;
  }
  const int64_t n4 = n / 4;
  const int64_t want = (n4 + int64_t{kFoldThreads} * kFoldUnroll - 1) / (int64_t{kFoldThreads} * kFoldUnroll);
  unsigned blocks = static_cast<unsigned>(want < 1 ? 1 : (want > kMaxElementwiseBlocks ? kMaxElementwiseBlocks : want));
  if (max_blocks > 0 && max_blocks < blocks) blocks = max_blocks;
  fold_vec4_kernel<kFoldUnroll><<<blocks, kFoldThreads, 0, stream>>>(reinterpret_cast<float4*>(dst),
                                                                     reinterpret_cast<const float4*>(src), n4);
  check_cuda(cudaGetLastError(), "launch of fold_vec4_kernel");
}

void flash_bwd_cast_sum(const float* a, const float* b, void* dst, DType dtype, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  require(a != nullptr && b != nullptr && dst != nullptr, "cast_sum of a null buffer");
  require(dtype == DType::kBF16 || dtype == DType::kF16, "cast_sum rounds to bf16 or fp16");
  const bool vec4 = aligned16(a) && aligned16(b) && reinterpret_cast<std::uintptr_t>(dst) % 8 == 0;
  const unsigned blocks = elementwise_blocks(n, vec4);
  constexpr int threads = kElementwiseThreads;
  if (dtype == DType::kBF16) {
    cast_sum_kernel<<<blocks, threads, 0, stream>>>(a, b, static_cast<__nv_bfloat16*>(dst), n, vec4);
  } else {
    cast_sum_kernel<<<blocks, threads, 0, stream>>>(a, b, static_cast<__half*>(dst), n, vec4);
  }
  check_cuda(cudaGetLastError(), "launch of cast_sum_kernel");
}

}  // namespace ringattn::cuda
