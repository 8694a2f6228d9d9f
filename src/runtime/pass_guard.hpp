// PassGuard: the end of an embedded device pass: NaN into its outputs when the pass failed, decided on the device.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace ringattn {

// One output of a pass, filled with `pattern` (a NaN of its dtype) when the pass failed.
struct NanFill {
  void* data = nullptr;
  std::size_t count = 0;   // elements
  int elem_bytes = 0;      // 2, 4 or 8
  uint64_t pattern = 0;    // the NaN bits, in the low elem_bytes bytes
};

inline constexpr int kMaxNanFills = 5;  // dq, dk, dv (backward); out, lse (forward)

// Two words of mapped pinned host memory shared by the host and one guard kernel per pass:
//  - the failure flag, set to nonzero by a watchdog (off the calling thread) before it aborts the
//    communicator, read by every guard that runs afterwards;
//  - the status, ORed by a guard that filled its outputs with the reasons (kGuard* bits), read by
//    poll() without waiting for the device.
class PassGuard {
 public:
  virtual ~PassGuard() = default;
  virtual volatile int* failure_flag() = 0;
  virtual int status() const = 0;
  // Enqueues on `stream` (a cudaStream_t) one kernel that fills every `fills[i]` with its NaN when
  // `force`, or `*device_sum != expected` (device_sum non-null: the transport's agreement), or the
  // failure flag is set; otherwise it writes nothing. Nothing is allocated; capturable in a graph.
  virtual void enqueue(void* stream, const int* device_sum, int expected, bool force, const NanFill* fills,
                       int num_fills) = 0;
};

// The CUDA guard on the current device; throws kInternal when built without CUDA.
std::unique_ptr<PassGuard> make_cuda_pass_guard();

}  // namespace ringattn
