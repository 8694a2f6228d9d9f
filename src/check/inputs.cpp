// The one seeded input generator (host): counter-based normal values per global element, and the copy for device tensors.
#include "check/inputs.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "ringattn/error.hpp"

namespace ringattn {

namespace {
constexpr double kTwoPi = 6.283185307179586476925286766559;
}  // namespace

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

namespace {

uint64_t tensor_key(uint64_t seed, TensorId tensor) {
  return splitmix64(seed ^ splitmix64(static_cast<uint64_t>(tensor) * 0x632be59bd9b4e019ull));
}

double normal_from_key(uint64_t key, uint64_t index) {
  // Two uniforms in (0, 1] from 53 random bits each, then Box-Muller (cosine branch).
  const double u1 = (static_cast<double>(splitmix64(key + 2 * index) >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = static_cast<double>(splitmix64(key + 2 * index + 1) >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

// Threads for host-side generation: the cores of this host shared by its ranks.
int generation_threads(int64_t work) {
  if (work < (int64_t{1} << 20)) return 1;
  int cores = static_cast<int>(std::thread::hardware_concurrency());
  int local_ranks = 1;
  if (const char* s = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local_ranks = std::max(1, std::atoi(s));
  return std::clamp(cores / local_ranks, 1, 16);
}

}  // namespace

double random_normal(uint64_t seed, TensorId tensor, uint64_t global_index) {
  return normal_from_key(tensor_key(seed, tensor), global_index);
}

void fill_random_rows(const TensorView& local, const ChunkPositions& pos, int64_t seq_len, uint64_t seed,
                      TensorId tensor) {
  RINGATTN_CHECK(local.device == Device::kHost && local.is_contiguous() && local.rank == 4, ErrorKind::kInternal,
                 "fill_random_rows needs a contiguous (B, rows, heads, D) host tensor, got " + local.describe(), "");
  RINGATTN_CHECK(local.shape[1] == pos.size(), ErrorKind::kInternal, "fill_random_rows: rows != positions", "");
  const int64_t B = local.shape[0], rows = local.shape[1];
  const int64_t row_elems = local.shape[2] * local.shape[3];
  const uint64_t key = tensor_key(seed, tensor);
  auto work = [&](int64_t lo, int64_t hi) {  // flat (b, i) row range
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / rows, i = r % rows;
      const uint64_t g0 = static_cast<uint64_t>((b * seq_len + pos.at(i)) * row_elems);
      const int64_t l0 = r * row_elems;
      for (int64_t e = 0; e < row_elems; ++e) store_from_double(local, l0 + e, normal_from_key(key, g0 + e));
    }
  };
  const int64_t total_rows = B * rows;
  const int threads = generation_threads(total_rows * row_elems);
  if (threads <= 1) {
    work(0, total_rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (total_rows + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = t * per, hi = std::min(total_rows, lo + per);
    if (lo < hi) pool.emplace_back(work, lo, hi);
  }
  for (auto& th : pool) th.join();
}

void fill_random_rows_anywhere(const TensorView& local, const ChunkPositions& pos, int64_t seq_len, uint64_t seed,
                               TensorId tensor) {
  if (local.device == Device::kHost) {
    fill_random_rows(local, pos, seq_len, seed, tensor);
    return;
  }
  // The device copy of the host values: one generator, whatever the backend.
  TensorView host = local;
  host.device = Device::kHost;
  std::vector<double> storage((local.nbytes() + sizeof(double) - 1) / sizeof(double));
  host.data = storage.data();
  fill_random_rows(host, pos, seq_len, seed, tensor);
#ifdef RINGATTN_HAVE_CUDA
  cudaError_t err = cudaDeviceSynchronize();
  if (err == cudaSuccess) err = cudaMemcpy(local.data, host.data, local.nbytes(), cudaMemcpyHostToDevice);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    fail(ErrorKind::kCuda, std::string("copying seeded inputs to the device failed: ") + cudaGetErrorString(err),
         "an earlier kernel may have failed; rerun with CUDA_LAUNCH_BLOCKING=1");
  }
#else
  fail(ErrorKind::kInternal, "seeded inputs for a device tensor in a build without CUDA", "");
#endif
}

}  // namespace ringattn
