// --check for the backward pass: dQ on sampled query rows and dK/dV on sampled key rows, from fp64 sums.
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/layout.hpp"
#include "ringattn/session.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

struct GradCheckResult {
  int64_t dq_rows = 0;    // local query rows whose dQ was checked (summed over ranks after the reduce)
  int64_t dkv_rows = 0;   // key rows whose dK/dV were checked (all ranks)
  bool sampled = false;
  double dq_rel_err = 0.0;  // max |got - ref| / max |ref| per gradient
  double dk_rel_err = 0.0;
  double dv_rel_err = 0.0;
  int64_t non_finite = 0;
  double tolerance = 0.0;
  bool pass = false;
};

// Collective. All tensors are this rank's host copies in the run's dtype (lse fp32/fp64):
// q, dout, out, dq: (B, S_local, H, D); k, v, dk, dv: (B, S_local, Hkv, D); lse: (B, H, S_local).
//  - dQ of local rows `q_rows` (every rank's are checked): the reference recomputes lse and O of
//    every sampled row from fp64 partials over each rank's own K/V, merged exactly over ranks (no
//    rank ever holds another's K/V), then dQ = scale * sum_j P_ij (dO_i.V_j - D_i) K_j the same way.
//  - dK/dV of local rows `k_rows` (every rank's are checked): every rank adds the fp64
//    contributions of its own queries, P_ij = exp(scale q_i.k_j - lse_i) with D_i = dO_i.O_i
//    from the forward's lse and O (checked separately by the forward --check), and the partial
//    sums are added over ranks; the owner compares.
// Visibility comes from reference_visible (the reference's own implementation of the mask
// semantics); a row that sees no key has dQ = 0 and adds nothing to dK/dV. Tolerance:
// check_tolerance (check.hpp).
GradCheckResult check_gradients(Session& session, const AttentionSpec& spec, const ChunkPositions& pos,
                                const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout, const TensorView& out, const TensorView& lse,
                                const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                const std::vector<int64_t>& q_rows, const std::vector<int64_t>& k_rows);

}  // namespace ringattn
