// Calibration: kernel TFLOP/s per mask class and size on one rank, ring exchange latency and bandwidth, as a machine file.
#include "calibrate.hpp"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <thread>

#include "check/inputs.hpp"
#include "machine_file.hpp"
#include "model/model.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/session.hpp"

#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif

namespace ringattn::cli {
namespace {

using Clock = std::chrono::steady_clock;

// Message sizes of the link measurement: a latency-bound and bandwidth-bound end.
const std::vector<std::size_t> kLinkBytes = {std::size_t{64} << 10, std::size_t{1} << 20, std::size_t{4} << 20,
                                             std::size_t{16} << 20};
constexpr int kLinkRepeats = 5;
// Ranks of a CPU host the model may place (the cores bound how many compute at full rate).
constexpr int kCpuRanksPerHost = 64;
constexpr double kForwardBackwardFactor = 3.5;
// The fewest compute slots a host is written with (a host that other jobs hold almost entirely).
constexpr double kMinSlots = 0.05;
constexpr int kSlotProbeIters = 5;

// How often a rank that waits for rank 0's kernels looks whether it is done.
constexpr auto kIdlePoll = std::chrono::milliseconds(2);

// A barrier whose waiting ranks sleep between polls: MPI's own barrier spins, and on a host with
// fewer cores than ranks the spinning ranks would slow the one rank being timed.
void idle_barrier(Session& session) {
#ifdef RINGATTN_HAVE_MPI
  if (session.world() > 1 && session.mpi_comm() != nullptr) {
    MPI_Request req;
    MPI_Ibarrier(*static_cast<MPI_Comm*>(session.mpi_comm()), &req);
    int done = 0;
    while (true) {
      MPI_Test(&req, &done, MPI_STATUS_IGNORE);
      if (done) return;
      std::this_thread::sleep_for(kIdlePoll);
    }
  }
#endif
  session.barrier();
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

double ms_since(Clock::time_point t0) { return std::chrono::duration<double, std::milli>(Clock::now() - t0).count(); }

std::string now_utc() {
  char buf[32];
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

// Median milliseconds of one forward step (begin, step, end) and of forward + backward on `t` rows.
struct StepTimes {
  double fwd_ms = 0.0;
  double fwd_bwd_ms = 0.0;
};

StepTimes time_step(Backend& be, const AttentionSpec& spec, int iters, int warmup, uint64_t seed) {
  const int64_t B = spec.batch, t = spec.seq_len, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const DType acc = spec.dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  const ChunkPositions pos = chunk_positions(Layout::kContiguous, t, 0, 1);
  be.prepare(spec, t, t);
  const TensorView q = allocate_on_backend(be, spec.dtype, {B, t, H, D});
  const TensorView k = allocate_on_backend(be, spec.dtype, {B, t, Hkv, D});
  const TensorView v = allocate_on_backend(be, spec.dtype, {B, t, Hkv, D});
  const TensorView out = allocate_on_backend(be, spec.dtype, {B, t, H, D});
  const TensorView lse = allocate_on_backend(be, acc, {B, H, t});
  const TensorView dout = allocate_on_backend(be, spec.dtype, {B, t, H, D});
  const TensorView dq = allocate_on_backend(be, spec.dtype, {B, t, H, D});
  const TensorView dk = allocate_on_backend(be, acc, {B, t, Hkv, D});
  const TensorView dv = allocate_on_backend(be, acc, {B, t, Hkv, D});
  fill_random_rows_anywhere(q, pos, t, seed, TensorId::kQ);
  fill_random_rows_anywhere(k, pos, t, seed, TensorId::kK);
  fill_random_rows_anywhere(v, pos, t, seed, TensorId::kV);
  fill_random_rows_anywhere(dout, pos, t, seed, TensorId::kDOut);
  std::vector<double> f_ms, b_ms;
  for (int it = 0; it < warmup + iters; ++it) {
    // The ring's step calls (not the one-rank forms): what every step of a ring pass runs.
    be.reset_marks();
    const auto t0 = Clock::now();
    be.forward_begin(q, pos);
    be.forward_step(k, v, pos);
    be.forward_end(out, lse);
    be.mark();
    be.synchronize_and_read_marks();
    const double f = ms_since(t0);
    be.reset_marks();
    const auto t1 = Clock::now();
    be.backward_begin(q, out, dout, lse, pos);
    be.backward_step_into(k, v, pos, dk, dv);
    be.backward_end(dq);
    be.mark();
    be.synchronize_and_read_marks();
    const double b = ms_since(t1);
    if (it < warmup) continue;
    f_ms.push_back(f);
    b_ms.push_back(f + b);
  }
  return {median(f_ms), median(b_ms)};
}

}  // namespace

int run_calibrate(const CalibrateOptions& o) {
  guess_process_context_from_launcher();
  RINGATTN_CHECK(!o.tokens.empty() && o.iters >= 1, ErrorKind::kInvalidArgument, "--calibrate needs sizes and -n >= 1",
                 "pass e.g. -b 512 -e 2048 -f 2 -n 3");
  RINGATTN_CHECK(o.problem.doc_lens.empty(), ErrorKind::kInvalidArgument,
                 "--calibrate measures sizes of its own: --doc-lens cannot follow them",
                 "calibrate the masked class with --window, --stride or --global-tokens");
  std::unique_ptr<Session> session = Session::create(nullptr, nullptr, session_options_from_flags(o.problem));
  const int rank = session->rank(), world = session->world();
  const bool root = rank == 0;
  const AttentionSpec base = spec_from_flags(o.problem);
  std::vector<model::MaskClass> classes = {model::MaskClass::kDense, model::MaskClass::kCausal};
  if (base.mask.has_pattern()) classes.push_back(model::MaskClass::kMasked);

  model::Machine m;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  const std::string when = now_utc();
  m.name = std::string(session->on_gpu() ? "gpu-" : "cpu-") + host;
  m.description = "calibrated by `ringattn bench --calibrate` on " + std::string(host) + " at " + when;
  m.source = "measured: kernels on rank 0 alone (" + session->backend_name() + " backend), exchanges over " +
             session->transport_name() + " with " + std::to_string(world) + " ranks";
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  // Ranks on rank 0's host: their number is the host's size; the CPU computes on its cores.
  const std::vector<std::string> ranks = session->gather_strings(session->describe_rank());
  int local = 0;
  if (root) {
    const std::string h0 = ranks[0].substr(0, ranks[0].find(' '));
    for (const std::string& r : ranks) local += r.substr(0, r.find(' ')) == h0 ? 1 : 0;
  }
  m.gpus_per_host = session->on_gpu() ? std::max(1, local) : kCpuRanksPerHost;
  m.compute_slots = session->on_gpu() ? m.gpus_per_host : static_cast<double>(cores);  // measured below with ranks
  m.max_hosts = 1;
  m.step_overhead_us = 0.0;

  if (root) {
    std::printf("# ringattn bench --calibrate: %s, %d rank%s, %u cores, %s\n", host, world, world == 1 ? "" : "s", cores,
                when.c_str());
    std::printf("# kernels on rank 0 alone: %s, %d heads (%d kv), head_dim %d; TFLOP/s on visible pairs (x3.5 fwd+bwd)\n",
                dtype_name(base.dtype), base.heads, base.effective_kv_heads(), base.head_dim);
    std::printf("%8s %8s %12s %12s %12s %12s\n", "class", "tokens", "fwd ms", "fwd TFLOP/s", "f+b ms", "f+b TFLOP/s");
    std::unique_ptr<Backend> be = session->make_backend();
    for (model::MaskClass c : classes) {
      model::RateTable fwd, fb;
      fwd.backward = false;
      fb.backward = true;
      fwd.head_dim = fb.head_dim = base.head_dim;
      fwd.dtype = fb.dtype = base.dtype;
      fwd.mask = fb.mask = c;
      for (int64_t t : o.tokens) {
        AttentionSpec s = base;
        s.seq_len = t;
        s.layout = Layout::kContiguous;
        if (c != model::MaskClass::kMasked) s.mask = MaskSpec{};
        s.mask.causal = c == model::MaskClass::kCausal || (c == model::MaskClass::kMasked && base.mask.causal);
        s.validate(1);
        const StepTimes st = time_step(*be, s, o.iters, o.warmup, o.problem.seed);
        const double pairs = count_visible_pairs(s.mask.view(), t, 0, t, 1, s.heads, s.batch);
        const double flops = 4.0 * s.head_dim * pairs;
        const double rf = flops / (st.fwd_ms * 1e-3) / 1e12, rb = kForwardBackwardFactor * flops / (st.fwd_bwd_ms * 1e-3) / 1e12;
        fwd.tokens.push_back(t);
        fwd.tflops.push_back(rf);
        fb.tokens.push_back(t);
        fb.tflops.push_back(rb);
        std::printf("%8s %8lld %12.3f %12.4g %12.3f %12.4g\n", model::mask_class_name(c), static_cast<long long>(t),
                    st.fwd_ms, rf, st.fwd_bwd_ms, rb);
        std::fflush(stdout);
      }
      const std::string src = "measured " + when + ": one step (begin, step, end) on rank 0, median of -n " +
                              std::to_string(o.iters);
      fwd.source = fb.source = src;
      m.rates.push_back(fwd);
      m.rates.push_back(fb);
    }
  }
  idle_barrier(*session);

  // Ranks sharing the host's cores: every rank times the middle size at once; slots = ranks x
  // (time alone / time together), so that the model slows each rank as the CPU did (below 1 when
  // other jobs hold the cores too).
  if (!session->on_gpu() && world > 1) {
    AttentionSpec s = base;
    s.seq_len = o.tokens[o.tokens.size() / 2];
    s.layout = Layout::kContiguous;
    s.mask = MaskSpec{};
    s.validate(1);
    std::unique_ptr<Backend> be = session->make_backend();
    session->barrier();
    // Forward+backward passes, as many as a bench size runs: short probes catch the load of a moment.
    const int iters = std::max(o.iters, kSlotProbeIters);
    const double alone = root ? time_step(*be, s, iters, o.warmup, o.problem.seed).fwd_bwd_ms : 0.0;
    idle_barrier(*session);
    const double together = session->max_over_ranks(time_step(*be, s, iters, o.warmup, o.problem.seed).fwd_bwd_ms);
    const double alone_ms = session->max_over_ranks(alone);
    m.compute_slots = std::clamp(world * alone_ms / together, kMinSlots, static_cast<double>(world));
    if (root) {
      std::printf("# %d ranks at once: %.3f ms per step vs %.3f ms alone: %.2f compute slots\n", world, together, alone_ms,
                  m.compute_slots);
    }
  }

  // Link: every rank sends to rank+1 while receiving from rank-1, as a ring hop does.
  m.intra.name = session->transport_name();
  m.intra.latency_us = 0.0;
  m.intra.gbs = 1.0;
  if (world > 1) {
    AttentionSpec s = base;
    s.seq_len = 2 * world * 64;
    s.layout = Layout::kContiguous;
    s.mask = MaskSpec{};
    std::unique_ptr<RingAttention> ring = session->make_ring(s);
    Backend& be = ring->backend();
    Transport& tr = ring->transport();
    tr.set_timeout_ms(o.problem.timeout_s * 1000.0);
    const std::size_t most = kLinkBytes.back();
    void* send = be.allocate(most);
    void* recv = be.allocate(most);
    std::vector<double> xs, ys;
    int hop = 0;
    if (root) std::printf("# link: send to rank+1 while receiving from rank-1\n%12s %12s %12s\n", "bytes", "ms", "GB/s");
    for (std::size_t bytes : kLinkBytes) {
      std::vector<double> ms;
      for (int it = 0; it < kLinkRepeats + 1; ++it) {
        session->barrier();
        const auto t0 = Clock::now();
        tr.start_exchange(send, recv, bytes, hop);
        tr.wait(hop);
        be.mark();
        be.synchronize_and_read_marks();
        be.reset_marks();
        ++hop;
        const double t = session->max_over_ranks(ms_since(t0));
        if (it > 0) ms.push_back(t);  // the first exchange sets up the path
      }
      xs.push_back(static_cast<double>(bytes));
      ys.push_back(median(ms));
      if (root) std::printf("%12zu %12.4f %12.4g\n", bytes, ys.back(), bytes / (ys.back() * 1e-3) / 1e9);
    }
    // Least squares of ms = latency + bytes / bandwidth.
    const double n = static_cast<double>(xs.size());
    double sx = 0, sy = 0, sxx = 0, sxy = 0;
    for (std::size_t i = 0; i < xs.size(); ++i) sx += xs[i], sy += ys[i], sxx += xs[i] * xs[i], sxy += xs[i] * ys[i];
    const double slope = (n * sxy - sx * sy) / (n * sxx - sx * sx);  // ms per byte
    const double icpt = (sy - slope * sx) / n;
    m.intra.gbs = slope > 0 ? 1e-9 / (slope * 1e-3) : 1.0;
    m.intra.latency_us = std::max(0.0, icpt * 1e3);
    m.intra.source = "measured " + when + ": ring exchanges of 64 KiB .. 16 MiB over " + std::string(tr.name()) +
                     ", median of " + std::to_string(kLinkRepeats) + ", fitted as latency + bytes / bandwidth";
  } else {
    m.intra.source = "not measured: one rank (run under mpirun -np 2 or more to measure the exchange)";
  }
  if (root) {
    std::printf("# link fit: latency %.2f us, %.4g GB/s\n", m.intra.latency_us, m.intra.gbs);
    write_text_file(o.path, machine_toml(m));
    std::printf("# wrote %s\n# OK\n", o.path.c_str());
  }
  session->barrier();
  return 0;
}

}  // namespace ringattn::cli
