// Shared CLI helpers for run and bench: problem flags, seeded inputs, device staging, the --check logic, JSON.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "ringattn/backend.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/session.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::cli {

// ---- flags -------------------------------------------------------------------------------------

// The attention problem and the session, as flags. Strings are parsed by spec_from_flags so that
// a bad value gets ringattn's message (flag name + fix) on every rank.
struct ProblemFlags {
  int64_t batch = 1;
  std::string seq_len = "4K";
  int heads = 8;
  int kv_heads = 0;  // 0: same as --heads
  int head_dim = 64;
  bool causal = false;
  std::string layout = "contiguous";
  std::string dtype = "fp32";
  double softmax_scale = 0.0;  // 0: 1/sqrt(head_dim)
  uint64_t seed = 0;
  std::string backend = "auto";
  std::string log_level;  // empty: RINGATTN_LOG_LEVEL, else warn
  double timeout_s = kDefaultTimeoutMs / 1000.0;

  // Options as registered, to tell whether the user passed a flag (e.g. to conflict with --load).
  CLI::Option* batch_opt = nullptr;
  CLI::Option* seq_len_opt = nullptr;
  CLI::Option* heads_opt = nullptr;
  CLI::Option* kv_heads_opt = nullptr;
  CLI::Option* head_dim_opt = nullptr;
  CLI::Option* dtype_opt = nullptr;
};

// Registers --batch --heads --kv-heads --head-dim --causal --layout --dtype --scale --seed
// (and --seq-len when `with_seq_len`; bench sweeps sizes with its own flags).
void add_problem_flags(CLI::App& app, ProblemFlags& flags, bool with_seq_len = true);
// Registers --backend --log-level --timeout.
void add_session_flags(CLI::App& app, ProblemFlags& flags);

// Builds the spec from the flags (parses --seq-len, --layout, --dtype); does not check divisibility
// by the ring size (AttentionSpec::validate(world) does). Throws naming the flag and the fix.
AttentionSpec spec_from_flags(const ProblemFlags& flags);
// Checks --backend and --timeout and converts them.
SessionOptions session_options_from_flags(const ProblemFlags& flags);
// True when the user passed `opt` on the command line.
inline bool given(const CLI::Option* opt) { return opt != nullptr && opt->count() > 0; }

// Before the session exists: takes rank and world from the launcher's environment (Open MPI,
// MPICH/PMI, Slurm) so that early error messages already name the right rank.
void guess_process_context_from_launcher();

// Tests only: when environment variable `env` names a gradient ("dq", "dk" or "dv"), scales that
// host tensor by 1.5 so a gradient check must fail. Returns whether it corrupted one.
bool inject_gradient_fault(const char* env, const TensorView& dq, const TensorView& dk, const TensorView& dv);

// The message of an exception for the user; std::bad_alloc becomes "out of host memory" with a hint.
std::string describe_exception(const std::exception& e);

// ---- host tensors ------------------------------------------------------------------------------

// An owning, contiguous host tensor.
struct HostTensor {
  std::vector<double> storage;  // doubles for 8-byte alignment; holds view.nbytes()
  TensorView view;
};
HostTensor make_host_tensor(DType dtype, std::initializer_list<int64_t> shape);
// Converts any host tensor into a new contiguous host tensor of `dtype` (rounding to nearest even).
HostTensor convert_host(const TensorView& src, DType dtype);

// ---- seeded inputs -----------------------------------------------------------------------------

// Which tensor a random value belongs to (part of the counter, so q, k, v differ).
enum class TensorId : uint64_t { kQ = 1, kK = 2, kV = 3, kDOut = 4 };

uint64_t splitmix64(uint64_t x);
// A standard-normal value that depends only on (seed, tensor, global flat index): a counter-based
// hash (splitmix64) and Box-Muller. The same seed gives the same global problem on any rank count.
double random_normal(uint64_t seed, TensorId tensor, uint64_t global_index);
// local: (B, rows, Hh, D) host, any dtype. Row i receives global row pos.at(i) of the seeded
// (B, seq_len, Hh, D) tensor, rounded to local's dtype. Each rank generates only its own rows.
void fill_random_rows(const TensorView& local, const ChunkPositions& pos, int64_t seq_len, uint64_t seed,
                      TensorId tensor);

// ---- tensors in the backend's memory -----------------------------------------------------------

// Allocates a contiguous tensor of the given dtype/shape in `backend`'s memory (host or device);
// freed with the backend.
TensorView allocate_on_backend(Backend& backend, DType dtype, std::initializer_list<int64_t> shape);
// Copies a contiguous host tensor into a tensor of the same size in the backend's memory, and back.
// Device copies are synchronous (cudaMemcpy after a device synchronize).
void copy_to_backend(const TensorView& host, const TensorView& dst);
void copy_to_host(const TensorView& src, const TensorView& host);

// ---- --check: comparison with the fp64 naive reference -----------------------------------------

// Fills k_block and v_block, (B, n, Hkv, D) host tensors in the run's dtype, with global key rows
// [first_row, first_row + n). Lets the check stream K/V without holding the whole sequence.
using KvBlockSource = std::function<void(int64_t first_row, const TensorView& k_block, const TensorView& v_block)>;
// Seeded K/V (same values as fill_random_rows with TensorId::kK / kV).
KvBlockSource seeded_kv_source(uint64_t seed, int64_t seq_len);
// K/V from whole global host tensors (B, S, Hkv, D) that outlive the source.
KvBlockSource global_kv_source(const TensorView& k_global, const TensorView& v_global);

// Tolerance on max|out - ref| / max|ref| (and on |lse - ref| / max(1, |ref|)) per dtype.
double check_tolerance(DType dtype);

// Budget (multiply-adds of the naive reference per rank) under which every local row is checked.
inline constexpr double kFullCheckBudget = 4.0e9;
inline constexpr int64_t kMinSampleRows = 4;
inline constexpr int64_t kMaxSampleRows = 64;
// Local rows to check: all of them when the reference is cheap enough (or requested = -1), else
// a seeded sample (rank-dependent, sorted). requested > 0 forces that many sampled rows.
std::vector<int64_t> choose_check_rows(const AttentionSpec& spec, int world, int rank, uint64_t seed,
                                       int64_t requested, bool* sampled);

struct CheckResult {
  int64_t rows = 0;           // local query rows checked (each over all batches and heads)
  bool sampled = false;
  double max_abs_err = 0.0;   // max |out - ref|
  double max_ref = 0.0;       // max |ref|
  double max_rel_err = 0.0;   // max_abs_err / max_ref
  double max_lse_err = 0.0;   // max |lse - ref| / max(1, |ref|)
  int64_t mismatched = 0;     // non-finite values or wrong fully-masked rows
  double tolerance = 0.0;
  bool pass = false;
};

// Compares the ring's output for local `rows` against reference_attention (src/attn/reference.hpp)
// fed with the same (already rounded) inputs, streaming K/V in blocks and merging the block
// results in fp64 with the log-sum-exp rule (block_rows keys per block; 0: about 4M elements). q, out: (B, S_local, H, D) host; lse: (B, H, S_local)
// host fp32/fp64; q_pos: the ring's positions of this rank.
CheckResult check_against_reference(const AttentionSpec& spec, const TensorView& q, const ChunkPositions& q_pos,
                                    const TensorView& out, const TensorView& lse, const std::vector<int64_t>& rows,
                                    const KvBlockSource& kv, int64_t block_rows = 0);
// Collective: the job-wide result (max errors, summed rows and mismatches, pass on all ranks).
CheckResult reduce_check(Session& session, const CheckResult& local);

// ---- gathering rows for --save -----------------------------------------------------------------

// Collective: every rank passes its local host tensor (rows along `seq_dim`, positions from the
// spec's layout); rank 0 receives a global host tensor (seq_len rows) in global token order.
// Other ranks get an empty tensor.
HostTensor gather_to_root(Session& session, const AttentionSpec& spec, const TensorView& local, int seq_dim);

// Creates `dir` (with parents) when missing and proves it writable with a probe file.
// Throws naming `flag` and the fix.
void ensure_writable_dir(const std::string& dir, const std::string& flag);
// Writes text to `path` through a temporary file and rename.
void write_text_file(const std::string& path, const std::string& text);

// Thrown by collectively() on every rank at once, so the ranks can report it together.
class CollectiveError : public Error {
 public:
  using Error::Error;
};

// Runs `fn` on this rank and then agrees with every rank: when any rank threw, every rank throws
// CollectiveError with the first failure's message (no rank is left waiting in a collective).
void collectively(Session& session, const std::function<void()>& fn);

// Runs a subcommand's body; on CollectiveError every rank prints "ringattn: error: ..." to stderr,
// waits until all ranks have printed (mpirun kills the job at the first non-zero exit) and
// returns 1. Other exceptions propagate to main().
int run_reporting_errors(Session& session, const std::function<int()>& body);

// ---- JSON --------------------------------------------------------------------------------------

// A minimal streaming JSON writer: objects, arrays, numbers (non-finite -> null), strings, bools.
class JsonWriter {
 public:
  JsonWriter& begin_object(const std::string& key = "");
  JsonWriter& end_object();
  JsonWriter& begin_array(const std::string& key = "");
  JsonWriter& end_array();
  JsonWriter& field(const std::string& key, double value);
  JsonWriter& field(const std::string& key, int64_t value);
  JsonWriter& field(const std::string& key, int value) { return field(key, static_cast<int64_t>(value)); }
  JsonWriter& field(const std::string& key, bool value);
  JsonWriter& field(const std::string& key, const std::string& value);
  JsonWriter& field(const std::string& key, const char* value) { return field(key, std::string(value)); }
  // Inserts pre-rendered JSON (e.g. gathered from another rank).
  JsonWriter& raw(const std::string& key, const std::string& json);
  JsonWriter& value(double v);
  JsonWriter& value(const std::string& v);
  const std::string& str() const { return out_; }

 private:
  void prefix(const std::string& key);
  std::string out_;
  std::vector<bool> first_;  // per open container: no element written yet
};
std::string json_escape(const std::string& s);
std::string json_number(double v);

}  // namespace ringattn::cli
