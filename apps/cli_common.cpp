// Shared CLI helpers: flag parsing, counter-based random inputs, staging into backend memory,
// the streamed fp64 reference check, gathering rows to rank 0, atomic text files and JSON.
#include "cli_common.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <limits>
#include <new>
#include <set>
#include <thread>

#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif
#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "attn/reference.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kTwoPi = 6.283185307179586476925286766559;
// Elements of one streamed K (or V) block in the check.
constexpr int64_t kCheckBlockElems = int64_t{1} << 22;
// Largest message of the --save gather (MPI counts are ints).
constexpr std::size_t kMaxMessageBytes = std::size_t{1} << 30;
constexpr int kGatherTag = 7401;
}  // namespace

// ---- flags -------------------------------------------------------------------------------------

void add_problem_flags(CLI::App& app, ProblemFlags& f, bool with_seq_len) {
  f.batch_opt = app.add_option("--batch", f.batch, "Batch size")->capture_default_str();
  if (with_seq_len) {
    f.seq_len_opt = app.add_option("--seq-len", f.seq_len, "Global sequence length, K/M/G suffixes (4K = 4096)")
                        ->capture_default_str();
  }
  f.heads_opt = app.add_option("--heads", f.heads, "Query heads")->capture_default_str();
  f.kv_heads_opt = app.add_option("--kv-heads", f.kv_heads, "Key/value heads (GQA/MQA; 0 = --heads)")
                       ->capture_default_str();
  f.head_dim_opt = app.add_option("--head-dim", f.head_dim, "Head dimension")->capture_default_str();
  app.add_flag("--causal", f.causal, "Causal mask (key position <= query position)");
  app.add_option("--layout", f.layout, "Sequence layout over ranks: contiguous | zigzag | striped")
      ->capture_default_str();
  f.dtype_opt = app.add_option("--dtype", f.dtype, "Precision of q/k/v/out: fp64 | fp32 | bf16 | fp16")
                    ->capture_default_str();
  app.add_option("--scale", f.softmax_scale, "Softmax scale (0 = 1/sqrt(head_dim))")->capture_default_str();
  app.add_option("--seed", f.seed, "Seed of the random inputs (same global problem for any rank count)")
      ->capture_default_str();
}

void add_session_flags(CLI::App& app, ProblemFlags& f) {
  app.add_option("--backend", f.backend, "auto | cpu | cuda (auto: cuda when a GPU is visible)")
      ->capture_default_str();
  app.add_option("--log-level", f.log_level,
                 "trace | debug | info | warn | error | critical | off (default: $RINGATTN_LOG_LEVEL, else warn)");
  app.add_option("--timeout", f.timeout_s, "Seconds any wait for a peer may take before the job aborts")
      ->capture_default_str();
}

AttentionSpec spec_from_flags(const ProblemFlags& f) {
  AttentionSpec spec;
  spec.batch = f.batch;
  spec.seq_len = parse_size(f.seq_len, "--seq-len");
  spec.heads = f.heads;
  spec.kv_heads = f.kv_heads;
  spec.head_dim = f.head_dim;
  spec.mask.causal = f.causal;
  spec.softmax_scale = f.softmax_scale;
  spec.layout = parse_layout(f.layout);
  spec.dtype = parse_dtype(f.dtype);
  return spec;
}

SessionOptions session_options_from_flags(const ProblemFlags& f) {
  if (f.backend != "auto" && f.backend != "cpu" && f.backend != "cuda") {
    fail(ErrorKind::kInvalidArgument, "unknown backend '" + f.backend + "' for --backend",
         "use one of auto, cpu, cuda");
  }
  if (!(f.timeout_s > 0.0) || !std::isfinite(f.timeout_s)) {
    fail(ErrorKind::kInvalidArgument, "--timeout " + std::to_string(f.timeout_s) + " must be a positive number of seconds",
         "pass e.g. --timeout 300");
  }
  SessionOptions o;
  o.backend = f.backend;
  o.timeout_ms = f.timeout_s * 1000.0;
  return o;
}

void guess_process_context_from_launcher() {
  auto env_int = [](std::initializer_list<const char*> names) {
    for (const char* n : names) {
      if (const char* v = std::getenv(n); v != nullptr && *v != '\0') return std::atoi(v);
    }
    return -1;
  };
  const int rank = env_int({"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"});
  const int world = env_int({"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"});
  if (rank < 0 || world < 1 || rank >= world) return;
  ProcessContext ctx = process_context();
  ctx.rank = rank;
  ctx.world = world;
  set_process_context(ctx);
}

// ---- host tensors ------------------------------------------------------------------------------

HostTensor make_host_tensor(DType dtype, std::initializer_list<int64_t> shape) {
  HostTensor t;
  t.view = make_view(nullptr, dtype, Device::kHost, shape);
  t.storage.resize((t.view.nbytes() + sizeof(double) - 1) / sizeof(double));
  t.view.data = t.storage.data();
  return t;
}

HostTensor convert_host(const TensorView& src, DType dtype) {
  RINGATTN_CHECK(src.device == Device::kHost && src.is_contiguous(), ErrorKind::kInternal,
                 "convert_host needs a contiguous host tensor", "");
  HostTensor t;
  t.view = src;
  t.view.dtype = dtype;
  t.storage.resize((t.view.nbytes() + sizeof(double) - 1) / sizeof(double));
  t.view.data = t.storage.data();
  const int64_t n = src.numel();
  if (src.dtype == dtype) {
    std::memcpy(t.view.data, src.data, src.nbytes());
  } else {
    for (int64_t i = 0; i < n; ++i) store_from_double(t.view, i, load_as_double(src, i));
  }
  return t;
}

// ---- seeded inputs -----------------------------------------------------------------------------

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

namespace {

uint64_t tensor_key(uint64_t seed, TensorId tensor) {
  return splitmix64(seed ^ splitmix64(static_cast<uint64_t>(tensor) * 0x632be59bd9b4e019ull));
}

double normal_from_key(uint64_t key, uint64_t index) {
  // Two uniforms in (0, 1] from 53 random bits each, then Box-Muller (cosine branch).
  const double u1 = (static_cast<double>(splitmix64(key + 2 * index) >> 11) + 1.0) * 0x1.0p-53;
  const double u2 = static_cast<double>(splitmix64(key + 2 * index + 1) >> 11) * 0x1.0p-53;
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(kTwoPi * u2);
}

// Threads for host-side generation: the cores of this host shared by its ranks.
int generation_threads(int64_t work) {
  if (work < (int64_t{1} << 20)) return 1;
  int cores = static_cast<int>(std::thread::hardware_concurrency());
  int local_ranks = 1;
  if (const char* s = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) local_ranks = std::max(1, std::atoi(s));
  return std::clamp(cores / local_ranks, 1, 16);
}

}  // namespace

double random_normal(uint64_t seed, TensorId tensor, uint64_t global_index) {
  return normal_from_key(tensor_key(seed, tensor), global_index);
}

void fill_random_rows(const TensorView& local, const ChunkPositions& pos, int64_t seq_len, uint64_t seed,
                      TensorId tensor) {
  RINGATTN_CHECK(local.device == Device::kHost && local.is_contiguous() && local.rank == 4, ErrorKind::kInternal,
                 "fill_random_rows needs a contiguous (B, rows, heads, D) host tensor, got " + local.describe(), "");
  RINGATTN_CHECK(local.shape[1] == pos.size(), ErrorKind::kInternal, "fill_random_rows: rows != positions", "");
  const int64_t B = local.shape[0], rows = local.shape[1];
  const int64_t row_elems = local.shape[2] * local.shape[3];
  const uint64_t key = tensor_key(seed, tensor);
  auto work = [&](int64_t lo, int64_t hi) {  // flat (b, i) row range
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = r / rows, i = r % rows;
      const uint64_t g0 = static_cast<uint64_t>((b * seq_len + pos.at(i)) * row_elems);
      const int64_t l0 = r * row_elems;
      for (int64_t e = 0; e < row_elems; ++e) store_from_double(local, l0 + e, normal_from_key(key, g0 + e));
    }
  };
  const int64_t total_rows = B * rows;
  const int threads = generation_threads(total_rows * row_elems);
  if (threads <= 1) {
    work(0, total_rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (total_rows + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const int64_t lo = t * per, hi = std::min(total_rows, lo + per);
    if (lo < hi) pool.emplace_back(work, lo, hi);
  }
  for (auto& th : pool) th.join();
}

// ---- tensors in the backend's memory -----------------------------------------------------------

TensorView allocate_on_backend(Backend& backend, DType dtype, std::initializer_list<int64_t> shape) {
  TensorView v = make_view(nullptr, dtype, backend.device(), shape);
  v.data = backend.allocate(std::max<std::size_t>(v.nbytes(), 1));
  return v;
}

namespace {

void copy_between(const TensorView& src, const TensorView& dst, const char* what) {
  RINGATTN_CHECK(src.nbytes() == dst.nbytes() && src.is_contiguous() && dst.is_contiguous(), ErrorKind::kInternal,
                 std::string(what) + ": " + src.describe() + " and " + dst.describe() + " differ in size", "");
  if (src.nbytes() == 0) return;
  if (src.device == Device::kHost && dst.device == Device::kHost) {
    std::memcpy(dst.data, src.data, src.nbytes());
    return;
  }
#ifdef RINGATTN_HAVE_CUDA
  const cudaMemcpyKind kind = src.device == Device::kHost   ? cudaMemcpyHostToDevice
                              : dst.device == Device::kHost ? cudaMemcpyDeviceToHost
                                                            : cudaMemcpyDeviceToDevice;
  cudaError_t err = cudaDeviceSynchronize();  // the backend's stream may still write src / read dst
  if (err == cudaSuccess) err = cudaMemcpy(dst.data, src.data, src.nbytes(), kind);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    fail(ErrorKind::kCuda, std::string(what) + " of " + src.describe() + " failed: " + cudaGetErrorString(err),
         "an earlier kernel may have failed; rerun with --log-level debug or under compute-sanitizer");
  }
#else
  fail(ErrorKind::kInternal, std::string(what) + ": device tensor in a build without CUDA", "");
#endif
}

}  // namespace

void copy_to_backend(const TensorView& host, const TensorView& dst) { copy_between(host, dst, "copy to backend"); }

void copy_to_host(const TensorView& src, const TensorView& host) { copy_between(src, host, "copy to host"); }

// ---- --check -----------------------------------------------------------------------------------

KvBlockSource seeded_kv_source(uint64_t seed, int64_t seq_len) {
  return [seed, seq_len](int64_t first, const TensorView& k, const TensorView& v) {
    ChunkPositions p;
    p.num_segments = 1;
    p.seg[0] = {first, 1, k.shape[1]};
    fill_random_rows(k, p, seq_len, seed, TensorId::kK);
    fill_random_rows(v, p, seq_len, seed, TensorId::kV);
  };
}

KvBlockSource global_kv_source(const TensorView& k_global, const TensorView& v_global) {
  return [k_global, v_global](int64_t first, const TensorView& k, const TensorView& v) {
    ChunkPositions p;
    p.num_segments = 1;
    p.seg[0] = {first, 1, k.shape[1]};
    shard_rows(k_global, k, p, 1);
    shard_rows(v_global, v, p, 1);
  };
}

double check_tolerance(DType dtype) {
  switch (dtype) {
    // Ring and reference both accumulate in fp64: differences are a few ulps (~1e-15).
    case DType::kF64: return 1e-10;
    // fp32 accumulation over S keys: error ~ sqrt(S) * 6e-8, plus exp approximations on GPUs
    // (2^-22 relative); 1e-4 keeps a wide margin up to million-token sums.
    case DType::kF32: return 1e-4;
    // Rounding the output alone costs 2^-9 (bf16) of |out|, and flash kernels round the
    // probabilities to bf16 before the P*V product; 2e-2 is ~10x the per-element rounding.
    case DType::kBF16: return 2e-2;
    // Same argument with fp16's 2^-11 rounding.
    case DType::kF16: return 1e-2;
  }
  return 0.0;
}

std::vector<int64_t> choose_check_rows(const AttentionSpec& spec, int world, int rank, uint64_t seed,
                                       int64_t requested, bool* sampled) {
  const int64_t local = spec.local_seq(world);
  const double per_row = static_cast<double>(spec.batch) * spec.heads * static_cast<double>(spec.seq_len) *
                         spec.head_dim * (spec.mask.causal ? 0.5 : 1.0);
  int64_t n = local;
  if (requested > 0) {
    n = std::min(requested, local);
  } else if (requested == 0 && per_row * static_cast<double>(local) > kFullCheckBudget) {
    n = std::clamp(static_cast<int64_t>(kFullCheckBudget / per_row), kMinSampleRows, kMaxSampleRows);
    n = std::min(n, local);
  }
  std::vector<int64_t> rows;
  if (n >= local) {
    *sampled = false;
    rows.resize(local);
    for (int64_t i = 0; i < local; ++i) rows[i] = i;
    return rows;
  }
  *sampled = true;
  std::set<int64_t> pick = {0, local - 1};  // chunk edges: where layouts cut the sequence
  uint64_t counter = splitmix64(seed ^ (0x5eedull << 32) ^ static_cast<uint64_t>(rank));
  while (static_cast<int64_t>(pick.size()) < n) {
    counter = splitmix64(counter);
    pick.insert(static_cast<int64_t>(counter % static_cast<uint64_t>(local)));
  }
  rows.assign(pick.begin(), pick.end());
  return rows;
}

CheckResult check_against_reference(const AttentionSpec& spec, const TensorView& q, const ChunkPositions& q_pos,
                                    const TensorView& out, const TensorView& lse, const std::vector<int64_t>& rows,
                                    const KvBlockSource& kv, int64_t block_rows) {
  const int64_t B = spec.batch, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const int64_t S = spec.seq_len, Sl = q.shape[1];
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  RINGATTN_CHECK(q.device == Device::kHost && out.device == Device::kHost && lse.device == Device::kHost,
                 ErrorKind::kInternal, "check needs host tensors", "");
  RINGATTN_CHECK(out.shape[1] == Sl && lse.shape[2] == Sl, ErrorKind::kInternal, "check: shapes disagree", "");

  // One (B, 1, H, D) query tensor per checked row, in the run's dtype (the values the ring used).
  std::vector<HostTensor> q_rows;
  std::vector<ChunkPositions> q_row_pos;
  int64_t last_needed = 0;
  for (int64_t i : rows) {
    HostTensor t = make_host_tensor(q.dtype, {B, 1, H, D});
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t e = 0; e < H * D; ++e) store_from_double(t.view, b * H * D + e, load_as_double(q, (b * Sl + i) * H * D + e));
    }
    q_rows.push_back(std::move(t));
    ChunkPositions p;
    p.num_segments = 1;
    p.seg[0] = {q_pos.at(i), 1, 1};
    q_row_pos.push_back(p);
    last_needed = std::max(last_needed, q_pos.at(i));
  }
  if (!spec.mask.causal) last_needed = S - 1;

  // Running fp64 merge of the block results: acc_o (row, b, h, d), acc_lse (row, b, h).
  std::vector<double> acc_o(static_cast<std::size_t>(n_rows * B * H * D), 0.0);
  std::vector<double> acc_lse(static_cast<std::size_t>(n_rows * B * H), -kInf);
  const int64_t block = std::clamp<int64_t>(block_rows > 0 ? block_rows : kCheckBlockElems / (B * Hkv * D), 1, S);
  HostTensor o_tmp = make_host_tensor(DType::kF64, {B, 1, H, D});
  HostTensor l_tmp = make_host_tensor(DType::kF64, {B, H, 1});
  HostTensor k_blk, v_blk;
  for (int64_t j0 = 0; j0 <= last_needed && j0 < S; j0 += block) {
    const int64_t n = std::min(block, S - j0);
    if (k_blk.view.rank == 0 || k_blk.view.shape[1] != n) {
      k_blk = make_host_tensor(spec.dtype, {B, n, Hkv, D});
      v_blk = make_host_tensor(spec.dtype, {B, n, Hkv, D});
    }
    kv(j0, k_blk.view, v_blk.view);
    ChunkPositions k_pos;
    k_pos.num_segments = 1;
    k_pos.seg[0] = {j0, 1, n};
    for (int64_t r = 0; r < n_rows; ++r) {
      if (spec.mask.causal && j0 > q_row_pos[r].seg[0].start) continue;  // the whole block is in the future
      reference_attention(spec, q_rows[r].view, q_row_pos[r], k_blk.view, v_blk.view, k_pos, o_tmp.view, l_tmp.view);
      const auto* o = o_tmp.view.as<double>();
      const auto* l = l_tmp.view.as<double>();
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const double lb = l[bh];
        double& la = acc_lse[r * B * H + bh];
        double* oa = &acc_o[(r * B * H + bh) * D];
        const double* ob = o + bh * D;
        if (lb == -kInf) continue;
        if (la == -kInf) {
          la = lb;
          std::copy(ob, ob + D, oa);
          continue;
        }
        const double m = std::max(la, lb);
        const double lnew = m + std::log(std::exp(la - m) + std::exp(lb - m));
        const double wa = std::exp(la - lnew), wb = std::exp(lb - lnew);
        for (int64_t d = 0; d < D; ++d) oa[d] = wa * oa[d] + wb * ob[d];
        la = lnew;
      }
    }
  }

  CheckResult res;
  res.rows = n_rows;
  res.tolerance = check_tolerance(spec.dtype);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = rows[r];
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = b * H + h;
        const double ref_l = acc_lse[r * B * H + bh];
        const double got_l = load_as_double(lse, bh * Sl + i);
        const double* ref_o = &acc_o[(r * B * H + bh) * D];
        const int64_t o0 = ((b * Sl + i) * H + h) * D;
        if (ref_l == -kInf) {  // no visible key: lse = -inf and out = 0 exactly
          bool ok = got_l == -kInf;
          for (int64_t d = 0; d < D; ++d) ok = ok && load_as_double(out, o0 + d) == 0.0;
          if (!ok) ++res.mismatched;
          continue;
        }
        if (!std::isfinite(got_l)) {
          ++res.mismatched;
        } else {
          res.max_lse_err = std::max(res.max_lse_err, std::fabs(got_l - ref_l) / std::max(1.0, std::fabs(ref_l)));
        }
        for (int64_t d = 0; d < D; ++d) {
          const double got = load_as_double(out, o0 + d);
          res.max_ref = std::max(res.max_ref, std::fabs(ref_o[d]));
          if (!std::isfinite(got)) {
            ++res.mismatched;
            continue;
          }
          res.max_abs_err = std::max(res.max_abs_err, std::fabs(got - ref_o[d]));
        }
      }
    }
  }
  res.max_rel_err = res.max_ref > 0.0 ? res.max_abs_err / res.max_ref : res.max_abs_err;
  res.pass = res.mismatched == 0 && res.max_rel_err <= res.tolerance && res.max_lse_err <= res.tolerance;
  return res;
}

CheckResult reduce_check(Session& session, const CheckResult& local) {
  CheckResult g = local;
  g.max_abs_err = session.max_over_ranks(local.max_abs_err);
  g.max_ref = session.max_over_ranks(local.max_ref);
  g.max_lse_err = session.max_over_ranks(local.max_lse_err);
  g.rows = static_cast<int64_t>(session.sum_over_ranks(static_cast<double>(local.rows)));
  g.mismatched = static_cast<int64_t>(session.sum_over_ranks(static_cast<double>(local.mismatched)));
  g.sampled = session.max_over_ranks(local.sampled ? 1.0 : 0.0) > 0.0;
  g.max_rel_err = g.max_ref > 0.0 ? g.max_abs_err / g.max_ref : g.max_abs_err;
  const bool all_pass = session.sum_over_ranks(local.pass ? 0.0 : 1.0) == 0.0;
  g.pass = all_pass && g.mismatched == 0 && g.max_rel_err <= g.tolerance && g.max_lse_err <= g.tolerance;
  return g;
}

// ---- --save ------------------------------------------------------------------------------------

HostTensor gather_to_root(Session& session, const AttentionSpec& spec, const TensorView& local, int seq_dim) {
  const int world = session.world(), rank = session.rank();
  RINGATTN_CHECK(local.device == Device::kHost && local.is_contiguous() && local.rank > seq_dim,
                 ErrorKind::kInternal, "gather_to_root: unexpected tensor " + local.describe(), "");
  HostTensor global;
  if (rank == 0) {
    global.view = local;  // same dtype and dims, seq_len rows along seq_dim, contiguous
    global.view.shape[seq_dim] = spec.seq_len;
    int64_t st = 1;
    for (int d = global.view.rank - 1; d >= 0; --d) {
      global.view.stride[d] = st;
      st *= global.view.shape[d];
    }
    global.storage.resize((global.view.nbytes() + sizeof(double) - 1) / sizeof(double));
    global.view.data = global.storage.data();
    unshard_rows(local, global.view, chunk_positions(spec.resolved_layout(world), spec.seq_len, 0, world), seq_dim);
  }
  if (world == 1) return global;
#ifdef RINGATTN_HAVE_MPI
  auto* comm_ptr = static_cast<MPI_Comm*>(session.mpi_comm());
  RINGATTN_CHECK(comm_ptr != nullptr, ErrorKind::kInternal, "gather_to_root: no MPI communicator", "");
  const MPI_Comm comm = *comm_ptr;
  const std::size_t bytes = local.nbytes();  // equal on every rank
  auto transfer = [&](char* buf, int peer, bool send) {
    for (std::size_t off = 0; off < bytes; off += kMaxMessageBytes) {
      const int n = static_cast<int>(std::min(kMaxMessageBytes, bytes - off));
      const int rc = send ? MPI_Send(buf + off, n, MPI_BYTE, peer, kGatherTag, comm)
                          : MPI_Recv(buf + off, n, MPI_BYTE, peer, kGatherTag, comm, MPI_STATUS_IGNORE);
      if (rc != MPI_SUCCESS) {
        fail(ErrorKind::kComm, std::string("gathering --save rows: MPI_") + (send ? "Send" : "Recv") + " failed",
             "check the MPI installation and network");
      }
    }
  };
  if (rank == 0) {
    HostTensor tmp;
    tmp.view = local;
    tmp.storage.resize((bytes + sizeof(double) - 1) / sizeof(double));
    tmp.view.data = tmp.storage.data();
    for (int r = 1; r < world; ++r) {
      transfer(static_cast<char*>(tmp.view.data), r, false);
      unshard_rows(tmp.view, global.view, chunk_positions(spec.resolved_layout(world), spec.seq_len, r, world), seq_dim);
    }
  } else {
    transfer(static_cast<char*>(local.data), 0, true);
  }
#else
  fail(ErrorKind::kInternal, "gather_to_root with several ranks in a build without MPI", "");
#endif
  return global;
}

void ensure_writable_dir(const std::string& dir, const std::string& flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::exists(dir, ec)) {
    fs::create_directories(dir, ec);
    if (ec) {
      fail(ErrorKind::kIo, "cannot create the " + flag + " directory '" + dir + "': " + ec.message(),
           "pass a directory you can write to");
    }
  }
  if (!fs::is_directory(dir, ec)) {
    fail(ErrorKind::kIo, flag + " '" + dir + "' exists and is not a directory", "pass a directory");
  }
  const std::string probe = (fs::path(dir) / (".ringattn_probe." + std::to_string(getpid()))).string();
  std::FILE* f = std::fopen(probe.c_str(), "wb");
  if (f == nullptr) {
    fail(ErrorKind::kIo, "the " + flag + " directory '" + dir + "' is not writable: " + std::strerror(errno),
         "fix its permissions or pass another directory");
  }
  std::fclose(f);
  std::remove(probe.c_str());
}

void write_text_file(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) {
    fail(ErrorKind::kIo, "cannot create '" + tmp + "': " + std::strerror(errno), "check the directory of " + path);
  }
  bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
  ok = (std::fclose(f) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    fail(ErrorKind::kIo, "cannot write '" + path + "': " + std::strerror(e), "check free space and permissions");
  }
}

bool inject_gradient_fault(const char* env, const TensorView& dq, const TensorView& dk, const TensorView& dv) {
  const char* fault = std::getenv(env);
  if (fault == nullptr) return false;
  const std::string which = fault;
  const TensorView* t = which == "dq" ? &dq : which == "dk" ? &dk : which == "dv" ? &dv : nullptr;
  if (t == nullptr) return false;
  for (int64_t e = 0; e < t->numel(); ++e) store_from_double(*t, e, 1.5 * load_as_double(*t, e));
  return true;
}

std::string describe_exception(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) {
    return context_prefix() + " out of host memory (" + e.what() +
           ") (hint: the problem does not fit this rank's memory: use more ranks, a shorter sequence "
           "(--seq-len, -e) or fewer heads, or fewer ranks per host)";
  }
  return e.what();
}

void collectively(Session& session, const std::function<void()>& fn) {
  bool ok = true;
  std::string message;
  try {
    fn();
  } catch (const std::exception& e) {
    ok = false;
    message = describe_exception(e);
  }
  try {
    session.agree_ok(ok, message);
  } catch (const Error& e) {
    throw CollectiveError(e.kind(), e.what());
  }
}

int run_reporting_errors(Session& session, const std::function<int()>& body) {
  try {
    return body();
  } catch (const CollectiveError& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    std::fflush(stderr);
    session.barrier();
    return 1;
  }
}

// ---- JSON --------------------------------------------------------------------------------------

std::string json_escape(const std::string& s) {
  std::string o;
  o.reserve(s.size() + 2);
  for (unsigned char c : s) {
    switch (c) {
      case '"': o += "\\\""; break;
      case '\\': o += "\\\\"; break;
      case '\n': o += "\\n"; break;
      case '\t': o += "\\t"; break;
      case '\r': o += "\\r"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof(buf), "\\u%04x", c);
          o += buf;
        } else {
          o += static_cast<char>(c);
        }
    }
  }
  return o;
}

std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

void JsonWriter::prefix(const std::string& key) {
  if (!first_.empty()) {
    if (!first_.back()) out_ += ",";
    first_.back() = false;
  }
  if (!key.empty()) out_ += "\"" + json_escape(key) + "\":";
}

JsonWriter& JsonWriter::begin_object(const std::string& key) {
  prefix(key);
  out_ += "{";
  first_.push_back(true);
  return *this;
}

JsonWriter& JsonWriter::end_object() {
  out_ += "}";
  first_.pop_back();
  return *this;
}

JsonWriter& JsonWriter::begin_array(const std::string& key) {
  prefix(key);
  out_ += "[";
  first_.push_back(true);
  return *this;
}

JsonWriter& JsonWriter::end_array() {
  out_ += "]";
  first_.pop_back();
  return *this;
}

JsonWriter& JsonWriter::field(const std::string& key, double v) {
  prefix(key);
  out_ += json_number(v);
  return *this;
}

JsonWriter& JsonWriter::field(const std::string& key, int64_t v) {
  prefix(key);
  out_ += std::to_string(v);
  return *this;
}

JsonWriter& JsonWriter::field(const std::string& key, bool v) {
  prefix(key);
  out_ += v ? "true" : "false";
  return *this;
}

JsonWriter& JsonWriter::field(const std::string& key, const std::string& v) {
  prefix(key);
  out_ += "\"" + json_escape(v) + "\"";
  return *this;
}

JsonWriter& JsonWriter::raw(const std::string& key, const std::string& json) {
  prefix(key);
  out_ += json;
  return *this;
}

JsonWriter& JsonWriter::value(double v) { return field("", v); }

JsonWriter& JsonWriter::value(const std::string& v) { return field("", v); }

}  // namespace ringattn::cli
