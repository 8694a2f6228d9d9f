// NcclTransport: dedicated NCCL communicator, comm stream, per-hop events, and the timeout watchdog.
#include "comm/nccl/nccl_transport.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "comm/nccl_env.hpp"
#include "comm/transports.hpp"
#include "ringattn/error.hpp"
#include "ringattn/session.hpp"

namespace ringattn {
namespace {

constexpr auto kWatchdogPeriod = std::chrono::milliseconds(10);
constexpr auto kSettlePoll = std::chrono::microseconds(50);
constexpr int kHostRecordBytes = 128;  // "host pid" of one rank, for messages

void check_cuda(cudaError_t e, const char* call) {
  if (e != cudaSuccess) {
    fail(ErrorKind::kCuda, std::string(call) + " failed: " + cudaGetErrorString(e),
         "check that each rank has its own GPU (CUDA_VISIBLE_DEVICES, RINGATTN_LOCAL_RANK)");
  }
}

void check_mpi(int rc, const char* call) {
  if (rc != MPI_SUCCESS) {
    char text[MPI_MAX_ERROR_STRING] = {0};
    int len = 0;
    MPI_Error_string(rc, text, &len);
    fail(ErrorKind::kComm, std::string(call) + " failed: " + text, "");
  }
}

std::string seconds_text(double ms) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.1f s", ms / 1000.0);
  return buf;
}

}  // namespace

NcclTransport::NcclTransport(MPI_Comm comm, int device, cudaStream_t compute_stream, double timeout_ms)
    : device_(device), compute_stream_(compute_stream) {
  timeout_ms_.store(timeout_ms > 0 ? timeout_ms : kDefaultTimeoutMs);
  check_mpi(MPI_Comm_rank(comm, &rank_), "MPI_Comm_rank");
  check_mpi(MPI_Comm_size(comm, &world_), "MPI_Comm_size");
  next_ = (rank_ + 1) % world_;
  prev_ = (rank_ + world_ - 1) % world_;
  RINGATTN_CHECK(compute_stream_ != nullptr, ErrorKind::kInternal, "NCCL transport needs the backend's compute stream",
                 "build the CUDA backend before the transport");

  // "host pid" of every rank, so a timeout can say who the silent peer is.
  char mine[kHostRecordBytes] = {0};
  std::snprintf(mine, sizeof(mine), "host %s pid %d", process_context().host.c_str(), static_cast<int>(getpid()));
  std::vector<char> all(static_cast<std::size_t>(kHostRecordBytes) * world_);
  check_mpi(MPI_Allgather(mine, kHostRecordBytes, MPI_CHAR, all.data(), kHostRecordBytes, MPI_CHAR, comm),
            "MPI_Allgather of host names");
  for (int r = 0; r < world_; ++r) {
    const char* rec = all.data() + static_cast<std::size_t>(r) * kHostRecordBytes;
    peers_.emplace_back(rec, strnlen(rec, kHostRecordBytes));
  }

  create_streams_and_events();

  // More p2p channels per send/recv from 3 ranks up (comm/nccl_env.hpp), before NCCL's first call.
  apply_nccl_p2p_channel_default(world_);

  ncclUniqueId id;
  std::memset(&id, 0, sizeof(id));
  if (rank_ == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) {
      fail(ErrorKind::kComm, std::string("ncclGetUniqueId failed: ") + ncclGetErrorString(r),
           "set NCCL_DEBUG=WARN for details; NCCL_SOCKET_IFNAME may need to name a reachable interface");
    }
  }
  check_mpi(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm), "MPI_Bcast of the NCCL unique id");
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // no NCCL call may block the host: waits are ours, with a deadline
  // RINGATTN_NCCL_MAX_CTAS caps the CTAs (channels) NCCL may use, i.e. the SMs the exchange takes
  // from the attention kernel while they overlap (see docs/BENCHMARKS.md).
  if (const char* env = std::getenv("RINGATTN_NCCL_MAX_CTAS")) {
    const int v = std::atoi(env);
    RINGATTN_CHECK(v > 0, ErrorKind::kInvalidArgument, std::string("RINGATTN_NCCL_MAX_CTAS=") + env + " is not positive",
                   "unset it, or pass a CTA count such as 4");
    config.maxCTAs = v;
    config.minCTAs = 1;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    const ncclResult_t r = ncclCommInitRankConfig(&comm_, world_, id, rank_, &config);
    if (r != ncclSuccess && r != ncclInProgress) {
      fail(ErrorKind::kComm, std::string("ncclCommInitRankConfig failed: ") + ncclGetErrorString(r),
           "set NCCL_DEBUG=WARN for details");
    }
    settle_locked("ncclCommInitRankConfig", -1);
  }
  // Ranks of one host move the data by copy engines (no SM taken from the attention kernels) unless
  // RINGATTN_COPY_ENGINE=0; a set-up that fails on any rank leaves every rank on NCCL's kernels.
  if (CopyEngineRing::wanted(comm, world_)) {
    try {
      ce_ = std::make_unique<CopyEngineRing>(comm, rank_, world_, compute_stream_, static_cast<int>(slots_.size()));
    } catch (const Error& e) {
      if (rank_ == 0) {
        std::fprintf(stderr, "ringattn: %s copy-engine exchange unavailable (%s); NCCL kernels move the data\n",
                     context_prefix().c_str(), e.what());
      }
    }
  }
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

NcclTransport::NcclTransport(ncclComm_t borrowed, cudaStream_t compute_stream, double timeout_ms)
    : owns_comm_(false), compute_stream_(compute_stream) {
  timeout_ms_.store(timeout_ms > 0 ? timeout_ms : kDefaultTimeoutMs);
  RINGATTN_CHECK(borrowed != nullptr, ErrorKind::kInvalidArgument, "NCCL transport given a null communicator",
                 "pass the host program's initialised ncclComm_t");
  RINGATTN_CHECK(compute_stream_ != nullptr, ErrorKind::kInvalidArgument,
                 "NCCL transport given a null compute stream", "pass the stream given to make_cuda_backend");
  comm_ = borrowed;
  auto nccl = [](ncclResult_t r, const char* call) {
    if (r != ncclSuccess) fail(ErrorKind::kComm, std::string(call) + " failed: " + ncclGetErrorString(r), "");
  };
  nccl(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
  nccl(ncclCommCount(comm_, &world_), "ncclCommCount");
  nccl(ncclCommCuDevice(comm_, &device_), "ncclCommCuDevice");
  next_ = (rank_ + 1) % world_;
  prev_ = (rank_ + world_ - 1) % world_;
  peers_.assign(static_cast<std::size_t>(world_), "of the host program's communicator");
  create_streams_and_events();
  watchdog_ = std::thread([this] { watchdog_loop(); });
}

void NcclTransport::create_streams_and_events() {
  check_cuda(cudaSetDevice(device_), "cudaSetDevice");
  int lo = 0, hi = 0;
  check_cuda(cudaDeviceGetStreamPriorityRange(&lo, &hi), "cudaDeviceGetStreamPriorityRange");
  // Highest priority: the NCCL kernels get SMs as soon as any frees up, instead of queueing
  // behind the whole attention grid.
  check_cuda(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, hi), "cudaStreamCreateWithPriority");
  check_cuda(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), "cudaEventCreate");
  // A pass posts at most `world` exchanges (backward: world, dK/dV travel home); keep two
  // passes' worth so a slot is never reused while it can still be pending.
  slots_.resize(static_cast<std::size_t>(2 * world_ + 2));
  for (Slot& s : slots_) {
    check_cuda(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
    check_cuda(cudaEventCreateWithFlags(&s.fence, cudaEventDisableTiming), "cudaEventCreate");
  }
  const int agree_init[2] = {1, 0};
  check_cuda(cudaMalloc(&agree_dev_, sizeof(agree_init)), "cudaMalloc (end-of-pass agreement)");
  check_cuda(cudaMemcpy(agree_dev_, agree_init, sizeof(agree_init), cudaMemcpyHostToDevice), "cudaMemcpy");
  check_cuda(cudaMallocHost(&agree_host_, sizeof(int)), "cudaMallocHost (end-of-pass agreement)");
  check_cuda(cudaEventCreateWithFlags(&agree_done_, cudaEventDisableTiming), "cudaEventCreate");
}

NcclTransport::~NcclTransport() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (watchdog_.joinable()) watchdog_.join();
  cudaSetDevice(device_);
  if (comm_ != nullptr && !aborted_.load() && !owns_comm_) {
    // A borrowed communicator stays the host program's: drain what is in flight (with the
    // deadline) and leave it alive.
    const auto deadline = Clock::now() + timeout();
    for (Slot& s : slots_) {
      while (s.pending && cudaEventQuery(s.done) == cudaErrorNotReady && Clock::now() < deadline) {
        std::this_thread::sleep_for(kSettlePoll);
      }
    }
    while (agree_done_ && cudaEventQuery(agree_done_) == cudaErrorNotReady && Clock::now() < deadline) {
      std::this_thread::sleep_for(kSettlePoll);
    }
    comm_ = nullptr;
  }
  if (comm_ != nullptr && !aborted_.load()) {
    // Drain what is still in flight (with the deadline), then finalize; abort if anything hangs.
    bool clean = true;
    const auto deadline = Clock::now() + timeout();
    for (Slot& s : slots_) {
      while (s.pending && cudaEventQuery(s.done) == cudaErrorNotReady) {
        if (Clock::now() > deadline) { clean = false; break; }
        std::this_thread::sleep_for(kSettlePoll);
      }
      if (!clean) break;
    }
    while (clean && agree_done_ && cudaEventQuery(agree_done_) == cudaErrorNotReady) {
      if (Clock::now() > deadline) clean = false;
      std::this_thread::sleep_for(kSettlePoll);
    }
    if (clean) {
      ncclResult_t r = ncclCommFinalize(comm_);
      ncclResult_t state = r;
      while (state == ncclInProgress && Clock::now() < deadline) {
        std::this_thread::sleep_for(kSettlePoll);
        if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess) break;
      }
      clean = (r == ncclSuccess || r == ncclInProgress) && state == ncclSuccess;
    }
    if (clean) {
      ncclCommDestroy(comm_);
    } else {
      std::fprintf(stderr, "ringattn: %s NCCL communicator did not finalize within %s; aborting it\n",
                   context_prefix().c_str(), seconds_text(timeout_ms_.load()).c_str());
      ncclCommAbort(comm_);
    }
    comm_ = nullptr;
  }
  ce_.reset();  // after the drains above; before the streams and events its work was queued on
  for (Slot& s : slots_) {
    if (s.done) cudaEventDestroy(s.done);
    if (s.fence) cudaEventDestroy(s.fence);
  }
  if (ready_) cudaEventDestroy(ready_);
  if (agree_done_) cudaEventDestroy(agree_done_);
  if (agree_dev_) cudaFree(agree_dev_);
  if (agree_host_) cudaFreeHost(agree_host_);
  if (comm_stream_) cudaStreamDestroy(comm_stream_);
}

std::chrono::milliseconds NcclTransport::timeout() const {
  return std::chrono::milliseconds(static_cast<int64_t>(timeout_ms_.load()));
}

void NcclTransport::set_timeout_ms(double ms) {
  RINGATTN_CHECK(ms > 0, ErrorKind::kInvalidArgument, "timeout " + std::to_string(ms) + " ms is not positive",
                 "pass -T with a positive number of seconds");
  timeout_ms_.store(ms);
}

std::string NcclTransport::peer_text(int peer) const {
  std::string s = "rank " + std::to_string(peer);
  if (peer >= 0 && peer < static_cast<int>(peers_.size())) s += " (" + peers_[peer] + ")";
  return s;
}

std::string NcclTransport::ring_route() const {
  return " (send to " + peer_text(next_) + ", receive from " + peer_text(prev_) + ")";
}

std::string NcclTransport::route_of(const Slot& slot) const {
  return slot.route.empty() ? ring_route() : slot.route;
}

std::string NcclTransport::peer_route(const PeerExchange& exchange) const {
  auto list = [this](const std::vector<PeerMessage>& messages) {
    std::vector<bool> named(static_cast<std::size_t>(world_), false);
    std::string text;
    for (const PeerMessage& m : messages) {
      if (m.peer < 0 || m.peer >= world_ || named[m.peer]) continue;
      named[m.peer] = true;
      text += (text.empty() ? "" : ", ") + peer_text(m.peer);
    }
    return text.empty() ? std::string("none") : text;
  };
  return " (send to " + list(exchange.sends) + "; receive from " + list(exchange.recvs) + ")";
}

void NcclTransport::check() const {
  if (failed_.load()) {
    std::lock_guard<std::mutex> lock(mu_);
    throw Error(ErrorKind::kComm, failure_);
  }
}

void NcclTransport::fail_locked(const std::string& message) {
  if (failed_.load()) return;
  failure_ = context_prefix() + " " + message;
  if (failure_flag_ != nullptr) {
    // Before the abort: the kernels it ends are followed on the stream by a guard that reads it.
    *failure_flag_ = 1;
    std::atomic_thread_fence(std::memory_order_seq_cst);
  }
  failed_.store(true);
  if (comm_ != nullptr && !aborted_.load()) {
    // Ends the NCCL kernels in flight, so streams (and host threads synchronising on them) drain.
    ncclCommAbort(comm_);
    aborted_.store(true);
  }
}

void NcclTransport::settle_locked(const char* what, int hop, const std::string& route) {
  const auto deadline = Clock::now() + timeout();
  ncclResult_t state = ncclInProgress;
  while (true) {
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) state = r;
    if (state != ncclInProgress) break;
    if (Clock::now() > deadline) break;
    std::this_thread::sleep_for(kSettlePoll);
  }
  if (state == ncclSuccess) return;
  std::string where = hop >= 0 ? "hop " + std::to_string(hop) + ": " : "";
  const std::string peers = route.empty() ? ring_route() : route;
  std::string msg;
  if (state == ncclInProgress) {
    msg = where + std::string(what) + " did not complete within " + seconds_text(timeout_ms_.load()) + peers +
          "; a peer is stalled or dead; communicator aborted";
  } else {
    msg = where + std::string(what) + " failed: " + ncclGetErrorString(state) + peers + "; communicator aborted";
  }
  fail_locked(msg + " (hint: set NCCL_DEBUG=WARN; raise -T if a step legitimately takes longer)");
  throw Error(ErrorKind::kComm, failure_);
}

NcclTransport::Slot& NcclTransport::acquire_slot_locked(std::unique_lock<std::mutex>& lock, int hop) {
  if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
  RINGATTN_CHECK(hop >= 0, ErrorKind::kInternal, "negative hop " + std::to_string(hop), "");
  Slot& slot = slot_for(hop);
  if (slot.pending && embedded_) slot.pending = false;  // see enable_embedded()
  if (slot.pending) {
    // Only possible when a caller posts more than two passes' hops without waiting: let it drain.
    const auto deadline = Clock::now() + timeout();
    while (cudaEventQuery(slot.done) == cudaErrorNotReady) {
      if (Clock::now() > deadline) {
        fail_locked("hop " + std::to_string(slot.hop) + ": exchange still pending when hop " + std::to_string(hop) +
                    " needs its slot" + route_of(slot));
        throw Error(ErrorKind::kComm, failure_);
      }
      lock.unlock();
      std::this_thread::sleep_for(kSettlePoll);
      lock.lock();
      if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
    }
    slot.pending = false;
  }
  return slot;
}

void NcclTransport::order_after_compute_locked(Slot& slot, int hop) {
  // Sends must see finished data; receives must not overwrite a buffer that compute still reads:
  // the comm stream waits for the compute stream up to this hop's fence (or up to now).
  if (slot.fence_hop == hop) {
    check_cuda(cudaStreamWaitEvent(comm_stream_, slot.fence, 0), "cudaStreamWaitEvent (comm waits for fence)");
    slot.fence_hop = -1;
  } else {
    check_cuda(cudaEventRecord(ready_, compute_stream_), "cudaEventRecord (compute -> comm)");
    check_cuda(cudaStreamWaitEvent(comm_stream_, ready_, 0), "cudaStreamWaitEvent (comm waits for compute)");
  }
}

void NcclTransport::start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                                          const ExchangePrologue& before) {
  std::unique_lock<std::mutex> lock(mu_);
  Slot& slot = acquire_slot_locked(lock, hop);
  order_after_compute_locked(slot, hop);
  // The prologue's work runs on the comm stream ahead of the transfer, beside the compute enqueued
  // after the fence (it only enqueues, so calling it under the lock is cheap).
  if (before) before(comm_stream_);
  if (ce_) {
    try {
      ce_->post(seq_, parts, num_parts, comm_stream_, ce_poll(lock, Clock::now() + timeout(), hop));
    } catch (const Error& e) {  // the ranks are out of step now: every later call fails
      fail_locked("hop " + std::to_string(hop) + ": " + e.what());
      ce_->cancel();
      throw Error(ErrorKind::kComm, failure_);
    }
    check_cuda(cudaEventRecord(slot.done, comm_stream_), "cudaEventRecord (exchange done)");
    slot.hop = hop;
    slot.seq = seq_++;
    slot.pending = true;
    slot.posted = Clock::now();
    slot.route.clear();  // the ring's: named on failure only
    lock.unlock();
    cv_.notify_all();
    return;
  }
  // Byte counts with ncclInt8: counts are elements of the datatype, here bytes.
  // Several sends to one peer inside a group are matched in order, so piece i lands in its recv.
  ncclResult_t r = ncclGroupStart();
  for (int part = 0; part < num_parts; ++part) {
    const std::size_t bytes = parts[part].bytes;
    if (r == ncclSuccess || r == ncclInProgress) {
      r = ncclSend(parts[part].send, bytes, ncclInt8, next_, comm_, comm_stream_);
    }
    if (r == ncclSuccess || r == ncclInProgress) {
      r = ncclRecv(parts[part].recv, bytes, ncclInt8, prev_, comm_, comm_stream_);
    }
  }
  const ncclResult_t end = ncclGroupEnd();
  if (r == ncclSuccess || r == ncclInProgress) r = end;
  if (r != ncclSuccess && r != ncclInProgress) {
    fail_locked("hop " + std::to_string(hop) + ": posting the NCCL exchange failed: " + ncclGetErrorString(r) +
                ring_route());
    throw Error(ErrorKind::kComm, failure_);
  }
  // Non-blocking communicator: the kernels are on the stream only once the group has settled
  // (the first hop also connects to the peers here).
  settle_locked("NCCL exchange", hop);
  check_cuda(cudaEventRecord(slot.done, comm_stream_), "cudaEventRecord (exchange done)");
  slot.hop = hop;
  slot.pending = true;
  slot.posted = Clock::now();
  slot.route.clear();  // the ring's: named on failure only
  lock.unlock();
  cv_.notify_all();
}

void NcclTransport::start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before) {
  std::unique_lock<std::mutex> lock(mu_);
  for (const auto* list : {&exchange.sends, &exchange.recvs}) {
    for (const PeerMessage& m : *list) {
      RINGATTN_CHECK(m.peer >= 0 && m.peer < world_, ErrorKind::kInternal,
                     "peer exchange of hop " + std::to_string(hop) + " names rank " + std::to_string(m.peer) +
                         " of a ring of " + std::to_string(world_),
                     "the plan names peers in [0, world)");
    }
  }
  Slot& slot = acquire_slot_locked(lock, hop);
  // A fence of this hop marked the copy-engine ring's next receive buffers free; this exchange is
  // not that ring's, so the ring's next post records its own free point.
  if (ce_ && slot.fence_hop == hop) ce_->unmark_free(seq_);
  order_after_compute_locked(slot, hop);
  if (before) before(comm_stream_);
  const std::string route = peer_route(exchange);
  if (!exchange.empty()) {
    // NCCL's kernels, never the copy engines (they reach the ring neighbour only). Byte counts with
    // ncclInt8; receives and sends of one group, so no order of peers can deadlock; several
    // messages of one pair match in posting order. Empty pieces are skipped on both sides alike
    // (the plan gives both the same sizes).
    ncclResult_t r = ncclGroupStart();
    auto ok = [&r] { return r == ncclSuccess || r == ncclInProgress; };
    for (const PeerMessage& m : exchange.recvs) {
      for (const PeerPiece& p : m.pieces) {
        if (ok() && p.bytes > 0) r = ncclRecv(p.data, p.bytes, ncclInt8, m.peer, comm_, comm_stream_);
      }
    }
    for (const PeerMessage& m : exchange.sends) {
      for (const PeerPiece& p : m.pieces) {
        if (ok() && p.bytes > 0) r = ncclSend(p.data, p.bytes, ncclInt8, m.peer, comm_, comm_stream_);
      }
    }
    const ncclResult_t end = ncclGroupEnd();
    if (ok()) r = end;
    if (!ok()) {
      fail_locked("hop " + std::to_string(hop) + ": posting the NCCL peer exchange failed: " +
                  ncclGetErrorString(r) + route);
      throw Error(ErrorKind::kComm, failure_);
    }
    settle_locked("NCCL peer exchange", hop, route);
    kernel_exchange_in_pass_ = true;
  }
  check_cuda(cudaEventRecord(slot.done, comm_stream_), "cudaEventRecord (exchange done)");
  slot.hop = hop;
  slot.seq = -1;  // not an exchange of the copy-engine ring: wait() has nothing to ask it
  slot.pending = true;
  slot.posted = Clock::now();
  slot.route = route;
  lock.unlock();
  cv_.notify_all();
}

void NcclTransport::fence(int hop) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
  Slot& slot = slot_for(hop);
  // Re-recording is safe even while an older hop of this slot is pending: its comm-stream wait
  // captured the event when it was posted.
  check_cuda(cudaEventRecord(slot.fence, compute_stream_), "cudaEventRecord (fence)");
  slot.fence_hop = hop;
  if (ce_) ce_->mark_free(seq_);  // this hop's exchange will be number seq_
}

void NcclTransport::wait(int hop) {
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
  if (hop >= 0) {
    Slot& slot = slot_for(hop);
    RINGATTN_CHECK(slot.hop == hop, ErrorKind::kInternal,
                   "wait for hop " + std::to_string(hop) + " that was never started", "");
    if (ce_ && slot.seq >= 0) {  // rank-1's data landed (a ring exchange on the copy engines)
      try {
        ce_->wait(slot.seq, ce_poll(lock, Clock::now() + timeout(), hop));
      } catch (const Error& e) {
        fail_locked("hop " + std::to_string(hop) + ": " + e.what());
        ce_->cancel();
        throw Error(ErrorKind::kComm, failure_);
      }
    }
    check_cuda(cudaStreamWaitEvent(compute_stream_, slot.done, 0), "cudaStreamWaitEvent (compute waits for comm)");
    return;
  }
  // Host-side drain: every posted exchange complete (the watchdog enforces the deadline).
  while (true) {
    bool pending = false;
    for (Slot& s : slots_) {
      if (!s.pending) continue;
      const cudaError_t e = cudaEventQuery(s.done);
      if (e == cudaSuccess) {
        s.pending = false;
      } else if (e == cudaErrorNotReady) {
        pending = true;
      } else {
        fail_locked("hop " + std::to_string(s.hop) + ": " + cudaGetErrorString(e));
        throw Error(ErrorKind::kComm, failure_);
      }
    }
    if (!pending) return;
    lock.unlock();
    std::this_thread::sleep_for(kSettlePoll);
    lock.lock();
    if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
  }
}

CopyEngineRing::Poll NcclTransport::ce_poll(std::unique_lock<std::mutex>& lock, Clock::time_point deadline, int hop) {
  return [this, &lock, deadline, hop](const std::string& waiting_for) {
    lock.unlock();
    std::this_thread::sleep_for(kSettlePoll);
    lock.lock();
    if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
    if (Clock::now() > deadline) {
      fail_locked("hop " + std::to_string(hop) + ": copy-engine exchange timed out after " +
                  seconds_text(timeout_ms_.load()) + " waiting for " + waiting_for + " (send to " + peer_text(next_) +
                  ", receive from " + peer_text(prev_) + "); a peer is stalled or dead "
                  "(hint: raise -T if one step legitimately takes longer)");
      ce_->cancel();
      throw Error(ErrorKind::kComm, failure_);
    }
  };
}

void NcclTransport::end_pass(const std::function<void()>& meanwhile) {
  // Copy engines: each arrival is a message from the peer that sent it; a peer exchange in the pass
  // ran on NCCL's kernels, which prove nothing of the kind, so it is confirmed like a kernel ring.
  const bool kernels = kernel_exchange_in_pass_;
  kernel_exchange_in_pass_ = false;
  if ((ce_ && !kernels) || world_ < 2) {
    meanwhile();
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
  const std::string ring = " (send to " + peer_text(next_) + ", receive from " + peer_text(prev_) + ")";
  check_cuda(cudaMemsetAsync(agree_dev_ + 1, 0, sizeof(int), comm_stream_), "cudaMemsetAsync (agreement)");
  const ncclResult_t r = ncclAllReduce(agree_dev_, agree_dev_ + 1, 1, ncclInt32, ncclSum, comm_, comm_stream_);
  if (r != ncclSuccess && r != ncclInProgress) {
    fail_locked("after the last hop: posting the end-of-pass agreement failed: " + std::string(ncclGetErrorString(r)) +
                ring);
    throw Error(ErrorKind::kComm, failure_);
  }
  settle_locked("the end-of-pass agreement after the last hop", -1);
  check_cuda(cudaMemcpyAsync(agree_host_, agree_dev_ + 1, sizeof(int), cudaMemcpyDeviceToHost, comm_stream_),
             "cudaMemcpyAsync (agreement)");
  check_cuda(cudaEventRecord(agree_done_, comm_stream_), "cudaEventRecord (agreement)");
  lock.unlock();
  meanwhile();
  lock.lock();
  // The deadline counts from the caller's own synchronisation: the ring's ranks finish their last
  // step within one step of each other, and a step may take up to the timeout.
  const auto deadline = Clock::now() + timeout();
  while (true) {
    if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
    const cudaError_t e = cudaEventQuery(agree_done_);
    if (e == cudaSuccess) break;
    if (e != cudaErrorNotReady) {
      fail_locked("after the last hop: the end-of-pass agreement failed: " + std::string(cudaGetErrorString(e)) + ring);
      throw Error(ErrorKind::kComm, failure_);
    }
    if (Clock::now() > deadline) {
      fail_locked("after the last hop: the end-of-pass agreement did not complete within " +
                  seconds_text(timeout_ms_.load()) + ring +
                  "; a peer failed or stalled during the pass, so this rank's result is not trusted; communicator "
                  "aborted (hint: raise -T if one step legitimately takes longer)");
      throw Error(ErrorKind::kComm, failure_);
    }
    lock.unlock();
    std::this_thread::sleep_for(kSettlePoll);
    lock.lock();
  }
  if (*agree_host_ != world_) {
    fail_locked("after the last hop: " + std::to_string(*agree_host_) + " of " + std::to_string(world_) +
                " ranks confirmed the pass" + ring + "; a peer failed during the pass; communicator aborted");
    throw Error(ErrorKind::kComm, failure_);
  }
}

void NcclTransport::abort(const std::string& why) {
  std::lock_guard<std::mutex> lock(mu_);
  fail_locked("aborted: " + why);
}

void NcclTransport::watchdog_loop() {
  cudaSetDevice(device_);
  std::unique_lock<std::mutex> lock(mu_);
  // Progress clock: a hop can only start once the one before it finished, so its age counts from
  // the later of its posting and the last completion seen.
  Clock::time_point last_progress = Clock::now();
  while (!stop_) {
    cv_.wait_for(lock, kWatchdogPeriod);
    if (stop_ || failed_.load()) continue;
    const Slot* oldest = nullptr;
    agree_slot_.done = agree_done_;
    for (std::size_t i = 0; i <= slots_.size(); ++i) {
      Slot& s = i < slots_.size() ? slots_[i] : agree_slot_;  // the last: an embedded pass's agreement
      if (!s.pending) continue;
      const cudaError_t e = cudaEventQuery(s.done);
      if (e == cudaSuccess) {
        s.pending = false;
        last_progress = Clock::now();
      } else if (e == cudaErrorNotReady) {
        if (!oldest || s.posted < oldest->posted) oldest = &s;
      } else {
        fail_locked(hop_text(s.hop) + ": CUDA error on the communication stream: " + cudaGetErrorString(e));
      }
    }
    if (failed_.load()) break;
    ncclResult_t state = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
    if (r != ncclSuccess) state = r;
    if (state != ncclSuccess && state != ncclInProgress) {
      const int hop = oldest ? oldest->hop : -1;
      fail_locked((oldest && hop < 0 ? hop_text(hop) : "hop " + std::to_string(hop)) + ": NCCL reported " +
                  ncclGetErrorString(state) +
                  (oldest ? route_of(*oldest) : ring_route()) + "; communicator aborted");
    } else if (oldest) {
      const auto start = std::max(oldest->posted, last_progress);
      if (Clock::now() - start > timeout()) {
        fail_locked(hop_text(oldest->hop) + ": NCCL exchange timed out after " +
                    seconds_text(timeout_ms_.load()) + route_of(*oldest) +
                    ", never completed; a peer is stalled or dead; communicator aborted "
                    "(hint: raise -T if one step legitimately takes longer)");
      }
    }
    if (failed_.load()) {
      std::fprintf(stderr, "ringattn: watchdog: %s\n", failure_.c_str());
      std::fflush(stderr);
      break;
    }
  }
}

bool NcclTransport::enable_embedded(std::string* why) {
  std::lock_guard<std::mutex> lock(mu_);
  if (ce_) {
    if (why) {
      *why = "its ring moves data by copy engines, which need IPC-mapped cudaMalloc memory and host messages per "
             "hop; embedded passes run on NCCL's kernels";
    }
    return false;
  }
  embedded_ = true;
  return true;
}

void NcclTransport::set_compute_stream(void* stream) {
  std::lock_guard<std::mutex> lock(mu_);
  compute_stream_ = stream != nullptr ? static_cast<cudaStream_t>(stream) : cudaStreamLegacy;  // as the backend's
}

void NcclTransport::set_failure_flag(volatile int* flag) {
  std::lock_guard<std::mutex> lock(mu_);
  failure_flag_ = flag;
  if (flag != nullptr && failed_.load()) *flag = 1;
}

std::string NcclTransport::failure() const {
  if (!failed_.load()) return {};
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

Transport::Verdict NcclTransport::end_pass_async() {
  std::unique_lock<std::mutex> lock(mu_);
  if (failed_.load()) throw Error(ErrorKind::kComm, failure_);
  kernel_exchange_in_pass_ = false;
  if (world_ < 2) return {};
  // Behind the pass's last exchange on the comm stream, as in end_pass(); the compute stream
  // (the caller's) then waits for it, which joins every exchange of the pass into it.
  check_cuda(cudaMemsetAsync(agree_dev_ + 1, 0, sizeof(int), comm_stream_), "cudaMemsetAsync (agreement)");
  const ncclResult_t r = ncclAllReduce(agree_dev_, agree_dev_ + 1, 1, ncclInt32, ncclSum, comm_, comm_stream_);
  if (r != ncclSuccess && r != ncclInProgress) {
    fail_locked("after the last hop: posting the end-of-pass agreement failed: " + std::string(ncclGetErrorString(r)) +
                ring_route());
    throw Error(ErrorKind::kComm, failure_);
  }
  settle_locked("the end-of-pass agreement after the last hop", -1);
  check_cuda(cudaEventRecord(agree_done_, comm_stream_), "cudaEventRecord (agreement)");
  check_cuda(cudaStreamWaitEvent(compute_stream_, agree_done_, 0), "cudaStreamWaitEvent (compute joins the agreement)");
  agree_slot_.hop = -1;
  agree_slot_.pending = true;
  agree_slot_.posted = Clock::now();
  agree_slot_.route.clear();
  lock.unlock();
  cv_.notify_all();
  return {agree_dev_ + 1, world_};
}

std::string NcclTransport::hop_text(int hop) { return hop >= 0 ? "hop " + std::to_string(hop) : "end-of-pass agreement"; }

void check_transport(const Transport& transport) {
  if (const auto* nccl = dynamic_cast<const NcclTransport*>(&transport)) nccl->check();
}

std::unique_ptr<Transport> make_nccl_transport_borrowed(void* nccl_comm, void* compute_stream, double timeout_ms) {
  return std::make_unique<NcclTransport>(static_cast<ncclComm_t>(nccl_comm), static_cast<cudaStream_t>(compute_stream),
                                         timeout_ms);
}

std::unique_ptr<Transport> make_nccl_transport(MPI_Comm comm, int device, void* compute_stream) {
  return std::make_unique<NcclTransport>(comm, device, static_cast<cudaStream_t>(compute_stream),
                                         kDefaultTimeoutMs);
}

}  // namespace ringattn
