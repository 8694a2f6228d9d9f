// Embedded passes on one GPU: bit-identical to blocking, never block the host, CUDA-graph replay of fwd+bwd (1 rank, loopback p ranks) equal to eager.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gpu_test_util.hpp"
#include "plan/plan.hpp"
#include "ringattn/ringattn.hpp"
#include "runtime/pass_guard.hpp"

namespace ringattn::test {
namespace {

constexpr int kTimedPasses = 20;          // forward+backward passes per timing loop
constexpr int kWarmupPasses = 3;
constexpr double kSlowHostOpMs = 400.0;   // the deliberately slow stream operation before a call
constexpr double kReturnBeforeMs = 200.0; // a non-blocking call returns well before it ends
// Replay must not be slower than eager; the lead measures on the H200, this only catches a gross
// regression without failing on timing noise.
constexpr double kReplaySlackFactor = 1.25;

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

void run_ranks(int world, const std::function<void(int)>& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

AttentionSpec test_spec(int64_t S) {
  AttentionSpec spec;
  spec.batch = 1;
  spec.seq_len = S;
  spec.heads = 8;
  spec.kv_heads = 2;
  spec.head_dim = 128;
  spec.mask.causal = true;
  spec.layout = Layout::kZigzag;
  spec.dtype = DType::kBF16;
  return spec;
}

std::vector<unsigned char> download(const DeviceTensor& t) {
  std::vector<unsigned char> h(t.view.nbytes());
  cudaMemcpy(h.data(), t.data, h.size(), cudaMemcpyDeviceToHost);
  return h;
}

// One rank's embedded ring, its device tensors and workspaces, driven on `stream`.
struct Rank {
  std::unique_ptr<RingAttention> ring;
  cudaStream_t stream = nullptr;
  std::unique_ptr<DeviceTensor> q, k, v, dout, out, lse, dq, dk, dv;
  void* fwd_ws = nullptr;
  void* bwd_ws = nullptr;
  std::size_t fwd_bytes = 0, bwd_bytes = 0;

  Rank(const AttentionSpec& spec, std::unique_ptr<Transport> transport, cudaStream_t s, bool embedded, unsigned seed)
      : stream(s) {
    ring = std::make_unique<RingAttention>(spec, make_cuda_backend(s), std::move(transport), RingOptions{embedded});
    const int64_t B = spec.batch, n = ring->local_seq(), H = spec.heads, Hkv = spec.effective_kv_heads(),
                  D = spec.head_dim;
    q = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, H, D});
    k = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, Hkv, D});
    v = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, Hkv, D});
    dout = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, H, D});
    out = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, H, D});
    lse = std::make_unique<DeviceTensor>(DType::kF32, std::initializer_list<int64_t>{B, H, n});
    dq = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, H, D});
    dk = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, Hkv, D});
    dv = std::make_unique<DeviceTensor>(DType::kBF16, std::initializer_list<int64_t>{B, n, Hkv, D});
    std::mt19937 rng(seed);
    for (DeviceTensor* t : {q.get(), k.get(), v.get(), dout.get()}) {
      HostTensor h(t->view.dtype, {t->view.shape[0], t->view.shape[1], t->view.shape[2], t->view.shape[3]});
      fill_normal(h, rng);
      t->upload(h);
    }
    if (embedded) {
      fwd_bytes = ring->workspace_bytes(Pass::kForward);
      bwd_bytes = ring->workspace_bytes(Pass::kBackward);
      if (fwd_bytes > 0) cudaMalloc(&fwd_ws, fwd_bytes);
      if (bwd_bytes > 0) cudaMalloc(&bwd_ws, bwd_bytes);
    }
  }
  ~Rank() {
    cudaFree(fwd_ws);
    cudaFree(bwd_ws);
  }

  void poison() {
    for (DeviceTensor* t : {out.get(), lse.get(), dq.get(), dk.get(), dv.get()}) t->poison();
  }
  // Forward then backward, enqueued on the rank's stream (embedded) or run to the end (blocking).
  void pass() {
    if (!ring->embedded()) {
      ring->forward(q->view, k->view, v->view, out->view, lse->view);
      ring->backward(q->view, k->view, v->view, out->view, lse->view, dout->view, dq->view, dk->view, dv->view);
      return;
    }
    PassOptions f{stream, fwd_ws, fwd_bytes, false};
    PassOptions b{stream, bwd_ws, bwd_bytes, false};
    ring->forward(q->view, k->view, v->view, out->view, lse->view, f);
    ring->backward(q->view, k->view, v->view, out->view, lse->view, dout->view, dq->view, dk->view, dv->view, b);
  }
  std::vector<std::vector<unsigned char>> results() const {
    return {download(*out), download(*lse), download(*dq), download(*dk), download(*dv)};
  }
};

// p ranks of one problem on one GPU: world 1 on the local transport, else loopback.
struct Job {
  std::vector<cudaStream_t> streams;
  std::vector<std::unique_ptr<Rank>> ranks;

  Job(const AttentionSpec& spec, int world, bool embedded) {
    std::vector<void*> raw;
    for (int r = 0; r < world; ++r) {
      cudaStream_t s = nullptr;
      cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
      streams.push_back(s);
      raw.push_back(s);
    }
    std::vector<std::unique_ptr<Transport>> transports;
    if (world == 1) {
      transports.push_back(make_local_transport());
    } else {
      transports = make_loopback_transports(world, raw);
    }
    for (int r = 0; r < world; ++r) {
      ranks.push_back(std::make_unique<Rank>(spec, std::move(transports[r]), streams[r], embedded, 100u + r));
    }
  }
  ~Job() {
    cudaDeviceSynchronize();
    ranks.clear();
    for (cudaStream_t s : streams) cudaStreamDestroy(s);
  }
  int world() const { return static_cast<int>(ranks.size()); }
  // `passes` forward+backward passes on every rank, one thread per rank (one pass: the thread ends).
  void run(int passes) {
    run_ranks(world(), [&](int r) {
      for (int i = 0; i < passes; ++i) ranks[r]->pass();
    });
  }
  void sync() {
    for (cudaStream_t s : streams) cudaStreamSynchronize(s);
  }
  void poison() {
    for (auto& r : ranks) r->poison();
    cudaDeviceSynchronize();
  }
};

// Captures one forward+backward pass of every rank of `job` into one graph: `origin` forks every
// rank's stream, one thread per rank enqueues its pass (the loopback ranks meet on the host as in
// eager calls), and every rank's stream joins `origin` again.
cudaGraphExec_t capture(Job& job, cudaStream_t origin) {
  std::vector<cudaEvent_t> events(static_cast<std::size_t>(job.world()) + 1);
  for (cudaEvent_t& e : events) EXPECT_EQ(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), cudaSuccess);
  EXPECT_EQ(cudaStreamBeginCapture(origin, cudaStreamCaptureModeRelaxed), cudaSuccess);
  cudaEventRecord(events[0], origin);
  for (cudaStream_t s : job.streams) cudaStreamWaitEvent(s, events[0], 0);
  std::string failure;
  try {
    job.run(1);
  } catch (const std::exception& e) {
    failure = e.what();
  }
  for (int r = 0; r < job.world(); ++r) {
    cudaEventRecord(events[r + 1], job.streams[r]);
    cudaStreamWaitEvent(origin, events[r + 1], 0);
  }
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(origin, &graph);
  EXPECT_TRUE(failure.empty()) << "a pass failed during capture: " << failure;
  EXPECT_EQ(end, cudaSuccess) << cudaGetErrorString(end);
  cudaGraphExec_t exec = nullptr;
  if (end == cudaSuccess && graph != nullptr) {
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    EXPECT_EQ(inst, cudaSuccess) << cudaGetErrorString(inst);
    cudaGraphDestroy(graph);
  }
  for (cudaEvent_t e : events) cudaEventDestroy(e);
  return exec;
}

// Eager embedded passes, then the captured graph replayed: the same bits, and replay no slower.
void check_graph(int world, const char* route) {
  if (route[0] != '\0') {
    setenv("RINGATTN_PLAN_ROUTE", route, 1);
  } else {
    unsetenv("RINGATTN_PLAN_ROUTE");
  }
  const AttentionSpec spec = test_spec(4096);
  const std::string what = std::to_string(world) + " rank(s), route " + (route[0] ? route : "auto");
  Job job(spec, world, true);
  job.poison();
  job.run(1);
  job.sync();
  std::vector<std::vector<std::vector<unsigned char>>> eager;
  for (auto& r : job.ranks) eager.push_back(r->results());
  for (auto& r : job.ranks) ASSERT_FALSE(r->ring->poll().has_value()) << what << ": " << r->ring->poll()->what();

  job.run(kWarmupPasses);
  job.sync();
  auto t0 = Clock::now();
  job.run(kTimedPasses);
  job.sync();
  const double eager_ms = ms_since(t0) / kTimedPasses;

  cudaStream_t origin = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&origin, cudaStreamNonBlocking), cudaSuccess);
  cudaGraphExec_t exec = capture(job, origin);
  ASSERT_NE(exec, nullptr) << what;
  job.poison();
  ASSERT_EQ(cudaGraphLaunch(exec, origin), cudaSuccess);
  ASSERT_EQ(cudaStreamSynchronize(origin), cudaSuccess);
  for (int r = 0; r < world; ++r) {
    const auto replayed = job.ranks[r]->results();
    const char* names[] = {"out", "lse", "dq", "dk", "dv"};
    for (std::size_t i = 0; i < replayed.size(); ++i) {
      EXPECT_TRUE(replayed[i] == eager[r][i]) << what << " rank " << r << ": replayed " << names[i] << " differs from eager";
    }
    EXPECT_FALSE(job.ranks[r]->ring->poll().has_value()) << what;
  }
  for (int i = 0; i < kWarmupPasses; ++i) cudaGraphLaunch(exec, origin);
  cudaStreamSynchronize(origin);
  t0 = Clock::now();
  for (int i = 0; i < kTimedPasses; ++i) cudaGraphLaunch(exec, origin);
  cudaStreamSynchronize(origin);
  const double replay_ms = ms_since(t0) / kTimedPasses;
  std::printf("[embedded graph] %s, S=%lld causal bf16 hd128: eager %.3f ms/pass, graph replay %.3f ms/pass\n",
              what.c_str(), static_cast<long long>(spec.seq_len), eager_ms, replay_ms);
  EXPECT_LE(replay_ms, eager_ms * kReplaySlackFactor) << what;
  cudaGraphExecDestroy(exec);
  cudaStreamDestroy(origin);
  unsetenv("RINGATTN_PLAN_ROUTE");
}

TEST(EmbeddedGpu, SameBitsAsBlockingOnOneAndFourRanks) {
  RINGATTN_SKIP_WITHOUT_GPU();
  AttentionSpec masked = test_spec(4096);  // documents and a window: the direct route, offsets on the device
  masked.layout = Layout::kContiguous;
  masked.mask.doc_offsets = doc_offsets_from_lengths({700, 1500, 396, 1500}, masked.seq_len);
  masked.mask.has_window = true;
  masked.mask.window_left = 255;
  masked.mask.window_right = 0;
  for (int world : {1, 4}) for (const AttentionSpec& spec : {test_spec(4096), masked}) {
    Job blocking(spec, world, false), embedded(spec, world, true);
    blocking.poison();
    embedded.poison();
    blocking.run(1);
    blocking.sync();
    embedded.run(1);
    embedded.sync();
    for (int r = 0; r < world; ++r) {
      EXPECT_TRUE(blocking.ranks[r]->results() == embedded.ranks[r]->results())
          << world << " ranks, rank " << r << ", mask " << spec.mask.describe()
          << ": embedded results differ from blocking";
    }
  }
}

void sleep_on_stream(void* ms) {
  std::this_thread::sleep_for(std::chrono::duration<double, std::milli>(*static_cast<double*>(ms)));
}

TEST(EmbeddedGpu, CallsReturnBeforeASlowPrecedingStreamOperation) {
  RINGATTN_SKIP_WITHOUT_GPU();
  for (int world : {1, 2}) {
    Job job(test_spec(4096), world, true);
    job.run(1);  // first calls: kernel attributes, the sm90 probe
    job.sync();
    double slow_ms = kSlowHostOpMs;
    for (cudaStream_t s : job.streams) ASSERT_EQ(cudaLaunchHostFunc(s, sleep_on_stream, &slow_ms), cudaSuccess);
    const auto t0 = Clock::now();
    job.run(1);
    const double call_ms = ms_since(t0);
    bool pending = false;
    for (cudaStream_t s : job.streams) pending = pending || cudaStreamQuery(s) == cudaErrorNotReady;
    job.sync();
    std::printf("[embedded] %d rank(s): forward+backward calls returned after %.2f ms behind a %.0f ms stream op\n",
                world, call_ms, slow_ms);
    EXPECT_LT(call_ms, kReturnBeforeMs) << world << " ranks: the calls waited for the device";
    EXPECT_TRUE(pending) << "the stream had finished before the calls returned";
  }
}

TEST(EmbeddedGpu, OneRankGraphReplayEqualsEager) {
  RINGATTN_SKIP_WITHOUT_GPU();
  check_graph(1, "");
}

TEST(EmbeddedGpu, LoopbackRingGraphReplayEqualsEager) {
  RINGATTN_SKIP_WITHOUT_GPU();
  check_graph(2, "");
  check_graph(4, "");
  check_graph(4, "direct");
}

// The guard kernel alone: untouched when the pass succeeded, NaN and a status bit when it failed.
TEST(EmbeddedGpu, PassGuardFillsNanOnlyOnFailure) {
  RINGATTN_SKIP_WITHOUT_GPU();
  auto guard = make_cuda_pass_guard();
  DeviceTensor a(DType::kBF16, {1, 1000, 1, 3}), sum(DType::kF32, {1, 1, 1, 1});
  cudaMemset(a.data, 0, a.view.nbytes());
  const int expected = 4, agreed = 4, short_by_one = 3;
  cudaMemcpy(sum.data, &agreed, sizeof(int), cudaMemcpyHostToDevice);
  NanFill f{a.data, static_cast<std::size_t>(a.view.numel()), 2, 0x7fc0u};
  guard->enqueue(nullptr, static_cast<const int*>(sum.data), expected, false, &f, 1);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  HostTensor h(DType::kBF16, {1, 1000, 1, 3});
  a.download(h);
  EXPECT_EQ(load_as_double(h.view, 0), 0.0);
  EXPECT_EQ(guard->status(), 0);
  cudaMemcpy(sum.data, &short_by_one, sizeof(int), cudaMemcpyHostToDevice);
  guard->enqueue(nullptr, static_cast<const int*>(sum.data), expected, false, &f, 1);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  a.download(h);
  for (int64_t i = 0; i < h.view.numel(); ++i) ASSERT_TRUE(std::isnan(load_as_double(h.view, i))) << i;
  EXPECT_EQ(guard->status(), kGuardAgreement);
  cudaMemset(a.data, 0, a.view.nbytes());
  *guard->failure_flag() = 1;
  guard->enqueue(nullptr, nullptr, 0, false, &f, 1);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  a.download(h);
  EXPECT_TRUE(std::isnan(load_as_double(h.view, h.view.numel() - 1)));
  EXPECT_EQ(guard->status(), kGuardAgreement | kGuardWatchdog);
}

}  // namespace
}  // namespace ringattn::test
