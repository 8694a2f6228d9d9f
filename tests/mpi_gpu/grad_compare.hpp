// Comparison helpers of the MPI + GPU gradient tests: bf16 tolerances and errors against a global fp64 reference.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "gpu/gpu_test_util.hpp"
#include "ringattn/layout.hpp"

namespace ringattn::test {

// bf16 keeps 8 significant bits (unit roundoff 2^-8); flash kernels round P (and dS) to bf16 before
// the products, so a plain same-precision implementation lands at a few units of it relative to
// max|ref| (measured errors of the kernels: docs/BACKWARD_NOTES.md).
constexpr double kBf16Unit = 1.0 / 256;
constexpr double kOutTolerance = 2.0 * kBf16Unit;
constexpr double kGradTolerance = 4.0 * kBf16Unit;

inline double max_over_ranks(double v) {
  double out = v;
  MPI_Allreduce(&v, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

// max |got - want| / max |want| over this rank's rows of a global fp64 reference, max over ranks.
inline double rel_error(const HostTensor& got, const HostTensor& want_global, const ChunkPositions& pos,
                        int64_t batch, int64_t rows, int64_t seq, int64_t width) {
  double err = 0.0, ref = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t x = 0; x < width; ++x) {
        const double w = want_global.view.as<double>()[(b * seq + pos.at(i)) * width + x];
        const double g = load_as_double(got.view, (b * rows + i) * width + x);
        ref = std::max(ref, std::fabs(w));
        err = std::isfinite(g) ? std::max(err, std::fabs(g - w)) : INFINITY;
      }
    }
  }
  return max_over_ranks(err) / max_over_ranks(ref);
}

}  // namespace ringattn::test
