// Host side of the Hopper forward kernel: the sm_90a capability check and tensor-map encoding
// through the runtime's driver entry point (the binaries do not link libcuda).
#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <mutex>

#include "attn/cuda/flash_fwd_sm90.hpp"

namespace ringattn::cuda {
namespace {

// 1 in code built for sm_90a, 2 in any other device code; read back once per device.
__device__ int g_sm90a_probe;
__global__ void sm90a_probe_kernel() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  g_sm90a_probe = 1;
#else
  g_sm90a_probe = 2;
#endif
}

constexpr int kMaxDevices = 64;
constexpr int kSm90Major = 9, kSm90Minor = 0;

bool probe_current_device() {
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (major != kSm90Major || minor != kSm90Minor) return false;
  cudaStream_t stream = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  int value = 0;
  sm90a_probe_kernel<<<1, 1, 0, stream>>>();
  const bool ok = cudaGetLastError() == cudaSuccess &&
                  cudaMemcpyFromSymbolAsync(&value, g_sm90a_probe, sizeof(int), 0, cudaMemcpyDeviceToHost, stream) ==
                      cudaSuccess &&
                  cudaStreamSynchronize(stream) == cudaSuccess;
  cudaStreamDestroy(stream);
  cudaGetLastError();
  return ok && value == 1;
}

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_fn() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult status{};
    constexpr unsigned kDriverApiVersion = 12000;  // the cuTensorMapEncodeTiled signature of CUDA 12.0+
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, kDriverApiVersion, cudaEnableDefault,
                                         &status) != cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiledFn>(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

}  // namespace

int sm90_fwd_variant() {
  static const int variant = [] {
    const char* env = std::getenv("RINGATTN_SM90_VARIANT");
    const int v = env != nullptr ? std::atoi(env) : -1;
    return v == 1 || v == 4 || v == 5 ? v : -1;
  }();
  return variant;
}

bool sm90_fwd_supported() {
  // 0 unknown, 1 yes, 2 no, per device.
  static std::atomic<int> cache[kMaxDevices];
  static std::mutex mutex;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return false;
  }
  int known = cache[device].load(std::memory_order_acquire);
  if (known == 0) {
    std::lock_guard<std::mutex> lock(mutex);
    known = cache[device].load(std::memory_order_acquire);
    if (known == 0) {
      known = probe_current_device() ? 1 : 2;
      cache[device].store(known, std::memory_order_release);
    }
  }
  return known == 1;
}

bool encode_tile_map(CUtensorMap* map, bool bf16, const void* base, int head_dim, int64_t rows, int64_t heads,
                     int64_t batch, int64_t row_stride, int64_t head_stride, int64_t batch_stride, int box_rows) {
  constexpr int64_t kElemBytes = 2;
  constexpr int64_t kAlign = 16;               // global address and strides: multiples of 16 bytes
  constexpr int64_t kMaxStride = int64_t{1} << 40;
  constexpr cuuint32_t kBoxCols = 64;          // 128 bytes: the swizzle width
  const EncodeTiledFn fn = encode_fn();
  if (fn == nullptr || base == nullptr || rows <= 0 || heads <= 0 || batch <= 0) return false;
  if (reinterpret_cast<uintptr_t>(base) % kAlign != 0) return false;
  // A dimension of extent 1 never steps: give it a harmless stride.
  if (heads == 1) head_stride = row_stride * rows;
  if (batch == 1) batch_stride = head_stride * heads;
  const int64_t strides_bytes[3] = {row_stride * kElemBytes, head_stride * kElemBytes, batch_stride * kElemBytes};
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(head_dim), static_cast<cuuint64_t>(rows),
                        static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    if (strides_bytes[i] <= 0 || strides_bytes[i] % kAlign != 0 || strides_bytes[i] >= kMaxStride) return false;
    strides[i] = static_cast<cuuint64_t>(strides_bytes[i]);
  }
  const cuuint32_t box[4] = {kBoxCols, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r = fn(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                        const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace ringattn::cuda
