// RingAttention: the exact ring schedule (forward and backward) over a Backend and a Transport.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "ringattn/mask.hpp"

#include "ringattn/backend.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {

struct RingPlan;  // src/plan/plan.hpp

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

class RingAttention {
 public:
  // The transport's rank/world define the ring. Buffers (two K/V chunks, accumulators) are
  // allocated here, once for this shape.
  RingAttention(const AttentionSpec& spec, std::unique_ptr<Backend> backend,
                std::unique_ptr<Transport> transport);
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

  AttentionSpec spec_;
  std::unique_ptr<RingPlan> plan_;
  std::vector<DirectHop> direct_;  // direct plans: this rank's side of every remote hop
  void* direct_kv_[2] = {nullptr, nullptr};    // arriving K/V rows, double-buffered
  void* direct_grad_[2] = {nullptr, nullptr};  // dK/dV of the rows computed in a hop, before they go home
  void* direct_grad_in_ = nullptr;             // dK/dV arriving from a reader for this rank's rows
  void* own_grad_ = nullptr;                   // fp32 dK/dV of this rank's own rows, summed over readers
  Mask mask_;       // view of spec_.mask
  Layout layout_;   // spec_.layout resolved for this ring
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
};

}  // namespace ringattn
