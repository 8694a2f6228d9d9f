// `ringattn run`: one exact ring-attention forward (and --backward) pass on seeded or loaded inputs, with --check, --save and --json.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "check/check.hpp"
#include "check/grad_check.hpp"
#include "cli_common.hpp"
#include "commands.hpp"
#include "exit_codes.hpp"
#include "core/logging.hpp"
#include "core/npy.hpp"
#include "plan/plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/ringattn.hpp"
#include "ringattn/session.hpp"

namespace ringattn::cli {
namespace {

constexpr uint64_t kKeySampleSalt = 0x6b65797307ull;  // separates the key-row sample from the query-row one
constexpr double kBackwardFlopsFactor = 2.5;  // backward = 2.5 x forward FLOPs, as peers count
constexpr const char* kRunFaultEnv = "RINGATTN_RUN_FAULT";  // tests: corrupt one gradient before --check

struct RunFlags {
  ProblemFlags problem;
  bool check = false;
  bool backward = false;   // also run the backward pass (dQ, dK, dV) with dO seeded or from do.npy
  int64_t check_rows = 0;  // 0: auto (all rows when cheap, else a sample), -1: all, N: N sampled rows
  int warmup = -1;         // untimed passes first; -1: 1 on the GPU (NCCL connections, kernel loading), 0 on the CPU
  int iters = 1;           // timed passes; the time reported is their mean (the last one is checked/saved)
  std::string load_dir;
  std::string save_dir;
  std::string json_path;
  CLI::Option* load_opt = nullptr;  // to tell an empty path given from none
  CLI::Option* save_opt = nullptr;
  CLI::Option* json_opt = nullptr;
};

// The --load values of the problem, for messages: a size read from q.npy is named as such, not as
// a flag the user never passed ("--seq-len 100 is not divisible by 3" for a file of 100 tokens).
std::string name_loaded_values(const RunFlags& f, std::string message) {
  const std::string q = (std::filesystem::path(f.load_dir) / "q.npy").string();
  const struct {
    const char* flag;
    const CLI::Option* opt;
    std::string from;
  } names[] = {{"--batch ", f.problem.batch_opt, "the batch (axis 0) of '" + q + "', "},
               {"--seq-len ", f.problem.seq_len_opt, "the sequence length (axis 1) of '" + q + "', "},
               {"--heads ", f.problem.heads_opt, "the heads (axis 2) of '" + q + "', "},
               {"--kv-heads ", f.problem.kv_heads_opt, "the kv heads (axis 2) of k.npy, "},
               {"--head-dim ", f.problem.head_dim_opt, "the head dimension (axis 3) of '" + q + "', "}};
  // The hint keeps its flags: they are what the user can pass to change the problem.
  const std::size_t hint_at = message.find(" (hint:");
  std::string hint = hint_at == std::string::npos ? std::string() : message.substr(hint_at);
  message = message.substr(0, hint_at);
  for (const auto& n : names) {
    if (given(n.opt)) continue;
    const std::string flag = n.flag;
    for (std::size_t at = message.find(flag); at != std::string::npos; at = message.find(flag, at + n.from.size())) {
      message.replace(at, flag.size(), n.from);
    }
  }
  return message + hint;
}

// Flags with a range: refused up front naming the flag and the values it takes.
void validate_run_flags(const RunFlags& f) {
  if (f.iters < 1) {
    fail(ErrorKind::kInvalidArgument, "--iters " + std::to_string(f.iters) + " must be at least 1",
         "pass --iters 1 or more");
  }
  if (f.warmup < -1) {
    fail(ErrorKind::kInvalidArgument, "--warmup " + std::to_string(f.warmup) + " is below -1",
         "pass 0 or more untimed passes, or -1 for the default (1 on the GPU, 0 on the CPU)");
  }
  if (f.check_rows < -1) {
    fail(ErrorKind::kInvalidArgument, "--check-rows " + std::to_string(f.check_rows) + " is below -1",
         "pass 0 (auto), -1 (all rows) or a number of sampled rows");
  }
  const std::pair<const CLI::Option*, const std::string*> paths[] = {
      {f.load_opt, &f.load_dir}, {f.save_opt, &f.save_dir}, {f.json_opt, &f.json_path}};
  for (const auto& [opt, value] : paths) {
    if (given(opt) && value->empty()) {
      fail(ErrorKind::kInvalidArgument, opt->get_name() + " was given an empty path", "pass a path, or omit the flag");
    }
  }
  if (!f.json_path.empty() && std::filesystem::is_directory(f.json_path)) {
    fail(ErrorKind::kInvalidArgument, "--json '" + f.json_path + "' is a directory",
         "pass a file path, e.g. --json " + (std::filesystem::path(f.json_path) / "run.json").string());
  }
}

// Global q/k/v read from --load, converted to the run's dtype.
struct LoadedInputs {
  HostTensor q, k, v;  // (B, S, H, D), (B, S, Hkv, D), (B, S, Hkv, D)
  HostTensor dout;     // (B, S, H, D), only with --backward
};

std::string join(const std::string& dir, const char* name) { return (std::filesystem::path(dir) / name).string(); }

// DIR/cu_seqlens.npy when present: int32/int64 [n_docs + 1] offsets rising strictly from 0 to seq_len.
// Returns false when the file is absent.
bool load_cu_seqlens(const RunFlags& f, AttentionSpec& spec) {
  const std::string cp = join(f.load_dir, "cu_seqlens.npy");
  if (!std::filesystem::exists(cp)) return false;
  if (!f.problem.doc_lens.empty()) {
    fail(ErrorKind::kInvalidArgument, "--doc-lens and '" + cp + "' both give the documents",
         "drop --doc-lens or remove cu_seqlens.npy from the --load directory");
  }
  const std::vector<int64_t> cu = read_npy_int_vector(cp);
  bool ok = cu.size() >= 2 && cu.front() == 0 && cu.back() == spec.seq_len;
  for (std::size_t i = 1; ok && i < cu.size(); ++i) ok = cu[i] > cu[i - 1];
  if (!ok) {
    fail(ErrorKind::kInvalidArgument,
         "'" + cp + "' must hold n_docs + 1 offsets rising strictly from 0 to the sequence length " +
             std::to_string(spec.seq_len) + " (got " + std::to_string(cu.size()) + " values" +
             (cu.empty() ? std::string() : " from " + std::to_string(cu.front()) + " to " + std::to_string(cu.back())) +
             ")",
         "write cu_seqlens.npy as np.cumsum([0] + doc_lengths) (int32 or int64) for q.npy's sequence");
  }
  spec.mask.doc_offsets = cu;
  return true;
}

void conflict(const char* flag, int64_t flag_value, const std::string& file, int64_t file_value, const char* axis) {
  fail(ErrorKind::kInvalidArgument,
       std::string(flag) + " " + std::to_string(flag_value) + " conflicts with '" + file + "' whose " + axis + " is " +
           std::to_string(file_value),
       std::string("with --load the arrays define the problem: drop ") + flag + " or pass arrays of that shape");
}

// Reads DIR/q.npy, k.npy, v.npy; takes batch, seq_len, heads, kv_heads and head_dim from their
// shapes (a flag the user passed must agree) and the dtype from q.npy unless --dtype was given.
LoadedInputs load_inputs(const RunFlags& f, AttentionSpec& spec) {
  const std::string qp = join(f.load_dir, "q.npy"), kp = join(f.load_dir, "k.npy"), vp = join(f.load_dir, "v.npy");
  NpyArray q = read_npy(qp);
  NpyArray k = read_npy(kp);
  NpyArray v = read_npy(vp);
  if (q.shape.size() != 4) {
    fail(ErrorKind::kInvalidArgument, "'" + qp + "' has shape " + q.shape_string() + ", expected 4 dimensions",
         "--load wants q.npy as [batch, seq, heads, head_dim] in global token order");
  }
  const int64_t B = q.shape[0], S = q.shape[1], H = q.shape[2], D = q.shape[3];
  if (k.shape.size() != 4) {
    fail(ErrorKind::kInvalidArgument, "'" + kp + "' has shape " + k.shape_string() + ", expected 4 dimensions",
         "--load wants k.npy as [batch, seq, kv_heads, head_dim]");
  }
  const int64_t Hkv = k.shape[2];
  expect_npy_shape(k, {B, S, Hkv, D}, kp, "[batch, seq, kv_heads, head_dim] matching q.npy " + q.shape_string());
  expect_npy_shape(v, {B, S, Hkv, D}, vp, "[batch, seq, kv_heads, head_dim] matching k.npy");
  const ProblemFlags& p = f.problem;
  if (given(p.batch_opt) && p.batch != B) conflict("--batch", p.batch, qp, B, "batch (axis 0)");
  if (given(p.seq_len_opt) && spec.seq_len != S) conflict("--seq-len", spec.seq_len, qp, S, "seq (axis 1)");
  if (given(p.heads_opt) && p.heads != H) conflict("--heads", p.heads, qp, H, "heads (axis 2)");
  if (given(p.kv_heads_opt) && p.kv_heads != 0 && p.kv_heads != Hkv) {
    conflict("--kv-heads", p.kv_heads, kp, Hkv, "kv_heads (axis 2)");
  }
  if (given(p.head_dim_opt) && p.head_dim != D) conflict("--head-dim", p.head_dim, qp, D, "head_dim (axis 3)");
  if (H > (1 << 30) || Hkv > (1 << 30) || D > (1 << 30) || Hkv < 1) {
    fail(ErrorKind::kInvalidArgument, "'" + kp + "' has an unusable head count " + std::to_string(Hkv), "");
  }
  spec.batch = B;
  spec.seq_len = S;
  spec.heads = static_cast<int>(H);
  spec.kv_heads = static_cast<int>(Hkv);
  spec.head_dim = static_cast<int>(D);
  if (!given(p.dtype_opt)) spec.dtype = q.dtype;
  if (!load_cu_seqlens(f, spec)) apply_doc_lens(p, spec);
  LoadedInputs in;
  in.q = convert_host(q.view(), spec.dtype);
  in.k = convert_host(k.view(), spec.dtype);
  in.v = convert_host(v.view(), spec.dtype);
  if (f.backward) {
    const std::string dp = join(f.load_dir, "do.npy");
    if (!std::filesystem::exists(dp)) {
      fail(ErrorKind::kInvalidArgument, "--backward with --load needs '" + dp + "' (the output gradient dO)",
           "write do.npy [batch, seq, heads, head_dim] next to q.npy, or drop --load to use seeded inputs");
    }
    NpyArray dout = read_npy(dp);
    expect_npy_shape(dout, {B, S, H, D}, dp, "[batch, seq, heads, head_dim] matching q.npy " + q.shape_string());
    in.dout = convert_host(dout.view(), spec.dtype);
  }
  return in;
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string stats_json(int rank, const std::string& who, const PassStats& st, const PassStats* bwd, double wall_ms,
                       double visible_pairs) {
  JsonWriter j;
  j.begin_object().field("rank", rank).field("where", who).field("wall_ms", wall_ms).field("total_ms", st.total_ms);
  j.field("compute_ms", st.compute_ms()).field("exposed_comm_ms", st.exposed_comm_ms());
  j.field("visible_pairs", visible_pairs);
  hops_json(j, "hops", st, false);
  if (bwd != nullptr) hops_json(j, "backward_hops", *bwd, true);
  j.end_object();
  return j.str();
}

int run_body(const RunFlags& f, Session& session, const std::string& early_error);

int run_main(const RunFlags& f) {
  guess_process_context_from_launcher();
  // A bad --backend or --timeout is reported collectively, from a session on the CPU backend.
  SessionOptions options;
  std::string early_error;
  try {
    options = session_options_from_flags(f.problem);
  } catch (const Error& e) {
    early_error = e.what();
    options = SessionOptions{};
    options.backend = "cpu";
  }
  try {
    init_logging(f.problem.log_level);  // a bad level is reported below, collectively
  } catch (const Error&) {
  }
  std::unique_ptr<Session> session = Session::create(nullptr, nullptr, options);
  return run_reporting_errors(*session, [&] { return run_body(f, *session, early_error); });
}

int run_body(const RunFlags& f, Session& session, const std::string& early_error) {
  const int rank = session.rank(), world = session.world();
  AttentionSpec spec;
  std::optional<LoadedInputs> loaded;
  std::optional<SaveDirLock> save_lock;
  collectively(session, [&] {
    if (!early_error.empty()) throw Error(ErrorKind::kInvalidArgument, early_error);
    validate_run_flags(f);
    init_logging(f.problem.log_level);
    spec = spec_from_flags(f.problem);
    if (!f.load_dir.empty()) {
      loaded = load_inputs(f, spec);
      try {
        spec.validate(world);
      } catch (const Error& e) {
        throw Error(e.kind(), name_loaded_values(f, e.what()));
      }
    } else {
      apply_doc_lens(f.problem, spec);
      spec.validate(world);
    }
    if (rank == 0 && !f.save_dir.empty()) {
      ensure_writable_dir(f.save_dir, "--save");
      save_lock.emplace(f.save_dir, "--save");  // held until the job ends
    }
    if (rank == 0 && !f.json_path.empty()) {
      const auto parent = std::filesystem::path(f.json_path).parent_path();
      ensure_writable_dir(parent.empty() ? std::string(".") : parent.string(), "--json");
    }
  });
  // Whether --save, --json, --load are given (not their paths) changes what the ranks do together.
  auto given_text = [](const std::string& v) { return std::string(v.empty() ? "not given" : "given"); };
  agree_flags(session, {{"--iters", std::to_string(f.iters)},
                        {"--warmup", std::to_string(f.warmup)},
                        {"--backward", f.backward ? "on" : "off"},
                        {"--check", f.check ? "on" : "off"},
                        {"--check-rows", std::to_string(f.check_rows)},
                        {"--seed", std::to_string(f.problem.seed)},
                        {"--save", given_text(f.save_dir)},
                        {"--json", given_text(f.json_path)},
                        {"--load", given_text(f.load_dir)},
                        {"the problem (shapes, dtype, layout, mask, scale)", spec.describe()}});
  log().info("session up: {} ranks, backend {}, transport {}", world, session.backend_name(),
             session.transport_name());
  log().info("problem: {}", spec.describe());

  std::unique_ptr<RingAttention> ring;
  collectively(session, [&] { ring = session.make_ring(spec); });
  const int64_t B = spec.batch, Sl = ring->local_seq(), H = spec.heads, Hkv = spec.effective_kv_heads(),
                D = spec.head_dim;
  // This rank's rows under the plan's layout (auto and balanced resolved): the same positions on every rank.
  const RankLayout ranks = layout_ranks(spec, world);
  const ChunkPositions pos = ranks.positions(rank);
  RINGATTN_CHECK(pos.size() == Sl, ErrorKind::kInternal,
                 "the plan gives rank " + std::to_string(rank) + " " + std::to_string(pos.size()) + " rows, the ring " +
                     std::to_string(Sl),
                 "");
  const DType lse_dtype = spec.dtype == DType::kF64 ? DType::kF64 : DType::kF32;

  // Host inputs of this rank (its rows only), then the same in the backend's memory.
  HostTensor q = make_host_tensor(spec.dtype, {B, Sl, H, D});
  HostTensor k = make_host_tensor(spec.dtype, {B, Sl, Hkv, D});
  HostTensor v = make_host_tensor(spec.dtype, {B, Sl, Hkv, D});
  HostTensor out = make_host_tensor(spec.dtype, {B, Sl, H, D});
  HostTensor lse = make_host_tensor(lse_dtype, {B, H, Sl});
  TensorView q_dev, k_dev, v_dev, out_dev, lse_dev;
  collectively(session, [&] {
    if (loaded) {
      shard_rows(loaded->q.view, q.view, pos, 1);
      shard_rows(loaded->k.view, k.view, pos, 1);
      shard_rows(loaded->v.view, v.view, pos, 1);
    } else {
      fill_random_rows(q.view, pos, spec.seq_len, f.problem.seed, TensorId::kQ);
      fill_random_rows(k.view, pos, spec.seq_len, f.problem.seed, TensorId::kK);
      fill_random_rows(v.view, pos, spec.seq_len, f.problem.seed, TensorId::kV);
    }
    Backend& be = ring->backend();
    q_dev = allocate_on_backend(be, spec.dtype, {B, Sl, H, D});
    k_dev = allocate_on_backend(be, spec.dtype, {B, Sl, Hkv, D});
    v_dev = allocate_on_backend(be, spec.dtype, {B, Sl, Hkv, D});
    out_dev = allocate_on_backend(be, spec.dtype, {B, Sl, H, D});
    lse_dev = allocate_on_backend(be, lse_dtype, {B, H, Sl});
    copy_to_backend(q.view, q_dev);
    copy_to_backend(k.view, k_dev);
    copy_to_backend(v.view, v_dev);
  });

  // --scale against the inputs' magnitudes (max over every rank's rows; every rank has the same).
  session.set_step("checking --scale against the inputs");
  const double q_norm = session.max_over_ranks(max_row_norm(q.view));
  const double k_norm = session.max_over_ranks(max_row_norm(k.view));
  collectively(session, [&] {
    check_scale_bound(spec, q_norm, k_norm,
                      loaded ? "the largest row norms of q.npy and k.npy" : "the seeded inputs' largest row norms");
  });

  // Warm-up passes (untimed), then `iters` timed passes, each started together after a barrier.
  const int warmup = f.warmup >= 0 ? f.warmup : (session.on_gpu() ? 1 : 0);
  double wall_ms = 0.0;
  for (int it = 0; it < warmup + f.iters; ++it) {
    session.set_step("the barrier before forward pass " + std::to_string(it));
    session.barrier();
    session.set_step("agreeing on the outcome of forward pass " + std::to_string(it));
    collectively(session, [&] {
      const double t0 = now_ms();
      ring->forward(q_dev, k_dev, v_dev, out_dev, lse_dev);  // returns when the pass is complete
      if (it >= warmup) wall_ms += (now_ms() - t0) / f.iters;
    });
  }
  collectively(session, [&] {
    copy_to_host(out_dev, out.view);
    copy_to_host(lse_dev, lse.view);
  });
  PassStats stats = ring->last_stats();

  // --backward: dO seeded or loaded, then warm-up and timed backward passes.
  HostTensor dout, dq, dk, dv;
  double wall_bwd_ms = 0.0;
  PassStats bwd_stats;
  if (f.backward) {
    dout = make_host_tensor(spec.dtype, {B, Sl, H, D});
    dq = make_host_tensor(spec.dtype, {B, Sl, H, D});
    dk = make_host_tensor(spec.dtype, {B, Sl, Hkv, D});
    dv = make_host_tensor(spec.dtype, {B, Sl, Hkv, D});
    TensorView dout_dev, dq_dev, dk_dev, dv_dev;
    collectively(session, [&] {
      if (loaded) {
        shard_rows(loaded->dout.view, dout.view, pos, 1);
      } else {
        fill_random_rows(dout.view, pos, spec.seq_len, f.problem.seed, TensorId::kDOut);
      }
      Backend& be = ring->backend();
      dout_dev = allocate_on_backend(be, spec.dtype, {B, Sl, H, D});
      dq_dev = allocate_on_backend(be, spec.dtype, {B, Sl, H, D});
      dk_dev = allocate_on_backend(be, spec.dtype, {B, Sl, Hkv, D});
      dv_dev = allocate_on_backend(be, spec.dtype, {B, Sl, Hkv, D});
      copy_to_backend(dout.view, dout_dev);
    });
    for (int it = 0; it < warmup + f.iters; ++it) {
      session.set_step("the barrier before backward pass " + std::to_string(it));
      session.barrier();
      session.set_step("agreeing on the outcome of backward pass " + std::to_string(it));
      collectively(session, [&] {
        const double t0 = now_ms();
        ring->backward(q_dev, k_dev, v_dev, out_dev, lse_dev, dout_dev, dq_dev, dk_dev, dv_dev);
        if (it >= warmup) wall_bwd_ms += (now_ms() - t0) / f.iters;
      });
    }
    bwd_stats = ring->last_stats();
    collectively(session, [&] {
      copy_to_host(dq_dev, dq.view);
      copy_to_host(dk_dev, dk.view);
      copy_to_host(dv_dev, dv.view);
    });
    inject_gradient_fault(kRunFaultEnv, dq.view, dk.view, dv.view);  // tests: --check must catch it
  }
  session.set_step("reducing the timings");
  const double wall_bwd_max = session.max_over_ranks(wall_bwd_ms);
  const double bwd_compute_max = session.max_over_ranks(bwd_stats.compute_ms());
  const double bwd_exposed_max = session.max_over_ranks(bwd_stats.exposed_comm_ms());
  const double wall_max = session.max_over_ranks(wall_ms);
  const double compute_max = session.max_over_ranks(stats.compute_ms());
  const double exposed_max = session.max_over_ranks(stats.exposed_comm_ms());
  const std::vector<std::string> rank_lines = session.gather_strings(session.describe_rank());
  // Visible pairs per rank (exact counts of this rank's queries), every rank's on every rank.
  std::vector<double> pairs(static_cast<std::size_t>(world), 0.0);
  pairs[static_cast<std::size_t>(rank)] = visible_pairs_of(spec, pos);
  session.reduce_over_ranks(pairs.data(), world, /*max=*/false);
  double pairs_max = 0.0, pairs_sum = 0.0;
  for (double p : pairs) {
    pairs_max = std::max(pairs_max, p);
    pairs_sum += p;
  }
  const double pairs_mean = pairs_sum / world;
  const double pairs_imbalance = pairs_mean > 0.0 ? pairs_max / pairs_mean : 1.0;
  const std::vector<std::string> rank_stats = session.gather_strings(stats_json(
      rank, session.describe_rank(), stats, f.backward ? &bwd_stats : nullptr, wall_ms, pairs[static_cast<std::size_t>(rank)]));
  // Non-finite outputs (a NaN or inf input propagates, as in the reference): counted without
  // --check too, so a run never reports success on outputs nobody can use.
  auto non_finite = [](const HostTensor& t) {
    double n = 0;
    for (int64_t e = 0; e < t.view.numel(); ++e) n += std::isfinite(load_as_double(t.view, e)) ? 0 : 1;
    return n;
  };
  double bad_values[4] = {non_finite(out), 0, 0, 0};
  if (f.backward) {
    bad_values[1] = non_finite(dq);
    bad_values[2] = non_finite(dk);
    bad_values[3] = non_finite(dv);
  }
  session.reduce_over_ranks(bad_values, 4, /*max=*/false);
  const double bad_total = bad_values[0] + bad_values[1] + bad_values[2] + bad_values[3];
  int skipped = 0;
  for (const HopStats& h : stats.hops) skipped += h.skipped ? 1 : 0;
  const double skipped_total = session.sum_over_ranks(skipped);

  // --check against the fp64 reference.
  // A sampled check (long sequences) merges per-rank fp64 partials over each rank's own K/V
  // (src/check/sampled_check.cpp), so no rank regenerates or streams the whole K/V; the exhaustive check
  // of short runs streams the global K/V through the naive reference.
  CheckResult check;
  session.set_step("--check");
  if (f.check) {
    bool sampled_here = false;
    const std::vector<int64_t> rows =
        choose_check_rows(spec, world, rank, f.problem.seed, f.check_rows, &sampled_here);
    const bool sampled = session.max_over_ranks(sampled_here ? 1.0 : 0.0) > 0.0;
    if (sampled) {
      SampledCheckOptions options;
      options.samples = static_cast<int64_t>(session.sum_over_ranks(static_cast<double>(rows.size())));
      options.seed = f.problem.seed;
      options.tolerance = check_tolerance(spec.dtype);
      SampledCheckResult r;
      collectively(session, [&] {
        r = distributed_sampled_check(spec, session, q.view, k.view, v.view, out.view, lse.view, options);
      });
      check.rows = r.rows;
      check.sampled = true;
      check.max_abs_err = r.max_abs_err;
      check.max_ref = r.max_ref;
      check.max_rel_err = r.max_rel_err;
      check.max_lse_err = r.max_lse_err;
      check.mismatched = r.bad_values;
      check.tolerance = r.tolerance;
      check.pass = r.pass;
    } else {
      CheckResult local;
      collectively(session, [&] {
        const KvBlockSource kv = loaded ? global_kv_source(loaded->k.view, loaded->v.view)
                                        : seeded_kv_source(f.problem.seed, spec.seq_len);
        local = check_against_reference(spec, q.view, pos, out.view, lse.view, rows, kv);
        local.sampled = false;
      });
      check = reduce_check(session, local);
    }
  }
  GradCheckResult grad_check;
  if (f.check && f.backward) {
    collectively(session, [&] {
      bool sampled = false;
      const std::vector<int64_t> rows = choose_check_rows(spec, world, rank, f.problem.seed, f.check_rows, &sampled);
      // Key rows: a different seeded sample than the query rows (same count on every rank).
      const std::vector<int64_t> key_rows =
          choose_check_rows(spec, world, rank, f.problem.seed ^ kKeySampleSalt, f.check_rows, &sampled);
      grad_check = check_gradients(session, spec, pos, q.view, k.view, v.view, dout.view, out.view, lse.view,
                                   dq.view, dk.view, dv.view, rows, key_rows);
    });
  }

  // --save: gather rows to rank 0 in global token order, write out.npy and lse.npy there.
  session.set_step("--save");
  if (!f.save_dir.empty()) {
    const DType save_dtype = (spec.dtype == DType::kF64 || spec.dtype == DType::kF32) ? spec.dtype : DType::kF32;
    HostTensor out_save = convert_host(out.view, save_dtype);
    HostTensor out_global = gather_to_root(session, spec, out_save.view, 1);
    HostTensor lse_global = gather_to_root(session, spec, lse.view, 2);
    collectively(session, [&] {
      if (rank != 0) return;
      write_npy(join(f.save_dir, "out.npy"), out_global.view);
      write_npy(join(f.save_dir, "lse.npy"), lse_global.view);
    });
    if (f.backward) {
      const char* names[] = {"dq.npy", "dk.npy", "dv.npy"};
      const HostTensor* grads[] = {&dq, &dk, &dv};
      for (int g = 0; g < 3; ++g) {
        HostTensor save = convert_host(grads[g]->view, save_dtype);
        HostTensor global = gather_to_root(session, spec, save.view, 1);
        collectively(session, [&] {
          if (rank == 0) write_npy(join(f.save_dir, names[g]), global.view);
        });
      }
    }
  }

  const double flops = forward_flops(spec);
  const double tflops_per_rank = wall_max > 0.0 ? flops / world / (wall_max * 1e-3) / 1e12 : 0.0;
  if (rank == 0) {
    std::printf("# ringattn run: %d ranks, backend %s, transport %s\n", world, session.backend_name().c_str(),
                ring->transport().name());
    std::printf("# problem: %s\n", spec.describe().c_str());
    std::printf("# passes: %d warm-up, %d timed (times are the mean of the timed passes; compute and exposed\n"
                "#   communication are the last pass's, max over ranks)\n", warmup, f.iters);
    if (loaded) {
      std::printf("# inputs: loaded from %s\n", f.load_dir.c_str());
    } else {
      std::printf("# inputs: seeded, --seed %llu\n", static_cast<unsigned long long>(f.problem.seed));
    }
    for (const std::string& line : rank_lines) std::printf("#   %s\n", line.c_str());
    std::printf("# layout %s; visible (query, key) pairs per rank:", layout_name(ranks.layout));
    for (int r = 0; r < world; ++r) std::printf(" %.0f", pairs[static_cast<std::size_t>(r)]);
    std::printf("\n#   max/mean %.4f (max %.0f, mean %.0f); visible fraction %.4f of S^2*B*H\n", pairs_imbalance,
                pairs_max, pairs_mean, pairs_sum / dense_pairs(spec));
    std::printf("# %12s %12s %16s %14s %13s\n", "time_ms", "compute_ms", "exposed_comm_ms", "TFLOP/s/rank",
                "skipped_hops");
    std::printf("  %12.3f %12.3f %16.3f %14.4f %8.0f/%-4d  forward\n", wall_max, compute_max, exposed_max,
                tflops_per_rank, skipped_total, world * world);
    if (f.backward) {
      const double bwd_tflops = wall_bwd_max > 0.0 ? kBackwardFlopsFactor * flops / world / (wall_bwd_max * 1e-3) / 1e12 : 0.0;
      const double both_ms = wall_max + wall_bwd_max;
      const double both_tflops =
          both_ms > 0.0 ? (1.0 + kBackwardFlopsFactor) * flops / world / (both_ms * 1e-3) / 1e12 : 0.0;
      std::printf("  %12.3f %12.3f %16.3f %14.4f %13s  backward\n", wall_bwd_max, bwd_compute_max, bwd_exposed_max,
                  bwd_tflops, "");
      std::printf("  %12.3f %12s %16s %14.4f %13s  forward+backward\n", both_ms, "", "", both_tflops, "");
    }
    if (bad_total > 0) {
      std::printf("# non-finite outputs: %.0f in out%s (NaN or inf in the inputs, or an overflow)\n", bad_values[0],
                  f.backward ? (", " + std::to_string(static_cast<int64_t>(bad_values[1])) + " in dq, " +
                                std::to_string(static_cast<int64_t>(bad_values[2])) + " in dk, " +
                                std::to_string(static_cast<int64_t>(bad_values[3])) + " in dv")
                                   .c_str()
                             : "");
    } else {
      std::printf("# non-finite outputs: none\n");
    }
    if (f.check) {
      std::printf("# check vs fp64 reference: %lld rows (%s) x %lld batch x %d heads\n",
                  static_cast<long long>(check.rows), check.sampled ? "sampled" : "all",
                  static_cast<long long>(spec.batch), spec.heads);
      std::printf("#   max_abs_err %.3e  max_rel_err %.3e  max_lse_err %.3e  non-finite %lld  tolerance %.0e\n",
                  check.max_abs_err, check.max_rel_err, check.max_lse_err, static_cast<long long>(check.mismatched),
                  check.tolerance);
      if (f.backward) {
        std::printf("# gradient check vs fp64 sums: dQ on %lld query rows, dK/dV on %lld key rows (%s)\n",
                    static_cast<long long>(grad_check.dq_rows), static_cast<long long>(grad_check.dkv_rows),
                    grad_check.sampled ? "sampled" : "all");
        std::printf("#   dq_rel_err %.3e  dk_rel_err %.3e  dv_rel_err %.3e  non-finite %lld  tolerance %.0e\n",
                    grad_check.dq_rel_err, grad_check.dk_rel_err, grad_check.dv_rel_err,
                    static_cast<long long>(grad_check.non_finite), grad_check.tolerance);
      }
      std::printf("%s\n", check.pass && (!f.backward || grad_check.pass) ? "PASS" : "FAIL");
    }
    if (!f.save_dir.empty()) {
      std::printf("# saved %s/out.npy and %s/lse.npy%s\n", f.save_dir.c_str(), f.save_dir.c_str(),
                  f.backward ? " and dq.npy, dk.npy, dv.npy" : "");
    }
    std::fflush(stdout);
  }

  if (!f.json_path.empty()) {
    collectively(session, [&] {
      if (rank != 0) return;
      JsonWriter j;
      j.begin_object().field("command", "run").field("version", "0.1.0");
      j.field("ranks", world).field("backend", session.backend_name()).field("transport", ring->transport().name());
      j.begin_object("problem").field("batch", spec.batch).field("seq_len", spec.seq_len).field("heads", spec.heads);
      j.field("kv_heads", spec.effective_kv_heads()).field("head_dim", spec.head_dim).field("causal", spec.mask.causal);
      j.field("scale", spec.scale()).field("layout", layout_name(spec.layout)).field("dtype", dtype_name(spec.dtype));
      j.field("resolved_layout", layout_name(ranks.layout)).field("mask", spec.mask.describe());
      j.end_object();
      j.begin_object("visible_pairs").field("total", pairs_sum).field("max", pairs_max).field("mean", pairs_mean);
      j.field("max_over_mean", pairs_imbalance).field("fraction", pairs_sum / dense_pairs(spec)).end_object();
      j.begin_object("inputs");
      if (loaded) {
        j.field("source", "load").field("dir", f.load_dir);
      } else {
        j.field("source", "seed").field("seed", static_cast<int64_t>(f.problem.seed));
      }
      j.end_object();
      j.begin_object("timing").field("warmup", warmup).field("iters", f.iters);
      j.field("wall_ms", wall_max).field("compute_ms", compute_max);
      j.field("exposed_comm_ms", exposed_max).field("flops", flops).field("tflops_per_rank", tflops_per_rank);
      j.field("skipped_hops", static_cast<int64_t>(skipped_total));
      j.field("non_finite_outputs", static_cast<int64_t>(bad_total));
      if (f.backward) {
        j.field("backward_wall_ms", wall_bwd_max).field("backward_compute_ms", bwd_compute_max);
        j.field("backward_exposed_comm_ms", bwd_exposed_max);
        j.field("fwd_bwd_tflops_per_rank", (1.0 + kBackwardFlopsFactor) * flops / world /
                                               ((wall_max + wall_bwd_max) * 1e-3) / 1e12);
      }
      j.end_object();
      j.begin_array("per_rank");
      for (const std::string& s : rank_stats) j.raw("", s);
      j.end_array();
      j.begin_object("check").field("enabled", f.check);
      if (f.check) {
        j.field("rows", check.rows).field("sampled", check.sampled).field("max_abs_err", check.max_abs_err);
        j.field("max_rel_err", check.max_rel_err).field("max_lse_err", check.max_lse_err);
        j.field("non_finite", check.mismatched).field("tolerance", check.tolerance).field("pass", check.pass);
        if (f.backward) {
          j.begin_object("gradients").field("dq_rows", grad_check.dq_rows).field("dkv_rows", grad_check.dkv_rows);
          j.field("sampled", grad_check.sampled).field("dq_rel_err", grad_check.dq_rel_err);
          j.field("dk_rel_err", grad_check.dk_rel_err).field("dv_rel_err", grad_check.dv_rel_err);
          j.field("non_finite", grad_check.non_finite).field("pass", grad_check.pass).end_object();
        }
      }
      j.end_object();
      if (!f.save_dir.empty()) j.field("save_dir", f.save_dir);
      j.end_object();
      write_text_file(f.json_path, j.str() + "\n");
    });
  }

  if (rank == 0 && bad_total > 0) {
    std::fprintf(stderr, "ringattn: warning: %s %.0f non-finite output values (out, and dq/dk/dv with --backward): "
                 "check the inputs for NaN or inf, or the --scale\n", context_prefix().c_str(), bad_total);
  }
  if (f.check && f.backward && !grad_check.pass) {
    std::fprintf(stderr, "ringattn: %s gradient check FAILED: dq %.3e dk %.3e dv %.3e non-finite %lld (tolerance %.0e)\n",
                 context_prefix().c_str(), grad_check.dq_rel_err, grad_check.dk_rel_err, grad_check.dv_rel_err,
                 static_cast<long long>(grad_check.non_finite), grad_check.tolerance);
    return kExitCheckFailed;
  }
  if (f.check && !check.pass) {
    std::fprintf(stderr, "ringattn: %s check FAILED: max_rel_err %.3e, max_lse_err %.3e, non-finite %lld (tolerance %.0e)\n",
                 context_prefix().c_str(), check.max_rel_err, check.max_lse_err,
                 static_cast<long long>(check.mismatched), check.tolerance);
    return kExitCheckFailed;
  }
  return 0;
}

}  // namespace

Command add_run_command(CLI::App& root) {
  auto flags = std::make_shared<RunFlags>();
  CLI::App* app =
      root.add_subcommand("run", "One exact ring-attention forward (+ --backward) pass (seeded or --load inputs)");
  app->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);  // a repeated flag: last wins
  add_problem_flags(*app, flags->problem);
  add_session_flags(*app, flags->problem);
  app->add_flag("--check", flags->check, "Compare with the fp64 naive reference; exit 2 on FAIL");
  app->add_flag("--backward", flags->backward,
                "Also run the backward pass (dO seeded, or do.npy with --load); --save adds dq/dk/dv.npy");
  app->add_option("--check-rows", flags->check_rows,
                  "Rows per rank for --check: 0 = all when cheap else a sample, -1 = all, N = N sampled")
      ->capture_default_str();
  app->add_option("--warmup", flags->warmup, "Untimed passes before the timed ones (-1: 1 on GPU, 0 on CPU)")
      ->capture_default_str();
  app->add_option("--iters", flags->iters, "Timed passes; the mean time is reported")->capture_default_str();
  flags->load_opt = app->add_option("--load", flags->load_dir,
                  "Read q.npy [B,S,H,D], k.npy and v.npy [B,S,Hkv,D] (global order, float32/64) from DIR");
  flags->save_opt = app->add_option("--save", flags->save_dir, "Write out.npy [B,S,H,D] and lse.npy [B,H,S] (global order) to DIR");
  flags->json_opt = app->add_option("--json", flags->json_path, "Write one JSON object with parameters, timings and check results");
  return {app, [flags] { return run_main(*flags); }};
}

}  // namespace ringattn::cli
