// Backend: one rank's block-attention engine (CPU or CUDA), folding visiting K/V chunks into running accumulators.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ringattn/layout.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// One backend instance serves one problem shape; accumulators are allocated in prepare() and
// reused by every pass (nothing is allocated per hop). All calls are ordered on the backend's
// compute stream (the CPU backend runs synchronously).
class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;
  virtual Device device() const = 0;

  // Allocates accumulators for `q_rows` local query rows and `k_rows` rows per visiting chunk.
  virtual void prepare(const AttentionSpec& spec, int64_t q_rows, int64_t k_rows) = 0;

  // ---- forward ----
  // q: (B, q_rows, H, D) in spec.dtype. Resets the running state (acc = 0, m = -inf, l = 0).
  virtual void forward_begin(const TensorView& q, const ChunkPositions& q_pos) = 0;
  // k, v: (B, k_rows, Hkv, D) in spec.dtype. Folds this chunk into the running state.
  virtual void forward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos) = 0;
  // out: (B, q_rows, H, D) in spec.dtype; lse: (B, H, q_rows) fp32 (fp64 when spec.dtype is fp64),
  // natural log; rows that see no key get lse = -inf and out = 0.
  virtual void forward_end(const TensorView& out, const TensorView& lse) = 0;
  // The pass's only step (one rank): forward_step then forward_end in one call. A device backend
  // writes out and lse from its kernel, without a running state or a finalize pass. The default
  // calls the two.
  virtual void forward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                                 const TensorView& out, const TensorView& lse);

  // ---- backward (training) ----
  // q, out, dout: (B, q_rows, H, D); lse: (B, H, q_rows) as written by forward_end.
  // Computes D = rowsum(dout * out) and zeroes the dQ accumulator.
  virtual void backward_begin(const TensorView& q, const TensorView& out, const TensorView& dout,
                              const TensorView& lse, const ChunkPositions& q_pos);
  // k, v: (B, k_rows, Hkv, D) spec.dtype; dk_acc, dv_acc: (B, k_rows, Hkv, D) fp32 (fp64 for fp64
  // runs), accumulated in place: the accumulators that travel with the chunk.
  virtual void backward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                             const TensorView& dk_acc, const TensorView& dv_acc);
  // As backward_step, but the chunk's dK/dV are written over dk_out, dv_out instead of added into
  // them: fp32 (fp64) accumulators that no earlier step of the pass wrote (no zeroing pass, no read),
  // or spec.dtype tensors when this step is the chunk's only one (rounded once, no accumulator at
  // all). Every element is written, zeros where no query sees the key. The default zeroes fp32/fp64
  // outputs and calls backward_step; it refuses 16-bit outputs.
  virtual void backward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                                  const TensorView& dk_out, const TensorView& dv_out);
  // dq: (B, q_rows, H, D) spec.dtype.
  virtual void backward_end(const TensorView& dq);
  // Rounds an fp32/fp64 accumulator into a spec.dtype tensor of the same shape.
  virtual void cast_accumulator(const TensorView& acc, const TensorView& dst);
  // dst = round(acc + addend), rounded once; acc may be overwritten. The default adds, then casts.
  virtual void cast_accumulator_sum(const TensorView& acc, const TensorView& addend, const TensorView& dst);
  // Fills an accumulator view with zeros.
  virtual void zero(const TensorView& acc);
  // dst += src for two accumulator views of the same shape and dtype (travelling dK/dV partials).
  virtual void accumulate(const TensorView& dst, const TensorView& src);
  // accumulate on `stream`, beside the compute (the ring passes a transport's exchange stream, see
  // ExchangePrologue): dst += src, a share folded into the partial that travels on (src keeps its
  // values: the next step that uses it stores over it). Device backends take a stream of their
  // device (nullptr = the compute stream); host backends get nullptr and run it now. The default
  // calls accumulate and refuses a stream.
  virtual void fold_on(const TensorView& dst, const TensorView& src, void* stream);

  // ---- memory and timing helpers used by the scheduler ----
  // Allocates `bytes` in the backend's memory (host or device); freed with the backend.
  virtual void* allocate(std::size_t bytes) = 0;
  // Copies `bytes` between two buffers of the backend's memory, ordered on the compute stream.
  virtual void copy(void* dst, const void* src, std::size_t bytes) = 0;
  // Records a timeline marker on the compute stream and returns its index.
  virtual int mark() = 0;
  // Blocks until all work is done; then returns milliseconds of every mark since the first.
  virtual std::vector<double> synchronize_and_read_marks() = 0;
  // Forgets previous marks (called at the start of each pass).
  virtual void reset_marks() = 0;
  // The compute stream (a cudaStream_t) for device backends; nullptr on the host.
  virtual void* stream() const { return nullptr; }

  // ---- embedded mode (RingAttention built with RingOptions::embedded) ----
  // Called once, before prepare(): prepare() then allocates nothing, a pass takes its scratch from
  // bind_scratch(), and allocate() refuses (so nothing is ever allocated while a pass runs).
  virtual void set_embedded(bool on) { (void)on; }
  // Bytes of scratch one forward (backward) pass needs in the backend's memory, after prepare();
  // 0 for a backend that keeps its own host memory (the CPU backend).
  virtual std::size_t scratch_bytes(bool backward) const {
    (void)backward;
    return 0;
  }
  // Points the scratch of the passes that follow at `base` (scratch_bytes(backward) bytes,
  // kWorkspaceAlignment-aligned, in the backend's memory).
  virtual void bind_scratch(void* base, bool backward) {
    (void)base;
    (void)backward;
  }
  // The compute stream of the calls that follow, exactly as given (a cudaStream_t of the backend's
  // device; nullptr is CUDA's default stream). Host backends ignore it.
  virtual void set_stream(void* stream) { (void)stream; }
  // Whether mark() records timeline markers (on by default). Off, marks are numbered but not
  // recorded, and synchronize_and_read_marks() must not be called.
  virtual void set_timeline(bool on) { (void)on; }
};

// Alignment of every buffer carved from a caller's workspace (and of the workspace itself).
inline constexpr std::size_t kWorkspaceAlignment = 256;

// The CPU reference backend (fp64, fp32; bf16/fp16 are widened to fp32 on the fly).
std::unique_ptr<Backend> make_cpu_backend();
// The CUDA backend on the current device, or throws when built without CUDA.
// `stream` is a cudaStream_t (nullptr: the backend creates its own).
std::unique_ptr<Backend> make_cuda_backend(void* stream = nullptr);
bool cuda_backend_available();

}  // namespace ringattn
