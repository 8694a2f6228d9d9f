// `ringattn bench --calibrate FILE`: measures kernel rates and link figures on the machine at hand, writes a machine file.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "cli_common.hpp"

namespace ringattn::cli {

struct CalibrateOptions {
  ProblemFlags problem;          // heads, kv heads, head_dim, dtype, mask patterns (-> the "masked" class)
  std::vector<int64_t> tokens;   // query rows (and keys) of one measured step, per size
  int iters = 3;
  int warmup = 1;
  std::string path;              // the machine file to write (rank 0)
};

// Collective over the launcher's ranks: rank 0 times the kernels alone (forward, forward+backward;
// dense, causal and, with mask flags, masked), then every rank joins timed ring exchanges of
// growing size (world > 1) fitted as latency + bytes / bandwidth. Returns the exit code.
int run_calibrate(const CalibrateOptions& options);

}  // namespace ringattn::cli
