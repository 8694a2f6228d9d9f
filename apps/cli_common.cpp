// Shared CLI helpers: flag parsing (mask flags included), staging into backend memory, gathering rows to rank 0,
// agreement on errors across ranks, atomic text files and JSON.
#include "cli_common.hpp"

#include "exit_codes.hpp"

#include <fcntl.h>
#include <sys/file.h>
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

#include "plan/plan.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
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
  app.add_flag("--causal", f.causal, "Causal mask (key position <= query position; ANDed with the patterns)");
  app.add_option("--window", f.window,
                 "Sliding window LEFT,RIGHT: query i sees keys i-LEFT..i+RIGHT (-1 = unbounded; 4095,0 with --causal)");
  app.add_option("--doc-lens", f.doc_lens,
                 "Packed documents L1,L2,... (summing to the sequence length): no attention across documents");
  app.add_option("--stride", f.stride, "Strided pattern: query i sees key j when (i - j) mod S == 0");
  app.add_option("--global-tokens", f.global_tokens,
                 "Global pattern: the first N positions of each document see and are seen by every position");
  app.add_option("--mask-heads", f.mask_heads,
                 "The patterns apply to query heads 0..K-1 only (a multiple of heads / kv-heads); others are dense");
  app.add_option("--layout", f.layout,
                 "Sequence layout over ranks: auto | contiguous | zigzag | striped | balanced (auto: contiguous with "
                 "a window, zigzag for causal when the length divides by 2 x ranks, else contiguous)")
      ->capture_default_str();
  f.dtype_opt = app.add_option("--dtype", f.dtype, "Precision of q/k/v/out: fp64 | fp32 | bf16 | fp16")
                    ->capture_default_str();
  app.add_option("--scale", f.softmax_scale, "Softmax scale (0 = 1/sqrt(head_dim)); scale * max||q_i|| * max||k_j|| must stay below 1e4 (1e300 in fp64)")->capture_default_str();
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
  if (!f.window.empty()) {
    spec.mask.has_window = true;
    parse_window(f.window, &spec.mask.window_left, &spec.mask.window_right);
  }
  if (!f.stride.empty()) {
    spec.mask.stride = parse_int_flag(f.stride, "--stride", "pass --stride S with S >= 1, or omit it");
    if (spec.mask.stride <= 0) {
      fail(ErrorKind::kInvalidArgument, "--stride " + f.stride + " must be positive",
           "pass --stride S with S >= 1 (key j is seen when (i - j) mod S == 0), or omit it");
    }
  }
  if (!f.global_tokens.empty()) {
    spec.mask.global_tokens =
        parse_int_flag(f.global_tokens, "--global-tokens", "pass --global-tokens N with N >= 0, or omit it");
  }
  if (!f.mask_heads.empty()) {
    const int64_t k = parse_int_flag(f.mask_heads, "--mask-heads", "pass a head count 1..--heads, or omit it");
    // The range against the head count is MaskSpec::validate's (--load may set the heads).
    spec.mask.mask_heads = static_cast<int>(k);
  }
  spec.softmax_scale = f.softmax_scale;
  spec.layout = parse_layout(f.layout);
  spec.dtype = parse_dtype(f.dtype);
  return spec;
}

double visible_pairs_of(const AttentionSpec& spec, const ChunkPositions& pos) {
  const Mask mask = spec.mask.view();
  double pairs = 0.0;
  for (int s = 0; s < pos.num_segments; ++s) {
    const Segment& g = pos.segment(s);
    if (g.count == 0) continue;
    pairs += count_visible_pairs(mask, spec.seq_len, g.start, g.start + g.stride * (g.count - 1) + 1, g.stride,
                                 spec.heads, spec.batch);
  }
  return pairs;
}

void apply_doc_lens(const ProblemFlags& f, AttentionSpec& spec) {
  if (f.doc_lens.empty()) return;
  spec.mask.doc_offsets = doc_offsets_from_lengths(parse_lengths(f.doc_lens, "--doc-lens"), spec.seq_len, "--doc-lens");
}

int64_t parse_int_flag(const std::string& text, const std::string& flag, const std::string& hint) {
  std::size_t used = 0;
  long long v = 0;
  bool ok = !text.empty();
  try {
    v = std::stoll(text, &used, 10);
  } catch (const std::exception&) {
    ok = false;
  }
  if (!ok || used != text.size()) {
    fail(ErrorKind::kInvalidArgument, flag + " '" + text + "' is not an integer", hint);
  }
  return static_cast<int64_t>(v);
}

void parse_window(const std::string& text, int64_t* left, int64_t* right) {
  const std::string hint =
      "give --window LEFT,RIGHT: two integers, each >= 0 or -1 for unbounded (e.g. --window 4095,0 with --causal)";
  std::vector<std::string> parts;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    parts.push_back(text.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (parts.size() != 2) {
    fail(ErrorKind::kInvalidArgument,
         "--window '" + text + "' has " + std::to_string(parts.size()) + " part" + (parts.size() == 1 ? "" : "s") +
             ", expected two (LEFT,RIGHT)",
         hint);
  }
  *left = parse_int_flag(parts[0], "--window", hint);
  *right = parse_int_flag(parts[1], "--window", hint);
  if (*left < -1 || *right < -1) {
    fail(ErrorKind::kInvalidArgument, "--window " + text + " has a side below -1", hint);
  }
}

std::vector<int64_t> parse_lengths(const std::string& text, const std::string& flag) {
  const std::string hint = "give " + flag + " L1,L2,... with positive integer lengths summing to the sequence length";
  std::vector<int64_t> lengths;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = text.find(',', start);
    const std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    const int64_t n = parse_int_flag(part, flag, hint);
    if (n < 1) fail(ErrorKind::kInvalidArgument, flag + " length " + part + " must be at least 1", hint);
    lengths.push_back(n);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return lengths;
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
    if (n > 0) std::memcpy(t.view.data, src.data, src.nbytes());  // an empty .npy has no data pointer
  } else {
    for (int64_t i = 0; i < n; ++i) store_from_double(t.view, i, load_as_double(src, i));
  }
  return t;
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

// ---- --save ------------------------------------------------------------------------------------

HostTensor gather_to_root(Session& session, const AttentionSpec& spec, const TensorView& local, int seq_dim) {
  const int world = session.world(), rank = session.rank();
  RINGATTN_CHECK(local.device == Device::kHost && local.is_contiguous() && local.rank > seq_dim,
                 ErrorKind::kInternal, "gather_to_root: unexpected tensor " + local.describe(), "");
  const RankLayout ranks = layout_ranks(spec, world);
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
    unshard_rows(local, global.view, ranks.positions(0), seq_dim);
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
      unshard_rows(tmp.view, global.view, ranks.positions(r), seq_dim);
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

SaveDirLock::SaveDirLock(const std::string& dir, const std::string& flag) {
  const std::string path = (std::filesystem::path(dir) / ".ringattn-save.lock").string();
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    fail(ErrorKind::kIo, "cannot create the lock '" + path + "' of " + flag + ": " + std::strerror(errno),
         "pass a directory you can write to");
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    char owner[64] = {0};
    const ssize_t n = ::pread(fd_, owner, sizeof(owner) - 1, 0);
    ::close(fd_);
    fd_ = -1;
    std::string who = n > 0 ? std::string(owner, static_cast<std::size_t>(n)) : std::string("?");
    while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
    fail(ErrorKind::kInvalidArgument,
         flag + " '" + dir + "' is being written by another ringattn job (pid " + who + ", lock '" + path +
             "'): two jobs in one directory would leave a mix of both jobs' files",
         "wait for that job to end, or pass another " + flag + " directory");
  }
  const std::string me = std::to_string(static_cast<long>(getpid())) + " on " + process_context().host + "\n";
  if (::ftruncate(fd_, 0) == 0) {
    [[maybe_unused]] const ssize_t w = ::pwrite(fd_, me.data(), me.size(), 0);
  }
}

SaveDirLock::~SaveDirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock; the file stays (removing it would race a new locker)
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
  ErrorKind kind = ErrorKind::kInternal;
  try {
    fn();
  } catch (const Error& e) {
    ok = false;
    message = e.what();
    kind = e.kind();
  } catch (const std::bad_alloc& e) {
    ok = false;
    message = describe_exception(e);
    kind = ErrorKind::kOutOfMemory;
  } catch (const std::exception& e) {
    ok = false;
    message = context_prefix() + " internal error: " + e.what();
  }
  try {
    session.agree_ok(ok, message, kind);
  } catch (const Error& e) {
    throw CollectiveError(e.kind(), e.what());
  }
}

double max_score_bound(DType dtype) { return dtype == DType::kF64 ? 1e300 : 1e4; }

void check_scale_bound(const AttentionSpec& spec, double max_q_norm, double max_k_norm, const std::string& inputs) {
  const double bound = max_score_bound(spec.dtype);
  const double worst = spec.scale() * max_q_norm * max_k_norm;
  if (!(worst <= bound)) {  // NaN norms (a NaN input) are not the scale's fault: they propagate
    if (std::isnan(worst)) return;
    char text[512];
    std::snprintf(text, sizeof(text),
                  "--scale %.6g is too large for these inputs in %s: scores reach up to scale * max|q_i| * max|k_j| = "
                  "%.6g * %.6g * %.6g = %.3g, above the %.0e that %s computes correctly (the bound depends on the "
                  "inputs' magnitudes: %s)",
                  spec.scale(), dtype_name(spec.dtype), spec.scale(), max_q_norm, max_k_norm, worst, bound,
                  dtype_name(spec.dtype), inputs.c_str());
    char hint[160];
    std::snprintf(hint, sizeof(hint), "pass --scale at most %.3g for these inputs, or scale the inputs down",
                  bound / (max_q_norm * max_k_norm));
    fail(ErrorKind::kInvalidArgument, text, hint);
  }
}

double max_row_norm(const TensorView& t) {
  const int64_t d = t.shape[t.rank - 1], rows = d > 0 ? t.numel() / d : 0;
  double best = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0.0;
    for (int64_t i = 0; i < d; ++i) {
      const double x = load_as_double(t, r * d + i);
      sum += x * x;
    }
    if (std::isnan(sum)) return sum;
    best = std::max(best, std::sqrt(sum));
  }
  return best;
}

void agree_flags(Session& session, const std::vector<std::pair<std::string, std::string>>& flags) {
  // One line per flag; a value's own newlines would split it, so they are escaped.
  std::string mine;
  for (const auto& [name, value] : flags) {
    std::string v = value;
    for (std::size_t at = v.find('\n'); at != std::string::npos; at = v.find('\n', at + 2)) v.replace(at, 1, "\\n");
    mine += name + "=" + v + "\n";
  }
  session.set_step("agreeing on the flags");
  const std::vector<std::string> all = session.gather_strings(mine);
  auto split = [](const std::string& text) {
    std::vector<std::string> lines;
    std::size_t start = 0;
    for (std::size_t nl = text.find('\n'); nl != std::string::npos; start = nl + 1, nl = text.find('\n', start)) {
      lines.push_back(text.substr(start, nl - start));
    }
    return lines;
  };
  const std::vector<std::string> first = split(all[0]);
  for (std::size_t f = 0; f < flags.size(); ++f) {
    const std::string& name = flags[f].first;
    auto value_of = [&](const std::vector<std::string>& lines) {
      return f < lines.size() ? lines[f].substr(std::min(lines[f].size(), name.size() + 1)) : std::string("?");
    };
    const std::string ref = value_of(first);
    std::string differing;
    int count = 0;
    for (std::size_t r = 1; r < all.size(); ++r) {
      const std::string v = value_of(split(all[r]));
      if (v == ref) continue;
      differing += std::string(count++ ? ", " : "") + "rank " + std::to_string(r) + " has " + (v.empty() ? "''" : v);
    }
    if (count > 0) {
      throw CollectiveError(ErrorKind::kMismatch,
                            context_prefix() + " ranks were launched with different " + name + ": rank 0 has " +
                                (ref.empty() ? "''" : ref) + ", " + differing +
                                " (hint: pass the same " + name +
                                " to every rank; it changes the steps the ranks take together or the data)");
    }
  }
}

int run_reporting_errors(Session& session, const std::function<int()>& body) {
  try {
    return body();
  } catch (const CollectiveError& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    std::fflush(stderr);
    session.set_step("the barrier after reporting an error");
    session.barrier();
    return exit_code_for(e.kind());
  } catch (const Error& e) {
    // One rank's own failure outside collectively (a collective or the ring): its peers may wait
    // for it in the ring or a collective, so the job ends here.
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    std::fflush(stderr);
    if (session.world() > 1) session.abort_job(exit_code_for(e.kind()));
    return exit_code_for(e.kind());
  }
}

// ---- JSON --------------------------------------------------------------------------------------

// One pass's hops: times, K+V bytes sent and received (all peers) and per peer; backward hops also
// carry the dK/dV bytes.
void hops_json(JsonWriter& j, const char* key, const PassStats& st, bool backward) {
  j.begin_array(key);
  for (const HopStats& h : st.hops) {
    j.begin_object().field("hop", h.hop).field("source_rank", h.source_rank).field("skipped", h.skipped);
    j.field("compute_ms", h.compute_ms).field("exposed_comm_ms", h.exposed_comm_ms);
    j.field("sent_bytes", static_cast<double>(h.sent_bytes)).field("received_bytes", static_cast<double>(h.received_bytes));
    if (backward) {
      j.field("grad_sent_bytes", static_cast<double>(h.grad_sent_bytes));
      j.field("grad_received_bytes", static_cast<double>(h.grad_received_bytes));
    }
    j.begin_array("peers");
    for (const PeerBytes& p : h.peers) {
      j.begin_object().field("rank", p.rank).field("sent_bytes", static_cast<double>(p.sent_bytes));
      j.field("received_bytes", static_cast<double>(p.received_bytes)).end_object();
    }
    j.end_array().end_object();
  }
  j.end_array();
}

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
