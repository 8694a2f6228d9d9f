// Transport: the ring exchange (send to rank+1, receive from rank-1) over MPI host memory or NCCL device memory.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace ringattn {

inline constexpr double kDefaultTimeoutMs = 300000.0;  // 5 minutes per wait

// One piece of a message: the pieces of a send are concatenated into one receive buffer.
struct SendPart {
  const void* data = nullptr;
  std::size_t bytes = 0;
};

// One piece of an exchange: `bytes` from `send` to rank+1, and as many bytes from rank-1 into
// `recv`. Every rank posts pieces of the same sizes in the same order.
struct ExchangePart {
  const void* send = nullptr;
  void* recv = nullptr;
  std::size_t bytes = 0;
};

// Work that must precede an exchange's transfer but need not wait for the compute enqueued after
// the fence (the backward folds a dK/dV share into the partial it sends). Called with the stream
// the transfer runs on: device transports pass their exchange stream (a cudaStream_t), so the
// work runs beside the compute; host transports pass nullptr and call it on the posting thread.
using ExchangePrologue = std::function<void(void* stream)>;

// One piece of a peer message, in the memory of the transport's backend (host or device).
struct PeerPiece {
  void* data = nullptr;  // read by a send, written by a receive
  std::size_t bytes = 0;
};

// One message of a peer exchange: to (send) or from (receive) `peer`, the concatenation of
// `pieces`. The ring plan builds both sides, so a send's pieces and the matching receive's pieces
// have the same sizes in the same order: a transport may move them piece by piece, unstaged.
struct PeerMessage {
  int peer = -1;
  std::vector<PeerPiece> pieces;
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& p : pieces) n += p.bytes;
    return n;
  }
};

// Everything one rank sends and receives in one hop of a plan: any set of peers, possibly none.
// Messages of the same (sender, receiver) pair in one exchange match in list order.
struct PeerExchange {
  std::vector<PeerMessage> sends;
  std::vector<PeerMessage> recvs;
  bool empty() const { return sends.empty() && recvs.empty(); }
};

class Transport {
 public:
  virtual ~Transport() = default;
  virtual const char* name() const = 0;
  virtual int rank() const = 0;
  virtual int world() const = 0;
  // Posts the exchange of hop `hop`: every part's `send` to rank+1 and its `recv` from rank-1, in
  // order. `before`, if set, is enqueued ahead of the transfer (see ExchangePrologue).
  // Device transports start the transfer only after the work already enqueued on the compute stream
  // (or up to the hop's fence), so a buffer written by that work (or read by it, for recv) is safe.
  virtual void start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                                     const ExchangePrologue& before = nullptr) = 0;
  // Sends the concatenation of `parts` to rank+1 and receives as many bytes from rank-1 into `recv`.
  void start_exchange_parts(const SendPart* parts, int num_parts, void* recv, int hop,
                            const ExchangePrologue& before = nullptr);
  // The one-piece form: `send` (bytes) to rank+1, `recv` (bytes) from rank-1.
  void start_exchange(const void* send, void* recv, std::size_t bytes, int hop,
                      const ExchangePrologue& before = nullptr) {
    const SendPart part{send, bytes};
    start_exchange_parts(&part, 1, recv, hop, before);
  }
  // Whether start_peer_exchange works (the ring plan then sends rows straight to the ranks that
  // need them); without it the plan keeps to the neighbour ring of start_exchange_pieces.
  virtual bool supports_peer_exchange() const { return false; }
  // Posts the exchange of hop `hop` with any set of peers, completed by wait(hop) like the ring's.
  // An empty exchange is legal (wait then returns at once). Ordering against the compute stream,
  // `before` and the fence are as for start_exchange_pieces. The default throws kInternal.
  virtual void start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before = nullptr);
  // Device transports: marks, on the compute stream, the point after which the exchange of hop
  // `hop` may start (all work enqueued so far). The caller may then enqueue compute and post the
  // exchange afterwards without the exchange waiting for that compute, so the host's posting
  // latency never idles the GPU. Without a fence, start_exchange orders after everything enqueued.
  // Host transports ignore it.
  virtual void fence(int hop) { (void)hop; }
  // Completes the exchange of hop `hop`. Host transports block (with the timeout); device
  // transports make the compute stream wait for it. Throws ringattn::Error naming the hop and
  // peer on timeout or communicator failure.
  virtual void wait(int hop) = 0;
  // Ends a pass (a forward or a backward), after its last wait: `meanwhile` (the caller's own
  // synchronisation) runs while the transport confirms that every rank finished the pass, and an
  // Error(kComm) names the problem when one did not. A transport whose completed exchange proves
  // that its peers finished theirs need not check; the default runs `meanwhile` only.
  virtual void end_pass(const std::function<void()>& meanwhile) { meanwhile(); }
  // Tears the communicator down after a failure so that no rank hangs.
  virtual void abort(const std::string& why) = 0;
  // Milliseconds a wait may take before the job is aborted.
  virtual void set_timeout_ms(double ms) = 0;

  // ---- embedded passes (RingAttention built with RingOptions::embedded) ----
  // Switches the transport to embedded passes, once, before the first one: no host wait on the
  // device's progress inside a pass. Returns false, with the reason in `why`, when this transport
  // cannot (the copy-engine ring needs IPC-mapped cudaMalloc memory and host messages per hop).
  virtual bool enable_embedded(std::string* why) {
    (void)why;
    return true;
  }
  // The compute stream of the passes that follow, exactly as given (device transports; a
  // cudaStream_t, nullptr being CUDA's default stream). Host transports ignore it.
  virtual void set_compute_stream(void* stream) { (void)stream; }
  // Ends an embedded pass, after its last wait, without a host wait: every stream of the transport
  // joins the compute stream. A transport with an end-of-pass agreement enqueues it and returns
  // the device word it sums into, which equals `expected` when every rank finished the pass; its
  // watchdog enforces the timeout.
  struct Verdict {
    const int* device_sum = nullptr;  // nullptr: nothing to check on the device
    int expected = 0;
  };
  virtual Verdict end_pass_async() { return {}; }
  // A host word (mapped into the device) that a failure found off the calling thread (a watchdog)
  // sets to nonzero before it aborts the communicator: the pass guard reads it. nullptr: none.
  virtual void set_failure_flag(volatile int* flag) { (void)flag; }
  // The failure a watchdog recorded; empty when none. Never blocks on the device.
  virtual std::string failure() const { return {}; }
};

// A transport for one process (world 1): exchanges never happen.
std::unique_ptr<Transport> make_local_transport();

// p ranks in one process (tests, and a p-rank ring on one GPU): transport r of the returned
// vector is rank r; each is driven by its own thread. `compute_streams` empty: host memory
// (memcpy); else one cudaStream_t per rank, all on the current device (copies on the device,
// ordered against each rank's compute stream like the NCCL transport's).
std::vector<std::unique_ptr<Transport>> make_loopback_transports(int world,
                                                                 const std::vector<void*>& compute_streams = {},
                                                                 double timeout_ms = kDefaultTimeoutMs);

// ---- embedding in a host program (a training stack) that owns its communicators and streams ----
// A GPU ring over the host program's NCCL communicator (`nccl_comm`, an ncclComm_t): rank and ring
// size come from it, exchanges run on a stream of ringattn's own, ordered by events against
// `compute_stream` (a cudaStream_t: the one passed to make_cuda_backend). ringattn never finalizes
// or destroys the communicator, but aborts it when a hop outlives `timeout_ms` or NCCL reports an
// error, so that no rank hangs (the host program then needs a new one). Throws without NCCL.
std::unique_ptr<Transport> make_nccl_transport_borrowed(void* nccl_comm, void* compute_stream,
                                                        double timeout_ms = kDefaultTimeoutMs);
// A host-memory ring over the host program's MPI communicator (`mpi_comm` points to an MPI_Comm,
// duplicated inside). Throws when ringattn is built without MPI.
std::unique_ptr<Transport> make_mpi_transport_borrowed(void* mpi_comm);

}  // namespace ringattn
