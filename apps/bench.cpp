// `ringattn bench`: nccl-tests style sweep of the ring forward over sequence lengths; one table from rank 0.
//
// Per size: a ring of this session's backend and transport, seeded inputs, -w warm-up and -n timed
// forward passes (time = max over ranks of each rank's median wall time per pass), per-hop telemetry from
// RingAttention::last_stats(), the one-GPU baseline (the same backend calls on one GPU without the
// ring, one pass before each ring pass, see docs/BENCHMARKS.md), peak device memory, and with -c 1 the distributed sampled check.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif
#ifdef RINGATTN_HAVE_NCCL
#include <nccl.h>
#endif
#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>

#include "runtime/cuda/device_tensors.hpp"  // device_memory()
#endif
#ifdef RINGATTN_HAVE_NCCL
#include "comm/nccl/nccl_transport.hpp"
#endif

#include "check/check.hpp"
#include "check/grad_check.hpp"
#include "check/inputs.hpp"
#include "calibrate.hpp"
#include "cli_common.hpp"
#include "commands.hpp"
#include "plan/plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/ringattn.hpp"
#include "ringattn/session.hpp"

namespace ringattn::cli {
namespace {

constexpr const char* kVersion = "0.1.0";
constexpr int kExitFailed = 1;       // a size failed its check (or an error)
constexpr int kExitCommFailure = 3;  // a peer hung or died: timeout / NCCL error, job aborted
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr double kBackwardFlopsFactor = 2.5;  // backward = 2.5x forward FLOPs, as peers count
constexpr auto kGraceBeforeAbort = std::chrono::seconds(2);  // lets every surviving rank print its message
constexpr const char* kBenchFaultEnv = "RINGATTN_BENCH_FAULT";  // tests: corrupt the output or a gradient
constexpr uint64_t kGradQuerySalt = 29;  // seeds of the gradient check's query and key row samples
constexpr uint64_t kGradKeySalt = 31;
// Config keys whose TOML array (or string) is the flag's comma-separated list.
const std::set<std::string> kListKeys = {"window", "doc-lens"};

using Clock = std::chrono::steady_clock;

struct BenchFlags {
  ProblemFlags problem;
  std::string min_tokens = "32K";
  std::string max_tokens = "32K";
  double factor = 2.0;
  int iters = 5;
  int warmup = 2;
  int check = 1;
  int64_t check_rows = 32;
  std::string json_path;
  std::string calibrate_path;  // --calibrate: write a machine file instead of the sweep
  bool baseline = true;
  std::string config_path;
  std::string progress = "auto";  // auto: when rank 0's stderr is a terminal; on; off
  bool backward = false;           // time forward + backward (3.5x the forward FLOPs)
};

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

double median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

void check_comm(const Transport& t) {
#ifdef RINGATTN_HAVE_NCCL
  check_transport(t);
#else
  (void)t;
#endif
}

// Collectives with a deadline: a barrier or reduction that a stalled peer never joins must not
// hang the survivors (and each poll also surfaces a transport failure seen by the watchdog).
class TimedCollectives {
 public:
  TimedCollectives(Session& session, double timeout_ms) : session_(session), timeout_ms_(timeout_ms) {}
  void set_transport(const Transport* t) { transport_ = t; }

  void barrier(const std::string& where) {
#ifdef RINGATTN_HAVE_MPI
    if (session_.world() == 1 || !session_.mpi_comm()) return;
    MPI_Request req;
    MPI_Ibarrier(comm(), &req);
    complete(&req, where);
#else
    (void)where;
#endif
  }
  // In place, max or sum over ranks.
  void reduce(double* values, int n, bool is_max, const std::string& where) {
#ifdef RINGATTN_HAVE_MPI
    if (session_.world() == 1 || !session_.mpi_comm()) return;
    std::vector<double> in(values, values + n);
    MPI_Request req;
    MPI_Iallreduce(in.data(), values, n, MPI_DOUBLE, is_max ? MPI_MAX : MPI_SUM, comm(), &req);
    complete(&req, where);
#else
    (void)values;
    (void)n;
    (void)is_max;
    (void)where;
#endif
  }

 private:
#ifdef RINGATTN_HAVE_MPI
  MPI_Comm comm() const { return *static_cast<MPI_Comm*>(session_.mpi_comm()); }
  void complete(MPI_Request* req, const std::string& where) {
    const auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_ms_));
    int done = 0;
    while (true) {
      MPI_Test(req, &done, MPI_STATUS_IGNORE);
      if (done) return;
      if (transport_) check_comm(*transport_);
      if (Clock::now() > deadline) {
        fail(ErrorKind::kComm,
             where + ": not every rank arrived within " + std::to_string(timeout_ms_ / 1000.0) +
                 " s; a peer is stalled or dead",
             "check the other ranks' messages; raise -T if a step legitimately takes longer");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
#endif
  Session& session_;
  double timeout_ms_;
  const Transport* transport_ = nullptr;
};

// Progress on rank 0's stderr when it is a terminal: size, iteration, hop, elapsed, estimate.
struct Progress {
  bool enabled = false;
  Clock::time_point sweep_start;
  Clock::time_point size_start;
  Clock::time_point last_print;
  int64_t tokens = 0;
  std::size_t size_index = 0;
  std::vector<int64_t> sizes;
  int pass = 0;          // passes of this size done (warm-up, timed, baseline)
  int passes = 1;        // passes of this size in all
  const char* phase = "";

  void start_size(std::size_t i, int total_passes) {
    size_index = i;
    tokens = sizes[i];
    pass = 0;
    passes = std::max(1, total_passes);
    size_start = Clock::now();
  }
  double remaining_s(double hop_fraction) const {
    const double done = pass + hop_fraction;
    if (done <= 0) return -1;
    const double per_pass = ms_since(size_start) / 1000.0 / done;
    double rest = per_pass * (passes - done);
    for (std::size_t j = size_index + 1; j < sizes.size(); ++j) {
      const double r = static_cast<double>(sizes[j]) / static_cast<double>(tokens);
      rest += per_pass * passes * r * r;  // attention work grows with the square of the length
    }
    return rest;
  }
  void show(int hop, int hops) {
    if (!enabled) return;
    const auto now = Clock::now();
    if (now - last_print < std::chrono::milliseconds(200) && hop + 1 < hops) return;
    last_print = now;
    const double rest = remaining_s(hops > 0 ? static_cast<double>(hop + 1) / hops : 0.0);
    std::fprintf(stderr, "\r# [%lld tokens] %s pass %d/%d hop %d/%d, elapsed %.1f s, remaining ~%s   ",
                 static_cast<long long>(tokens), phase, pass + 1, passes, hop + 1, hops,
                 ms_since(sweep_start) / 1000.0, rest < 0 ? "?" : (std::to_string(static_cast<int>(rest + 0.5)) + " s").c_str());
    std::fflush(stderr);
  }
  void clear() {
    if (!enabled) return;
    std::fprintf(stderr, "\r%100s\r", "");
    std::fflush(stderr);
  }
};

void on_hop(int hop, int hops, void* user) { static_cast<Progress*>(user)->show(hop, hops); }

struct HopSummary {
  double compute_ms = 0.0;  // max over ranks
  double exposed_ms = 0.0;  // max over ranks
  bool skipped = false;
};

struct SizeResult {
  int64_t tokens = 0;
  int64_t tokens_per_gpu = 0;
  double flops = 0.0;            // dense-equivalent (4*B*S^2*H*d, half when causal; x3.5 with --backward)
  double visible_flops = 0.0;    // on visible pairs only (visible_forward_flops, same factor)
  double visible_pairs = 0.0;    // all ranks, batch rows and heads
  double visible_fraction = 0.0;  // visible_pairs / (S^2 * B * H)
  double visible_tflops_per_gpu = 0.0;
  std::string exchange;        // the ring's transport as built ("nccl+copy-engine", "nccl", "mpi", ...)
  double ring_ms = 0.0;        // max over ranks of the median wall time
  double ring_min_ms = 0.0;    // max over ranks of the fastest pass
  double baseline_ms = 0.0;    // the same backend calls without the ring (max over ranks of median)
  double tflops_per_gpu = 0.0;
  double baseline_tflops = 0.0;
  double efficiency = 0.0;     // baseline_ms / ring_ms
  double compute_ms = 0.0;     // per pass, max over ranks (GPU timeline)
  double exposed_ms = 0.0;     // per pass, max over ranks
  double timeline_ms = 0.0;    // per pass, max over ranks
  double exposed_pct = 0.0;
  double peak_mem_bytes = 0.0;   // max over ranks: device memory used by the job at its peak
  double ring_mem_bytes = 0.0;   // max over ranks: growth from before the ring was built
  double model_mem_bytes = 0.0;  // model_memory(): what the formula says one rank needs
  bool checked = false;
  SampledCheckResult check;
  bool grad_checked = false;  // -c 1 with --backward: dQ/dK/dV on sampled rows (src/check/grad_check.hpp)
  GradCheckResult grad;
  std::vector<HopSummary> hops;
  std::string per_rank_json;  // rank 0: array of per-rank details
};

// What the memory formula of docs/BENCHMARKS.md says one rank needs (forward, or forward + backward).
double model_memory(const AttentionSpec& spec, int world, bool backward) {
  const double B = static_cast<double>(spec.batch), c = static_cast<double>(spec.local_seq(world));
  const double H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const double e = static_cast<double>(dtype_size(spec.dtype));
  const double acc = spec.dtype == DType::kF64 ? 8.0 : 4.0;
  const double qo = 2.0 * B * c * H * D * e;        // q, out
  const double kv = 2.0 * B * c * Hkv * D * e;      // k, v
  const double lse = B * H * c * acc;               // lse
  const double buffers = (world > 2 ? 2.0 : world - 1.0) * kv;  // the travelling K/V buffers (none on one rank)
  const double state = B * c * H * D * acc + 2.0 * B * H * c * acc;  // acc, running max, running sum
  const double forward = qo + kv + lse + buffers + state;
  if (!backward) return forward;
  const double grads = qo + kv;                          // dO, dQ; dK, dV
  const double kv_acc = 2.0 * B * c * Hkv * D * acc;     // fp32 dK + dV of one chunk
  const double dq_acc = B * c * H * D * acc + 2.0 * B * H * c * acc;  // fp32 dQ, lse_log2, delta
  if (world == 1) return forward + grads + dq_acc;  // one rank: the step writes dK, dV directly
  const double messages = 2.0 * (kv + kv_acc);           // two [K | V | dK | dV] messages
  const double local_grad = (world > 2 ? 2.0 : 1.0) * kv_acc;  // this rank's shares (one written, one folded)
  return forward + grads + messages + local_grad + dq_acc;
}

std::vector<int64_t> sweep_sizes(const BenchFlags& f) {
  const int64_t lo = parse_size(f.min_tokens, "-b/--min-tokens");
  const int64_t hi = parse_size(f.max_tokens, "-e/--max-tokens");
  RINGATTN_CHECK(lo >= 1 && hi >= lo, ErrorKind::kInvalidArgument,
                 "-b " + std::to_string(lo) + " -e " + std::to_string(hi) + " is not a sweep",
                 "pass -b <= -e, e.g. -b 32K -e 1M");
  RINGATTN_CHECK(lo == hi || f.factor > 1.0, ErrorKind::kInvalidArgument,
                 "-f " + std::to_string(f.factor) + " must be greater than 1 for a sweep", "pass e.g. -f 2");
  std::vector<int64_t> out;
  for (double s = static_cast<double>(lo); s <= static_cast<double>(hi) * (1 + 1e-12); s *= f.factor) {
    out.push_back(static_cast<int64_t>(std::llround(s)));
    if (lo == hi) break;
  }
  return out;
}

void validate_flags(const BenchFlags& f) {
  RINGATTN_CHECK(f.iters >= 1, ErrorKind::kInvalidArgument, "-n " + std::to_string(f.iters) + " must be at least 1",
                 "pass e.g. -n 5");
  RINGATTN_CHECK(f.warmup >= 0, ErrorKind::kInvalidArgument, "-w " + std::to_string(f.warmup) + " is negative",
                 "pass e.g. -w 2");
  RINGATTN_CHECK(f.check == 0 || f.check == 1, ErrorKind::kInvalidArgument,
                 "-c " + std::to_string(f.check) + " must be 0 or 1", "pass -c 1 to check results, -c 0 to skip");
  RINGATTN_CHECK(f.check_rows >= 1, ErrorKind::kInvalidArgument,
                 "--check-rows " + std::to_string(f.check_rows) + " must be at least 1", "pass e.g. --check-rows 32");
}

std::string fmt(const char* format, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

// TFLOP/s with three significant digits below 10 (CPU runs), one decimal above.
std::string tflops_text(double v) { return v >= 10.0 ? fmt("%.1f", v) : fmt("%.3g", v); }

std::string now_utc() {
  char buf[32];
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string versions_line() {
  std::string s = "# ringattn bench " + std::string(kVersion);
#ifdef RINGATTN_HAVE_CUDA
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  s += ", CUDA runtime " + std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10) + " driver " +
       std::to_string(drv / 1000) + "." + std::to_string((drv % 1000) / 10);
#endif
#ifdef RINGATTN_HAVE_NCCL
  int nv = 0;
  ncclGetVersion(&nv);
  s += ", NCCL " + std::to_string(nv / 10000) + "." + std::to_string((nv / 100) % 100) + "." + std::to_string(nv % 100);
#endif
#ifdef RINGATTN_HAVE_MPI
  int major = 0, minor = 0;
  MPI_Get_version(&major, &minor);
  s += ", MPI " + std::to_string(major) + "." + std::to_string(minor);
#endif
  return s;
}

// Device memory in use on this rank's GPU (0 on the host backend).
double used_device_bytes(const Backend& backend) {
#ifdef RINGATTN_HAVE_CUDA
  if (backend.device() == Device::kCuda) return static_cast<double>(cuda::device_memory().used_bytes());
#endif
  (void)backend;
  return 0.0;
}

// The first n rows' worth of memory of a (B, S, H, D) tensor as a (B, n, H, D) tensor: the stand-in
// for n arriving rows in the one-GPU baselines (the values are the local ones; only time matters).
TensorView first_rows(const TensorView& t, int64_t n) {
  if (n == t.shape[1]) return t;
  return make_view(t.data, t.dtype, t.device, {t.shape[0], n, t.shape[2], t.shape[3]});
}

// Device buffers of the backward pass of one size: dO, dQ/dK/dV and the fp32 dK/dV accumulators.
struct BackwardBuffers {
  TensorView dout, dq, dk, dv, dk_acc, dv_acc;
};

// The backward counterpart of baseline_pass: the backend's backward calls of this rank's ring pass,
// with the local K/V (and local fp32 accumulators) standing in for each visiting chunk.
double baseline_backward_pass(const RingAttention& ring, const RankLayout& ranks, Backend& backend,
                              const AttentionSpec& spec, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                              const TensorView& lse, const BackwardBuffers& g) {
  const int p = ring.world(), r = ring.rank();
  const auto t0 = Clock::now();
  backend.reset_marks();
  backend.mark();
  backend.backward_begin(q, out, g.dout, lse, ranks.positions(r));
  if (p == 1) {  // as the ring on one rank: the step rounds dK/dV into the gradients
    backend.backward_step_into(k, v, ranks.positions(r), g.dk, g.dv);
  } else {
    // The plan's steps (plan_steps: the ring's chunks or a direct plan's rows) with local memory
    // standing in for the arriving rows. One dK/dV accumulator serves all steps: the first visible
    // step stores into it (as each step stores into its share), the later ones add; a direct plan's
    // adds of the dK/dV its readers return (small, bandwidth-bound) are left out.
    bool stored = false;
    for (const PlanStep& st : plan_steps(ring.plan(), r)) {
      if (st.owner < 0) continue;
      const ChunkPositions k_pos = positions_from(st.positions);
      if (classify_chunks(spec.mask.view(), spec.heads, ranks.positions(r), k_pos) == Visibility::kEmpty) continue;
      const TensorView sk = first_rows(k, st.num_rows()), sv = first_rows(v, st.num_rows());
      const TensorView dk = first_rows(g.dk_acc, st.num_rows()), dv = first_rows(g.dv_acc, st.num_rows());
      if (stored) {
        backend.backward_step(sk, sv, k_pos, dk, dv);
      } else {
        backend.backward_step_into(sk, sv, k_pos, dk, dv);
        stored = true;
      }
    }
    if (!stored) {
      backend.zero(g.dk_acc);
      backend.zero(g.dv_acc);
    }
    backend.cast_accumulator(g.dk_acc, g.dk);
    backend.cast_accumulator(g.dv_acc, g.dv);
  }
  backend.backward_end(g.dq);
  backend.mark();
  backend.synchronize_and_read_marks();
  return ms_since(t0);
}

// One pass of exactly the backend calls the ring makes on this rank, with the local K/V standing
// in for each visiting chunk: the same kernels at the same per-GPU work, with no communication.
double baseline_pass(const RingAttention& ring, const RankLayout& ranks, Backend& backend, const AttentionSpec& spec,
                     const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out, const TensorView& lse) {
  const int p = ring.world(), r = ring.rank();
  const auto t0 = Clock::now();
  backend.reset_marks();
  backend.mark();
  backend.forward_begin(q, ranks.positions(r));
  if (p == 1) {  // as the ring on one rank: the only step writes out and lse
    backend.forward_step_into(k, v, ranks.positions(r), out, lse);
  } else {
    for (const PlanStep& st : plan_steps(ring.plan(), r)) {  // the ring's chunks or a direct plan's rows
      if (st.owner < 0) continue;
      const ChunkPositions k_pos = positions_from(st.positions);
      if (classify_chunks(spec.mask.view(), spec.heads, ranks.positions(r), k_pos) == Visibility::kEmpty) continue;
      backend.forward_step(first_rows(k, st.num_rows()), first_rows(v, st.num_rows()), k_pos);
    }
    backend.forward_end(out, lse);
  }
  backend.mark();
  backend.synchronize_and_read_marks();
  return ms_since(t0);
}

// A host copy of a backend tensor (same dtype and shape; rank 3 or 4).
HostTensor host_copy(const TensorView& t) {
  HostTensor h = t.rank == 3 ? make_host_tensor(t.dtype, {t.shape[0], t.shape[1], t.shape[2]})
                             : make_host_tensor(t.dtype, {t.shape[0], t.shape[1], t.shape[2], t.shape[3]});
  copy_to_host(t, h.view);
  return h;
}

// Fault injection for tests (RINGATTN_BENCH_FAULT set): scales every output value, so the check
// must report FAILED and the exit code must be non-zero.
void scale_output(const TensorView& out, double factor) {
  const std::size_t bytes = out.nbytes();
  std::vector<char> host(bytes);
  TensorView h = out;
  h.device = Device::kHost;
  h.data = host.data();
  if (out.device == Device::kHost) {
    h.data = out.data;
  } else {
#ifdef RINGATTN_HAVE_CUDA
    RINGATTN_CHECK(cudaMemcpy(host.data(), out.data, bytes, cudaMemcpyDeviceToHost) == cudaSuccess, ErrorKind::kCuda,
                   "fault injection: copy of out failed", "");
#endif
  }
  for (int64_t i = 0; i < h.numel(); ++i) store_from_double(h, i, factor * load_as_double(h, i));
#ifdef RINGATTN_HAVE_CUDA
  if (out.device != Device::kHost) {
    RINGATTN_CHECK(cudaMemcpy(out.data, host.data(), bytes, cudaMemcpyHostToDevice) == cudaSuccess, ErrorKind::kCuda,
                   "fault injection: copy of out failed", "");
  }
#endif
}

// RINGATTN_BENCH_FAULT set to anything but a gradient's name: the output is corrupted.
bool output_fault() {
  const char* fault = std::getenv(kBenchFaultEnv);
  if (fault == nullptr) return false;
  const std::string which = fault;
  return which != "dq" && which != "dk" && which != "dv";
}


std::string rank_json(int rank, const std::vector<double>& ring_ms, const std::vector<double>& base_ms,
                      const PassStats& stats, const PassStats* bwd, double peak, double growth, double visible_pairs) {
  JsonWriter j;
  j.begin_object().field("rank", rank);
  j.begin_array("ring_ms");
  for (double t : ring_ms) j.value(t);
  j.end_array().begin_array("baseline_ms");
  for (double t : base_ms) j.value(t);
  j.end_array();
  j.field("timeline_ms", stats.total_ms).field("compute_ms", stats.compute_ms());
  j.field("exposed_comm_ms", stats.exposed_comm_ms());
  j.field("device_memory_used_bytes", peak).field("ring_memory_bytes", growth);
  j.field("visible_pairs", visible_pairs);
  hops_json(j, "hops", stats, false);
  if (bwd != nullptr) hops_json(j, "backward_hops", *bwd, true);
  j.end_object();
  return j.str();
}

SizeResult run_size(Session& session, TimedCollectives& coll, const BenchFlags& f, AttentionSpec spec,
                    Progress& progress) {
  const int world = session.world();
  spec.validate(world);
  SizeResult res;
  res.tokens = spec.seq_len;
  res.tokens_per_gpu = spec.local_seq(world);
  res.flops = forward_flops(spec);
  res.visible_flops = visible_forward_flops(spec);
  res.model_mem_bytes = model_memory(spec, world, f.backward);

  double before = 0.0;
#ifdef RINGATTN_HAVE_CUDA
  if (session.on_gpu()) before = static_cast<double>(cuda::device_memory().used_bytes());
#endif
  std::unique_ptr<RingAttention> ring = session.make_ring(spec);
  ring->transport().set_timeout_ms(f.problem.timeout_s * 1000.0);
  coll.set_transport(&ring->transport());
  res.exchange = ring->transport().name();
  Backend& be = ring->backend();
  const int64_t B = spec.batch, c = ring->local_seq(), H = spec.heads, Hkv = spec.effective_kv_heads();
  const int64_t D = spec.head_dim;
  const DType lse_dtype = spec.dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  // This rank's rows under the plan's layout (auto and balanced resolved).
  const RankLayout ranks = layout_ranks(spec, world);
  const ChunkPositions pos = ranks.positions(ring->rank());
  const TensorView q = allocate_on_backend(be, spec.dtype, {B, c, H, D});
  const TensorView k = allocate_on_backend(be, spec.dtype, {B, c, Hkv, D});
  const TensorView v = allocate_on_backend(be, spec.dtype, {B, c, Hkv, D});
  const TensorView out = allocate_on_backend(be, spec.dtype, {B, c, H, D});
  const TensorView lse = allocate_on_backend(be, lse_dtype, {B, H, c});
  const uint64_t seed = f.problem.seed;
  fill_random_rows_anywhere(q, pos, spec.seq_len, seed, TensorId::kQ);
  fill_random_rows_anywhere(k, pos, spec.seq_len, seed, TensorId::kK);
  fill_random_rows_anywhere(v, pos, spec.seq_len, seed, TensorId::kV);
  BackwardBuffers g;
  if (f.backward) {
    const DType acc = spec.dtype == DType::kF64 ? DType::kF64 : DType::kF32;
    g.dout = allocate_on_backend(be, spec.dtype, {B, c, H, D});
    g.dq = allocate_on_backend(be, spec.dtype, {B, c, H, D});
    g.dk = allocate_on_backend(be, spec.dtype, {B, c, Hkv, D});
    g.dv = allocate_on_backend(be, spec.dtype, {B, c, Hkv, D});
    if (f.baseline && world > 1) {  // the one-GPU baseline's own accumulators (the ring keeps its own)
      g.dk_acc = allocate_on_backend(be, acc, {B, c, Hkv, D});
      g.dv_acc = allocate_on_backend(be, acc, {B, c, Hkv, D});
    }
    fill_random_rows_anywhere(g.dout, pos, spec.seq_len, seed, TensorId::kDOut);
    res.flops *= 1.0 + kBackwardFlopsFactor;
    res.visible_flops *= 1.0 + kBackwardFlopsFactor;
  }

  ring->set_hop_callback(on_hop, &progress);
  progress.start_size(progress.size_index, (f.warmup + f.iters) * (f.baseline ? 2 : 1));
  const std::string label = std::to_string(spec.seq_len) + " tokens";
  double peak = 0.0;
  std::vector<double> ring_ms, base_ms;
  double compute = 0.0, exposed = 0.0, timeline = 0.0;
  PassStats fwd_last, bwd_last;
  for (int it = 0; it < f.warmup + f.iters; ++it) {
    const bool timed = it >= f.warmup;
    progress.phase = timed ? "timed" : "warm-up";
    // The baseline pass runs right before each ring pass, so both see the same clocks and
    // temperature (a baseline timed after the ring, or after the host-side check left the GPUs
    // idle, read up to 12% faster at 8k tokens per GPU). It ends with the ring's own outputs.
    if (f.baseline) {
      double ms = baseline_pass(*ring, ranks, be, spec, q, k, v, out, lse);
      if (f.backward) ms += baseline_backward_pass(*ring, ranks, be, spec, q, k, v, out, lse, g);
      ++progress.pass;
      if (timed) base_ms.push_back(ms);
    }
    // Every ring pass starts together (a deadline barrier, so a peer that never comes is named);
    // within a pass the hops are handshakes watched by the transport's watchdog.
    coll.barrier("barrier before pass " + std::to_string(it) + " of " + label);
    const auto t0 = Clock::now();
    ring->forward(q, k, v, out, lse);
    double ms = ms_since(t0);
    check_comm(ring->transport());
    PassStats st = ring->last_stats();
    fwd_last = st;
    if (f.backward) {  // forward + backward: time, compute and exposed communication add up
      const auto t1 = Clock::now();
      ring->backward(q, k, v, out, lse, g.dout, g.dq, g.dk, g.dv);
      ms += ms_since(t1);
      check_comm(ring->transport());
      const PassStats& bst = ring->last_stats();
      bwd_last = bst;
      st.total_ms += bst.total_ms;
      st.hops.insert(st.hops.end(), bst.hops.begin(), bst.hops.end());
    }
    peak = std::max(peak, used_device_bytes(be));
    ++progress.pass;
    if (!timed) continue;
    ring_ms.push_back(ms);
    compute += st.compute_ms() / f.iters;
    exposed += st.exposed_comm_ms() / f.iters;
    timeline += st.total_ms / f.iters;
  }
  ring->set_hop_callback(nullptr, nullptr);
  const PassStats& stats = fwd_last;
  const double my_pairs = visible_pairs_of(spec, pos);
  res.visible_pairs = session.sum_over_ranks(my_pairs);
  res.visible_fraction = res.visible_pairs / dense_pairs(spec);  // the per-hop summary: the forward hops of the last pass

  // The last pass was the ring's: out, lse and the gradients are its results.
  if (f.check && output_fault()) scale_output(out, 1.5);  // tests: must FAIL
  if (f.check) {
    SampledCheckOptions opt;
    opt.samples = f.check_rows;
    opt.seed = seed + 17;
    res.check = distributed_sampled_check(spec, session, q, k, v, out, lse, opt);
    res.checked = true;
  }
  if (f.check && f.backward) {
    // Gradients of the last pass on sampled rows (as many per rank as -c samples over the ring),
    // from host copies; the reference never gathers another rank's K/V.
    progress.phase = "gradient check";
    const HostTensor hq = host_copy(q), hk = host_copy(k), hv = host_copy(v), hout = host_copy(out);
    const HostTensor hlse = host_copy(lse), hdo = host_copy(g.dout);
    const HostTensor hdq = host_copy(g.dq), hdk = host_copy(g.dk), hdv = host_copy(g.dv);
    inject_gradient_fault(kBenchFaultEnv, hdq.view, hdk.view, hdv.view);  // tests: the check must catch it
    const int64_t per_rank = std::max<int64_t>(1, (f.check_rows + world - 1) / world);
    bool sampled = false;
    const std::vector<int64_t> q_rows =
        choose_check_rows(spec, world, ring->rank(), seed + kGradQuerySalt, per_rank, &sampled);
    const std::vector<int64_t> k_rows =
        choose_check_rows(spec, world, ring->rank(), seed + kGradKeySalt, per_rank, &sampled);
    res.grad = check_gradients(session, spec, pos, hq.view, hk.view, hv.view, hdo.view, hout.view,
                               hlse.view, hdq.view, hdk.view, hdv.view, q_rows, k_rows);
    res.grad_checked = true;
  }

  // Reductions over ranks (max: the slowest rank sets the pace).
  double maxes[9] = {median(ring_ms), *std::min_element(ring_ms.begin(), ring_ms.end()), median(base_ms),
                     compute, exposed, timeline, peak, peak - before, 0.0};
  coll.reduce(maxes, 9, true, "reduction of " + label + " results");
  res.ring_ms = maxes[0];
  res.ring_min_ms = maxes[1];
  res.baseline_ms = maxes[2];
  res.compute_ms = maxes[3];
  res.exposed_ms = maxes[4];
  res.timeline_ms = maxes[5];
  res.peak_mem_bytes = maxes[6];
  res.ring_mem_bytes = maxes[7];
  res.tflops_per_gpu = res.flops / world / (res.ring_ms * 1e-3) / 1e12;
  res.visible_tflops_per_gpu = res.visible_flops / world / (res.ring_ms * 1e-3) / 1e12;
  res.baseline_tflops = f.baseline ? res.flops / world / (res.baseline_ms * 1e-3) / 1e12 : 0.0;
  res.efficiency = f.baseline && res.ring_ms > 0 ? res.baseline_ms / res.ring_ms : 0.0;
  res.exposed_pct = res.timeline_ms > 0 ? 100.0 * res.exposed_ms / res.timeline_ms : 0.0;

  std::vector<double> hop_values(2 * stats.hops.size());
  for (std::size_t h = 0; h < stats.hops.size(); ++h) {
    hop_values[2 * h] = stats.hops[h].compute_ms;
    hop_values[2 * h + 1] = stats.hops[h].exposed_comm_ms;
  }
  coll.reduce(hop_values.data(), static_cast<int>(hop_values.size()), true, "reduction of per-hop telemetry");
  for (std::size_t h = 0; h < stats.hops.size(); ++h) {
    res.hops.push_back({hop_values[2 * h], hop_values[2 * h + 1], stats.hops[h].skipped});
  }
  const std::vector<std::string> per_rank =
      session.gather_strings(rank_json(ring->rank(), ring_ms, base_ms, fwd_last, f.backward ? &bwd_last : nullptr,
                                       peak, peak - before, my_pairs));
  std::string arr = "[";
  for (std::size_t i = 0; i < per_rank.size(); ++i) arr += (i ? "," : "") + per_rank[i];
  res.per_rank_json = arr + "]";
  coll.set_transport(nullptr);
  return res;
}

void print_header(bool gpu) {
  std::printf("#\n");
  std::printf("# %10s %10s %10s %9s %9s %8s %9s %8s %8s %9s %9s %9s %6s\n", "tokens", "tokens", "time", "TFLOP/s",
              "TFLOP/s", "visible", "1-GPU", "ring", "exposed", gpu ? "peak mem" : "mem", "model", "max", "check");
  std::printf("# %10s %10s %10s %9s %9s %8s %9s %8s %8s %9s %9s %9s %6s\n", "(total)", "(per GPU)", "(ms)", "(per GPU)",
              "(visible)", "fraction", "(TFLOP/s)", "eff (%)", "comm (%)", "(GiB)", "(GiB)", "rel err", "");
}

// The largest relative error a size's checks saw: the output, and with --backward dQ, dK, dV.
double worst_rel_err(const SizeResult& r) {
  double w = r.check.max_rel_err;
  if (r.grad_checked) w = std::max({w, r.grad.dq_rel_err, r.grad.dk_rel_err, r.grad.dv_rel_err});
  return w;
}

void print_row(const SizeResult& r, bool baseline) {
  const bool gpu = r.peak_mem_bytes > 0;
  std::printf("  %10lld %10lld %10.3f %9s %9s %8.4f %9s %8s %8.2f %9s %9.3f %9s %6s\n",
              static_cast<long long>(r.tokens), static_cast<long long>(r.tokens_per_gpu), r.ring_ms,
              tflops_text(r.tflops_per_gpu).c_str(), tflops_text(r.visible_tflops_per_gpu).c_str(), r.visible_fraction,
              baseline ? tflops_text(r.baseline_tflops).c_str() : "N/A",
              baseline ? fmt("%.1f", 100.0 * r.efficiency).c_str() : "N/A", r.exposed_pct, gpu ? fmt("%.3f", r.peak_mem_bytes / kGiB).c_str() : "N/A",
              r.model_mem_bytes / kGiB, r.checked ? fmt("%.2e", worst_rel_err(r)).c_str() : "N/A",
              r.checked ? (r.check.pass && (!r.grad_checked || r.grad.pass) ? "OK" : "FAIL") : "N/A");
  std::fflush(stdout);
}

std::string results_json(const BenchFlags& f, const AttentionSpec& base, Session& session,
                         const std::vector<std::string>& ranks, const std::vector<SizeResult>& results, bool ok,
                         int exit_code) {
  JsonWriter j;
  j.begin_object().field("command", "bench").field("version", kVersion).field("date", now_utc());
  j.field("world", session.world()).field("backend", session.backend_name()).field("transport", session.transport_name());
  j.begin_object("params")
      .field("batch", base.batch)
      .field("heads", base.heads)
      .field("kv_heads", base.effective_kv_heads())
      .field("head_dim", base.head_dim)
      .field("causal", base.mask.causal)
      .field("mask", base.mask.describe())
      .field("layout", layout_name(base.layout))
      .field("dtype", dtype_name(base.dtype))
      .field("scale", base.scale())
      .field("min_tokens", f.min_tokens)
      .field("max_tokens", f.max_tokens)
      .field("factor", f.factor)
      .field("iters", f.iters)
      .field("warmup", f.warmup)
      .field("check", f.check)
      .field("check_rows", f.check_rows)
      .field("backward", f.backward)
      .field("timeout_s", f.problem.timeout_s)
      .field("seed", static_cast<int64_t>(f.problem.seed))
      .end_object();
  j.begin_array("ranks");
  for (const auto& r : ranks) j.value(r);
  j.end_array();
  j.begin_array("results");
  for (const SizeResult& r : results) {
    j.begin_object()
        .field("tokens", r.tokens)
        .field("exchange", r.exchange)
        .field("tokens_per_gpu", r.tokens_per_gpu)
        .field("flops", r.flops)
        .field("visible_flops", r.visible_flops)
        .field("visible_pairs", r.visible_pairs)
        .field("visible_fraction", r.visible_fraction)
        .field("visible_tflops_per_gpu", r.visible_tflops_per_gpu)
        .field("time_ms", r.ring_ms)
        .field("time_min_ms", r.ring_min_ms)
        .field("tflops_per_gpu", r.tflops_per_gpu)
        .field("baseline_ms", r.baseline_ms)
        .field("baseline_tflops", r.baseline_tflops)
        .field("ring_efficiency", r.efficiency)
        .field("timeline_ms", r.timeline_ms)
        .field("compute_ms", r.compute_ms)
        .field("exposed_comm_ms", r.exposed_ms)
        .field("exposed_comm_pct", r.exposed_pct)
        .field("peak_device_memory_bytes", r.peak_mem_bytes)
        .field("ring_memory_bytes", r.ring_mem_bytes)
        .field("model_memory_bytes", r.model_mem_bytes);
    if (r.checked) {
      j.begin_object("check")
          .field("rows", r.check.rows)
          .field("max_abs_err", r.check.max_abs_err)
          .field("max_rel_err", r.check.max_rel_err)
          .field("rel_l2_err", r.check.rel_l2_err)
          .field("max_lse_err", r.check.max_lse_err)
          .field("bad_values", r.check.bad_values)
          .field("tolerance", r.check.tolerance)
          .field("pass", r.check.pass)
          .end_object();
    }
    if (r.grad_checked) {
      j.begin_object("grad_check")
          .field("dq_rows", r.grad.dq_rows)
          .field("dkv_rows", r.grad.dkv_rows)
          .field("dq_rel_err", r.grad.dq_rel_err)
          .field("dk_rel_err", r.grad.dk_rel_err)
          .field("dv_rel_err", r.grad.dv_rel_err)
          .field("non_finite", r.grad.non_finite)
          .field("tolerance", r.grad.tolerance)
          .field("pass", r.grad.pass)
          .end_object();
    }
    j.begin_array("hops");
    for (std::size_t h = 0; h < r.hops.size(); ++h) {
      j.begin_object().field("hop", static_cast<int64_t>(h)).field("skipped", r.hops[h].skipped);
      j.field("compute_ms_max", r.hops[h].compute_ms).field("exposed_comm_ms_max", r.hops[h].exposed_ms).end_object();
    }
    j.end_array();
    j.raw("per_rank", r.per_rank_json);
    j.end_object();
  }
  j.end_array();
  j.field("ok", ok).field("exit_code", exit_code).end_object();
  return j.str() + "\n";
}

int run_bench(const BenchFlags& f) {
  guess_process_context_from_launcher();  // flag errors below name this process's rank under mpirun
  validate_flags(f);
  AttentionSpec base = spec_from_flags(f.problem);
  const std::vector<int64_t> sizes = sweep_sizes(f);
  // Documents are one list for every size: a single sequence length (flag errors stop every rank
  // alike, before the session exists).
  if (!f.problem.doc_lens.empty()) {
    RINGATTN_CHECK(sizes.size() == 1 && sizes.front() == parse_size(f.max_tokens, "-e/--max-tokens"),
                   ErrorKind::kInvalidArgument,
                   "--doc-lens needs a single sequence length, got the sweep -b " + f.min_tokens + " -e " + f.max_tokens,
                   "pass -b and -e both equal to the sum of the lengths");
    base.seq_len = sizes.front();
    apply_doc_lens(f.problem, base);
  }
  base.mask.validate(sizes.front(), base.heads, base.effective_kv_heads());
  std::unique_ptr<Session> session = Session::create(nullptr, nullptr, session_options_from_flags(f.problem));
  const int rank = session->rank(), world = session->world();
  TimedCollectives coll(*session, f.problem.timeout_s * 1000.0);
  const bool root = rank == 0;

  const std::vector<std::string> ranks = session->gather_strings(session->describe_rank());
  if (root) {
    std::printf("%s\n", versions_line().c_str());
    std::printf("# backend %s, transport %s, %d rank%s, date %s\n", session->backend_name().c_str(),
                session->transport_name().c_str(), world, world == 1 ? "" : "s", now_utc().c_str());
    std::printf("# problem: batch %lld, heads %d, kv-heads %d, head-dim %d, mask %s, layout %s, dtype %s, scale %.6g\n",
                static_cast<long long>(base.batch), base.heads, base.effective_kv_heads(), base.head_dim,
                base.mask.describe().c_str(), layout_name(base.layout), dtype_name(base.dtype), base.scale());
    std::printf("# sweep: -b %lld -e %lld -f %g, -n %d -w %d -c %d (%lld sampled rows), -T %g s, seed %llu\n",
                static_cast<long long>(sizes.front()), static_cast<long long>(sizes.back()), f.factor, f.iters,
                f.warmup, f.check, static_cast<long long>(f.check_rows), f.problem.timeout_s,
                static_cast<unsigned long long>(f.problem.seed));
    std::printf("# ring efficiency = one-GPU time of the same backend calls (no ring) / ring time; "
                "TFLOP/s counts 4*B*S^2*H*d%s (dense-equivalent); visible: 4*d per visible (query, key) pair%s\n",
                base.mask.causal ? " / 2 (causal)" : "", f.backward ? "; both x3.5 with --backward" : "");
    for (const std::string& r : ranks) std::printf("#  %s\n", r.c_str());
    print_header(session->on_gpu());
    std::fflush(stdout);
  }

  Progress progress;
  // Under mpirun a rank's stderr is a pipe even when mpirun's is a terminal: --progress on forces it.
  progress.enabled = root && (f.progress == "on" || (f.progress == "auto" && isatty(fileno(stderr))));
  progress.sizes = sizes;
  progress.sweep_start = Clock::now();
  std::vector<SizeResult> results;
  bool ok = true;
  try {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      AttentionSpec spec = base;
      spec.seq_len = sizes[i];
      progress.size_index = i;
      SizeResult r = run_size(*session, coll, f, spec, progress);
      progress.clear();
      if ((r.checked && !r.check.pass) || (r.grad_checked && !r.grad.pass)) ok = false;
      if (root) print_row(r, f.baseline);
      results.push_back(std::move(r));
    }
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::kComm && e.kind() != ErrorKind::kCuda) throw;
    // A peer may be stuck in the ring or a collective: report, give the other survivors a moment
    // to report too, then end the whole job (MPI_Abort) with a non-zero code.
    progress.clear();
    std::fprintf(stderr, "ringattn bench: error: %s\n", e.what());
    std::fflush(stderr);
    if (world > 1) {
      std::this_thread::sleep_for(kGraceBeforeAbort);
      session->abort_job(kExitCommFailure);
    }
    return kExitCommFailure;
  }

  const int exit_code = ok ? 0 : kExitFailed;
  if (root) {
    std::printf("#\n");
    if (!results.empty()) std::printf("# exchange: %s\n", results.front().exchange.c_str());
    for (const SizeResult& r : results) {
      std::printf("# per-hop at %lld tokens (max over ranks, last pass): ", static_cast<long long>(r.tokens));
      for (std::size_t h = 0; h < r.hops.size(); ++h) {
        if (r.hops[h].skipped) {
          std::printf("%s[%zu] skipped", h ? ", " : "", h);
        } else {
          std::printf("%s[%zu] %.2f+%.2f ms", h ? ", " : "", h, r.hops[h].compute_ms, r.hops[h].exposed_ms);
        }
      }
      std::printf("  (compute+exposed comm)\n");
    }
    double sum_tf = 0.0, worst = 0.0;
    for (const SizeResult& r : results) {
      sum_tf += r.tflops_per_gpu;
      if (r.checked) worst = std::max(worst, worst_rel_err(r));
    }
    std::printf("# Avg TFLOP/s per GPU: %.1f over %zu size%s\n", results.empty() ? 0.0 : sum_tf / results.size(),
                results.size(), results.size() == 1 ? "" : "s");
    if (f.check) {
      std::printf("# Check: %s, worst max rel err %.2e (tolerance %.1e, %lld sampled rows per size)\n",
                  ok ? "all sizes within tolerance" : "SOME SIZES OUT OF TOLERANCE", worst,
                  check_tolerance(base.dtype), static_cast<long long>(f.check_rows));
    } else {
      std::printf("# Check: not run (-c 0)\n");
    }
    std::printf("# %s (exit code %d)\n", ok ? "OK" : "FAILED", exit_code);
    std::fflush(stdout);
    if (!f.json_path.empty()) {
      write_text_file(f.json_path, results_json(f, base, *session, ranks, results, ok, exit_code));
    }
  }
  coll.barrier("final barrier");
  return exit_code;
}

// Reads a TOML file of flags (long names as keys, at the top level or under [bench]) into `app`'s
// options that the command line left unset. (CLI11 2.1 reads config files for the root app only.)
void apply_config(CLI::App& app, const std::string& path) {
  CLI::ConfigTOML format;
  std::vector<CLI::ConfigItem> items;
  try {
    items = format.from_file(path);
  } catch (const CLI::Error& e) {
    fail(ErrorKind::kIo, "cannot read --config " + path + ": " + e.what(), "pass an existing TOML file, e.g. configs/");
  }
  for (const CLI::ConfigItem& item : items) {
    if (item.name == "++" || item.name == "--") continue;  // section markers
    const bool top = item.parents.empty() || (item.parents.size() == 1 && item.parents[0] == "bench");
    RINGATTN_CHECK(top, ErrorKind::kInvalidArgument, "--config " + path + ": unknown section of key '" + item.fullname() + "'",
                   "put keys at the top level or under [bench]");
    // Keys may spell the flag with underscores (doc_lens = ...) as TOML users do.
    std::string name = item.name;
    std::replace(name.begin(), name.end(), '_', '-');
    CLI::Option* op = app.get_option_no_throw("--" + name);
    if (!op && name.size() == 1) op = app.get_option_no_throw("-" + name);
    RINGATTN_CHECK(op != nullptr && name != "config", ErrorKind::kInvalidArgument,
                   "--config " + path + ": unknown key '" + item.name + "'",
                   "keys are the long flag names of `ringattn bench --help`, e.g. heads = 32, min-tokens = \"128K\"");
    if (op->count() > 0) continue;  // the command line wins
    try {
      if (op->get_expected_min() == 0) {
        op->add_result(op->get_flag_value(item.name, format.to_flag(item)));
      } else if (kListKeys.count(name) > 0) {
        // window = [4095, 0] and doc_lens = [512, 512] are the flags' comma lists.
        std::string joined;
        for (std::size_t i = 0; i < item.inputs.size(); ++i) joined += (i ? "," : "") + item.inputs[i];
        op->add_result(joined);
      } else {
        op->add_result(item.inputs);
      }
      op->run_callback();
    } catch (const CLI::Error& e) {
      fail(ErrorKind::kInvalidArgument, "--config " + path + ": bad value for '" + item.name + "': " + e.what(),
           "see `ringattn bench --help` for the expected type");
    }
  }
}

}  // namespace

Command add_bench_command(CLI::App& root) {
  auto flags = std::make_shared<BenchFlags>();
  BenchFlags& f = *flags;
  // Defaults: the standard shape (32 heads, head_dim 128, bf16; layout auto: zigzag for causal).
  f.problem.heads = 32;
  f.problem.head_dim = 128;
  f.problem.dtype = "bf16";
  f.problem.layout = "auto";
  CLI::App* app = root.add_subcommand(
      "bench", "Sweep the ring forward over sequence lengths (nccl-tests style flags); rank 0 prints one table");
  app->add_option("--config", f.config_path,
                  "TOML file of these flags by long name, e.g. configs/llama3_8b_128k.toml (the command line wins)");
  app->add_option("-b,--min-tokens", f.min_tokens, "Smallest total sequence length (K/M/G suffixes)")
      ->capture_default_str();
  app->add_option("-e,--max-tokens", f.max_tokens, "Largest total sequence length (K/M/G suffixes)")
      ->capture_default_str();
  app->add_option("-f,--step-factor", f.factor, "Multiply the length by this factor between sizes")
      ->capture_default_str();
  app->add_option("-n,--iters", f.iters, "Timed passes per size")->capture_default_str();
  app->add_option("-w,--warmup-iters", f.warmup, "Untimed warm-up passes per size")->capture_default_str();
  app->add_option("-c,--check", f.check, "1: verify sampled rows against the fp64 reference; 0: skip")
      ->capture_default_str();
  app->add_option("--check-rows", f.check_rows, "Query rows sampled by -c 1 (each over all heads)")
      ->capture_default_str();
  app->add_option("--calibrate", f.calibrate_path,
                  "Measure kernel rates (dense, causal, masked with mask flags; -b..-e tokens per step) and the ring "
                  "exchange (more than one rank), and write a machine file for `ringattn plan`");
  app->add_option("-J,--json", f.json_path, "Write results (with per-rank, per-hop detail) to this JSON file");
  app->add_option("-T", f.problem.timeout_s, "Seconds any wait for a peer may take (same as --timeout)");
  app->add_option("--progress", f.progress,
                  "Progress on rank 0's stderr: auto (when it is a terminal; under mpirun it is a pipe), on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}))
      ->capture_default_str();
  app->add_flag("!--no-baseline", f.baseline, "Skip the one-GPU baseline (no ring efficiency column)");
  app->add_flag("--backward", f.backward,
                "Time forward + backward per pass (TFLOP/s count 3.5x the forward FLOPs; -c 1 also checks dQ, dK, dV on sampled rows)");
  add_problem_flags(*app, f.problem, /*with_seq_len=*/false);
  add_session_flags(*app, f.problem);
  return {app, [flags, app] {
            if (!flags->config_path.empty()) apply_config(*app, flags->config_path);
            if (!flags->calibrate_path.empty()) {
              CalibrateOptions o;
              o.problem = flags->problem;
              o.tokens = sweep_sizes(*flags);
              o.iters = flags->iters;
              o.warmup = flags->warmup;
              o.path = flags->calibrate_path;
              return run_calibrate(o);
            }
            return run_bench(*flags);
          }};
}

}  // namespace ringattn::cli
