// MpiTransport: the ring exchange over non-blocking MPI point-to-point on host memory, with a timeout.
#include <mpi.h>

#include <chrono>
#include <thread>
#include <vector>

#include "comm/transports.hpp"
#include "ringattn/error.hpp"
#include "ringattn/session.hpp"

namespace ringattn {
namespace {

constexpr std::size_t kMaxMessageBytes = std::size_t{1} << 30;  // MPI counts are int: split larger messages
constexpr int kTagModulus = 30000;

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, text, &len);
  return std::string(text, len);
}

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
      if (!finalized) MPI_Comm_free(&comm_);
    }
  }

  const char* name() const override { return "mpi"; }
  int rank() const override { return rank_; }
  int world() const override { return world_; }
  void set_timeout_ms(double ms) override { timeout_ms_ = ms; }

  void start_exchange_pieces(const ExchangePart* parts, int num_parts, int hop,
                             const ExchangePrologue& before) override {
    RINGATTN_CHECK(requests_.empty(), ErrorKind::kInternal,
                   "exchange of hop " + std::to_string(hop) + " posted while hop " + std::to_string(hop_) +
                       " is still in flight",
                   "");
    hop_ = hop;
    if (before) before(nullptr);  // host memory: the prologue runs here, before the transfer is posted
    const int next = (rank_ + 1) % world_, prev = (rank_ + world_ - 1) % world_;
    const int tag = hop % kTagModulus;
    // Messages of the same (peer, tag) match in posting order, so piece i lands in its recv.
    for (int part = 0; part < num_parts; ++part) {
      const std::size_t bytes = parts[part].bytes;
      for (std::size_t off = 0; off < bytes; off += kMaxMessageBytes) {
        const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
        MPI_Request r;
        check(MPI_Irecv(static_cast<char*>(parts[part].recv) + off, n, MPI_BYTE, prev, tag, comm_, &r), "MPI_Irecv");
        requests_.push_back(r);
        check(MPI_Isend(static_cast<const char*>(parts[part].send) + off, n, MPI_BYTE, next, tag, comm_, &r),
              "MPI_Isend");
        requests_.push_back(r);
      }
    }
  }

  void wait(int hop) override {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double, std::milli>(timeout_ms_);
    int done = 0;
    while (!requests_.empty()) {
      check(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE),
            "MPI_Testall");
      if (done) break;
      if (std::chrono::steady_clock::now() > deadline) {
        const int prev = (rank_ + world_ - 1) % world_, next = (rank_ + 1) % world_;
        const std::string why = "ring exchange of hop " + std::to_string(hop) + " timed out after " +
                                std::to_string(static_cast<long>(timeout_ms_ / 1000)) + " s waiting for rank " +
                                std::to_string(prev) + " (receive) / rank " + std::to_string(next) + " (send)";
        abort(why);
        fail(ErrorKind::kComm, why, "a peer rank died or is stuck; check its log, or raise the timeout (-T/--timeout)");
      }
      std::this_thread::yield();
    }
    requests_.clear();
  }

  void abort(const std::string&) override {
    for (auto& r : requests_) {
      if (r != MPI_REQUEST_NULL) MPI_Cancel(&r);
    }
    requests_.clear();
  }

 private:
  void check(int code, const char* what) {
    if (code != MPI_SUCCESS) {
      fail(ErrorKind::kComm, std::string(what) + " failed at hop " + std::to_string(hop_) + ": " + mpi_error_string(code),
           "a peer rank may have died; check the other ranks' messages");
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0, world_ = 1, hop_ = -1;
  double timeout_ms_ = kDefaultTimeoutMs;
  std::vector<MPI_Request> requests_;
};

}  // namespace

std::unique_ptr<Transport> make_mpi_transport(MPI_Comm comm) { return std::make_unique<MpiTransport>(comm); }

std::unique_ptr<Transport> make_mpi_transport_borrowed(void* mpi_comm) {
  RINGATTN_CHECK(mpi_comm != nullptr, ErrorKind::kInvalidArgument, "MPI transport given a null communicator",
                 "pass a pointer to the host program's MPI_Comm");
  return std::make_unique<MpiTransport>(*static_cast<MPI_Comm*>(mpi_comm));
}

}  // namespace ringattn
