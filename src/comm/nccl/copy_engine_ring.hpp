// CopyEngineRing: the ring exchange by copy engines (CUDA IPC) between ranks of one host, SM-free beside compute.
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>

#include <chrono>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "ringattn/transport.hpp"

namespace ringattn {

// Moves each piece of an exchange with cudaMemcpyAsync straight into the receiver's buffer (opened
// through its CUDA IPC handle), so no SM runs the transfer: NCCL's send/recv kernels hold one SM
// per channel while a hop is in flight, which slowed each backward step by 9-14% at 8k tokens per
// GPU on 4x H200 (docs/DESIGN.md "Copy-engine exchange"). Ordering, per exchange `seq`:
//   receiver: records free[seq % K] on its compute stream (the recv buffer is no longer read), then
//             sends (MPI, host) the recv buffers' IPC handles and offsets to rank-1;
//   sender:   receives that message, makes its comm stream wait for the receiver's free event,
//             copies, records sent[seq % K] on the comm stream and tells rank+1 (MPI);
//   receiver: wait() receives that message and makes the compute stream wait for sent[seq % K].
// Every GPU-side wait is enqueued only after the host message that says the event it waits for
// was recorded, so a silent peer shows up as a host-side timeout, never as a stuck stream.
// Interprocess events come in a ring of K slots; a slot is re-recorded only after the peer's
// wait on its previous record was enqueued (the host messages order them).
class CopyEngineRing {
 public:
  // Collective over `comm` (duplicated inside). Throws on every rank alike when any rank cannot
  // share its events or map rank+1's memory (a probe allocation proves peer access).
  CopyEngineRing(MPI_Comm comm, int rank, int world, cudaStream_t compute_stream, int slots);
  ~CopyEngineRing();
  CopyEngineRing(const CopyEngineRing&) = delete;
  CopyEngineRing& operator=(const CopyEngineRing&) = delete;

  // Whether every rank of `comm` should try copy engines: more than one rank, all on one host, and
  // no rank with RINGATTN_COPY_ENGINE=0 (collective: the answer is the same on every rank).
  static bool wanted(MPI_Comm comm, int world);

  // Called until it returns true or throws; `poll` sleeps a little, unlocks the caller's lock while
  // it does, and throws once the deadline is past (the message says who was waited for).
  using Poll = std::function<void(const std::string& waiting_for)>;

  // Records the receiver's free event for exchange `seq` on the compute stream (at the fence).
  void mark_free(long seq);
  // Forgets mark_free(seq) (its fence served an exchange of NCCL's kernels instead): post(seq)
  // then records the free event itself, at its own time.
  void unmark_free(long seq);
  // Posts exchange `seq`: the receiver message to rank-1 (recording free now unless mark_free ran
  // for this seq), the sender's copies on `comm_stream` once rank+1 said its buffers are free.
  void post(long seq, const ExchangePart* parts, int num_parts, cudaStream_t comm_stream, const Poll& poll);
  // The compute stream waits until the data of exchange `seq` from rank-1 has landed.
  void wait(long seq, const Poll& poll);
  // Cancels the outstanding host messages (after a failure).
  void cancel();

 private:
  static constexpr int kMaxParts = 4;
  static constexpr std::size_t kProbeBytes = 256;
  struct PieceInfo {
    cudaIpcMemHandle_t handle;
    unsigned long long offset;
    unsigned long long bytes;
  };
  struct FreeMessage {
    long seq;
    int num_parts;
    PieceInfo parts[kMaxParts];
  };
  int slot(long seq) const { return static_cast<int>(seq % static_cast<long>(free_.size())); }
  // The IPC handle of the allocation holding `ptr`, and `ptr`'s offset in it (cached per base).
  void export_pointer(void* ptr, cudaIpcMemHandle_t* handle, unsigned long long* offset);
  // This process's mapping of a peer allocation (cached per handle).
  char* open_handle(const cudaIpcMemHandle_t& handle);
  // Tests `req` until it completes, polling in between; on the poll's failure cancels and frees it
  // (never waits: a silent peer may never match it) and rethrows.
  void wait_request(MPI_Request* req, const Poll& poll, const std::string& what);
  // Collective: returns when every rank's `ok` is true, else releases everything and throws.
  void agree(bool ok, const std::string& what);
  void release();
  void complete_sends(const Poll& poll);

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, world_ = 1, next_ = 0, prev_ = 0;
  cudaStream_t compute_stream_ = nullptr;
  std::vector<cudaEvent_t> free_, sent_;                // ours: recorded here, waited on by a peer
  std::vector<cudaEvent_t> next_free_, prev_sent_;      // the peers', opened through their handles
  std::vector<long> free_marked_;                       // seq whose free event mark_free recorded
  std::map<std::string, char*> opened_;                 // handle bytes -> mapped base
  std::vector<MPI_Request> sends_;                      // outstanding host messages we sent
  std::vector<FreeMessage> free_out_;                   // their buffers (slot-indexed)
  std::vector<long> sent_out_;
  FreeMessage free_in_{};  // receive buffers of the host messages (members: a cancelled and freed
  long sent_in_ = -1;      // receive that matches late writes here, not into a dead stack frame)
  void* probe_ = nullptr;  // a small allocation rank-1 maps at set-up
};

}  // namespace ringattn
