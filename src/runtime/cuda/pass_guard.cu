// The CUDA PassGuard: one small kernel at the end of an embedded pass fills its outputs with NaN when the pass failed.
#include <cuda_runtime.h>

#include <string>

#include "ringattn/error.hpp"
#include "ringattn/ring_attention.hpp"
#include "runtime/pass_guard.hpp"

namespace ringattn {
namespace {

constexpr int kGuardThreads = 256;
constexpr int kGuardMaxBlocks = 1024;

void check_cuda(cudaError_t e, const char* call) {
  if (e != cudaSuccess) fail(ErrorKind::kCuda, std::string("pass guard: ") + call + " failed: " + cudaGetErrorString(e));
}

struct GuardArgs {
  const int* device_sum;     // nullptr: no agreement
  int expected;
  int force;
  const volatile int* flag;  // mapped host word (the watchdog's)
  volatile int* status;      // mapped host word (poll()'s)
  int num_fills;
  NanFill fills[kMaxNanFills];
};

__global__ void pass_guard_kernel(GuardArgs a) {
  int reason = a.force ? kGuardForced : 0;
  if (a.device_sum != nullptr && *a.device_sum != a.expected) reason |= kGuardAgreement;
  if (*a.flag != 0) reason |= kGuardWatchdog;
  if (reason == 0) return;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    *a.status = *a.status | reason;  // the host only reads it
    __threadfence_system();
  }
  const std::size_t step = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  const std::size_t first = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int f = 0; f < a.num_fills; ++f) {
    const NanFill& x = a.fills[f];
    for (std::size_t i = first; i < x.count; i += step) {
      if (x.elem_bytes == 2) {
        static_cast<uint16_t*>(x.data)[i] = static_cast<uint16_t>(x.pattern);
      } else if (x.elem_bytes == 4) {
        static_cast<uint32_t*>(x.data)[i] = static_cast<uint32_t>(x.pattern);
      } else {
        static_cast<uint64_t*>(x.data)[i] = x.pattern;
      }
    }
  }
}

class CudaPassGuard final : public PassGuard {
 public:
  CudaPassGuard() {
    void* host = nullptr;
    check_cuda(cudaHostAlloc(&host, 2 * sizeof(int), cudaHostAllocMapped), "cudaHostAlloc (mapped)");
    words_ = static_cast<int*>(host);
    words_[0] = words_[1] = 0;
    void* dev = nullptr;
    check_cuda(cudaHostGetDevicePointer(&dev, host, 0), "cudaHostGetDevicePointer");
    dev_words_ = static_cast<int*>(dev);
    int sms = 0, device = 0;
    check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    blocks_ = sms > 0 ? 2 * sms : 1;
    if (blocks_ > kGuardMaxBlocks) blocks_ = kGuardMaxBlocks;
  }
  ~CudaPassGuard() override {
    if (words_ != nullptr) cudaFreeHost(words_);  // waits for the kernels that use it
  }
  CudaPassGuard(const CudaPassGuard&) = delete;
  CudaPassGuard& operator=(const CudaPassGuard&) = delete;

  volatile int* failure_flag() override { return words_; }
  int status() const override { return static_cast<const volatile int*>(words_)[1]; }

  void enqueue(void* stream, const int* device_sum, int expected, bool force, const NanFill* fills,
               int num_fills) override {
    RINGATTN_CHECK(num_fills >= 0 && num_fills <= kMaxNanFills, ErrorKind::kInternal,
                   "pass guard given " + std::to_string(num_fills) + " outputs", "at most kMaxNanFills");
    GuardArgs a{};
    a.device_sum = device_sum;
    a.expected = expected;
    a.force = force ? 1 : 0;
    a.flag = dev_words_;
    a.status = dev_words_ + 1;
    a.num_fills = num_fills;
    for (int i = 0; i < num_fills; ++i) a.fills[i] = fills[i];
    pass_guard_kernel<<<blocks_, kGuardThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
    check_cuda(cudaGetLastError(), "pass_guard_kernel launch");
  }

 private:
  int* words_ = nullptr;      // [failure flag, status], host view
  int* dev_words_ = nullptr;  // the same words, device view
  int blocks_ = 1;
};

}  // namespace

std::unique_ptr<PassGuard> make_cuda_pass_guard() { return std::make_unique<CudaPassGuard>(); }

}  // namespace ringattn
