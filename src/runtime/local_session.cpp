// Session for builds without MPI: one process, one ring of size 1, CPU or one GPU.
#ifndef RINGATTN_HAVE_MPI
#include <unistd.h>

#include "ringattn/error.hpp"
#include "ringattn/session.hpp"

#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

namespace ringattn {
namespace {

class LocalSession final : public Session {
 public:
  explicit LocalSession(const SessionOptions& options) : options_(options) {
    const std::string& want = options.backend;
    if (want != "auto" && want != "cpu" && want != "cuda") {
      fail(ErrorKind::kInvalidArgument, "unknown backend '" + want + "' for --backend", "use auto, cpu or cuda");
    }
    const bool cuda = cuda_backend_available();
    if (want == "cuda" && !cuda) {
      fail(ErrorKind::kInvalidArgument, "--backend cuda asked for, but CUDA is unavailable (no device or no CUDA build)",
           "run on a GPU machine with a CUDA build, or use --backend cpu");
    }
    gpu_ = want == "cuda" || (want == "auto" && cuda);
#ifdef RINGATTN_HAVE_CUDA
    if (gpu_) cudaSetDevice(0);
#endif
    ProcessContext ctx = process_context();
    ctx.device = gpu_ ? 0 : -1;
    set_process_context(ctx);
  }
  int rank() const override { return 0; }
  int world() const override { return 1; }
  int local_rank() const override { return 0; }
  int device() const override { return gpu_ ? 0 : -1; }
  bool on_gpu() const override { return gpu_; }
  std::string backend_name() const override { return gpu_ ? "cuda" : "cpu"; }
  std::string transport_name() const override { return "local"; }
  std::string describe_rank() const override {
    return "rank 0 host " + process_context().host + " pid " + std::to_string(static_cast<long>(getpid())) +
           (gpu_ ? " device 0" : " device cpu");
  }
  void check_agreement(const std::string&, const std::string&) override {}
  void agree_ok(bool ok, const std::string& message, ErrorKind kind) override {
    if (!ok) throw Error(kind, message);
  }
  std::vector<std::string> gather_strings(const std::string& value) override { return {value}; }
  double max_over_ranks(double value) override { return value; }
  double sum_over_ranks(double value) override { return value; }
  void reduce_over_ranks(double*, int64_t, bool) override {}
  void barrier() override {}
  void abort_job(int exit_code) override { std::_Exit(exit_code); }
  std::unique_ptr<Backend> make_backend() override { return gpu_ ? make_cuda_backend(nullptr) : make_cpu_backend(); }
  std::unique_ptr<RingAttention> make_ring(const AttentionSpec& spec) override {
    auto transport = make_local_transport();
    transport->set_timeout_ms(options_.timeout_ms);
    return std::make_unique<RingAttention>(spec, make_backend(), std::move(transport));
  }
  void* mpi_comm() const override { return nullptr; }

 private:
  SessionOptions options_;
  bool gpu_ = false;
};

}  // namespace

std::unique_ptr<Session> Session::create(int*, char***, const SessionOptions& options) {
  return std::make_unique<LocalSession>(options);
}

}  // namespace ringattn
#endif
