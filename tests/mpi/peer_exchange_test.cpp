// MPI peer exchange: any set of peers per hop lands every byte, mixes with ring hops, and a silent rank fails the others in time.
#include <gtest/gtest.h>
#include <mpi.h>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "../common/peer_cases.hpp"
#include "ringattn/error.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {
namespace {

constexpr double kShortTimeoutMs = 300.0;
constexpr double kFailWithinMs = 10000.0;  // timeout plus the abort's bounded drain, with slack
constexpr std::size_t kSmallMessage = 64;  // eager in Open MPI: the sends complete without a receiver

int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int mpi_world() {
  int w = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &w);
  return w;
}

std::unique_ptr<Transport> world_transport() {
  MPI_Comm host_comm = MPI_COMM_WORLD;
  return make_mpi_transport_borrowed(&host_comm);
}

// Asymmetric sizes, two messages of one pair, messages to self, a rank that only sends, an empty
// exchange; a second pass reuses the hop numbers.
TEST(MpiPeerExchange, LandsEveryByte) {
  const int world = mpi_world(), rank = mpi_rank();
  auto transport = world_transport();
  ASSERT_TRUE(transport->supports_peer_exchange());
  constexpr int kPasses = 2;
  for (int pass = 0; pass < kPasses; ++pass) {
    for (int hop = 0; hop < test::kPeerCaseHops; ++hop) {
      test::PeerCase c = test::make_peer_case(world, rank, hop);
      bool ran = false;
      transport->start_peer_exchange(c.exchange, hop, [&](void* stream) {
        EXPECT_EQ(stream, nullptr) << "a host transport runs the prologue itself";
        ran = true;
      });
      EXPECT_TRUE(ran);
      transport->wait(hop);
      EXPECT_EQ(test::peer_case_mismatch(c), "") << "pass " << pass;
    }
  }
}

// Ring hops and peer hops alternate on one transport; a fast rank's next hop never lands in a
// slow rank's current one.
TEST(MpiPeerExchange, AlternatesWithRingHops) {
  const int world = mpi_world(), rank = mpi_rank();
  auto transport = world_transport();
  constexpr int kRounds = 3;
  constexpr std::size_t kRingBytes = 1031;
  for (int round = 0; round < kRounds; ++round) {
    const int ring_hop = 2 * round, peer_hop = 2 * round + 1;
    std::vector<unsigned char> send(kRingBytes, static_cast<unsigned char>(rank + 10 * round)), recv(kRingBytes, 0);
    transport->start_exchange(send.data(), recv.data(), kRingBytes, ring_hop);
    transport->wait(ring_hop);
    const int prev = (rank + world - 1) % world;
    EXPECT_EQ(recv, std::vector<unsigned char>(kRingBytes, static_cast<unsigned char>(prev + 10 * round)));
    test::PeerCase c = test::make_peer_case(world, rank, peer_hop % test::kPeerCaseHops);
    transport->start_peer_exchange(c.exchange, peer_hop);
    transport->wait(peer_hop);
    EXPECT_EQ(test::peer_case_mismatch(c), "") << "round " << round;
  }
}

TEST(MpiPeerExchange, EmptyExchangeCompletesAtOnce) {
  auto transport = world_transport();
  transport->start_peer_exchange(PeerExchange{}, 0);
  transport->wait(0);
}

// The last rank never posts: the others, which all exchange with it, fail with Error(kComm) naming
// the hop within the timeout (abort cancels and completes their requests), and refuse later calls.
TEST(MpiPeerExchange, SilentRankFailsTheOthersWithinTheTimeout) {
  const int world = mpi_world(), rank = mpi_rank();
  if (world == 1) GTEST_SKIP() << "needs at least 2 ranks";
  auto transport = world_transport();
  transport->set_timeout_ms(kShortTimeoutMs);
  const int silent = world - 1;
  if (rank != silent) {
    std::vector<unsigned char> out(kSmallMessage, static_cast<unsigned char>(rank)), in(kSmallMessage * world, 0);
    PeerExchange x;
    for (int peer = 0; peer < world; ++peer) {
      x.sends.push_back(PeerMessage{peer, {PeerPiece{out.data(), out.size()}}});
      x.recvs.push_back(PeerMessage{peer, {PeerPiece{in.data() + kSmallMessage * peer, kSmallMessage}}});
    }
    const auto start = std::chrono::steady_clock::now();
    try {
      transport->start_peer_exchange(x, 0);
      transport->wait(0);
      ADD_FAILURE() << "rank " << rank << " completed an exchange with a silent rank";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kComm);
      const std::string what = e.what();
      EXPECT_NE(what.find("hop 0"), std::string::npos) << what;
      EXPECT_NE(what.find("rank " + std::to_string(silent)), std::string::npos) << what;
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    EXPECT_LT(ms, kFailWithinMs);
    try {
      transport->start_peer_exchange(PeerExchange{}, 1);
      ADD_FAILURE() << "an aborted transport accepted another exchange";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kComm);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);  // the silent rank stays alive until the others failed
}

TEST(MpiPeerExchange, PeerOutsideTheRingIsAnInternalError) {
  const int world = mpi_world();
  auto transport = world_transport();
  PeerExchange x;
  x.recvs.push_back(PeerMessage{world, {}});
  try {
    transport->start_peer_exchange(x, 0);
    ADD_FAILURE() << "a peer outside the ring was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInternal);
  }
}

}  // namespace
}  // namespace ringattn
