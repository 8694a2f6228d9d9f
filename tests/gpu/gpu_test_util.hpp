// Helpers of the GPU tests: device buffers, random host tensors, poisoning, and the skip guard.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "ringattn/tensor.hpp"

namespace ringattn::test {

#define RINGATTN_SKIP_WITHOUT_GPU()                                           \
  do {                                                                        \
    int device_count_ = 0;                                                    \
    if (cudaGetDeviceCount(&device_count_) != cudaSuccess || device_count_ == 0) { \
      cudaGetLastError();                                                     \
      GTEST_SKIP() << "no CUDA device: GPU test skipped";                     \
    }                                                                         \
  } while (0)

#define RINGATTN_EXPECT_CUDA(call) ASSERT_EQ((call), cudaSuccess) << #call

// A host tensor with its storage.
struct HostTensor {
  std::vector<unsigned char> bytes;
  TensorView view;

  HostTensor(DType dtype, std::initializer_list<int64_t> shape) {
    view = make_view(nullptr, dtype, Device::kHost, shape);
    bytes.resize(view.nbytes());
    view.data = bytes.data();
  }
};

// A device buffer freed at scope exit; `view` is contiguous with the given shape.
struct DeviceTensor {
  void* data = nullptr;
  TensorView view;

  DeviceTensor(DType dtype, std::initializer_list<int64_t> shape) {
    view = make_view(nullptr, dtype, Device::kCuda, shape);
    if (cudaMalloc(&data, view.nbytes() == 0 ? 1 : view.nbytes()) != cudaSuccess) data = nullptr;
    view.data = data;
  }
  ~DeviceTensor() { cudaFree(data); }
  DeviceTensor(const DeviceTensor&) = delete;
  DeviceTensor& operator=(const DeviceTensor&) = delete;

  // upload() and poison() run on the legacy default stream, which does not order the CUDA backend's
  // own (cudaStreamNonBlocking) stream: both wait for the device so the backend's kernels that
  // follow see the bytes (a pageable cudaMemcpy may return before its DMA lands; cudaMemset of
  // device memory is asynchronous to the host).
  void upload(const HostTensor& h) {
    cudaMemcpy(data, h.bytes.data(), view.nbytes(), cudaMemcpyHostToDevice);
    cudaDeviceSynchronize();
  }
  void download(HostTensor& h) const { cudaMemcpy(h.bytes.data(), data, view.nbytes(), cudaMemcpyDeviceToHost); }
  // 0xFF bytes: NaN in every float format, so an element the kernel forgets to write fails the check.
  void poison() {
    cudaMemset(data, 0xFF, view.nbytes());
    cudaDeviceSynchronize();
  }
};

// Fills a host tensor with standard-normal values rounded to its dtype.
inline void fill_normal(HostTensor& t, std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0);
  for (int64_t i = 0; i < t.view.numel(); ++i) store_from_double(t.view, i, dist(rng));
}

}  // namespace ringattn::test
