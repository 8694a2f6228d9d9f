// Distributed sampled check: fp64 attention of sampled query rows against every rank's own K/V chunk, merged by lse.
#pragma once

#include <cstdint>

#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

struct SampledCheckOptions {
  int64_t samples = 32;     // sampled (batch, global position) query rows, each checked over all heads
  uint64_t seed = 1;        // same on every rank: every rank draws the same sample
  int threads = 0;          // host threads per rank; 0: RINGATTN_CHECK_THREADS, else cores / ranks
  int64_t block_rows = 4096;  // K/V rows copied to the host at a time
  double tolerance = 0.0;   // on max|out - ref| / max|ref|; 0: sampled_check_tolerance(dtype)
};

struct SampledCheckResult {
  int64_t rows = 0;          // sampled query rows (each over all heads)
  double max_abs_err = 0.0;  // max |out - ref| over the sample
  double max_ref = 0.0;      // max |ref|
  double max_rel_err = 0.0;  // max_abs_err / max_ref
  double rel_l2_err = 0.0;   // ||out - ref|| / ||ref||
  double max_lse_err = 0.0;  // max |lse - ref| / max(1, |ref|)
  int64_t bad_values = 0;    // non-finite outputs, or a fully masked row with lse != -inf
  double tolerance = 0.0;
  bool pass = false;
};

// Tolerance on max|out - ref| / max|ref| for outputs rounded to `dtype` (bf16 2e-2, fp16 4e-3,
// fp32 1e-4, fp64 1e-10); the lse tolerance is the same number (bf16/fp16 inputs are exact in fp32).
double sampled_check_tolerance(DType dtype);

// Collective over the ring (`mpi_comm` points to an MPI_Comm; nullptr for a single process).
// q: (B, S_local, H, D); k, v: (B, S_local, Hkv, D); out: (B, S_local, H, D); lse: (B, H, S_local)
// fp32/fp64 — this rank's chunks in `spec.layout`, on the host or the device (work that writes them
// must have completed). Every rank receives the sampled query rows (allreduce), computes in fp64
// their partial attention (running max, sum, unnormalised output) against its OWN K/V chunk,
// streamed to the host in blocks, and the partials are merged exactly with the log-sum-exp rule
// (allreduce of the max, then of the rescaled sums). No rank ever holds more than one block of
// another rank's data, so a million-token run is checked without gathering K/V. All ranks return
// the same result.
SampledCheckResult distributed_sampled_check(const AttentionSpec& spec, int rank, int world, void* mpi_comm,
                                             const TensorView& q, const TensorView& k, const TensorView& v,
                                             const TensorView& out, const TensorView& lse,
                                             const SampledCheckOptions& options = {});

}  // namespace ringattn
