// NcclTransport: the ring exchange over a dedicated NCCL communicator, with a host watchdog that aborts hung hops.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "comm/nccl/copy_engine_ring.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {

// Send to rank+1 and receive from rank-1 inside one NCCL group on a communication stream of its
// own. Ordering (DESIGN.md "Overlap scheduler"):
//   compute stream --ready event--> comm stream: sends see finished data, receives do not overwrite
//                                   a buffer that earlier compute still reads;
//   comm stream --done event[hop]--> compute stream (wait()): compute on the received chunk starts
//                                   only after the receive completed.
// Events are created once (a ring of them, indexed by hop), so nothing is allocated per hop.
//
// Hang safety: the communicator is non-blocking (ncclConfig_t::blocking = 0), so no NCCL call
// blocks the host. A watchdog thread polls every posted hop (cudaEventQuery) and the
// communicator's asynchronous error; when a hop is older than the timeout or NCCL reports an error
// it aborts the communicator (which also ends the NCCL kernels, so a host blocked in a stream
// synchronise returns) and records an error naming the hop and the peers. Every later call of this
// transport, and check(), throws that error as ringattn::Error(kComm).
class NcclTransport final : public Transport {
 public:
  // Collective over `comm`: rank 0 creates the unique id, MPI_Bcast hands it out.
  NcclTransport(MPI_Comm comm, int device, cudaStream_t compute_stream, double timeout_ms);
  // Over the host program's communicator (blocking or not), which is never finalized or destroyed
  // here; on a timeout or NCCL error it is aborted like our own, so that no rank hangs.
  NcclTransport(ncclComm_t borrowed, cudaStream_t compute_stream, double timeout_ms);
  ~NcclTransport() override;
  NcclTransport(const NcclTransport&) = delete;
  NcclTransport& operator=(const NcclTransport&) = delete;

  // "nccl+copy-engine" when the data moves by copy engines, "nccl" when by NCCL's kernels.
  const char* name() const override { return ce_ ? "nccl+copy-engine" : "nccl"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  void start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                             const ExchangePrologue& before) override;
  // Any set of peers, one NCCL group of ncclSend/ncclRecv per piece on the comm stream, ordered
  // against the compute stream like the ring's. Always NCCL's kernels, also when the ring runs on
  // copy engines: that path maps only the ring neighbour's buffers (CUDA IPC).
  bool supports_peer_exchange() const override { return true; }
  void start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before) override;
  void fence(int hop) override;
  // hop >= 0: the compute stream waits (on the device) for that hop's exchange.
  // hop < 0: the host waits, with the timeout, until every posted exchange has completed.
  void wait(int hop) override;
  // NCCL's kernels (not the copy-engine path, unless a peer exchange ran in the pass): all ranks add 1 in a one-integer allreduce queued
  // behind the last exchange, and the host waits (with the timeout) for the sum to equal the ring
  // size. A completed NCCL receive alone does not prove that the ring is intact: with a peer
  // silent, a rank was seen to finish its forward while its neighbours timed out.
  void end_pass(const std::function<void()>& meanwhile) override;
  void abort(const std::string& why) override;
  void set_timeout_ms(double ms) override;

  // Embedded passes: NCCL's kernels only (the copy-engine ring needs IPC-mapped cudaMalloc memory
  // and host messages per hop, so a transport that set it up refuses); a slot still pending when
  // its hop comes round again is taken over without a host wait (the comm stream runs in order, so
  // the newer hop's completion implies the older's, and the watchdog follows the newer).
  bool enable_embedded(std::string* why) override;
  void set_compute_stream(void* stream) override;
  // The end-of-pass agreement of end_pass(), enqueued only: the compute stream waits for it on the
  // device, the watchdog times it like a hop, the pass guard compares the sum with the ring size.
  Verdict end_pass_async() override;
  void set_failure_flag(volatile int* flag) override;
  std::string failure() const override;

  // Throws the recorded failure, if any (a hop timed out or NCCL reported an error).
  void check() const;
  bool failed() const { return failed_.load(); }
  ncclComm_t comm() const { return comm_; }
  cudaStream_t comm_stream() const { return comm_stream_; }

 private:
  using Clock = std::chrono::steady_clock;
  struct Slot {
    cudaEvent_t done = nullptr;
    cudaEvent_t fence = nullptr;  // recorded on the compute stream by fence(hop)
    int fence_hop = -1;           // the hop whose fence is recorded, -1 when none
    int hop = -1;
    long seq = -1;                // the exchange's number (copy-engine path)
    bool pending = false;
    Clock::time_point posted;
    std::string route;            // a peer exchange's " (send to ...; receive from ...)"; empty: the ring's
  };

  Slot& slot_for(int hop) { return slots_[static_cast<std::size_t>(hop) % slots_.size()]; }
  std::string peer_text(int peer) const;
  static std::string hop_text(int hop);  // "hop 3", or "end-of-pass agreement" for -1
  // " (send to rank 1 (host pid), receive from rank 3 (...))": the ring's peers, or an exchange's.
  std::string ring_route() const;
  std::string peer_route(const PeerExchange& exchange) const;
  std::string route_of(const Slot& slot) const;
  // The slot of `hop`, once an older hop that used it has completed (with the deadline); mu_ held.
  Slot& acquire_slot_locked(std::unique_lock<std::mutex>& lock, int hop);
  // The comm stream waits for the compute stream up to the hop's fence, or up to now; mu_ held.
  void order_after_compute_locked(Slot& slot, int hop);
  // Polls ncclCommGetAsyncError until the last call left the in-progress state; mu_ held.
  // `route` names the peers in messages (the ring's when empty).
  void settle_locked(const char* what, int hop, const std::string& route = "");
  // Aborts the communicator once and records `message`; mu_ held.
  void fail_locked(const std::string& message);
  void watchdog_loop();
  // The comm stream (highest priority), its ordering event and the per-hop event slots.
  void create_streams_and_events();
  std::chrono::milliseconds timeout() const;
  // The copy-engine path's host wait: unlocks `lock` while it sleeps; fails the transport (and
  // throws) once `deadline` is past.
  CopyEngineRing::Poll ce_poll(std::unique_lock<std::mutex>& lock, Clock::time_point deadline, int hop);

  int rank_ = 0;
  int world_ = 1;
  int device_ = -1;
  int next_ = 0;
  int prev_ = 0;
  std::vector<std::string> peers_;  // "host pid" of every rank, for messages
  ncclComm_t comm_ = nullptr;
  bool owns_comm_ = true;  // false: the host program's communicator
  cudaStream_t compute_stream_ = nullptr;
  cudaStream_t comm_stream_ = nullptr;
  cudaEvent_t ready_ = nullptr;
  std::vector<Slot> slots_;
  int* agree_dev_ = nullptr;   // [this rank's 1, the allreduce's sum] (end_pass)
  int* agree_host_ = nullptr;  // pinned copy of the sum
  cudaEvent_t agree_done_ = nullptr;
  Slot agree_slot_;  // embedded passes: the agreement, watched like a hop (hop -1); done = agree_done_
  bool embedded_ = false;
  volatile int* failure_flag_ = nullptr;  // set before an abort (the pass guard's word), mu_ held
  // Ranks of one host (unless RINGATTN_COPY_ENGINE=0): the data moves by copy engines, not NCCL kernels.
  std::unique_ptr<CopyEngineRing> ce_;
  long seq_ = 0;  // ring exchanges started so far (the same count on every rank)
  // A peer exchange ran on NCCL's kernels in this pass: end_pass confirms it like a kernel ring's.
  bool kernel_exchange_in_pass_ = false;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<bool> failed_{false};
  std::atomic<bool> aborted_{false};
  std::atomic<double> timeout_ms_{0.0};
  std::string failure_;
  bool stop_ = false;
  std::thread watchdog_;
};

// Throws when `transport` is an NcclTransport whose watchdog recorded a failure; no-op otherwise.
void check_transport(const Transport& transport);

}  // namespace ringattn
