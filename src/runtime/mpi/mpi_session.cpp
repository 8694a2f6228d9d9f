// Session over MPI: init, local rank and device choice, cross-rank agreement, and ring construction.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <string>
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

  std::vector<std::string> allgather(const std::string& value) {
    const int len = static_cast<int>(value.size());
    std::vector<int> lens(world_), displs(world_);
    MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm_);
    int total = 0;
    for (int i = 0; i < world_; ++i) {
      displs[i] = total;
      total += lens[i];
    }
    std::string all(static_cast<std::size_t>(total), '\0');
    MPI_Allgatherv(value.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, comm_);
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

  void agree_ok(bool ok, const std::string& message) override {
    const std::vector<std::string> all = allgather(ok ? std::string() : (message.empty() ? "failed" : message));
    for (int i = 0; i < world_; ++i) {
      if (!all[i].empty()) {
        collective_failure_ = true;
        if (i == rank_) throw Error(ErrorKind::kInvalidArgument, all[i]);
        throw Error(ErrorKind::kInvalidArgument, context_prefix() + " stopping because rank " + std::to_string(i) +
                                                     " failed: " + all[i]);
      }
    }
  }

  std::vector<std::string> gather_strings(const std::string& value) override { return allgather(value); }

  double max_over_ranks(double value) override {
    double out = value;
    MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, MPI_MAX, comm_);
    return out;
  }
  double sum_over_ranks(double value) override {
    double out = value;
    MPI_Allreduce(&value, &out, 1, MPI_DOUBLE, MPI_SUM, comm_);
    return out;
  }
  void reduce_over_ranks(double* values, int64_t n, bool max) override {
    for (int64_t off = 0; off < n; off += kMaxReduceCount) {
      const int count = static_cast<int>(std::min(kMaxReduceCount, n - off));
      const int rc = MPI_Allreduce(MPI_IN_PLACE, values + off, count, MPI_DOUBLE, max ? MPI_MAX : MPI_SUM, comm_);
      RINGATTN_CHECK(rc == MPI_SUCCESS, ErrorKind::kComm, "MPI_Allreduce of " + std::to_string(count) + " values failed",
                     "check the MPI installation and that every rank is alive");
    }
  }
  void barrier() override { MPI_Barrier(comm_); }
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
