// Session over MPI: init, local rank and device choice, cross-rank agreement, and ring construction.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include "comm/transports.hpp"
#include "ringattn/error.hpp"
#include "ringattn/session.hpp"

namespace ringattn {
namespace {

constexpr const char* kLocalRankEnv = "RINGATTN_LOCAL_RANK";
constexpr int64_t kMaxReduceCount = int64_t{1} << 26;  // values per MPI_Allreduce (MPI counts are int)
constexpr int kExitCommFailure = 3;  // the exit code of a job ended by a collective that cannot complete
// A collective past its deadline first checks in with every rank point to point (a collective
// cannot tell who is missing): ranks inside a collective answer at once; longer than the MPI
// transport's abort drain (2 s), which a rank may spend before it reaches the collective.
constexpr auto kCheckInWindow = std::chrono::milliseconds(3000);
// When every rank answers the check-in, the collective is slow, not stalled: it gets this much
// more (or the timeout, if longer) before the job ends (the ranks are then in different collectives).
constexpr auto kAliveGrace = std::chrono::milliseconds(2000);
constexpr auto kPollSleep = std::chrono::microseconds(50);
constexpr int kPingTag = 1, kPongTag = 2;  // tags of the check-in communicator

using Clock = std::chrono::steady_clock;

// Rank numbers as "2, 5" for messages.
std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (std::size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

std::string seconds_text(double ms) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g s", ms / 1000.0);
  return buf;
}

class MpiSession final : public Session {
 public:
  MpiSession(int* argc, char*** argv, const SessionOptions& options) : options_(options) {
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized) {
      int provided = 0;
      if (MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
        fail(ErrorKind::kComm, "MPI_Init_thread failed", "launch with mpirun, or check the Open MPI installation");
      }
      owns_mpi_ = true;
    }
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    MPI_Comm_dup(MPI_COMM_WORLD, &check_in_comm_);
    MPI_Comm_set_errhandler(check_in_comm_, MPI_ERRORS_RETURN);
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &world_);
    ProcessContext ctx = process_context();
    ctx.rank = rank_;
    ctx.world = world_;
    set_process_context(ctx);

    local_rank_ = options.local_rank;
    if (local_rank_ < 0) {
      if (const char* env = std::getenv(kLocalRankEnv)) {
        local_rank_ = std::atoi(env);
      } else {
        MPI_Comm node;
        MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node);
        MPI_Comm_rank(node, &local_rank_);
        MPI_Comm_free(&node);
      }
    }
    choose_backend();
    check_agreement("backend", backend_);
  }

  ~MpiSession() override {
    // A rank unwinding from its own error must not enter MPI_Finalize while its peers wait in the
    // ring: skipping it makes mpirun end the whole job with a non-zero exit instead of hanging.
    const bool failing_alone = std::uncaught_exceptions() > 0 && !collective_failure_ && world_ > 1;
    if (owns_mpi_ && !failing_alone) {
      int finalized = 0;
      MPI_Finalized(&finalized);
      if (!finalized) {
        MPI_Comm_free(&comm_);
        MPI_Comm_free(&check_in_comm_);
        MPI_Finalize();
      }
    }
  }

  int rank() const override { return rank_; }
  int world() const override { return world_; }
  int local_rank() const override { return local_rank_; }
  int device() const override { return device_; }
  bool on_gpu() const override { return backend_ == "cuda"; }
  std::string backend_name() const override { return backend_; }
  std::string transport_name() const override {
    if (world_ == 1) return "local";
    return on_gpu() ? "nccl" : "mpi";
  }
  void* mpi_comm() const override { return const_cast<MPI_Comm*>(&comm_); }

  std::string describe_rank() const override {
    std::string s = "rank " + std::to_string(rank_) + " host " + process_context().host + " pid " +
                    std::to_string(static_cast<long>(getpid()));
#ifdef RINGATTN_HAVE_CUDA
    if (device_ >= 0) {
      char bus[64] = {0};
      cudaDeviceGetPCIBusId(bus, sizeof(bus), device_);
      cudaDeviceProp prop{};
      cudaGetDeviceProperties(&prop, device_);
      return s + " device " + std::to_string(device_) + " [" + bus + "] " + prop.name;
    }
#endif
    return s + " device cpu";
  }

  std::vector<std::string> allgather(const std::string& value, const std::string& own_failure = "") {
    const int len = static_cast<int>(value.size());
    std::vector<int> lens(world_), displs(world_);
    MPI_Request req;
    mpi_check(MPI_Iallgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm_, &req), "MPI_Iallgather");
    complete(&req, own_failure);
    int total = 0;
    for (int i = 0; i < world_; ++i) {
      displs[i] = total;
      total += lens[i];
    }
    std::string all(static_cast<std::size_t>(total), '\0');
    mpi_check(MPI_Iallgatherv(value.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, comm_, &req),
              "MPI_Iallgatherv");
    complete(&req, own_failure);
    std::vector<std::string> out(world_);
    for (int i = 0; i < world_; ++i) out[i] = all.substr(displs[i], lens[i]);
    return out;
  }

  void check_agreement(const std::string& what, const std::string& value) override {
    const std::vector<std::string> all = allgather(value);
    for (int i = 1; i < world_; ++i) {
      if (all[i] != all[0]) {
        collective_failure_ = true;
        fail(ErrorKind::kMismatch,
             "ranks disagree on " + what + ": rank 0 has '" + all[0] + "' but rank " + std::to_string(i) +
                 " has '" + all[i] + "'",
             "launch every rank with the same flags, inputs and environment");
      }
    }
  }

  void agree_ok(bool ok, const std::string& message, ErrorKind kind) override {
    // Each rank's entry: empty when ok, else the kind's digit and the message.
    const std::string mine =
        ok ? std::string() : std::to_string(static_cast<int>(kind)) + (message.empty() ? "failed" : message);
    const std::vector<std::string> all = allgather(mine, ok ? std::string() : message);
    for (int i = 0; i < world_; ++i) {
      if (!all[i].empty()) {
        collective_failure_ = true;
        const auto their_kind = static_cast<ErrorKind>(all[i][0] - '0');
        const std::string text = all[i].substr(1);
        if (i == rank_) throw Error(their_kind, text);
        throw Error(their_kind, context_prefix() + " stopping because rank " + std::to_string(i) + " failed: " + text);
      }
    }
  }

  std::vector<std::string> gather_strings(const std::string& value) override { return allgather(value); }

  double max_over_ranks(double value) override {
    reduce_over_ranks(&value, 1, true);
    return value;
  }
  double sum_over_ranks(double value) override {
    reduce_over_ranks(&value, 1, false);
    return value;
  }
  void reduce_over_ranks(double* values, int64_t n, bool max) override {
    std::vector<double> in;
    for (int64_t off = 0; off < n; off += kMaxReduceCount) {
      const int count = static_cast<int>(std::min(kMaxReduceCount, n - off));
      in.assign(values + off, values + off + count);
      MPI_Request req;
      mpi_check(MPI_Iallreduce(in.data(), values + off, count, MPI_DOUBLE, max ? MPI_MAX : MPI_SUM, comm_, &req),
                "MPI_Iallreduce");
      complete(&req, "");
    }
  }
  void barrier() override {
    MPI_Request req;
    mpi_check(MPI_Ibarrier(comm_, &req), "MPI_Ibarrier");
    complete(&req, "");
  }
  void set_step(const std::string& step) override { step_ = step; }
  void set_collective_poll(std::function<void()> poll) override { poll_ = std::move(poll); }
  void abort_job(int exit_code) override { MPI_Abort(MPI_COMM_WORLD, exit_code); }

  std::unique_ptr<Backend> make_backend() override {
    if (on_gpu()) return make_cuda_backend(nullptr);
    return make_cpu_backend();
  }

  std::unique_ptr<RingAttention> make_ring(const AttentionSpec& spec) override {
    check_agreement("the problem (shapes, dtype, layout)", spec.describe());
    std::unique_ptr<Backend> backend = make_backend();
    std::unique_ptr<Transport> transport;
    if (world_ == 1) {
      transport = make_local_transport();
    } else if (!on_gpu()) {
      transport = make_mpi_transport(comm_);
    } else {
#ifdef RINGATTN_HAVE_NCCL
      transport = make_nccl_transport(comm_, device_, backend->stream());
#else
      fail(ErrorKind::kInvalidArgument, "this ringattn was built without NCCL, so a GPU ring of " +
                                            std::to_string(world_) + " ranks cannot run",
           "rebuild with NCCL (set NCCL_ROOT if it is not found), or use --backend cpu");
#endif
    }
    transport->set_timeout_ms(options_.timeout_ms);
    return std::make_unique<RingAttention>(spec, std::move(backend), std::move(transport));
  }

 private:
  void mpi_check(int rc, const char* what) {
    if (rc != MPI_SUCCESS) {
      char text[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(rc, text, &len);
      fail(ErrorKind::kComm, std::string(what) + " failed" + (step_.empty() ? "" : " (" + step_ + ")") + ": " +
                                 std::string(text, len),
           "a peer rank may have died; check the other ranks' messages");
    }
  }

  // Waits for a collective's request with the session's timeout. Past the deadline it checks in
  // with every rank point to point and ends the job (MPI_Abort, exit code 3) with a message naming
  // the ranks that did not answer, what this rank was doing (the step) and `own_failure` (this
  // rank's own error when it is reporting one, e.g. the ring's timeout naming the hop): a
  // collective that a peer never joins can neither complete nor be cancelled, so no caller could
  // continue. While waiting it answers the other ranks' check-ins and runs the poll hook.
  void complete(MPI_Request* req, const std::string& own_failure) {
    if (world_ == 1) {
      MPI_Wait(req, MPI_STATUS_IGNORE);
      return;
    }
    const auto start = Clock::now();
    auto deadline = start + std::chrono::duration<double, std::milli>(options_.timeout_ms);
    bool checked_in = false;
    while (true) {
      int done = 0;
      MPI_Test(req, &done, MPI_STATUS_IGNORE);
      if (done) return;
      answer_check_ins();
      if (poll_) poll_();
      if (Clock::now() > deadline) {
        const std::vector<int> silent = check_in();
        if (!silent.empty() || checked_in) {
          end_job(silent, std::chrono::duration<double, std::milli>(Clock::now() - start).count(), own_failure);
        }
        checked_in = true;  // every rank answered: slow, not stalled; one grace period more
        deadline = Clock::now() + std::max<Clock::duration>(
                                      std::chrono::duration_cast<Clock::duration>(kAliveGrace),
                                      std::chrono::duration_cast<Clock::duration>(
                                          std::chrono::duration<double, std::milli>(options_.timeout_ms)));
      }
      std::this_thread::sleep_for(kPollSleep);
    }
  }

  // Answers every check-in that has arrived (a one-int reply), and reaps finished replies.
  void answer_check_ins() {
    while (true) {
      int flag = 0;
      MPI_Status st;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kPingTag, check_in_comm_, &flag, &st) != MPI_SUCCESS || !flag) break;
      int ping = 0;
      MPI_Recv(&ping, 1, MPI_INT, st.MPI_SOURCE, kPingTag, check_in_comm_, MPI_STATUS_IGNORE);
      replies_.emplace_back();
      MPI_Isend(&rank_, 1, MPI_INT, st.MPI_SOURCE, kPongTag, check_in_comm_, &replies_.back());
    }
    replies_.erase(std::remove_if(replies_.begin(), replies_.end(),
                                  [](MPI_Request& r) {
                                    int flag = 0;
                                    MPI_Test(&r, &flag, MPI_STATUS_IGNORE);
                                    return flag != 0;
                                  }),
                   replies_.end());
  }

  // Sends a check-in to every other rank and returns those that do not answer within
  // kCheckInWindow. Its requests are never freed: the job ends right after a failed check-in.
  std::vector<int> check_in() {
    auto* pongs = new std::vector<int>(world_, -1);  // outlives this call: see above
    auto* reqs = new std::vector<MPI_Request>(2 * world_, MPI_REQUEST_NULL);
    for (int r = 0; r < world_; ++r) {
      if (r == rank_) continue;
      MPI_Irecv(&(*pongs)[r], 1, MPI_INT, r, kPongTag, check_in_comm_, &(*reqs)[2 * r]);
      MPI_Isend(&rank_, 1, MPI_INT, r, kPingTag, check_in_comm_, &(*reqs)[2 * r + 1]);
    }
    const auto deadline = Clock::now() + kCheckInWindow;
    std::vector<int> silent;
    while (true) {
      silent.clear();
      for (int r = 0; r < world_; ++r) {
        if (r == rank_) continue;
        int flag = 1;
        if ((*reqs)[2 * r] != MPI_REQUEST_NULL) MPI_Test(&(*reqs)[2 * r], &flag, MPI_STATUS_IGNORE);
        if (!flag) silent.push_back(r);
      }
      answer_check_ins();
      if (silent.empty() || Clock::now() > deadline) break;
      std::this_thread::sleep_for(kPollSleep);
    }
    if (silent.empty()) {  // all answered: the requests are complete but for sends, which finish quickly
      for (MPI_Request& r : *reqs) {
        if (r != MPI_REQUEST_NULL) MPI_Wait(&r, MPI_STATUS_IGNORE);
      }
      delete reqs;
      delete pongs;
    }
    return silent;
  }

  [[noreturn]] void end_job(const std::vector<int>& silent, double waited_ms, const std::string& own_failure) {
    std::string what = step_.empty() ? "a collective step" : step_;
    std::string msg = context_prefix() + " " + what + " did not complete within " + seconds_text(waited_ms) + " (--timeout " +
                      seconds_text(options_.timeout_ms) + "): ";
    if (!silent.empty()) {
      msg += std::string(silent.size() == 1 ? "rank " : "ranks ") + rank_list(silent) +
             (silent.size() == 1 ? " does" : " do") + " not answer a point-to-point check-in within " +
             seconds_text(std::chrono::duration<double, std::milli>(kCheckInWindow).count()) +
             " (stalled, stopped or dead)";
    } else {
      msg += "every rank answers a check-in, but not every rank joins this collective (they are in different "
             "steps: do all ranks have the same flags?)";
    }
    if (!own_failure.empty()) msg += "; this rank had failed first: " + own_failure;
    msg += "; ending the job (MPI_Abort, exit code " + std::to_string(kExitCommFailure) + ")";
    msg += " (hint: check the named rank's host and log; raise --timeout if a step legitimately takes longer)";
    std::fprintf(stderr, "ringattn: error: %s\n", msg.c_str());
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, kExitCommFailure);
    std::_Exit(kExitCommFailure);  // MPI_Abort does not return; never continue past it
  }

  void choose_backend() {
    const std::string& want = options_.backend;
    if (want != "auto" && want != "cpu" && want != "cuda") {
      fail(ErrorKind::kInvalidArgument, "unknown backend '" + want + "' for --backend", "use auto, cpu or cuda");
    }
    backend_ = "cpu";
#ifdef RINGATTN_HAVE_CUDA
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) count = 0;
    cudaGetLastError();
    if (want == "cuda" || (want == "auto" && count > 0)) {
      if (count == 0) {
        fail(ErrorKind::kInvalidArgument, "--backend cuda asked for, but no CUDA device is visible",
             "run on a GPU machine, check CUDA_VISIBLE_DEVICES, or use --backend cpu");
      }
      if (local_rank_ >= count) {
        fail(ErrorKind::kInvalidArgument,
             "local rank " + std::to_string(local_rank_) + " has no GPU of its own (" + std::to_string(count) +
                 " visible on this host)",
             "launch at most one rank per GPU per host (mpirun -np <GPUs>), or use --backend cpu");
      }
      device_ = local_rank_;
      if (cudaSetDevice(device_) != cudaSuccess) {
        fail(ErrorKind::kCuda, "cudaSetDevice(" + std::to_string(device_) + ") failed", "check the GPU with nvidia-smi");
      }
      backend_ = "cuda";
      ProcessContext ctx = process_context();
      ctx.device = device_;
      set_process_context(ctx);
    }
#else
    if (want == "cuda") {
      fail(ErrorKind::kInvalidArgument, "this ringattn was built without CUDA, so --backend cuda is unavailable",
           "rebuild with nvcc found by CMake (-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc), or use --backend cpu");
    }
#endif
  }

  SessionOptions options_;
  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm check_in_comm_ = MPI_COMM_NULL;  // check-ins of timed-out collectives (kPingTag, kPongTag)
  std::vector<MPI_Request> replies_;        // check-in answers in flight (they send rank_)
  std::string step_;                        // what the next collectives belong to, for messages
  std::function<void()> poll_;              // run while a collective waits (a transport's watchdog)
  bool owns_mpi_ = false;
  bool collective_failure_ = false;
  int rank_ = 0, world_ = 1, local_rank_ = 0, device_ = -1;
  std::string backend_;
};

}  // namespace

std::unique_ptr<Session> Session::create(int* argc, char*** argv, const SessionOptions& options) {
  return std::make_unique<MpiSession>(argc, argv, options);
}

}  // namespace ringattn
