// Shared CLI helpers for run and bench: problem and mask flags, device staging, gathering rows, errors, JSON.
#pragma once

#include <cstdint>
#include <exception>
#include <functional>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "check/check.hpp"
#include "check/inputs.hpp"
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
  std::string layout = "auto";
  // Mask patterns as text, parsed by mask_from_flags so that every bad value gets a message naming
  // the flag and the fix (empty: not given).
  std::string window;         // LEFT,RIGHT
  std::string doc_lens;       // L1,L2,... summing to the sequence length
  std::string stride;         // S > 0
  std::string global_tokens;  // N >= 0
  std::string mask_heads;     // K: a multiple of heads / kv_heads, at most heads
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

// Registers --batch --heads --kv-heads --head-dim --causal --window --doc-lens --stride
// --global-tokens --mask-heads --layout --dtype --scale --seed
// (and --seq-len when `with_seq_len`; bench sweeps sizes with its own flags).
void add_problem_flags(CLI::App& app, ProblemFlags& flags, bool with_seq_len = true);
// Registers --backend --log-level --timeout.
void add_session_flags(CLI::App& app, ProblemFlags& flags);

// Builds the spec from the flags (parses --seq-len, --layout, --dtype); does not check divisibility
// by the ring size (AttentionSpec::validate(world) does). Throws naming the flag and the fix.
// The mask flags are parsed here too, except --doc-lens, which needs the final sequence length
// (--load and bench's sweep set it): callers apply it with apply_doc_lens.
AttentionSpec spec_from_flags(const ProblemFlags& flags);
// Sets spec.mask.doc_offsets from --doc-lens for spec.seq_len (no-op when not given). Throws naming
// --doc-lens when a length is not a positive integer or the lengths do not sum to the length.
void apply_doc_lens(const ProblemFlags& flags, AttentionSpec& spec);
// Visible (query, key) pairs of the queries at `pos` (this rank's rows), over all batch rows and
// query heads: the exact count of mask.hpp, which the plan's RingPlan::visible_pairs matches.
double visible_pairs_of(const AttentionSpec& spec, const ChunkPositions& pos);
// Every (query, key) pair: S^2 * batch * heads (the denominator of the visible fraction).
inline double dense_pairs(const AttentionSpec& spec) {
  return static_cast<double>(spec.seq_len) * static_cast<double>(spec.seq_len) * static_cast<double>(spec.batch) *
         spec.heads;
}
// Parses "LEFT,RIGHT" of --window (exactly two integers, each >= -1); throws naming --window.
void parse_window(const std::string& text, int64_t* left, int64_t* right);
// Parses a comma-separated list of positive integers (--doc-lens); throws naming `flag`.
std::vector<int64_t> parse_lengths(const std::string& text, const std::string& flag);
// Parses one integer of `flag`; throws naming the flag and `hint` when it is not one.
int64_t parse_int_flag(const std::string& text, const std::string& flag, const std::string& hint);
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

// ---- seeded inputs: check/inputs.hpp -------------------------------------------------------------

using ringattn::fill_random_rows;
using ringattn::random_normal;
using ringattn::splitmix64;
using ringattn::TensorId;

// ---- tensors in the backend's memory -----------------------------------------------------------

// Allocates a contiguous tensor of the given dtype/shape in `backend`'s memory (host or device);
// freed with the backend.
TensorView allocate_on_backend(Backend& backend, DType dtype, std::initializer_list<int64_t> shape);
// Copies a contiguous host tensor into a tensor of the same size in the backend's memory, and back.
// Device copies are synchronous (cudaMemcpy after a device synchronize).
void copy_to_backend(const TensorView& host, const TensorView& dst);
void copy_to_host(const TensorView& src, const TensorView& host);

// ---- gathering rows for --save -----------------------------------------------------------------

// Collective: every rank passes its local host tensor (rows along `seq_dim`, positions from the
// spec's layout); rank 0 receives a global host tensor (seq_len rows) in global token order.
// Other ranks get an empty tensor.
HostTensor gather_to_root(Session& session, const AttentionSpec& spec, const TensorView& local, int seq_dim);

// Creates `dir` (with parents) when missing and proves it writable with a probe file.
// Throws naming `flag` and the fix.
void ensure_writable_dir(const std::string& dir, const std::string& flag);
// Holds DIR/.ringattn-save.lock (flock, exclusive) for its lifetime, so that two jobs never write
// one --save directory at once (a reader would see one job's dk.npy beside the other's out.npy).
// Throws naming --save, the other job's pid and the fix when another process holds it; the lock
// goes with the process, so a crashed job leaves none behind.
class SaveDirLock {
 public:
  SaveDirLock(const std::string& dir, const std::string& flag);
  ~SaveDirLock();
  SaveDirLock(const SaveDirLock&) = delete;
  SaveDirLock& operator=(const SaveDirLock&) = delete;

 private:
  int fd_ = -1;
};

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

// Collective: every rank passes the same flags (name, value as text) in the same order; when a
// value differs between ranks, every rank throws CollectiveError(kMismatch) naming the first such
// flag, rank 0's value and each rank that differs with its value. For the options that change
// the collective sequence or the problem's data (a rank with another --iters would wait forever
// in a barrier, another --seed would silently compute another problem).
void agree_flags(Session& session, const std::vector<std::pair<std::string, std::string>>& flags);

// The largest score magnitude ringattn computes correctly in `dtype`: |scale * q_i . k_j| above it
// loses the softmax to rounding in fp32/bf16/fp16 compute (the GPU kernels' exp2(fma(s, scale,
// -max)) turns the product's rounding error into inf at about 2e9) and overflows in fp64 near 1e308.
double max_score_bound(DType dtype);
// Throws kInvalidArgument naming --scale when scale * max_q_norm * max_k_norm (a bound of every
// |score| by Cauchy-Schwarz; the norms are of one head's row, max over the whole problem) exceeds
// max_score_bound; `inputs` says where the norms come from (for the message).
void check_scale_bound(const AttentionSpec& spec, double max_q_norm, double max_k_norm, const std::string& inputs);
// The largest L2 norm of one head's row (the last dimension) of a host tensor.
double max_row_norm(const TensorView& t);

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
// Writes `key`: [...] with one pass's hops: hop, source_rank, skipped, compute_ms, exposed_comm_ms,
// sent_bytes and received_bytes (K+V, all peers, forwarding included), peers [{rank, sent_bytes,
// received_bytes}], and for a backward pass grad_sent_bytes / grad_received_bytes (dK/dV).
void hops_json(JsonWriter& j, const char* key, const PassStats& st, bool backward);
std::string json_number(double v);

}  // namespace ringattn::cli
