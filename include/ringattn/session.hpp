// Session: bootstrap of one rank (MPI -> device -> transport), cross-rank agreement and collective error handling.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ringattn/error.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/spec.hpp"

namespace ringattn {

struct SessionOptions {
  std::string backend = "auto";  // auto | cpu | cuda
  double timeout_ms = kDefaultTimeoutMs;
  // Local rank on this host; -1: RINGATTN_LOCAL_RANK, else the MPI shared-memory split.
  int local_rank = -1;
};

// One per process. Initialises MPI when ringattn is built with it and the host program has not
// done so (and then finalises it), picks this rank's GPU, and builds RingAttention objects whose
// backend and transport match: CPU + MPI, CUDA + NCCL, or a single process without any ring.
class Session {
 public:
  static std::unique_ptr<Session> create(int* argc, char*** argv, const SessionOptions& options);
  virtual ~Session() = default;

  virtual int rank() const = 0;
  virtual int world() const = 0;
  virtual int local_rank() const = 0;
  virtual int device() const = 0;           // -1 on the CPU backend
  virtual bool on_gpu() const = 0;
  virtual std::string backend_name() const = 0;  // "cpu" or "cuda"
  virtual std::string transport_name() const = 0;  // "local", "mpi" or "nccl"
  // "host pid device busid" of this rank (the benchmark preamble).
  virtual std::string describe_rank() const = 0;

  // Every collective below has a deadline, SessionOptions::timeout_ms: when a rank never joins,
  // the waiting ranks check in with every rank point to point and the first to finish ends the
  // whole job (MPI_Abort, exit code 3) with a message naming the ranks that did not answer and the
  // step (set_step); a collective that a peer never joins cannot be cancelled, so nothing could
  // continue after it.
  //
  // Collective: every rank passes its `value`; throws ErrorKind::kMismatch on every rank when any
  // differs, naming `what`, both values and the ranks.
  virtual void check_agreement(const std::string& what, const std::string& value) = 0;
  // Collective: when any rank passes ok = false, throws on every rank with the first failing
  // rank's message and kind (so every rank exits non-zero naming the real problem).
  virtual void agree_ok(bool ok, const std::string& message, ErrorKind kind = ErrorKind::kInvalidArgument) = 0;
  virtual std::vector<std::string> gather_strings(const std::string& value) = 0;  // rank 0 gets all
  virtual double max_over_ranks(double value) = 0;
  virtual double sum_over_ranks(double value) = 0;
  // Collective: elementwise max (max = true) or sum of values[0..n) over the ranks, in place.
  virtual void reduce_over_ranks(double* values, int64_t n, bool max) = 0;
  virtual void barrier() = 0;
  // What the next collectives belong to ("barrier before pass 3"), named when one times out.
  virtual void set_step(const std::string& step) { (void)step; }
  // Runs while a collective waits (e.g. a transport's watchdog check that throws on its failure).
  virtual void set_collective_poll(std::function<void()> poll) { (void)poll; }
  // Ends the whole job at once after an unrecoverable error on this rank (never in library code
  // paths that can report instead; used by the CLI when a peer may be stuck in a collective).
  virtual void abort_job(int exit_code) = 0;

  // A ring for `spec` over all ranks of this session with this session's backend and transport.
  virtual std::unique_ptr<RingAttention> make_ring(const AttentionSpec& spec) = 0;
  // The backend alone (for device-memory helpers around the ring).
  virtual std::unique_ptr<Backend> make_backend() = 0;
  // A pointer to the session's MPI_Comm, or nullptr when built without MPI.
  virtual void* mpi_comm() const = 0;
};

}  // namespace ringattn
