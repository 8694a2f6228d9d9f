// Shard/unshard as strided 2-D copies (host or device on either side) and a counter-based normal fill kernel.
#include "runtime/cuda/device_tensors.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "attn/cuda/cuda_check.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cuda {
namespace {

void move_rows(const TensorView& local, const TensorView& global, const ChunkPositions& positions, int seq_dim,
               bool to_global, cudaStream_t stream) {
  RINGATTN_CHECK(local.dtype == global.dtype && local.rank == global.rank && seq_dim >= 0 && seq_dim < local.rank,
                 ErrorKind::kInvalidArgument,
                 "shard/unshard between " + local.describe() + " and " + global.describe() + " along dim " +
                     std::to_string(seq_dim),
                 "both tensors need the same dtype and rank");
  RINGATTN_CHECK(local.is_contiguous() && global.is_contiguous(), ErrorKind::kInvalidArgument,
                 "shard/unshard needs contiguous tensors", "make a contiguous copy first");
  RINGATTN_CHECK(local.shape[seq_dim] == positions.size(), ErrorKind::kInvalidArgument,
                 "local tensor " + local.describe() + " has " + std::to_string(local.shape[seq_dim]) +
                     " rows, the layout gives " + std::to_string(positions.size()),
                 "allocate seq_len / ranks rows per rank");
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < local.rank; ++d) {
    if (d == seq_dim) continue;
    RINGATTN_CHECK(local.shape[d] == global.shape[d], ErrorKind::kInvalidArgument,
                   "shape mismatch " + local.describe() + " vs " + global.describe(), "");
    if (d < seq_dim) outer *= local.shape[d];
    else inner *= local.shape[d];
  }
  const std::size_t row = static_cast<std::size_t>(inner) * dtype_size(local.dtype);
  const int64_t local_rows = local.shape[seq_dim], global_rows = global.shape[seq_dim];
  auto* lb = static_cast<char*>(local.data);
  auto* gb = static_cast<char*>(global.data);
  for (int64_t o = 0; o < outer; ++o) {
    int64_t first = 0;  // first local row of this segment
    for (int s = 0; s < positions.num_segments; ++s) {
      const Segment& seg = positions.seg[s];
      if (seg.count == 0) continue;
      const int64_t last = seg.start + seg.stride * (seg.count - 1);
      RINGATTN_CHECK(seg.start >= 0 && last < global_rows, ErrorKind::kInvalidArgument,
                     "positions up to " + std::to_string(last) + " outside global tensor " + global.describe(), "");
      char* l = lb + static_cast<std::size_t>(o * local_rows + first) * row;
      char* g = gb + static_cast<std::size_t>(o * global_rows + seg.start) * row;
      const std::size_t gpitch = static_cast<std::size_t>(seg.stride) * row;
      if (to_global) {
        RINGATTN_CUDA_CHECK(cudaMemcpy2DAsync(g, gpitch, l, row, row, seg.count, cudaMemcpyDefault, stream));
      } else {
        RINGATTN_CUDA_CHECK(cudaMemcpy2DAsync(l, row, g, gpitch, row, seg.count, cudaMemcpyDefault, stream));
      }
      first += seg.count;
    }
  }
}

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__device__ __forceinline__ float normal_at(uint64_t key) {
  const uint64_t h = mix64(key);
  const float u1 = (static_cast<float>(h >> 40) + 1.0f) * (1.0f / 16777217.0f);  // (0, 1]
  const float u2 = static_cast<float>((h >> 16) & 0xFFFFFF) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// ChunkPositions::at on the device (the header's version is host-only).
__device__ __forceinline__ int64_t position_at(const ChunkPositions& p, int64_t i) {
  for (int s = 0; s < p.num_segments - 1; ++s) {
    if (i < p.seg[s].count) return p.seg[s].start + p.seg[s].stride * i;
    i -= p.seg[s].count;
  }
  return p.seg[p.num_segments - 1].start + p.seg[p.num_segments - 1].stride * i;
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_float<double>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// data: (B, rows, H*D) contiguous; element (b, i, e) gets normal(seed, id, (b*S + pos(i))*H*D + e).
template <typename T>
__global__ void fill_normal_kernel(T* data, ChunkPositions pos, int64_t batch, int64_t rows, int64_t row_elems,
                                   int64_t seq_len, uint64_t seed) {
  const int64_t n = batch * rows * row_elems;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i % row_elems;
    const int64_t r = (i / row_elems) % rows;
    const int64_t b = i / (row_elems * rows);
    const int64_t g = (b * seq_len + position_at(pos, r)) * row_elems + e;
    data[i] = from_float<T>(normal_at(seed ^ mix64(static_cast<uint64_t>(g))));
  }
}

}  // namespace

void shard_rows_async(const TensorView& global, const TensorView& local, const ChunkPositions& positions,
                      int seq_dim, void* stream) {
  move_rows(local, global, positions, seq_dim, false, static_cast<cudaStream_t>(stream));
}

void unshard_rows_async(const TensorView& local, const TensorView& global, const ChunkPositions& positions,
                        int seq_dim, void* stream) {
  move_rows(local, global, positions, seq_dim, true, static_cast<cudaStream_t>(stream));
}

void fill_random_rows_async(const TensorView& view, const ChunkPositions& positions, int64_t seq_len, uint64_t seed,
                            uint64_t stream_id, void* stream) {
  RINGATTN_CHECK(view.device == Device::kCuda && view.rank == 4 && view.is_contiguous(), ErrorKind::kInternal,
                 "random fill needs a contiguous 4-d device tensor, got " + view.describe(), "");
  RINGATTN_CHECK(view.shape[1] == positions.size(), ErrorKind::kInternal,
                 "random fill: " + view.describe() + " vs " + std::to_string(positions.size()) + " positions", "");
  const int64_t batch = view.shape[0], rows = view.shape[1], row_elems = view.shape[2] * view.shape[3];
  const int64_t n = batch * rows * row_elems;
  if (n == 0) return;
  constexpr int kThreads = 256;
  const int64_t want = (n + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(want < 65536 ? want : 65536);
  const uint64_t key = seed * 0xD1B54A32D192ED03ull + stream_id * 0x8CB92BA72F3D8DD7ull;
  auto s = static_cast<cudaStream_t>(stream);
  switch (view.dtype) {
    case DType::kBF16:
      fill_normal_kernel<<<blocks, kThreads, 0, s>>>(view.as<__nv_bfloat16>(), positions, batch, rows, row_elems,
                                                     seq_len, key);
      break;
    case DType::kF16:
      fill_normal_kernel<<<blocks, kThreads, 0, s>>>(view.as<__half>(), positions, batch, rows, row_elems, seq_len,
                                                     key);
      break;
    case DType::kF32:
      fill_normal_kernel<<<blocks, kThreads, 0, s>>>(view.as<float>(), positions, batch, rows, row_elems, seq_len, key);
      break;
    case DType::kF64:
      fill_normal_kernel<<<blocks, kThreads, 0, s>>>(view.as<double>(), positions, batch, rows, row_elems, seq_len,
                                                     key);
      break;
  }
  RINGATTN_CUDA_CHECK_LAUNCH("fill_normal_kernel");
}

DeviceMemory device_memory() {
  DeviceMemory m;
  RINGATTN_CUDA_CHECK(cudaMemGetInfo(&m.free_bytes, &m.total_bytes));
  return m;
}

void synchronize(void* stream) { RINGATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream))); }

}  // namespace ringattn::cuda
