// Verification against the fp64 reference: the tolerance table, the exhaustive and the distributed sampled check.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "ringattn/layout.hpp"
#include "ringattn/session.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// ---- the one tolerance table ---------------------------------------------------------------------

// Tolerance on max|got - ref| / max|ref| of outputs and gradients (and on |lse - ref| / max(1, |ref|))
// rounded to `dtype`, for every check (run --check, bench -c 1, the gradient check, the GPU tests):
//   fp64 1e-10  ring and reference both accumulate in fp64: differences are a few ulps (~1e-15).
//   fp32 1e-4   fp32 accumulation over S keys, error ~ sqrt(S) * 6e-8, plus the GPUs' exp2
//               approximation (2^-22 relative): a wide margin up to million-token sums.
//   bf16 2e-2   rounding the output costs 2^-9 of |out| and flash kernels round P to bf16 before
//               P*V: ~10x the per-element rounding.
//   fp16 4e-3   the same argument with fp16's 2^-11 rounding. The CLI once used 1e-2 and the sampled
//               check 4e-3; 4e-3 is kept because every backend passes it (the CUDA ring tests,
//               tests/mpi_gpu/ring_gpu_test.cpp, check fp16 rings against it; the CPU backend
//               computes in fp64 and rounds once).
double check_tolerance(DType dtype);

// ---- exhaustive check of short runs ------------------------------------------------------------

// Fills k_block and v_block, (B, n, Hkv, D) host tensors in the run's dtype, with global key rows
// [first_row, first_row + n). Lets the check stream K/V without holding the whole sequence.
using KvBlockSource = std::function<void(int64_t first_row, const TensorView& k_block, const TensorView& v_block)>;
// Seeded K/V (same values as fill_random_rows with TensorId::kK / kV).
KvBlockSource seeded_kv_source(uint64_t seed, int64_t seq_len);
// K/V from whole global host tensors (B, S, Hkv, D) that outlive the source.
KvBlockSource global_kv_source(const TensorView& k_global, const TensorView& v_global);

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

// Compares the ring's output for local `rows` against reference_attention (src/attn/reference.hpp,
// which applies the mask from the semantics' text) fed with the same (already rounded) inputs,
// streaming K/V in blocks (block_rows keys per block; 0: about 4M elements) merged in fp64 by the
// log-sum-exp rule (lse_merge.hpp). q, out: (B, S_local, H, D) host; lse: (B, H, S_local) host
// fp32/fp64; q_pos: the ring's positions of this rank. A row that sees no key must have out = 0 and
// lse = -inf exactly.
CheckResult check_against_reference(const AttentionSpec& spec, const TensorView& q, const ChunkPositions& q_pos,
                                    const TensorView& out, const TensorView& lse, const std::vector<int64_t>& rows,
                                    const KvBlockSource& kv, int64_t block_rows = 0);
// Collective: the job-wide result (max errors, summed rows and mismatches, pass on all ranks).
CheckResult reduce_check(Session& session, const CheckResult& local);

// ---- distributed sampled check of long runs --------------------------------------------------------

struct SampledCheckOptions {
  int64_t samples = 32;     // sampled (batch, global position) query rows, each checked over all heads
  uint64_t seed = 1;        // same on every rank: every rank draws the same sample
  int threads = 0;          // host threads per rank; 0: RINGATTN_CHECK_THREADS, else cores / ranks
  int64_t block_rows = 4096;  // K/V rows copied to the host at a time
  double tolerance = 0.0;   // on max|out - ref| / max|ref|; 0: check_tolerance(dtype)
};

struct SampledCheckResult {
  int64_t rows = 0;          // sampled query rows (each over all heads)
  double max_abs_err = 0.0;  // max |out - ref| over the sample
  double max_ref = 0.0;      // max |ref|
  double max_rel_err = 0.0;  // max_abs_err / max_ref
  double rel_l2_err = 0.0;   // ||out - ref|| / ||ref||
  double max_lse_err = 0.0;  // max |lse - ref| / max(1, |ref|)
  int64_t bad_values = 0;    // non-finite outputs, or a row that sees no key with lse != -inf or out != 0
  double tolerance = 0.0;
  bool pass = false;
};

// Collective over the session's ranks. q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D);
// out: (B, S_local, H, D); lse: (B, H, S_local) fp32/fp64 — this rank's chunks in the spec's layout
// (plan/plan.hpp layout_ranks), on the host or the device (work that writes them must have completed). Every
// rank receives the sampled query rows, computes in fp64 their partial attention over its OWN K/V
// chunk (streamed to the host in blocks; visibility from reference_visible, the reference's own
// implementation of the mask semantics), and the partials are merged exactly over ranks
// (lse_merge.hpp). No rank ever holds more than one block of another rank's data, so a
// million-token run is checked without gathering K/V. All ranks return the same result.
SampledCheckResult distributed_sampled_check(const AttentionSpec& spec, Session& session, const TensorView& q,
                                             const TensorView& k, const TensorView& v, const TensorView& out,
                                             const TensorView& lse, const SampledCheckOptions& options = {});

}  // namespace ringattn
