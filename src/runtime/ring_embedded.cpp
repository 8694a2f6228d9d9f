// Embedded passes of RingAttention: per-call stream, caller workspace, no host wait, NaN guard and kept errors.
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "plan/plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/ring_attention.hpp"
#include "runtime/pass_guard.hpp"

namespace ringattn {
namespace {

DType accumulator_dtype(DType dtype) { return dtype == DType::kF64 ? DType::kF64 : DType::kF32; }

std::size_t align_up(std::size_t n) { return (n + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment; }

// Hands out kWorkspaceAlignment-aligned pieces of a workspace in order; with no base it only counts.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  // Points `slot` at the next `bytes` (binding only; a zero-byte piece leaves slot at nullptr).
  void take(void*& slot, std::size_t bytes) {
    used_ = align_up(used_);
    if (base_ != nullptr) slot = bytes > 0 ? base_ + used_ : nullptr;
    used_ += bytes;
  }
  bool binding() const { return base_ != nullptr; }
  std::size_t used() const { return align_up(used_); }

 private:
  char* base_;
  std::size_t used_ = 0;
};

// The NaN of `dtype`, as the bits the guard stores.
NanFill nan_fill(const TensorView& t) {
  NanFill f;
  f.data = t.data;
  f.count = static_cast<std::size_t>(t.numel());
  f.elem_bytes = static_cast<int>(dtype_size(t.dtype));
  switch (t.dtype) {
    case DType::kF64: f.pattern = 0x7ff8000000000000ull; break;
    case DType::kF32: f.pattern = 0x7fc00000u; break;
    case DType::kBF16: f.pattern = 0x7fc0u; break;
    case DType::kF16: f.pattern = 0x7e00u; break;
  }
  return f;
}

}  // namespace

#ifndef RINGATTN_HAVE_CUDA
std::unique_ptr<PassGuard> make_cuda_pass_guard() {
  fail(ErrorKind::kInternal, "a CUDA pass guard in a ringattn built without CUDA", "");
}
#endif

void RingAttention::check_lse(const TensorView& lse) const {
  const DType want = accumulator_dtype(spec_.dtype);
  const bool ok = lse.data != nullptr && lse.rank == 3 && lse.shape[0] == spec_.batch && lse.shape[1] == spec_.heads &&
                  lse.shape[2] == local_seq_ && lse.dtype == want && lse.device == backend_->device() &&
                  lse.is_contiguous();
  RINGATTN_CHECK(ok, ErrorKind::kInvalidArgument,
                 "lse is " + lse.describe() + ", expected contiguous " + dtype_name(want) + "[" +
                     std::to_string(spec_.batch) + ", " + std::to_string(spec_.heads) + ", " +
                     std::to_string(local_seq_) + "]",
                 "lse is (batch, heads, seq) in fp32 (fp64 for fp64 inputs), in the backend's memory");
}

void RingAttention::enable_embedded() {
  std::string why;
  RINGATTN_CHECK(transport_->enable_embedded(&why), ErrorKind::kInvalidArgument,
                 std::string("the ") + transport_->name() + " transport cannot run embedded passes: " + why,
                 "build the ring on NCCL's kernels (a borrowed communicator, or RINGATTN_COPY_ENGINE=0)");
  embedded_ = true;
  backend_->set_embedded(true);
  if (backend_->device() == Device::kCuda) {
    guard_ = make_cuda_pass_guard();
    transport_->set_failure_flag(guard_->failure_flag());
  }
}

std::size_t RingAttention::lay_out_workspace(Pass pass, char* base) {
  Carver c(base);
  const bool bwd = pass == Pass::kBackward;
  const int p = world();
  const int64_t B = spec_.batch, S = local_seq_;
  if (plan_->route == Route::kRing) {
    // As forward() and backward() would allocate them.
    if (!bwd) {
      void* unused = nullptr;
      c.take(p > 2 ? buffers_[0] : unused, p > 2 ? kv_bytes_ : 0);
      c.take(buffers_[1], p > 1 ? kv_bytes_ : 0);
    } else if (p > 1) {
      const std::size_t msg_bytes = kv_bytes_ + grad_bytes_;
      c.take(grad_buffers_[0], msg_bytes);
      c.take(grad_buffers_[1], msg_bytes);
      c.take(local_grad_[1], grad_bytes_);
      if (p > 2) {
        c.take(local_grad_[0], grad_bytes_);
      } else if (c.binding()) {
        local_grad_[0] = local_grad_[1];
      }
    }
  } else {
    // As forward_direct() and backward_direct() would allocate them.
    const int H = static_cast<int>(direct_.size());
    const std::size_t row_bytes = static_cast<std::size_t>(spec_.effective_kv_heads() * spec_.head_dim);
    const std::size_t kv_row = row_bytes * dtype_size(spec_.dtype);
    const std::size_t grad_row = row_bytes * dtype_size(accumulator_dtype(spec_.dtype));
    int64_t max_recv = 0, max_send = 0;
    for (const DirectHop& h : direct_) {
      max_recv = std::max(max_recv, h.recv_rows);
      max_send = std::max(max_send, h.send_rows);
    }
    const std::size_t kv = max_recv > 0 ? static_cast<std::size_t>(2 * B * max_recv) * kv_row : 0;
    c.take(direct_kv_[0], kv);
    if (H > 1) {
      c.take(direct_kv_[1], kv);
    } else if (c.binding()) {
      direct_kv_[1] = direct_kv_[0];
    }
    if (bwd) {
      const std::size_t g = max_recv > 0 ? static_cast<std::size_t>(2 * B * max_recv) * grad_row : 0;
      c.take(direct_grad_[0], g);
      if (H > 1) {
        c.take(direct_grad_[1], g);
      } else if (c.binding()) {
        direct_grad_[1] = direct_grad_[0];
      }
      c.take(direct_grad_in_, max_send > 0 ? static_cast<std::size_t>(2 * B * max_send) * grad_row : 0);
      c.take(own_grad_, static_cast<std::size_t>(2 * B * S) * grad_row);
    }
  }
  void* scratch = nullptr;
  c.take(scratch, backend_->scratch_bytes(bwd));
  if (c.binding()) backend_->bind_scratch(scratch, bwd);
  return c.used();
}

std::size_t RingAttention::workspace_bytes(Pass pass) const {
  // Counting binds nothing: the const_cast only reuses the one layout routine.
  return const_cast<RingAttention*>(this)->lay_out_workspace(pass, nullptr);
}

std::optional<Error> RingAttention::poll() {
  if (kept_) return kept_;
  const std::string failure = transport_->failure();
  if (!failure.empty()) {
    kept_ = Error(ErrorKind::kComm, failure);
    return kept_;
  }
  const int status = guard_ ? guard_->status() : 0;
  if (status != 0) {
    std::string why;
    if (status & kGuardAgreement) why += "the end-of-pass agreement counted fewer than " + std::to_string(world()) + " ranks; ";
    if (status & kGuardWatchdog) why += "the transport's watchdog failed the ring; ";
    if (status & kGuardForced) why += "a call failed after enqueuing work; ";
    const std::string msg = context_prefix() + " an embedded pass wrote NaN into its outputs: " + why +
                            "a peer failed or stalled during the pass; the ring is aborted";
    try {
      transport_->abort(msg);  // so that no peer waits for this rank
    } catch (const Error&) {
    }
    kept_ = Error(ErrorKind::kComm, msg);
  }
  return kept_;
}

void RingAttention::begin_embedded(Pass pass, const PassOptions& options) {
  RINGATTN_CHECK(embedded_, ErrorKind::kInvalidArgument,
                 "forward/backward with PassOptions on a ring built without RingOptions::embedded",
                 "construct the RingAttention with RingOptions{.embedded = true}, or call the blocking overload");
  if (auto e = poll()) throw *e;
  const std::size_t need = workspace_bytes(pass);
  RINGATTN_CHECK(options.workspace_bytes >= need && (need == 0 || options.workspace != nullptr),
                 ErrorKind::kInvalidArgument,
                 std::string(pass == Pass::kForward ? "forward" : "backward") + " workspace of " +
                     std::to_string(options.workspace_bytes) + " bytes" +
                     (options.workspace == nullptr ? " (null)" : "") + ", this pass needs " + std::to_string(need),
                 "allocate workspace_bytes(pass) bytes in the backend's memory");
  RINGATTN_CHECK(reinterpret_cast<std::uintptr_t>(options.workspace) % kWorkspaceAlignment == 0,
                 ErrorKind::kInvalidArgument, "workspace is not " + std::to_string(kWorkspaceAlignment) + "-byte aligned",
                 "pass the start of an allocation (cudaMalloc and caching allocators align to 256 bytes or more)");
  backend_->set_stream(options.stream);
  transport_->set_compute_stream(options.stream);
  backend_->set_timeline(options.timeline);
  lay_out_workspace(pass, static_cast<char*>(options.workspace));
}

void RingAttention::fill_nan_now(const std::vector<TensorView>& outputs) {
  try {
    if (backend_->device() == Device::kHost) {
      for (const TensorView& t : outputs) {
        const NanFill f = nan_fill(t);
        for (std::size_t i = 0; i < f.count; ++i) {
          std::memcpy(static_cast<char*>(f.data) + i * f.elem_bytes, &f.pattern, static_cast<std::size_t>(f.elem_bytes));
        }
      }
    } else if (guard_) {
      NanFill fills[kMaxNanFills];
      const int n = static_cast<int>(std::min<std::size_t>(outputs.size(), kMaxNanFills));
      for (int i = 0; i < n; ++i) fills[i] = nan_fill(outputs[i]);
      guard_->enqueue(backend_->stream(), nullptr, 0, true, fills, n);
    }
  } catch (const Error&) {
    // The pass already failed with the error the caller gets; a second one adds nothing.
  }
}

void RingAttention::run_embedded(const std::vector<TensorView>& outputs, const PassOptions& options,
                                 const std::function<void()>& body) {
  pass_options_ = &options;
  pass_outputs_ = outputs;
  auto failed = [&](const Error& e) {
    pass_options_ = nullptr;
    if (!kept_) kept_ = e;
    fill_nan_now(outputs);
    try {
      transport_->abort(e.what());  // peers must not wait for the rest of this pass
    } catch (const Error&) {
    }
  };
  try {
    body();
  } catch (const Error& e) {
    failed(e);
    throw;
  } catch (const std::exception& e) {
    failed(Error(ErrorKind::kInternal, context_prefix() + " an embedded pass failed: " + e.what()));
    throw;
  }
  pass_options_ = nullptr;
}

void RingAttention::finish_pass(const std::vector<HopMarks>& marks, int start_mark, int end_mark) {
  if (!embedded_) {  // the blocking pass, as the apps have always run it
    transport_->end_pass([&] { read_timeline(marks, start_mark, end_mark); });
    return;
  }
  const bool timeline = pass_options_ != nullptr && pass_options_->timeline;
  if (backend_->device() == Device::kHost) {
    // A host backend computed the pass on this thread already: the transport's own end (MPI's
    // agreement) adds no wait on a device.
    transport_->end_pass([&] {
      if (timeline) read_timeline(marks, start_mark, end_mark);
    });
    return;
  }
  const Transport::Verdict verdict = transport_->end_pass_async();
  NanFill fills[kMaxNanFills];
  const int n = static_cast<int>(std::min<std::size_t>(pass_outputs_.size(), kMaxNanFills));
  for (int i = 0; i < n; ++i) fills[i] = nan_fill(pass_outputs_[i]);
  guard_->enqueue(backend_->stream(), verdict.device_sum, verdict.expected, false, fills, n);
  if (timeline) read_timeline(marks, start_mark, end_mark);
}

void RingAttention::forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                            const TensorView& lse, const PassOptions& options) {
  check_inputs(q, spec_.heads, "q");
  check_inputs(k, spec_.effective_kv_heads(), "k");
  check_inputs(v, spec_.effective_kv_heads(), "v");
  check_inputs(out, spec_.heads, "out");
  check_lse(lse);
  begin_embedded(Pass::kForward, options);
  run_embedded({out, lse}, options, [&] { forward(q, k, v, out, lse); });
}

void RingAttention::backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                             const TensorView& dv, const PassOptions& options) {
  check_inputs(q, spec_.heads, "q");
  check_inputs(k, spec_.effective_kv_heads(), "k");
  check_inputs(v, spec_.effective_kv_heads(), "v");
  check_inputs(out, spec_.heads, "out");
  check_inputs(dout, spec_.heads, "dout");
  check_inputs(dq, spec_.heads, "dq");
  check_inputs(dk, spec_.effective_kv_heads(), "dk");
  check_inputs(dv, spec_.effective_kv_heads(), "dv");
  check_lse(lse);
  begin_embedded(Pass::kBackward, options);
  run_embedded({dq, dk, dv}, options, [&] { backward(q, k, v, out, lse, dout, dq, dk, dv); });
}

}  // namespace ringattn
