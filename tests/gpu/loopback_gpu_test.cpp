// Loopback transport on one GPU: ring and peer exchanges between threads, copies ordered by events against each rank's compute stream.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "../common/peer_cases.hpp"
#include "gpu_test_util.hpp"
#include "ringattn/error.hpp"
#include "ringattn/transport.hpp"

namespace ringattn {
namespace {

constexpr int kMaxWorld = 4;
constexpr std::size_t kRingBytes = (std::size_t{1} << 20) + 3;  // odd: no alignment luck
constexpr unsigned char kPrologueByte = 0x5A;

// One compute stream per rank, destroyed at scope exit.
struct Streams {
  explicit Streams(int n) {
    for (int i = 0; i < n; ++i) {
      cudaStream_t s = nullptr;
      cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
      streams.push_back(s);
    }
  }
  ~Streams() {
    for (void* s : streams) cudaStreamDestroy(static_cast<cudaStream_t>(s));
  }
  std::vector<void*> streams;
};

std::string run_ranks(std::vector<std::unique_ptr<Transport>>& transports,
                      const std::function<void(int, Transport&, cudaStream_t)>& body, const Streams& s) {
  std::vector<std::string> errors(transports.size());
  std::vector<std::thread> threads;
  int device = 0;
  cudaGetDevice(&device);
  for (std::size_t r = 0; r < transports.size(); ++r) {
    threads.emplace_back([&, r] {
      try {
        cudaSetDevice(device);
        body(static_cast<int>(r), *transports[r], static_cast<cudaStream_t>(s.streams[r]));
      } catch (const std::exception& e) {
        errors[r] = "rank " + std::to_string(r) + ": " + e.what();
      }
    });
  }
  for (auto& t : threads) t.join();
  std::string all;
  for (const auto& e : errors) all += e.empty() ? "" : e + "\n";
  return all;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// After k hops rank r holds what rank r-k sent; the prologue runs on the exchange stream (not
// null), ahead of the copy; odd hops are fenced.
TEST(LoopbackGpu, RingPiecesTravelOneRankPerHop) {
  RINGATTN_SKIP_WITHOUT_GPU();
  for (int world = 1; world <= kMaxWorld; ++world) {
    Streams s(world);
    auto transports = make_loopback_transports(world, s.streams);
    const std::string errors = run_ranks(transports, [&](int rank, Transport& t, cudaStream_t stream) {
      void* send = nullptr;
      void* recv = nullptr;
      void* tail_send = nullptr;
      void* tail_recv = nullptr;
      check(cudaMalloc(&send, kRingBytes), "cudaMalloc");
      check(cudaMalloc(&recv, kRingBytes), "cudaMalloc");
      check(cudaMalloc(&tail_send, 1), "cudaMalloc");
      check(cudaMalloc(&tail_recv, 1), "cudaMalloc");
      std::vector<unsigned char> host(kRingBytes);
      for (int hop = 1; hop <= world + 1; ++hop) {
        const unsigned char mine = static_cast<unsigned char>(rank * 16 + hop);
        check(cudaMemsetAsync(send, mine, kRingBytes, stream), "cudaMemsetAsync");
        check(cudaMemsetAsync(recv, 0xEE, kRingBytes, stream), "cudaMemsetAsync");
        if (hop % 2 == 1) t.fence(hop);
        const ExchangePart parts[2] = {{send, recv, kRingBytes}, {tail_send, tail_recv, 1}};
        t.start_exchange_pieces(parts, 2, hop, [&](void* x) {
          EXPECT_NE(x, nullptr) << "a device transport passes its exchange stream";
          cudaMemsetAsync(tail_send, kPrologueByte + rank, 1, static_cast<cudaStream_t>(x));
        });
        t.wait(hop);
        check(cudaMemcpyAsync(host.data(), recv, kRingBytes, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
        unsigned char tail = 0;
        check(cudaMemcpyAsync(&tail, tail_recv, 1, cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        const int prev = ((rank - 1) % world + world) % world;
        const unsigned char want = static_cast<unsigned char>(prev * 16 + hop);
        EXPECT_EQ(host, std::vector<unsigned char>(kRingBytes, want)) << "world " << world << " rank " << rank
                                                                       << " hop " << hop;
        EXPECT_EQ(tail, static_cast<unsigned char>(kPrologueByte + prev)) << "the prologue's byte did not travel";
      }
      cudaFree(send);
      cudaFree(recv);
      cudaFree(tail_send);
      cudaFree(tail_recv);
    }, s);
    EXPECT_EQ(errors, "");
  }
}

// The shared peer cases (asymmetric sizes, several peers, self, send-only rank, empty exchange),
// staged through device buffers.
TEST(LoopbackGpu, PeerExchangeLandsEveryByte) {
  RINGATTN_SKIP_WITHOUT_GPU();
  for (int world = 1; world <= kMaxWorld; ++world) {
    Streams s(world);
    auto transports = make_loopback_transports(world, s.streams);
    const std::string errors = run_ranks(transports, [&](int rank, Transport& t, cudaStream_t stream) {
      for (int hop = 0; hop < test::kPeerCaseHops; ++hop) {
        test::PeerCase c = test::make_peer_case(world, rank, hop);
        PeerExchange dev = c.exchange;  // the same pieces, in device buffers
        std::vector<void*> buffers;
        auto stage = [&](std::vector<PeerMessage>& messages, const std::vector<PeerMessage>& host, bool upload) {
          for (std::size_t m = 0; m < messages.size(); ++m) {
            for (std::size_t p = 0; p < messages[m].pieces.size(); ++p) {
              void* d = nullptr;
              const std::size_t n = host[m].pieces[p].bytes;
              check(cudaMalloc(&d, n > 0 ? n : 1), "cudaMalloc");
              buffers.push_back(d);
              if (upload && n > 0) {
                check(cudaMemcpyAsync(d, host[m].pieces[p].data, n, cudaMemcpyHostToDevice, stream), "cudaMemcpyAsync");
              } else if (n > 0) {
                check(cudaMemsetAsync(d, 0xEE, n, stream), "cudaMemsetAsync");
              }
              messages[m].pieces[p].data = d;
            }
          }
        };
        stage(dev.sends, c.exchange.sends, true);
        stage(dev.recvs, c.exchange.recvs, false);
        t.start_peer_exchange(dev, hop);
        t.wait(hop);
        for (std::size_t m = 0; m < dev.recvs.size(); ++m) {
          for (std::size_t p = 0; p < dev.recvs[m].pieces.size(); ++p) {
            const PeerPiece& d = dev.recvs[m].pieces[p];
            if (d.bytes == 0) continue;
            check(cudaMemcpyAsync(c.exchange.recvs[m].pieces[p].data, d.data, d.bytes, cudaMemcpyDeviceToHost, stream),
                  "cudaMemcpyAsync");
          }
        }
        check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
        EXPECT_EQ(test::peer_case_mismatch(c), "") << "world " << world;
        for (void* d : buffers) cudaFree(d);
      }
    }, s);
    EXPECT_EQ(errors, "");
  }
}

}  // namespace
}  // namespace ringattn
