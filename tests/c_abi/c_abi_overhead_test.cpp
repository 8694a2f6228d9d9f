// Host time the C ABI adds over the C++ call: world 1, a one-row CPU problem, embedded forward, best of several batches.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <vector>

#include "ringattn/ringattn.hpp"
#include "ringattn/ringattn_c.h"

namespace {

constexpr int kCalls = 2000;     // calls per batch
constexpr int kBatches = 7;      // the best batch counts (a shared 2-core machine is noisy)
constexpr double kTargetUs = 20.0;

using Clock = std::chrono::steady_clock;

template <typename F>
double best_us_per_call(F&& call) {
  double best = 1e30;
  for (int b = 0; b < kBatches; ++b) {
    const auto t0 = Clock::now();
    for (int i = 0; i < kCalls; ++i) call();
    best = std::min(best, std::chrono::duration<double, std::micro>(Clock::now() - t0).count() / kCalls);
  }
  return best;
}

ringattn_tensor tensor(void* data, int ndim, std::initializer_list<int64_t> shape) {
  ringattn_tensor t;
  std::memset(&t, 0, sizeof t);
  t.struct_size = sizeof t;
  t.data = data;
  t.dtype = RINGATTN_DTYPE_F32;
  t.ndim = ndim;
  int i = 0;
  for (int64_t s : shape) t.shape[i++] = s;
  int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    t.stride[d] = stride;
    stride *= t.shape[d];
  }
  return t;
}

}  // namespace

int main() {
  using namespace ringattn;
  const int D = 8;
  std::vector<float> q(D, 0.5f), k(D, 0.25f), v(D, 1.0f), out(D), lse(1);
  AttentionSpec spec;
  spec.batch = 1;
  spec.seq_len = 1;
  spec.heads = 1;
  spec.head_dim = D;
  spec.dtype = DType::kF32;
  RingAttention ring(spec, make_cpu_backend(), make_local_transport(), RingOptions{true});
  const TensorView tq = make_view(q.data(), DType::kF32, Device::kHost, {1, 1, 1, D});
  const TensorView tk = make_view(k.data(), DType::kF32, Device::kHost, {1, 1, 1, D});
  const TensorView tv = make_view(v.data(), DType::kF32, Device::kHost, {1, 1, 1, D});
  const TensorView to = make_view(out.data(), DType::kF32, Device::kHost, {1, 1, 1, D});
  const TensorView tl = make_view(lse.data(), DType::kF32, Device::kHost, {1, 1, 1});
  const PassOptions o;
  const double cpp_us = best_us_per_call([&] { ring.forward(tq, tk, tv, to, tl, o); });

  ringattn_spec cs;
  std::memset(&cs, 0, sizeof cs);
  cs.struct_size = sizeof cs;
  cs.batch = 1;
  cs.seq_len = 1;
  cs.heads = 1;
  cs.head_dim = D;
  cs.dtype = RINGATTN_DTYPE_F32;
  cs.window_left = cs.window_right = -1;
  ringattn_transport_desc td;
  std::memset(&td, 0, sizeof td);
  td.struct_size = sizeof td;
  td.kind = RINGATTN_TRANSPORT_LOCAL;
  ringattn_ring_options ro;
  std::memset(&ro, 0, sizeof ro);
  ro.struct_size = sizeof ro;
  ro.device = -1;
  ro.embedded = 1;
  ringattn_ring cring = nullptr;
  if (ringattn_ring_create(&cs, &td, &ro, &cring) != RINGATTN_OK) {
    std::fprintf(stderr, "ringattn_ring_create: %s\n", ringattn_last_error());
    return 1;
  }
  const ringattn_tensor cq = tensor(q.data(), 4, {1, 1, 1, D}), ck = tensor(k.data(), 4, {1, 1, 1, D});
  const ringattn_tensor cv = tensor(v.data(), 4, {1, 1, 1, D}), co = tensor(out.data(), 4, {1, 1, 1, D});
  const ringattn_tensor cl = tensor(lse.data(), 3, {1, 1, 1});
  ringattn_status status = RINGATTN_OK;
  const double c_us = best_us_per_call([&] {
    const ringattn_status s = ringattn_forward(cring, &cq, &ck, &cv, &co, &cl, nullptr, 0, nullptr);
    if (s != RINGATTN_OK) status = s;
  });
  ringattn_ring_destroy(cring);
  if (status != RINGATTN_OK) {
    std::fprintf(stderr, "ringattn_forward: %s\n", ringattn_last_error());
    return 1;
  }
  const double added = c_us - cpp_us;
  std::printf("world-1 one-row forward: C++ %.2f us/call, C ABI %.2f us/call, added %.2f us (target < %.0f us): %s\n",
              cpp_us, c_us, added, kTargetUs, added < kTargetUs ? "OK" : "FAILED");
  return added < kTargetUs ? 0 : 1;
}
