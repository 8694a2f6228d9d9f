// The one CUDA error check of ringattn: every runtime call and every launch goes through it.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "ringattn/error.hpp"

namespace ringattn::cuda {

// Throws ringattn::Error(kCuda) naming the failed call, its place and CUDA's own message.
inline void check(cudaError_t status, const char* what, const char* file, int line) {
  if (status == cudaSuccess) return;
  fail(status == cudaErrorMemoryAllocation ? ErrorKind::kOutOfMemory : ErrorKind::kCuda,
       std::string(what) + " failed at " + file + ":" + std::to_string(line) + ": " + cudaGetErrorName(status) +
           " (" + cudaGetErrorString(status) + ")",
       status == cudaErrorMemoryAllocation
           ? "the device is out of memory: use fewer tokens per GPU, or more ranks"
           : "check that a CUDA device is visible (CUDA_VISIBLE_DEVICES) and that the driver matches the toolkit");
}

}  // namespace ringattn::cuda

#define RINGATTN_CUDA_CHECK(call) ::ringattn::cuda::check((call), #call, __FILE__, __LINE__)
// After every kernel launch: catches bad configurations at once, and earlier asynchronous faults.
#define RINGATTN_CUDA_CHECK_LAUNCH(kernel_name) \
  ::ringattn::cuda::check(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
