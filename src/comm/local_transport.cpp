// LocalTransport: the ring of one process, where no exchange ever happens.
#include "ringattn/error.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {
namespace {

class LocalTransport final : public Transport {
 public:
  const char* name() const override { return "local"; }
  int rank() const override { return 0; }
  int world() const override { return 1; }
  void start_exchange_pieces(const ExchangePart*, int, int hop, const ExchangePrologue&) override {
    fail(ErrorKind::kInternal, "a ring of one rank was asked to exchange at hop " + std::to_string(hop), "");
  }
  // Supported so that masked plans take the peer path on one rank too: their exchanges are empty.
  // `before` prepares data for a transfer that never happens (and this transport has no stream to
  // run device work on), so it is not called.
  bool supports_peer_exchange() const override { return true; }
  void start_peer_exchange(const PeerExchange& exchange, int hop, const ExchangePrologue& before) override {
    RINGATTN_CHECK(exchange.empty(), ErrorKind::kInternal,
                   "a ring of one rank was asked to exchange with peers at hop " + std::to_string(hop) + " (" +
                       std::to_string(exchange.sends.size()) + " sends, " + std::to_string(exchange.recvs.size()) +
                       " receives)",
                   "a plan of one rank has no peers");
    (void)before;
  }
  void wait(int) override {}
  void abort(const std::string&) override {}
  void set_timeout_ms(double) override {}
};

}  // namespace

std::unique_ptr<Transport> make_local_transport() { return std::make_unique<LocalTransport>(); }

#ifndef RINGATTN_HAVE_NCCL
std::unique_ptr<Transport> make_nccl_transport_borrowed(void*, void*, double) {
  fail(ErrorKind::kInvalidArgument, "this ringattn was built without NCCL, so it cannot ring over an NCCL communicator",
       "rebuild with CUDA, MPI and NCCL found by CMake (set NCCL_ROOT if needed)");
}
#endif

#ifndef RINGATTN_HAVE_MPI
std::unique_ptr<Transport> make_mpi_transport_borrowed(void*) {
  fail(ErrorKind::kInvalidArgument, "this ringattn was built without MPI, so it cannot ring over an MPI communicator",
       "install libopenmpi-dev and rebuild");
}
#endif

}  // namespace ringattn
