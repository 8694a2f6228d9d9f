// The one seeded input generator: a value is a host function of (seed, tensor, batch row, global position, head, dim).
#pragma once

#include <cstdint>

#include "ringattn/layout.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// Which tensor a random value belongs to (part of the counter, so q, k, v differ).
enum class TensorId : uint64_t { kQ = 1, kK = 2, kV = 3, kDOut = 4 };

uint64_t splitmix64(uint64_t x);
// A standard-normal value that depends only on (seed, tensor, global flat index): a counter-based
// hash (splitmix64) and Box-Muller. The same seed gives the same global problem on any rank count.
double random_normal(uint64_t seed, TensorId tensor, uint64_t global_index);
// Element (b, pos, head, dim) of the seeded global (B, seq_len, heads, head_dim) tensor: the flat
// index ((b * seq_len + pos) * heads + head) * head_dim + dim of random_normal. Every backend's
// inputs come from this function (device tensors are generated on the host and copied), so
// `run --seed N` and `bench --seed N` compute the same problem on any backend.
inline double input_value(uint64_t seed, TensorId tensor, int64_t b, int64_t pos, int64_t head, int64_t dim,
                          int64_t seq_len, int64_t heads, int64_t head_dim) {
  return random_normal(seed, tensor, static_cast<uint64_t>(((b * seq_len + pos) * heads + head) * head_dim + dim));
}
// local: (B, rows, Hh, D) host, any dtype. Row i receives global row pos.at(i) of the seeded
// (B, seq_len, Hh, D) tensor (input_value), rounded to local's dtype. Each rank generates only its rows.
void fill_random_rows(const TensorView& local, const ChunkPositions& pos, int64_t seq_len, uint64_t seed,
                      TensorId tensor);
// The same for a tensor in host or device memory: device tensors are filled on the host and copied.
void fill_random_rows_anywhere(const TensorView& local, const ChunkPositions& pos, int64_t seq_len, uint64_t seed,
                               TensorId tensor);

}  // namespace ringattn
