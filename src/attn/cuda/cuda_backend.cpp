// CudaBackend: forward and backward steps on one GPU, fp32 running state on the device, events for timelines.
#include <cuda_runtime.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "attn/cuda/cuda_check.hpp"
#include "attn/cuda/flash_bwd.hpp"
#include "attn/cuda/flash_fwd.hpp"
#include "ringattn/backend.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr int kMaxMarks = 4096;           // timeline events per pass, created once
constexpr int64_t kVectorElems = 8;       // the kernels move 16-byte vectors of 2-byte elements
constexpr std::size_t kVectorBytes = 16;
constexpr double kLog2e = 1.4426950408889634;
constexpr unsigned kFoldBesideBlocks = 16;  // fold_on on a side stream: blocks (SMs) it may take

void require(bool cond, const std::string& what, const std::string& hint) {
  RINGATTN_CHECK(cond, ErrorKind::kInvalidArgument, what, hint);
}

// The kernels read at most kMaxSegments inline segments of a chunk's positions; a longer list (the
// balanced layout's token blocks, a halo gathered from several runs) is refused: the kernels' tile
// bounds (flash_block.hpp) walk the inline segments only.
void require_kernel_positions(const ChunkPositions& pos, const char* what) {
  require(pos.list == nullptr && pos.num_segments <= kMaxSegments,
          std::string("the CUDA kernels take ") + what + " positions of at most " + std::to_string(kMaxSegments) +
              " runs, got " + std::to_string(pos.num_segments),
          "use --layout contiguous, zigzag or striped on the CUDA backend, or --backend cpu");
}

// An attention tensor (B, S, heads, D) on the device with the layout the kernels need.
void check_attention_view(const TensorView& t, const char* name, DType dtype, int64_t batch, int64_t rows,
                          int64_t heads, int64_t head_dim) {
  const std::string n = name;
  require(t.device == Device::kCuda, n + " " + t.describe() + " is not on the device",
          "pass device pointers to the CUDA backend");
  require(t.dtype == dtype, n + " " + t.describe() + " has the wrong dtype, expected " + dtype_name(dtype),
          "all attention tensors use the spec's dtype");
  require(t.rank == 4 && t.shape[0] == batch && t.shape[1] == rows && t.shape[2] == heads && t.shape[3] == head_dim,
          n + " " + t.describe() + " does not have shape (" + std::to_string(batch) + ", " + std::to_string(rows) +
              ", " + std::to_string(heads) + ", " + std::to_string(head_dim) + ")",
          "tensors are (batch, seq, heads, head_dim)");
  require(t.stride[3] == 1 && t.stride[0] % kVectorElems == 0 && t.stride[1] % kVectorElems == 0 &&
              t.stride[2] % kVectorElems == 0 && reinterpret_cast<uintptr_t>(t.data) % kVectorBytes == 0,
          n + " " + t.describe() + " needs a contiguous head_dim, strides that are multiples of 8 and 16-byte alignment",
          "make the tensor contiguous");
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(void* stream) {
    int device = 0;
    RINGATTN_CUDA_CHECK(cudaGetDevice(&device));
    if (stream != nullptr) {
      stream_ = static_cast<cudaStream_t>(stream);
    } else {
      RINGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      owns_stream_ = true;
    }
    own_stream_ = stream_;
  }

  ~CudaBackend() override {
    // Destructors must not throw: errors here are ignored, the process is usually ending.
    // (An embedded caller's stream may be gone by now: only the construction stream is waited for;
    // cudaFree waits for the device anyway.)
    cudaStreamSynchronize(own_stream_);
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    for (void* p : allocations_) cudaFree(p);
    if (owns_stream_) cudaStreamDestroy(own_stream_);
  }

  const char* name() const override { return "cuda"; }
  Device device() const override { return Device::kCuda; }
  void* stream() const override { return stream_; }

  void prepare(const AttentionSpec& spec, int64_t q_rows, int64_t k_rows) override {
    require(spec.dtype == DType::kBF16 || spec.dtype == DType::kF16,
            std::string("the CUDA backend computes bf16 and fp16, not ") + dtype_name(spec.dtype),
            "use --dtype bf16 or fp16, or the CPU backend for fp32/fp64");
    require(spec.head_dim == 64 || spec.head_dim == 128,
            "the CUDA backend has kernels for head_dim 64 and 128, not " + std::to_string(spec.head_dim),
            "use --head-dim 64 or 128, or the CPU backend");
    require(spec.heads > 0 && spec.heads % spec.effective_kv_heads() == 0,
            "heads " + std::to_string(spec.heads) + " not a multiple of kv heads " +
                std::to_string(spec.effective_kv_heads()),
            "choose --kv-heads dividing --heads");
    require(q_rows >= 0 && k_rows >= 0 && q_rows < (int64_t{1} << 31) && k_rows < (int64_t{1} << 31),
            "chunk of " + std::to_string(q_rows) + " x " + std::to_string(k_rows) + " rows out of range",
            "use more ranks");
    const int64_t rows = spec.batch * spec.heads * q_rows;
    const bool same_shape = spec_.batch == spec.batch && spec_.heads == spec.heads && spec_.head_dim == spec.head_dim &&
                            q_rows_ == q_rows && acc_ != nullptr;
    spec_ = spec;
    q_rows_ = q_rows;
    k_rows_ = k_rows;
    preparing_ = true;  // embedded: the document offsets are the one allocation, made here, once
    upload_mask();
    preparing_ = false;
    // Embedded passes run on the callers' streams, which know nothing of this one: the upload
    // lands before the constructor returns (a host wait at construction, never in a pass).
    if (embedded_) RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    if (!same_shape && !embedded_) {  // embedded: bind_scratch() points them into the caller's workspace
      release_state();
      acc_ = static_cast<float*>(allocate(static_cast<std::size_t>(rows * spec.head_dim) * sizeof(float)));
      row_max_ = static_cast<float*>(allocate(static_cast<std::size_t>(rows) * sizeof(float)));
      row_sum_ = static_cast<float*>(allocate(static_cast<std::size_t>(rows) * sizeof(float)));
    }
    if (events_.empty()) {
      events_.resize(kMaxMarks);
      for (cudaEvent_t& e : events_) RINGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDefault));
    }
  }

  // q: (B, q_rows, H, D) spec.dtype on the device.
  void forward_begin(const TensorView& q, const ChunkPositions& q_pos) override {
    require_prepared();
    check_attention_view(q, "q", spec_.dtype, spec_.batch, q_rows_, spec_.heads, spec_.head_dim);
    require_kernel_positions(q_pos, "query");
    require(q_pos.size() == q_rows_, "query positions cover " + std::to_string(q_pos.size()) + " rows, q has " +
                                         std::to_string(q_rows_), "");
    q_ = q;
    q_pos_ = q_pos;
    first_step_ = true;
  }

  // k, v: (B, Sk, Hkv, D) spec.dtype on the device, Sk <= k_rows.
  void forward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos) override {
    run_forward_step(k, v, k_pos, nullptr, nullptr);
  }

  // The pass's only step: the kernel writes out and lse (no state, no finalize pass). After an
  // earlier step, or for a chunk nobody sees, the step and forward_end as usual.
  void forward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos, const TensorView& out,
                         const TensorView& lse) override {
    if (!first_step_ || q_.data == nullptr || classify_chunks(host_mask_, spec_.heads, q_pos_, k_pos) == Visibility::kEmpty) {
      Backend::forward_step_into(k, v, k_pos, out, lse);
      return;
    }
    check_outputs(out, lse);
    run_forward_step(k, v, k_pos, &out, &lse);
    q_ = TensorView{};
  }

  void check_outputs(const TensorView& out, const TensorView& lse) const {
    check_attention_view(out, "out", spec_.dtype, spec_.batch, q_rows_, spec_.heads, spec_.head_dim);
    require(lse.device == Device::kCuda && lse.dtype == DType::kF32 && lse.rank == 3 && lse.shape[0] == spec_.batch &&
                lse.shape[1] == spec_.heads && lse.shape[2] == q_rows_,
            "lse " + lse.describe() + " must be fp32 (B, H, q_rows) on the device", "allocate lse as (B, H, S) fp32");
  }

  // out, lse: set for the pass's only step (forward_step_into), else nullptr.
  void run_forward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos, const TensorView* out,
                        const TensorView* lse) {
    require(q_.data != nullptr, "forward_step before forward_begin", "call forward_begin first");
    require_kernel_positions(k_pos, "key");
    const int64_t sk = k.rank == 4 ? k.shape[1] : -1;
    check_attention_view(k, "k", spec_.dtype, spec_.batch, sk, spec_.effective_kv_heads(), spec_.head_dim);
    check_attention_view(v, "v", spec_.dtype, spec_.batch, sk, spec_.effective_kv_heads(), spec_.head_dim);
    require(k_pos.size() == sk, "key positions cover " + std::to_string(k_pos.size()) + " rows, k has " +
                                    std::to_string(sk), "");
    // A chunk nobody sees leaves the state alone (and does not count as the first step).
    if (sk == 0 || classify_chunks(host_mask_, spec_.heads, q_pos_, k_pos) == Visibility::kEmpty) return;
    cuda::FlashFwdParams p;
    p.q = q_.data;
    p.k = k.data;
    p.v = v.data;
    p.q_batch_stride = q_.stride[0];
    p.q_row_stride = q_.stride[1];
    p.q_head_stride = q_.stride[2];
    p.k_batch_stride = k.stride[0];
    p.k_row_stride = k.stride[1];
    p.k_head_stride = k.stride[2];
    p.v_batch_stride = v.stride[0];
    p.v_row_stride = v.stride[1];
    p.v_head_stride = v.stride[2];
    p.acc = acc_;
    p.row_max = row_max_;
    p.row_sum = row_sum_;
    p.batch = static_cast<int>(spec_.batch);
    p.heads = spec_.heads;
    p.kv_group = spec_.group_size();
    p.seq_q = static_cast<int>(q_rows_);
    p.seq_k = static_cast<int>(sk);
    p.scale_log2 = static_cast<float>(spec_.scale() * kLog2e);
    p.causal = spec_.mask.causal;
    p.mask = kernel_mask_;
    p.first_step = first_step_;
    p.q_pos = q_pos_;
    p.k_pos = k_pos;
    if (out != nullptr) {
      p.out = out->data;
      p.out_batch_stride = out->stride[0];
      p.out_row_stride = out->stride[1];
      p.out_head_stride = out->stride[2];
      p.lse = lse->as<float>();
      p.lse_batch_stride = lse->stride[0];
      p.lse_head_stride = lse->stride[1];
      p.lse_row_stride = lse->stride[2];
    }
    cuda::flash_fwd_step(p, spec_.dtype, spec_.head_dim, stream_);
    first_step_ = false;
  }

  // out: (B, q_rows, H, D) spec.dtype; lse: (B, H, q_rows) fp32, natural log.
  void forward_end(const TensorView& out, const TensorView& lse) override {
    require(q_.data != nullptr, "forward_end before forward_begin", "call forward_begin first");
    check_outputs(out, lse);
    cuda::FlashFinalizeParams p;
    p.acc = acc_;
    p.row_max = row_max_;
    p.row_sum = row_sum_;
    p.out = out.data;
    p.out_batch_stride = out.stride[0];
    p.out_row_stride = out.stride[1];
    p.out_head_stride = out.stride[2];
    p.lse = lse.as<float>();
    p.lse_batch_stride = lse.stride[0];
    p.lse_head_stride = lse.stride[1];
    p.lse_row_stride = lse.stride[2];
    p.batch = static_cast<int>(spec_.batch);
    p.heads = spec_.heads;
    p.seq_q = static_cast<int>(q_rows_);
    p.head_dim = spec_.head_dim;
    p.nothing_visible = first_step_;
    cuda::flash_fwd_finalize(p, spec_.dtype, stream_);
    q_ = TensorView{};
  }

  // q, out, dout: (B, q_rows, H, D) spec.dtype; lse: (B, H, q_rows) fp32, all on the device.
  void backward_begin(const TensorView& q, const TensorView& out, const TensorView& dout, const TensorView& lse,
                      const ChunkPositions& q_pos) override {
    require_prepared();
    check_attention_view(q, "q", spec_.dtype, spec_.batch, q_rows_, spec_.heads, spec_.head_dim);
    check_attention_view(out, "out", spec_.dtype, spec_.batch, q_rows_, spec_.heads, spec_.head_dim);
    check_attention_view(dout, "dout", spec_.dtype, spec_.batch, q_rows_, spec_.heads, spec_.head_dim);
    require(lse.device == Device::kCuda && lse.dtype == DType::kF32 && lse.rank == 3 && lse.shape[0] == spec_.batch &&
                lse.shape[1] == spec_.heads && lse.shape[2] == q_rows_,
            "lse " + lse.describe() + " must be fp32 (B, H, q_rows) on the device", "pass the lse the forward wrote");
    require_kernel_positions(q_pos, "query");
    require(q_pos.size() == q_rows_, "query positions cover " + std::to_string(q_pos.size()) + " rows, q has " +
                                         std::to_string(q_rows_), "");
    if (bwd_dq_accum_ == nullptr) {
      const int b = static_cast<int>(spec_.batch);
      bwd_dq_accum_ = static_cast<float*>(
          allocate(cuda::flash_bwd_dq_accum_bytes(b, spec_.heads, spec_.head_dim, q_rows_)));
      bwd_lse_log2_ = static_cast<float*>(allocate(cuda::flash_bwd_row_vector_bytes(b, spec_.heads, q_rows_)));
      bwd_delta_ = static_cast<float*>(allocate(cuda::flash_bwd_row_vector_bytes(b, spec_.heads, q_rows_)));
    }
    bwd_ = cuda::FlashBwdParams{};
    bwd_.dtype = spec_.dtype;
    bwd_.batch = static_cast<int>(spec_.batch);
    bwd_.heads = spec_.heads;
    bwd_.kv_heads = spec_.effective_kv_heads();
    bwd_.head_dim = spec_.head_dim;
    bwd_.seq_q = static_cast<int>(q_rows_);
    bwd_.scale = static_cast<float>(spec_.scale());
    bwd_.causal = spec_.mask.causal;
    bwd_.mask = kernel_mask_;
    bwd_.mask_host = host_mask_;
    bwd_.q = q.data;
    bwd_.q_batch_stride = q.stride[0];
    bwd_.q_row_stride = q.stride[1];
    bwd_.q_head_stride = q.stride[2];
    bwd_.out = out.data;
    bwd_.out_batch_stride = out.stride[0];
    bwd_.out_row_stride = out.stride[1];
    bwd_.out_head_stride = out.stride[2];
    bwd_.dout = dout.data;
    bwd_.dout_batch_stride = dout.stride[0];
    bwd_.dout_row_stride = dout.stride[1];
    bwd_.dout_head_stride = dout.stride[2];
    bwd_.lse = lse.as<float>();
    bwd_.lse_batch_stride = lse.stride[0];
    bwd_.lse_head_stride = lse.stride[1];
    bwd_.lse_row_stride = lse.stride[2];
    bwd_.dq_accum = bwd_dq_accum_;
    bwd_.lse_log2 = bwd_lse_log2_;
    bwd_.delta = bwd_delta_;
    bwd_q_pos_ = q_pos;
    cuda::flash_bwd_preprocess(bwd_, stream_);
    bwd_started_ = true;
  }

  // k, v: (B, Sk, Hkv, D) spec.dtype; dk_acc, dv_acc: (B, Sk, Hkv, D) fp32, accumulated in place.
  void backward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos, const TensorView& dk_acc,
                     const TensorView& dv_acc) override {
    run_backward_step(k, v, k_pos, dk_acc, dv_acc, cuda::DkvWrite::kAdd);
  }

  // dk_out, dv_out: fp32 accumulators (stored over) or spec.dtype gradients (rounded in the kernel).
  void backward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                          const TensorView& dk_out, const TensorView& dv_out) override {
    const bool final_out = dk_out.dtype == spec_.dtype;  // bf16/fp16: prepare() refuses other dtypes
    run_backward_step(k, v, k_pos, dk_out, dv_out, final_out ? cuda::DkvWrite::kFinal : cuda::DkvWrite::kStore);
  }

  void run_backward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                         const TensorView& dk_acc, const TensorView& dv_acc, cuda::DkvWrite mode) {
    require(bwd_started_, "backward_step before backward_begin", "call backward_begin first");
    require_kernel_positions(k_pos, "key");
    const int64_t sk = k.rank == 4 ? k.shape[1] : -1;
    const int hkv = spec_.effective_kv_heads();
    check_attention_view(k, "k", spec_.dtype, spec_.batch, sk, hkv, spec_.head_dim);
    check_attention_view(v, "v", spec_.dtype, spec_.batch, sk, hkv, spec_.head_dim);
    const DType out_dtype = mode == cuda::DkvWrite::kFinal ? spec_.dtype : DType::kF32;
    for (const TensorView* a : {&dk_acc, &dv_acc}) {
      require(a->device == Device::kCuda && a->dtype == out_dtype && a->rank == 4 && a->shape[0] == spec_.batch &&
                  a->shape[1] == sk && a->shape[2] == hkv && a->shape[3] == spec_.head_dim && a->stride[3] == 1,
              "dK/dV " + std::string(mode == cuda::DkvWrite::kFinal ? "output " : "accumulator ") + a->describe() +
                  " must be " + dtype_name(out_dtype) + " (B, Sk, Hkv, D) on the device",
              "");
    }
    require(k_pos.size() == sk, "key positions cover " + std::to_string(k_pos.size()) + " rows, k has " +
                                    std::to_string(sk), "");
    bwd_.seq_k = static_cast<int>(sk);
    bwd_.k = k.data;
    bwd_.k_batch_stride = k.stride[0];
    bwd_.k_row_stride = k.stride[1];
    bwd_.k_head_stride = k.stride[2];
    bwd_.v = v.data;
    bwd_.v_batch_stride = v.stride[0];
    bwd_.v_row_stride = v.stride[1];
    bwd_.v_head_stride = v.stride[2];
    bwd_.dkv_write = mode;
    const bool final_out = mode == cuda::DkvWrite::kFinal;
    bwd_.dk_accum = final_out ? nullptr : dk_acc.as<float>();
    bwd_.dv_accum = final_out ? nullptr : dv_acc.as<float>();
    bwd_.dk_out = final_out ? dk_acc.data : nullptr;
    bwd_.dv_out = final_out ? dv_acc.data : nullptr;
    bwd_.dk_batch_stride = dk_acc.stride[0];
    bwd_.dk_row_stride = dk_acc.stride[1];
    bwd_.dk_head_stride = dk_acc.stride[2];
    bwd_.dv_batch_stride = dv_acc.stride[0];
    bwd_.dv_row_stride = dv_acc.stride[1];
    bwd_.dv_head_stride = dv_acc.stride[2];
    cuda::flash_bwd_step(bwd_, bwd_q_pos_, k_pos, stream_);
  }

  // dq: (B, q_rows, H, D) spec.dtype on the device.
  void backward_end(const TensorView& dq) override {
    require(bwd_started_, "backward_end before backward_begin", "call backward_begin first");
    check_attention_view(dq, "dq", spec_.dtype, spec_.batch, q_rows_, spec_.heads, spec_.head_dim);
    bwd_.dq = dq.data;
    bwd_.dq_batch_stride = dq.stride[0];
    bwd_.dq_row_stride = dq.stride[1];
    bwd_.dq_head_stride = dq.stride[2];
    cuda::flash_bwd_finalize(bwd_, stream_);
    bwd_started_ = false;
  }

  // dst += src, both fp32 contiguous on the device (travelling dK/dV partials).
  void accumulate(const TensorView& dst, const TensorView& src) override {
    require_accumulator_pair(dst, src, "accumulate");
    cuda::flash_bwd_accumulate(dst.as<float>(), src.as<float>(), dst.numel(), stream_);
  }

  void fold_on(const TensorView& dst, const TensorView& src, void* stream) override {
    require_accumulator_pair(dst, src, "fold");
    // Beside the attention kernel (another stream) the fold runs on a few SMs: on 4x H200 at 8k
    // tokens per GPU a full grid slowed the step by more than a fold between steps costs, 16
    // blocks made the pass 1.5% faster than either (docs/BENCHMARKS.md, 2026-11-28 04:25).
    const unsigned max_blocks = stream != nullptr && stream != stream_ ? kFoldBesideBlocks : 0;
    cuda::flash_bwd_fold(dst.as<float>(), src.as<float>(), dst.numel(), max_blocks, stream_or_compute(stream));
  }

  void cast_accumulator(const TensorView& acc, const TensorView& dst) override {
    require(acc.device == Device::kCuda && dst.device == Device::kCuda && acc.dtype == DType::kF32 &&
                acc.is_contiguous() && dst.is_contiguous() && acc.numel() == dst.numel(),
            "cast_accumulator from " + acc.describe() + " to " + dst.describe(),
            "both contiguous on the device, fp32 source, same number of elements");
    cuda::cast_f32(acc.as<float>(), dst.data, dst.dtype, acc.numel(), stream_);
  }

  void cast_accumulator_sum(const TensorView& acc, const TensorView& addend, const TensorView& dst) override {
    if (dst.dtype == DType::kF32) {  // no rounding: the sum is the result (add, then copy)
      Backend::cast_accumulator_sum(acc, addend, dst);
      return;
    }
    require(acc.device == Device::kCuda && addend.device == Device::kCuda && dst.device == Device::kCuda &&
                acc.dtype == DType::kF32 && addend.dtype == DType::kF32 && acc.is_contiguous() &&
                addend.is_contiguous() && dst.is_contiguous() && acc.numel() == dst.numel() &&
                addend.numel() == dst.numel(),
            "cast_accumulator_sum of " + acc.describe() + " and " + addend.describe() + " to " + dst.describe(),
            "all contiguous on the device, fp32 sources, same number of elements");
    cuda::flash_bwd_cast_sum(acc.as<float>(), addend.as<float>(), dst.data, dst.dtype, dst.numel(), stream_);
  }

  void zero(const TensorView& acc) override {
    require(acc.device == Device::kCuda && acc.is_contiguous(), "zero of " + acc.describe(),
            "the accumulator must be contiguous on the device");
    RINGATTN_CUDA_CHECK(cudaMemsetAsync(acc.data, 0, acc.nbytes(), stream_));
  }

  void* allocate(std::size_t bytes) override {
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    RINGATTN_CHECK(!embedded_ || preparing_, ErrorKind::kInternal,
                   "an embedded ring asked the CUDA backend for " + std::to_string(bytes) + " bytes",
                   "every buffer of an embedded pass comes from its workspace (RingAttention::lay_out_workspace)");
    RINGATTN_CUDA_CHECK(cudaMalloc(&p, bytes));
    allocations_.push_back(p);
    return p;
  }

  void copy(void* dst, const void* src, std::size_t bytes) override {
    if (bytes == 0) return;
    RINGATTN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_));
  }

  int mark() override {
    require(!events_.empty(), "mark() before prepare()", "call prepare first: it creates the event pool");
    RINGATTN_CHECK(marks_ < static_cast<int>(events_.size()), ErrorKind::kInternal,
                   "more than " + std::to_string(events_.size()) + " timeline marks in one pass",
                   "call reset_marks() at the start of each pass");
    if (timeline_) RINGATTN_CUDA_CHECK(cudaEventRecord(events_[marks_], stream_));
    return marks_++;
  }

  std::vector<double> synchronize_and_read_marks() override {
    RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<double> ms(marks_, 0.0);
    for (int i = 1; i < marks_; ++i) {
      float t = 0.f;
      RINGATTN_CUDA_CHECK(cudaEventElapsedTime(&t, events_[0], events_[i]));
      ms[i] = t;
    }
    return ms;
  }

  void reset_marks() override { marks_ = 0; }

  // ---- embedded mode ----
  void set_embedded(bool on) override { embedded_ = on; }
  // nullptr is the caller's legacy default stream (PyTorch's default stream is 0): named by its
  // handle, so the scheduler still sees a device stream and fences its exchanges.
  void set_stream(void* stream) override {
    stream_ = stream != nullptr ? static_cast<cudaStream_t>(stream) : cudaStreamLegacy;
  }
  void set_timeline(bool on) override { timeline_ = on; }

  // Forward: acc (B, H, q_rows, D) fp32, row max and row sum (B, H, q_rows) fp32. Backward: the dQ
  // accumulator, lse * log2(e) and D = rowsum(dout * out), as backward_begin would allocate them.
  std::size_t scratch_bytes(bool backward) const override {
    const int b = static_cast<int>(spec_.batch);
    if (backward) {
      return align(cuda::flash_bwd_dq_accum_bytes(b, spec_.heads, spec_.head_dim, q_rows_)) +
             2 * align(cuda::flash_bwd_row_vector_bytes(b, spec_.heads, q_rows_));
    }
    const std::size_t rows = static_cast<std::size_t>(spec_.batch * spec_.heads * q_rows_);
    return align(rows * spec_.head_dim * sizeof(float)) + 2 * align(rows * sizeof(float));
  }

  void bind_scratch(void* base, bool backward) override {
    require(embedded_, "bind_scratch on a CUDA backend that is not embedded", "call set_embedded(true) first");
    char* p = static_cast<char*>(base);
    const int b = static_cast<int>(spec_.batch);
    if (backward) {
      const std::size_t dq = align(cuda::flash_bwd_dq_accum_bytes(b, spec_.heads, spec_.head_dim, q_rows_));
      const std::size_t vec = align(cuda::flash_bwd_row_vector_bytes(b, spec_.heads, q_rows_));
      bwd_dq_accum_ = reinterpret_cast<float*>(p);
      bwd_lse_log2_ = reinterpret_cast<float*>(p + dq);
      bwd_delta_ = reinterpret_cast<float*>(p + dq + vec);
      return;
    }
    const std::size_t rows = static_cast<std::size_t>(spec_.batch * spec_.heads * q_rows_);
    const std::size_t acc = align(rows * spec_.head_dim * sizeof(float)), vec = align(rows * sizeof(float));
    acc_ = reinterpret_cast<float*>(p);
    row_max_ = reinterpret_cast<float*>(p + acc);
    row_sum_ = reinterpret_cast<float*>(p + acc + vec);
  }

 private:
  void require_prepared() const {
    RINGATTN_CHECK(acc_ != nullptr || embedded_ || spec_.batch * spec_.heads * q_rows_ == 0, ErrorKind::kInternal,
                   "CUDA backend used before prepare()", "call prepare(spec, q_rows, k_rows) first");
  }

  cudaStream_t stream_or_compute(void* stream) const {
    return stream != nullptr ? static_cast<cudaStream_t>(stream) : stream_;
  }

  // Two fp32 accumulator views of the same size, contiguous on the device.
  static void require_accumulator_pair(const TensorView& dst, const TensorView& src, const char* what) {
    require(dst.device == Device::kCuda && src.device == Device::kCuda && dst.dtype == DType::kF32 &&
                src.dtype == DType::kF32 && dst.is_contiguous() && src.is_contiguous() && dst.numel() == src.numel(),
            std::string(what) + " " + src.describe() + " into " + dst.describe(),
            "fp32, contiguous, same size, on the device");
  }

  // The mask for the host's decisions (host_mask_: spec_'s own documents) and for the kernels
  // (kernel_mask_: the same with the documents copied to the device, once per prepare).
  void upload_mask() {
    host_mask_ = spec_.mask.view();
    kernel_mask_ = host_mask_;
    const std::vector<int64_t>& docs = spec_.mask.doc_offsets;
    const std::size_t bytes = docs.size() * sizeof(int64_t);
    if (bytes > doc_offsets_bytes_) {
      if (doc_offsets_ != nullptr) {
        RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));  // kernels in flight may still read it
        free_allocation(doc_offsets_);
      }
      doc_offsets_ = static_cast<int64_t*>(allocate(bytes));
      doc_offsets_bytes_ = bytes;
    }
    if (bytes > 0) {
      // Pageable source: the call returns once it is staged, so spec_ may change afterwards.
      RINGATTN_CUDA_CHECK(cudaMemcpyAsync(doc_offsets_, docs.data(), bytes, cudaMemcpyHostToDevice, stream_));
      kernel_mask_.doc_offsets = doc_offsets_;
    }
  }

  void free_allocation(void* p) {
    RINGATTN_CUDA_CHECK(cudaFree(p));
    for (auto it = allocations_.begin(); it != allocations_.end(); ++it) {
      if (*it == p) {
        allocations_.erase(it);
        break;
      }
    }
  }

  void release_state() {
    for (float* p : {acc_, row_max_, row_sum_, bwd_dq_accum_, bwd_lse_log2_, bwd_delta_}) {
      if (p == nullptr) continue;
      RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream_));
      RINGATTN_CUDA_CHECK(cudaFree(p));
      for (auto it = allocations_.begin(); it != allocations_.end(); ++it) {
        if (*it == p) {
          allocations_.erase(it);
          break;
        }
      }
    }
    acc_ = row_max_ = row_sum_ = nullptr;
    bwd_dq_accum_ = bwd_lse_log2_ = bwd_delta_ = nullptr;
  }

  static std::size_t align(std::size_t n) { return (n + kWorkspaceAlignment - 1) / kWorkspaceAlignment * kWorkspaceAlignment; }

  cudaStream_t stream_ = nullptr;      // the compute stream of the calls in progress
  cudaStream_t own_stream_ = nullptr;  // the one given (or created) at construction
  bool owns_stream_ = false;
  bool embedded_ = false;  // no allocation: scratch from bind_scratch(); stream per call (set_stream)
  bool timeline_ = true;   // mark() records its event
  bool preparing_ = false; // inside prepare(): an embedded backend may allocate (its mask's documents)
  std::vector<void*> allocations_;
  std::vector<cudaEvent_t> events_;
  int marks_ = 0;

  AttentionSpec spec_;
  int64_t q_rows_ = 0;
  int64_t k_rows_ = 0;
  float* acc_ = nullptr;      // (B, H, q_rows, D) unnormalised output
  float* row_max_ = nullptr;  // (B, H, q_rows) running max of score * scale * log2(e)
  float* row_sum_ = nullptr;  // (B, H, q_rows) running sum of 2^(score * scale * log2(e) - max)

  Mask host_mask_;    // spec_.mask.view(): documents in host memory
  Mask kernel_mask_;  // the same, documents in device memory (doc_offsets_)
  int64_t* doc_offsets_ = nullptr;
  std::size_t doc_offsets_bytes_ = 0;

  TensorView q_;
  ChunkPositions q_pos_;
  bool first_step_ = true;

  // Backward workspace, allocated on the first backward pass of this shape.
  cuda::FlashBwdParams bwd_;
  ChunkPositions bwd_q_pos_;
  bool bwd_started_ = false;
  float* bwd_dq_accum_ = nullptr;  // (B, q_rows, H, D) fp32
  float* bwd_lse_log2_ = nullptr;  // (B, H, padded q_rows) fp32
  float* bwd_delta_ = nullptr;     // (B, H, padded q_rows) fp32
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(void* stream) { return std::make_unique<CudaBackend>(stream); }

bool cuda_backend_available() {
  int count = 0;
  const bool ok = cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
  cudaGetLastError();  // a missing device must not linger as the next launch's error
  return ok;
}

}  // namespace ringattn
