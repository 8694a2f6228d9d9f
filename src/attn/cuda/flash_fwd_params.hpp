// Plain parameters of one forward step (one visiting K/V chunk folded into the fp32 running state).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ringattn/layout.hpp"
#include "ringattn/mask.hpp"

namespace ringattn::cuda {

struct FlashFwdParams {
  // q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D); element strides, last dimension contiguous.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;

  // Running state, contiguous fp32, owned by the backend:
  // acc: (B, H, Sq, D) unnormalised output; row_max: (B, H, Sq) in scaled log2 units; row_sum: (B, H, Sq).
  float* acc = nullptr;
  float* row_max = nullptr;
  float* row_sum = nullptr;

  int batch = 0;
  int heads = 0;
  int kv_group = 1;  // query heads per kv head: kv head = h / kv_group
  int seq_q = 0;
  int seq_k = 0;
  float scale_log2 = 0.f;  // softmax scale * log2(e)
  bool causal = false;      // the kCausal kernels' mask (flash_mask.hpp)
  Mask mask;                // the kGeneral kernels' mask, doc_offsets in device memory
  bool first_step = false;  // initialise the state instead of loading it

  // The pass's only step (Backend::forward_step_into, with first_step): `out` set, the kernel writes
  // the normalised output (input dtype, (B, Sq, H, D) strided) and lse ((B, H, Sq) fp32 strided,
  // natural log, -inf where no key is visible) instead of the running state, as the finalize pass would.
  void* out = nullptr;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;
  int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;

  ChunkPositions q_pos;  // global positions of the Sq query rows
  ChunkPositions k_pos;  // global positions of the Sk key rows

  // Block order, set by the kernel launchers (callers leave it): (batch, head) pairs run in
  // sections of this many, so the blocks in flight share the K/V of few heads in L2.
  int section_heads = 1;
};

// Parameters of the finalize pass: state -> out (input dtype) and lse (fp32, natural log).
struct FlashFinalizeParams {
  const float* acc = nullptr;      // (B, H, Sq, D)
  const float* row_max = nullptr;  // (B, H, Sq)
  const float* row_sum = nullptr;  // (B, H, Sq)
  void* out = nullptr;             // (B, Sq, H, D) strided
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse = nullptr;            // (B, H, Sq) strided
  int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;
  int batch = 0, heads = 0, seq_q = 0, head_dim = 0;
  bool nothing_visible = false;  // no step touched the state: out = 0, lse = -inf
};

}  // namespace ringattn::cuda
