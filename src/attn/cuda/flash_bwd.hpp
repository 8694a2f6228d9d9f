// Entry points of the CUDA backward kernels (FA2 structure): preprocess, one step per visiting K/V chunk, finalize.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "attn/cuda/flash_mask.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::cuda {

// Rows of the per-(batch, head) scratch vectors (lse_log2, delta) are padded to a multiple of this,
// so the kernel can copy whole query tiles of them without tail checks.
inline constexpr int kBwdRowPad = 128;
constexpr int64_t flash_bwd_padded_rows(int64_t seq_q) { return (seq_q + kBwdRowPad - 1) / kBwdRowPad * kBwdRowPad; }

// How a step's dK/dV reach memory: added into fp32 accumulators, stored over them (a buffer no
// earlier step of the pass wrote: no zeroing pass, no read), or rounded and stored into the
// gradients themselves (the pass's only step).
enum class DkvWrite : int { kAdd, kStore, kFinal };

// Everything the three backward passes read and write. Strides count elements; the last dimension of
// every tensor is contiguous. Row strides of bf16/fp16 tensors must be multiples of 8 elements and
// their pointers 16-byte aligned (16-byte copies); dk/dv accumulator strides must be even.
struct FlashBwdParams {
  DType dtype = DType::kBF16;  // of q, k, v, out, dout, dq: kBF16 or kF16
  int batch = 0;
  int heads = 0;     // query heads H
  int kv_heads = 0;  // Hkv; H % Hkv == 0, kv head of query head h is h / (H / Hkv)
  int head_dim = 0;  // 64 or 128
  int seq_q = 0;     // local query rows Sq
  int seq_k = 0;     // rows of the visiting K/V chunk Sk
  float scale = 0.f; // softmax scale (1/sqrt(head_dim) unless the spec says otherwise)
  bool causal = false;  // the kCausal kernels' mask (flash_mask.hpp)
  Mask mask;            // the kGeneral kernels' mask, doc_offsets in device memory
  Mask mask_host;       // the same mask with doc_offsets in host memory: flash_bwd_step's skip test

  // q, out, dout: (B, Sq, H, D); dq: (B, Sq, H, D) output of finalize.
  const void* q = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  const void* out = nullptr;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  const void* dout = nullptr;
  int64_t dout_batch_stride = 0, dout_row_stride = 0, dout_head_stride = 0;
  void* dq = nullptr;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;

  // lse: (B, H, Sq) fp32, natural log, -inf for rows that see no key (as the forward writes it).
  const float* lse = nullptr;
  int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;

  // k, v: (B, Sk, Hkv, D) of the visiting chunk (set before each step).
  const void* k = nullptr;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  const void* v = nullptr;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  // dk_accum, dv_accum: (B, Sk, Hkv, D) fp32: the step adds into them (kAdd) or stores over them
  // (kStore); with kFinal the step rounds its dK/dV to `dtype` and stores them into dk_out, dv_out
  // ((B, Sk, Hkv, D) with the same strides; the accumulators are not touched). Every row of the
  // chunk is written in the store modes, zeros where no query sees the key.
  DkvWrite dkv_write = DkvWrite::kAdd;
  float* dk_accum = nullptr;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  float* dv_accum = nullptr;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  void* dk_out = nullptr;
  void* dv_out = nullptr;

  // Workspace owned by the caller, all fp32 and contiguous:
  // dq_accum: (B, Sq, H, D), or with flash_bwd_dq_tiled() (B, H, padded rows / 64, 2, 64 x 64) in the
  // register order of the Hopper kernels' warpgroups; lse_log2, delta: (B, H, flash_bwd_padded_rows(Sq)).
  float* dq_accum = nullptr;
  float* lse_log2 = nullptr;  // lse * log2(e); +inf for rows that see no key and for padding rows
  float* delta = nullptr;     // rowsum(dout * out); 0 for padding rows
};

// Bytes of each workspace buffer for a problem shape.
inline std::size_t flash_bwd_dq_accum_bytes(int batch, int heads, int head_dim, int64_t seq_q) {
  return static_cast<std::size_t>(batch) * heads * head_dim * flash_bwd_padded_rows(seq_q) * sizeof(float);
}
inline std::size_t flash_bwd_row_vector_bytes(int batch, int heads, int64_t seq_q) {
  return static_cast<std::size_t>(batch) * heads * flash_bwd_padded_rows(seq_q) * sizeof(float);
}

// Once per backward pass: delta = rowsum(dout * out) in fp32, lse_log2 from lse, dq_accum = 0.
// Reads q-side fields, lse; writes dq_accum, lse_log2, delta.
void flash_bwd_preprocess(const FlashBwdParams& params, cudaStream_t stream);

// One visiting K/V chunk: dq_accum += scale dS K, dk_accum += scale dS^T Q, dv_accum += P^T dout,
// with P = exp(scale Q K^T - lse) masked on global positions: by the causal rule (params.causal)
// when params.mask has no documents and no pattern, else by params.mask (any mask; the kGeneral
// kernels). Reads k, v, k-side strides and the workspace filled by preprocess.
void flash_bwd_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                    cudaStream_t stream);

// Once at the end: dq = round(dq_accum) into params.dtype.
void flash_bwd_finalize(const FlashBwdParams& params, cudaStream_t stream);

// dst[i] += src[i] for n contiguous fp32 elements (Backend::accumulate of travelling dK/dV partials).
void flash_bwd_accumulate(float* dst, const float* src, int64_t n, cudaStream_t stream);
// dst[i] += src[i] (Backend::fold_on: a share folded into the partial that travels on) on a grid that
// max_blocks > 0 caps: beside the attention kernel every block of the fold takes a whole SM from it.
void flash_bwd_fold(float* dst, const float* src, int64_t n, unsigned max_blocks, cudaStream_t stream);
// dst = round(a + b) into bf16/fp16, n elements: the last partial plus this rank's share, rounded once.
void flash_bwd_cast_sum(const float* a, const float* b, void* dst, DType dtype, int64_t n, cudaStream_t stream);

// The step for one compile-time (Elem, head_dim, mask class); one instantiation per translation unit.
template <typename Elem, int kHeadDim, MaskClass kMask = MaskClass::kCausal>
void launch_flash_bwd_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                           cudaStream_t stream);
// The Hopper (sm_90a, wgmma) step kernel, head_dim 128 only; same contract as launch_flash_bwd_step.
template <typename Elem, int kHeadDim, MaskClass kMask = MaskClass::kCausal>
void launch_flash_bwd_sm90_step(const FlashBwdParams& params, const ChunkPositions& q_pos, const ChunkPositions& k_pos,
                                cudaStream_t stream);

// Which step kernel flash_bwd_step uses: RINGATTN_BWD_KERNEL=mma forces the mma.sync kernel,
// =wgmma (or unset) takes the Hopper kernel where it applies (sm_90a device, head_dim 128). Read on
// every call, so a test can switch it with setenv.
enum class BwdKernel { kMma, kWgmma };
BwdKernel flash_bwd_kernel_choice();
// True when the step for this head_dim would run the wgmma kernel on the current device.
bool flash_bwd_uses_wgmma(int head_dim);
// True when dq_accum has the tiled layout: whenever the Hopper kernels run (flash_bwd_uses_wgmma);
// preprocess, step and finalize of one pass must agree, so RINGATTN_BWD_KERNEL must not change
// within a pass.
bool flash_bwd_dq_tiled(int head_dim);

}  // namespace ringattn::cuda
