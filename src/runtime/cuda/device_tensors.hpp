// Device-side helpers around the ring: shard/unshard between global and per-rank layouts, seeded random fill, memory.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ringattn/layout.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::cuda {

// Copies rank-local rows between a global tensor (seq_len rows along `seq_dim`) and a local one
// whose row i is global row positions.at(i). Either side may live on the host or the device (any
// mix); one strided 2-D copy per (outer index, segment), ordered on `stream` (a cudaStream_t,
// nullptr: the legacy default stream). Same dtype and shapes except along seq_dim; contiguous.
// q/k/v/out: seq_dim 1 of (B, S, H, D); lse: seq_dim 2 of (B, H, S).
void shard_rows_async(const TensorView& global, const TensorView& local, const ChunkPositions& positions,
                      int seq_dim, void* stream);
void unshard_rows_async(const TensorView& local, const TensorView& global, const ChunkPositions& positions,
                        int seq_dim, void* stream);

// Fills a contiguous (B, rows, H, D) device tensor with standard-normal values that depend only on
// (seed, stream_id, b, global position, h, d): the same global problem on any ring size or layout.
// `seq_len` is the global length; row i of the view holds global row positions.at(i).
void fill_random_rows_async(const TensorView& view, const ChunkPositions& positions, int64_t seq_len, uint64_t seed,
                            uint64_t stream_id, void* stream);

struct DeviceMemory {
  std::size_t free_bytes = 0;
  std::size_t total_bytes = 0;
  std::size_t used_bytes() const { return total_bytes - free_bytes; }
};
// cudaMemGetInfo of the current device.
DeviceMemory device_memory();

// Blocks until all work on `stream` is done.
void synchronize(void* stream);

}  // namespace ringattn::cuda
