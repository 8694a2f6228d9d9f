// RingAttention: the exact ring schedule (forward and backward) over a Backend and a Transport.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "ringattn/mask.hpp"

#include "ringattn/backend.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {

struct RingPlan;  // src/plan/plan.hpp
class PassGuard;  // src/runtime/pass_guard.hpp

// Bytes this rank moved with one peer in one hop.
struct PeerBytes {
  int rank = 0;
  uint64_t sent_bytes = 0;
  uint64_t received_bytes = 0;
};

// What one hop of a pass did; times in milliseconds, bytes as the plan moved them.
struct HopStats {
  int hop = 0;
  int source_rank = 0;        // whose K/V rows were computed on in this hop (-1: none)
  bool skipped = false;       // nothing visible in this hop: no compute
  double compute_ms = 0.0;    // block-attention work of this hop
  double exposed_comm_ms = 0.0;  // time compute waited for the next rows to arrive
  uint64_t sent_bytes = 0;        // K+V bytes sent to all peers (forwarding included)
  uint64_t received_bytes = 0;    // K+V bytes received from all peers
  uint64_t grad_sent_bytes = 0;   // backward: dK/dV bytes sent
  uint64_t grad_received_bytes = 0;
  std::vector<PeerBytes> peers;   // per peer: K+V bytes (backward: K+V and dK/dV together)
};

struct PassStats {
  std::vector<HopStats> hops;
  double visible_pairs = 0.0;  // visible (query, key) pairs of this rank's queries, all batch rows and heads
  double total_ms = 0.0;  // first mark to last mark on the compute timeline
  double compute_ms() const;
  double exposed_comm_ms() const;
};

// Observer called on the host after each hop is enqueued (progress display, telemetry).
using HopCallback = void (*)(int hop, int hops, void* user);

enum class Pass { kForward, kBackward };

// How a RingAttention runs its passes; fixed at construction.
struct RingOptions {
  // false: the blocking passes of the apps (the call returns when the pass is done, buffers are
  // allocated on first use, per-hop times always). true: embedded passes (forward/backward with
  // PassOptions) for a host program that owns streams and memory: the call enqueues the pass on
  // the caller's stream and returns; scratch comes from the caller's workspace; nothing is
  // allocated and nothing waits for the device inside a pass; failures are found by the
  // transport's watchdog and by a guard kernel at the end of the pass (see poll()).
  bool embedded = false;
};

// One embedded pass.
struct PassOptions {
  // The stream the pass is ordered on (a cudaStream_t of the backend's device; nullptr is CUDA's
  // default stream): it starts after the work already there, and everything it does, the
  // exchange streams included, is joined back into this stream before the call returns, so the
  // caller may reuse inputs and workspace by stream order alone. Host backends ignore it.
  void* stream = nullptr;
  // workspace_bytes(pass) bytes in the backend's memory, kWorkspaceAlignment-aligned; owned by
  // the caller, in use until the stream reaches the end of the pass. May change between calls.
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
  // Per-hop times in last_stats(): the call then waits for the pass (a host wait, on request).
  bool timeline = false;
};

// Bits of PassGuard's verdict: why an embedded pass wrote NaN into its outputs.
inline constexpr int kGuardAgreement = 1;  // the end-of-pass agreement counted fewer ranks
inline constexpr int kGuardWatchdog = 2;   // the transport's watchdog failed the ring
inline constexpr int kGuardForced = 4;     // the call itself failed after enqueuing work

class RingAttention {
 public:
  // The transport's rank/world define the ring. Buffers (two K/V chunks, accumulators) are
  // allocated here, once for this shape.
  RingAttention(const AttentionSpec& spec, std::unique_ptr<Backend> backend,
                std::unique_ptr<Transport> transport);
  // As above, with `options` (RingOptions::embedded: nothing is allocated here or later: every
  // buffer lives in the workspace of each call). Throws kInvalidArgument when the transport cannot
  // run embedded passes.
  RingAttention(const AttentionSpec& spec, std::unique_ptr<Backend> backend, std::unique_ptr<Transport> transport,
                const RingOptions& options);
  ~RingAttention();
  RingAttention(const RingAttention&) = delete;
  RingAttention& operator=(const RingAttention&) = delete;

  const AttentionSpec& spec() const { return spec_; }
  int rank() const;
  int world() const;
  int64_t local_seq() const { return local_seq_; }
  const ChunkPositions& positions() const { return q_pos_; }
  // What every hop computes and sends, identical on every rank (src/plan/plan.hpp).
  const RingPlan& plan() const { return *plan_; }
  Backend& backend() { return *backend_; }
  Transport& transport() { return *transport_; }

  // q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D), spec.dtype, in the backend's memory.
  // out: (B, S_local, H, D) spec.dtype; lse: (B, H, S_local) fp32 (fp64 for fp64 runs).
  void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const TensorView& lse);
  // Training: dout like out; writes dq like q, dk and dv like k and v (spec.dtype). Uses the
  // global lse from forward (no second forward pass).
  void backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                const TensorView& lse, const TensorView& dout, const TensorView& dq,
                const TensorView& dk, const TensorView& dv);

  // ---- embedded passes (RingOptions::embedded) ----
  bool embedded() const { return embedded_; }
  // Workspace bytes one pass needs (ring buffers, backend scratch); the same on every call.
  std::size_t workspace_bytes(Pass pass) const;
  // The passes above, enqueued on options.stream with options.workspace; they return once the
  // pass is enqueued. Tensors as above. Throws kInvalidArgument for bad arguments (nothing
  // enqueued, nothing kept) and the kept error of an earlier failed pass (nothing enqueued). A
  // pass that fails after enqueuing work fills its outputs (out, lse; dq, dk, dv) with NaN on the
  // stream, keeps the error and throws it; one whose failure the watchdog or the guard finds
  // later fills them with NaN on the device, and poll() (and every later call) returns the error.
  // The ring is unusable after a failure (its communicator is aborted).
  void forward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
               const TensorView& lse, const PassOptions& options);
  void backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                const TensorView& dv, const PassOptions& options);
  // The kept failure of this ring, if any; never blocks.
  std::optional<Error> poll();

  const PassStats& last_stats() const { return stats_; }
  void set_hop_callback(HopCallback cb, void* user) { hop_cb_ = cb; hop_user_ = user; }

 private:
  // Timeline marker indices of one hop: compute starts, compute done, next chunk arrived.
  struct HopMarks {
    int begin, computed, arrived;
  };
  void check_inputs(const TensorView& t, int heads, const char* what) const;
  // The passes of a direct plan: the owner sends each reader exactly the rows it needs.
  void forward_direct(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                      const TensorView& lse);
  void backward_direct(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                       const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                       const TensorView& dv);
  // Adds remote hop j's K/V messages (this rank's rows to the reader, the owner's rows into buffer j % 2).
  void add_kv_messages(PeerExchange& ex, int j, const TensorView& k, const TensorView& v) const;
  // Rows of remote hop h (0-based into plan().hops) that this rank receives, with their positions.
  struct DirectHop {
    int hop = 0;          // distance t
    int owner = -1;       // whose rows arrive (-1: none)
    int reader = -1;      // who gets this rank's rows (-1: none)
    int64_t recv_rows = 0;
    int64_t send_rows = 0;
    std::vector<Segment> recv_segments;  // positions of the arriving rows, in arrival order
  };
  // Waits for the pass, then fills the per-hop compute / exposed-communication times.
  void read_timeline(const std::vector<HopMarks>& marks, int start_mark, int end_mark);
  // The end of every pass: blocking, the transport's end_pass around read_timeline; embedded,
  // the asynchronous end (src/runtime/ring_embedded.cpp).
  void finish_pass(const std::vector<HopMarks>& marks, int start_mark, int end_mark);
  // Embedded passes (ring_embedded.cpp): carves `base` (nullptr: only counts) into this pass's
  // buffers, which it points the members at; returns the bytes used.
  std::size_t lay_out_workspace(Pass pass, char* base);
  void begin_embedded(Pass pass, const PassOptions& options);
  void run_embedded(const std::vector<TensorView>& outputs, const PassOptions& options,
                    const std::function<void()>& body);
  void fill_nan_now(const std::vector<TensorView>& outputs);
  void check_lse(const TensorView& lse) const;
  void enable_embedded();  // the constructor, before the backend's prepare()

  AttentionSpec spec_;
  std::unique_ptr<RingPlan> plan_;
  std::vector<DirectHop> direct_;  // direct plans: this rank's side of every remote hop
  void* direct_kv_[2] = {nullptr, nullptr};    // arriving K/V rows, double-buffered
  void* direct_grad_[2] = {nullptr, nullptr};  // dK/dV of the rows computed in a hop, before they go home
  void* direct_grad_in_ = nullptr;             // dK/dV arriving from a reader for this rank's rows
  void* own_grad_ = nullptr;                   // fp32 dK/dV of this rank's own rows, summed over readers
  Mask mask_;       // view of spec_.mask
  Layout layout_;   // spec_.layout resolved for this ring
  // Embedded device rings: the end-of-pass NaN guard. Declared first, so it outlives the transport
  // whose watchdog sets its failure word.
  std::unique_ptr<PassGuard> guard_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<Transport> transport_;
  int64_t local_seq_ = 0;
  ChunkPositions q_pos_;
  std::size_t kv_bytes_ = 0;       // K + V of one chunk
  std::size_t grad_bytes_ = 0;     // dK + dV accumulators of one chunk (backward)
  void* buffers_[2] = {nullptr, nullptr};
  void* grad_buffers_[2] = {nullptr, nullptr};  // [K | V | dK | dV] messages of the backward ring
  // This rank's dK/dV shares of visiting chunks: step s writes local_grad_[s % 2] while the exchange
  // stream folds step s-1's share into the partial it sends (the second one from 3 ranks up).
  void* local_grad_[2] = {nullptr, nullptr};
  PassStats stats_;
  HopCallback hop_cb_ = nullptr;
  void* hop_user_ = nullptr;
  bool post_early_ = false;  // RINGATTN_RING_POST=early: post exchanges before compute (timing only)
  bool fold_beside_ = true;  // RINGATTN_RING_FOLD=compute: folds on the compute stream (timing only)
  // Embedded mode.
  bool embedded_ = false;
  const PassOptions* pass_options_ = nullptr;  // the embedded call in progress
  std::vector<TensorView> pass_outputs_;       // its outputs: the guard fills them with NaN on failure
  std::optional<Error> kept_;                  // the first failure; returned by poll() and every later call
};

}  // namespace ringattn
