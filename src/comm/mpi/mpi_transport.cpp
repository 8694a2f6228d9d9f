// MpiTransport: the ring and peer exchanges over non-blocking MPI point-to-point on host memory, with a timeout.
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "comm/transports.hpp"
#include "ringattn/error.hpp"
#include "ringattn/session.hpp"

namespace ringattn {
namespace {

using Clock = std::chrono::steady_clock;

constexpr std::size_t kMaxMessageBytes = std::size_t{1} << 30;  // MPI counts are int: split larger messages
constexpr int kTagModulus = 30000;                               // below the smallest MPI_TAG_UB MPI allows
// How long abort lets cancelled and in-progress requests complete. Long enough for a peer that is
// slow but alive to reach its own post (then a matched transfer finishes), short enough that a
// stalled peer never holds the abort up.
constexpr auto kAbortDrain = std::chrono::milliseconds(2000);
constexpr int kPeersNamed = 4;  // pending requests a timeout message names

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return std::string(text, len);
}

// Abort: every request is cancelled, then tested until it completes, for at most kAbortDrain.
// Cancelled receives and matched transfers complete at once, so buffers are normally released
// before abort returns. What is still active after the drain (a send whose receiver never posted:
// Open MPI cannot cancel sends; a transfer cut off by a dead peer) is kept by the transport, never
// cleared, and the transport refuses every later call: MPI only touches such a buffer again if the
// peer later posts the matching operation, and a job that saw Error(kComm) ends (MPI_Abort).
class MpiTransport final : public Transport {
 public:
  explicit MpiTransport(MPI_Comm comm) {
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &world_);
  }
  ~MpiTransport() override {
    if (comm_ != MPI_COMM_NULL) {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) MPI_Comm_free(&comm_);  // deferred by MPI while orphaned requests are active
    }
  }

  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  void set_timeout_ms(double ms) override { timeout_ms_ = ms; }
  bool supports_peer_exchange() const override { return true; }

  void start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                             const ExchangePrologue& before) override {
    begin_hop(hop);
    if (before) before(nullptr);  // host memory: the prologue runs here, before the transfer is posted
    const int next = (rank_ + 1) % world_, prev = (rank_ + world_ - 1) % world_;
    // Messages of the same (peer, tag) match in posting order, so piece i lands in its recv.
    for (int part = 0; part < num_parts; ++part) {
      post_recv(prev, parts[part].recv, parts[part].bytes);
      post_send(next, parts[part].send, parts[part].bytes);
    }
  }

  // Per piece (split like the ring's), receives first. The plan gives a send's pieces the sizes of
  // the matching receive's, so both sides post the same chunks, and MPI's non-overtaking order for
  // one (source, tag) matches them (and messages of one pair) in list order.
  void start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before) override {
    begin_hop(hop);
    for (const PeerMessage& m : exchange.sends) check_peer(m.peer, "send to", hop);
    for (const PeerMessage& m : exchange.recvs) check_peer(m.peer, "receive from", hop);
    if (before) before(nullptr);
    for (const PeerMessage& m : exchange.recvs) {
      for (const PeerPiece& p : m.pieces) post_recv(m.peer, p.data, p.bytes);
    }
    for (const PeerMessage& m : exchange.sends) {
      for (const PeerPiece& p : m.pieces) post_send(m.peer, p.data, p.bytes);
    }
  }

  void wait(int hop) override {
    throw_if_aborted();
    const auto deadline = Clock::now() + std::chrono::duration<double, std::milli>(timeout_ms_);
    int done = 0;
    while (!requests_.empty()) {
      check(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE),
            "MPI_Testall");
      if (done) break;
      if (Clock::now() > deadline) {
        char after[32];
        std::snprintf(after, sizeof(after), "%g s", timeout_ms_ / 1000.0);  // 0.001 s, not "0 s"
        const std::string why =
            "exchange of hop " + std::to_string(hop) + " timed out after " + after + " waiting for " + pending_text();
        abort(why);
        fail(ErrorKind::kComm, why, "a peer rank died or is stuck; check its log, or raise the timeout (-T/--timeout)");
      }
      std::this_thread::yield();
    }
    requests_.clear();
    pending_.clear();
  }

  void abort(const std::string& why) override {
    if (aborted_.empty()) aborted_ = why.empty() ? "aborted" : why;
    for (auto& r : requests_) {
      if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
    }
    const auto deadline = Clock::now() + kAbortDrain;
    bool active = true;
    while (active) {
      active = false;
      for (auto& r : requests_) {
        if (r == MPI_REQUEST_NULL) continue;
        int flag = 0;
        if (MPI_Test(&r, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) continue;  // stays active: kept below
        active = active || !flag;
      }
      if (!active || Clock::now() > deadline) break;
      std::this_thread::yield();
    }
    std::size_t kept = 0;
    for (auto& r : requests_) {
      if (r != MPI_REQUEST_NULL) {
        orphans_.push_back(r);
        ++kept;
      }
    }
    requests_.clear();
    pending_.clear();
    if (kept > 0) {
      std::fprintf(stderr,
                   "ringattn: %s MPI abort: %zu request(s) still active after %lld ms (a peer never matched "
                   "them); the transport keeps them and refuses further exchanges: end the job\n",
                   context_prefix().c_str(), kept, static_cast<long long>(kAbortDrain.count()));
    }
  }

 private:
  // A posted request's peer, for the timeout message.
  struct Pending {
    int peer;
    bool send;
  };

  void throw_if_aborted() const {
    if (!aborted_.empty()) {
      fail(ErrorKind::kComm, "the MPI transport was aborted earlier (" + aborted_ + ")",
           "a failed exchange ends the ring; start a new job");
    }
  }

  void begin_hop(int hop) {
    throw_if_aborted();
    RINGATTN_CHECK(requests_.empty(), ErrorKind::kInternal,
                   "exchange of hop " + std::to_string(hop) + " posted while hop " + std::to_string(hop_) +
                       " is still in flight",
                   "wait for each hop before posting the next");
    hop_ = hop;
  }

  void check_peer(int peer, const char* what, int hop) const {
    RINGATTN_CHECK(peer >= 0 && peer < world_, ErrorKind::kInternal,
                   "peer exchange of hop " + std::to_string(hop) + " would " + what + " rank " +
                       std::to_string(peer) + " of a ring of " + std::to_string(world_),
                   "the plan names peers in [0, world)");
  }

  int tag() const { return hop_ % kTagModulus; }

  void post_recv(int peer, void* data, std::size_t bytes) {
    for (std::size_t off = 0; off < bytes; off += kMaxMessageBytes) {
      const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
      MPI_Request r;
      check(MPI_Irecv(static_cast<char*>(data) + off, n, MPI_BYTE, peer, tag(), comm_, &r), "MPI_Irecv");
      requests_.push_back(r);
      pending_.push_back({peer, false});
    }
  }

  void post_send(int peer, const void* data, std::size_t bytes) {
    for (std::size_t off = 0; off < bytes; off += kMaxMessageBytes) {
      const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
      MPI_Request r;
      check(MPI_Isend(static_cast<const char*>(data) + off, n, MPI_BYTE, peer, tag(), comm_, &r), "MPI_Isend");
      requests_.push_back(r);
      pending_.push_back({peer, true});
    }
  }

  // "rank 3 (receive), rank 1 (send)": the requests not yet complete, tested one by one.
  std::string pending_text() {
    std::string text;
    int named = 0;
    for (std::size_t i = 0; i < requests_.size() && named < kPeersNamed; ++i) {
      if (requests_[i] == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Test(&requests_[i], &flag, MPI_STATUS_IGNORE);
      if (flag) continue;
      text += (named ? ", rank " : "rank ") + std::to_string(pending_[i].peer) +
              (pending_[i].send ? " (send)" : " (receive)");
      ++named;
    }
    return named ? text : "the last requests";
  }

  // A failed MPI call: the requests already posted are aborted, so no buffer stays under MPI.
  void check(int code, const char* what) {
    if (code != MPI_SUCCESS) {
      const std::string why =
          std::string(what) + " failed at hop " + std::to_string(hop_) + ": " + mpi_error_string(code);
      abort(why);
      fail(ErrorKind::kComm, why, "a peer rank may have died; check the other ranks' messages");
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, world_ = 1, hop_ = -1;
  double timeout_ms_ = kDefaultTimeoutMs;
  std::vector<MPI_Request> requests_;
  std::vector<Pending> pending_;      // parallel to requests_
  std::vector<MPI_Request> orphans_;  // still active after an abort's drain: never freed (see above)
  std::string aborted_;               // set by abort: every later call throws it
};

}  // namespace

std::unique_ptr<Transport> make_mpi_transport(MPI_Comm comm) { return std::make_unique<MpiTransport>(comm); }

std::unique_ptr<Transport> make_mpi_transport_borrowed(void* mpi_comm) {
  RINGATTN_CHECK(mpi_comm != nullptr, ErrorKind::kInvalidArgument, "MPI transport given a null communicator",
                 "pass a pointer to the host program's MPI_Comm");
  return std::make_unique<MpiTransport>(*static_cast<MPI_Comm*>(mpi_comm));
}

}  // namespace ringattn
