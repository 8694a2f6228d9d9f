// Loopback transport in host memory: ring and peer exchanges between threads land every byte; a silent rank or an abort fails the others in time.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "../common/peer_cases.hpp"
#include "ringattn/error.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {
namespace {

constexpr int kMaxWorld = 4;
constexpr double kShortTimeoutMs = 200.0;
constexpr double kFailWithinMs = 5000.0;  // a failure must arrive well before this (no hang)

// Runs `body(rank, transport)` on one thread per rank; returns each rank's exception (or null).
std::vector<std::exception_ptr> run_ranks(std::vector<std::unique_ptr<Transport>>& transports,
                                          const std::function<void(int, Transport&)>& body) {
  std::vector<std::exception_ptr> errors(transports.size());
  std::vector<std::thread> threads;
  for (std::size_t r = 0; r < transports.size(); ++r) {
    threads.emplace_back([&, r] {
      try {
        body(static_cast<int>(r), *transports[r]);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  return errors;
}

std::string error_text(const std::exception_ptr& e) {
  if (!e) return "";
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    return x.what();
  }
  return "unknown exception";
}

ErrorKind error_kind(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const Error& x) {
    return x.kind();
  } catch (...) {
  }
  return ErrorKind::kInternal;
}

void expect_no_errors(const std::vector<std::exception_ptr>& errors) {
  for (std::size_t r = 0; r < errors.size(); ++r) EXPECT_FALSE(errors[r]) << "rank " << r << ": " << error_text(errors[r]);
}

TEST(LoopbackTransport, NamesItsRanks) {
  auto transports = make_loopback_transports(3);
  ASSERT_EQ(transports.size(), 3u);
  for (int r = 0; r < 3; ++r) {
    EXPECT_STREQ(transports[r]->name(), "loopback");
    EXPECT_EQ(transports[r]->rank(), r);
    EXPECT_EQ(transports[r]->world(), 3);
    EXPECT_TRUE(transports[r]->supports_peer_exchange());
  }
}

TEST(LoopbackTransport, RejectsBadArguments) {
  EXPECT_THROW(make_loopback_transports(0), Error);
  EXPECT_THROW(make_loopback_transports(2, {nullptr}), Error);
  EXPECT_THROW(make_loopback_transports(2, {}, 0.0), Error);
}

// After k hops of the ring, rank r holds the pieces rank r-k wrote; the prologue runs on the
// posting thread before the transfer.
TEST(LoopbackTransport, RingPiecesTravelOneRankPerHop) {
  for (int world = 1; world <= kMaxWorld; ++world) {
    auto transports = make_loopback_transports(world);
    const std::size_t sizes[3] = {17, 0, 4099};  // odd sizes, and an empty piece
    auto fill = [](int owner, int piece, std::vector<unsigned char>& buf) {
      for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>((owner * 131 + piece * 29 + i * 7) & 0xFF);
    };
    auto errors = run_ranks(transports, [&](int rank, Transport& t) {
      std::vector<unsigned char> a[3], b[3];
      for (int i = 0; i < 3; ++i) {
        a[i].resize(sizes[i]);
        b[i].assign(sizes[i], 0xEE);
        fill(rank, i, a[i]);
      }
      for (int k = 1; k <= world + 1; ++k) {
        const ExchangePart parts[3] = {{a[0].data(), b[0].data(), sizes[0]},
                                       {a[1].data(), b[1].data(), sizes[1]},
                                       {a[2].data(), b[2].data(), sizes[2]}};
        bool ran = false;
        t.start_exchange_pieces(parts, 3, k, [&](void* stream) {
          EXPECT_EQ(stream, nullptr);
          ran = true;
        });
        EXPECT_TRUE(ran) << "the prologue had not run when the exchange was posted";
        t.wait(k);
        const int owner = ((rank - k) % world + world) % world;
        for (int i = 0; i < 3; ++i) {
          std::vector<unsigned char> want(sizes[i]);
          fill(owner, i, want);
          EXPECT_EQ(b[i], want) << "world " << world << " rank " << rank << " hop " << k << " piece " << i;
          std::swap(a[i], b[i]);
        }
      }
    });
    expect_no_errors(errors);
  }
}

// Any set of peers per hop: asymmetric sizes, two messages of one pair, messages to self, a rank
// that only sends, an empty exchange; the hop numbers are reused by a second pass.
TEST(LoopbackTransport, PeerExchangeLandsEveryByte) {
  constexpr int kPasses = 2;
  for (int world = 1; world <= kMaxWorld; ++world) {
    auto transports = make_loopback_transports(world);
    auto errors = run_ranks(transports, [&](int rank, Transport& t) {
      std::size_t received = 0;
      for (int pass = 0; pass < kPasses; ++pass) {
        for (int hop = 0; hop < test::kPeerCaseHops; ++hop) {
          test::PeerCase c = test::make_peer_case(world, rank, hop);
          t.start_peer_exchange(c.exchange, hop);
          t.wait(hop);
          EXPECT_EQ(test::peer_case_mismatch(c), "") << "world " << world << " pass " << pass;
          received += c.expected.size();
        }
      }
      EXPECT_GT(received, 0u) << "rank " << rank << " received nothing: the case tests nothing";
    });
    expect_no_errors(errors);
  }
}

// Several hops in flight at once, waited for in order.
TEST(LoopbackTransport, PeerExchangesOfSeveralHopsOverlap) {
  constexpr int kWorld = 3;
  auto transports = make_loopback_transports(kWorld);
  auto errors = run_ranks(transports, [&](int rank, Transport& t) {
    std::vector<test::PeerCase> cases;
    for (int hop = 0; hop < test::kPeerCaseHops; ++hop) cases.push_back(test::make_peer_case(kWorld, rank, hop));
    for (int hop = 0; hop < test::kPeerCaseHops; ++hop) t.start_peer_exchange(cases[hop].exchange, hop);
    for (int hop = 0; hop < test::kPeerCaseHops; ++hop) {
      t.wait(hop);
      EXPECT_EQ(test::peer_case_mismatch(cases[hop]), "");
    }
  });
  expect_no_errors(errors);
}

// The last rank never posts: every other rank exchanges with it and fails with Error(kComm) within
// the timeout instead of hanging; the silent rank's later post fails too.
TEST(LoopbackTransport, SilentRankFailsTheOthersWithinTheTimeout) {
  for (int world = 2; world <= kMaxWorld; ++world) {
    auto transports = make_loopback_transports(world, {}, kShortTimeoutMs);
    const int silent = world - 1;
    std::vector<double> elapsed_ms(static_cast<std::size_t>(world), 0.0);
    auto errors = run_ranks(transports, [&](int rank, Transport& t) {
      if (rank == silent) return;
      std::vector<unsigned char> out(64, static_cast<unsigned char>(rank)), in(64 * world, 0);
      PeerExchange x;
      for (int peer = 0; peer < world; ++peer) {
        x.sends.push_back(PeerMessage{peer, {PeerPiece{out.data(), out.size()}}});
        x.recvs.push_back(PeerMessage{peer, {PeerPiece{in.data() + 64 * peer, 64}}});
      }
      const auto start = std::chrono::steady_clock::now();
      try {
        t.start_peer_exchange(x, 0);
        t.wait(0);
      } catch (...) {
        elapsed_ms[rank] = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        throw;
      }
    });
    for (int r = 0; r < world; ++r) {
      if (r == silent) {
        EXPECT_FALSE(errors[r]);
        continue;
      }
      ASSERT_TRUE(errors[r]) << "world " << world << " rank " << r << " did not fail";
      EXPECT_EQ(error_kind(errors[r]), ErrorKind::kComm) << error_text(errors[r]);
      EXPECT_NE(error_text(errors[r]).find("hop 0"), std::string::npos) << error_text(errors[r]);
      EXPECT_LT(elapsed_ms[r], kFailWithinMs) << "rank " << r;
    }
    PeerExchange empty;
    try {
      transports[silent]->start_peer_exchange(empty, 0);
      ADD_FAILURE() << "the silent rank could still post after the ring was aborted";
    } catch (const Error& e) {
      EXPECT_EQ(e.kind(), ErrorKind::kComm);
    }
  }
}

TEST(LoopbackTransport, TimeoutNamesTheSilentPeer) {
  auto transports = make_loopback_transports(2, {}, kShortTimeoutMs);
  std::vector<unsigned char> in(8);
  PeerExchange x;
  x.recvs.push_back(PeerMessage{1, {PeerPiece{in.data(), in.size()}}});
  transports[0]->start_peer_exchange(x, 3);
  try {
    transports[0]->wait(3);
    ADD_FAILURE() << "wait returned without the peer's send";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kComm);
    const std::string what = e.what();
    EXPECT_NE(what.find("hop 3"), std::string::npos) << what;
    EXPECT_NE(what.find("rank 1"), std::string::npos) << what;
  }
}

// abort() on one rank wakes another's wait at once, long before its timeout.
TEST(LoopbackTransport, AbortWakesEveryWaiter) {
  auto transports = make_loopback_transports(2);  // the default timeout: minutes
  std::atomic<bool> posted{false};
  auto errors = run_ranks(transports, [&](int rank, Transport& t) {
    if (rank == 1) {
      while (!posted.load()) std::this_thread::yield();
      t.abort("test abort");
      return;
    }
    std::vector<unsigned char> in(8);
    PeerExchange x;
    x.recvs.push_back(PeerMessage{1, {PeerPiece{in.data(), in.size()}}});
    t.start_peer_exchange(x, 0);
    posted.store(true);
    t.wait(0);
  });
  ASSERT_TRUE(errors[0]);
  EXPECT_EQ(error_kind(errors[0]), ErrorKind::kComm);
  EXPECT_NE(error_text(errors[0]).find("test abort"), std::string::npos) << error_text(errors[0]);
  EXPECT_FALSE(errors[1]);
}

TEST(LoopbackTransport, MismatchedPieceSizesAreAnInternalError) {
  auto transports = make_loopback_transports(2, {}, kShortTimeoutMs);
  std::vector<unsigned char> a(8), b(9);
  PeerExchange send, recv;
  send.sends.push_back(PeerMessage{1, {PeerPiece{a.data(), a.size()}}});
  recv.recvs.push_back(PeerMessage{0, {PeerPiece{b.data(), b.size()}}});
  transports[0]->start_peer_exchange(send, 0);
  try {
    transports[1]->start_peer_exchange(recv, 0);
    ADD_FAILURE() << "a receive of 9 bytes matched a send of 8";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInternal);
  }
  EXPECT_THROW(transports[0]->wait(0), Error);
}

TEST(LoopbackTransport, MisuseIsAnInternalError) {
  auto transports = make_loopback_transports(2);
  try {
    transports[0]->wait(5);
    ADD_FAILURE() << "wait for a hop never posted returned";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInternal);
  }
  PeerExchange x;
  x.sends.push_back(PeerMessage{2, {}});
  try {
    transports[0]->start_peer_exchange(x, 0);
    ADD_FAILURE() << "a peer outside the ring was accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInternal);
  }
}

TEST(LocalTransport, EmptyPeerExchangeOnlyHasNoPeers) {
  auto local = make_local_transport();
  EXPECT_TRUE(local->supports_peer_exchange());
  local->start_peer_exchange(PeerExchange{}, 0);
  local->wait(0);
  std::vector<unsigned char> buf(4);
  PeerExchange x;
  x.recvs.push_back(PeerMessage{0, {PeerPiece{buf.data(), buf.size()}}});
  try {
    local->start_peer_exchange(x, 1);
    ADD_FAILURE() << "a ring of one rank accepted a peer exchange";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kInternal);
  }
}

}  // namespace
}  // namespace ringattn
