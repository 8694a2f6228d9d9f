// The naive fp64 reference: materialises every score row; used only by tests and --check.
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/layout.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// q: (B, Sq, H, D) host, any dtype; k, v: (B, Sk, Hkv, D) host, any dtype.
// out: (B, Sq, H, D) fp64 host; lse: (B, H, Sq) fp64 host (natural log, -inf for rows that see no key).
// Query row i has global position q_pos.at(i), key row j has k_pos.at(j). When `rows` is given,
// only those local query rows are computed (the others are left untouched).
void reference_attention(const AttentionSpec& spec, const TensorView& q, const ChunkPositions& q_pos,
                         const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                         const TensorView& out, const TensorView& lse,
                         const std::vector<int64_t>* rows = nullptr);

// Whether query position i sees key position j at query head `head`, from the semantics' text.
bool reference_visible(const MaskSpec& mask, int64_t i, int64_t j, int head);

// Positions 0..n-1 (a whole sequence in global order).
ChunkPositions identity_positions(int64_t n);

}  // namespace ringattn

namespace ringattn {

// Naive fp64 backward over a whole sequence (positions 0..S-1): materialises P per (batch, head).
// q, dout: (B, S, H, D); k, v: (B, S, Hkv, D), any dtype on the host.
// dq: (B, S, H, D) fp64; dk, dv: (B, S, Hkv, D) fp64 (shared kv heads summed over their query heads).
void reference_attention_backward(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                                  const TensorView& v, const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv);

}  // namespace ringattn
