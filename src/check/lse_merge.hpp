// The one log-sum-exp merge of the checks: fp64 softmax partials (max, sum, unnormalised output), folded and merged exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "ringattn/session.hpp"

namespace ringattn::check {

// A partial softmax row over some keys: m = max score, l = sum exp(score - m),
// acc[0..D) = sum exp(score - m) * v. Empty (no visible key): m = -inf, l = 0, acc = 0.
inline constexpr double kEmptyMax = -std::numeric_limits<double>::infinity();

// Folds one visible key (its score and value row v[0..D)) into the partial (m, l, acc).
template <typename V>
inline void fold_key(double& m, double& l, double* acc, double score, const V* v, int64_t D) {
  if (score > m) {
    const double f = std::exp(m - score);  // 0 when m = -inf
    l = l * f + 1.0;
    for (int64_t e = 0; e < D; ++e) acc[e] = acc[e] * f + static_cast<double>(v[e]);
    m = score;
  } else {
    const double p = std::exp(score - m);
    l += p;
    for (int64_t e = 0; e < D; ++e) acc[e] += p * static_cast<double>(v[e]);
  }
}

// Merges partial b into partial a (either may be empty).
inline void merge_partial(double& ma, double& la, double* acca, double mb, double lb, const double* accb, int64_t D) {
  if (lb == 0.0) return;
  if (la == 0.0) {
    ma = mb;
    la = lb;
    std::copy(accb, accb + D, acca);
    return;
  }
  const double m = std::max(ma, mb), fa = std::exp(ma - m), fb = std::exp(mb - m);
  la = la * fa + lb * fb;
  for (int64_t e = 0; e < D; ++e) acca[e] = acca[e] * fa + accb[e] * fb;
  ma = m;
}

// The merged row: lse = m + log l and out = acc / l; a row that saw no key has lse = -inf, out = 0.
inline double partial_lse(double m, double l) { return l == 0.0 ? kEmptyMax : m + std::log(l); }
inline double partial_out(double l, double acc) { return l == 0.0 ? 0.0 : acc / l; }

// Collective: the exact merge of every rank's partials of the same n rows (m: n, l: n, acc: n * D):
// the max over ranks, each rank's sums rescaled to it, then summed. All ranks get the merged rows.
inline void merge_over_ranks(Session& session, std::vector<double>& m, std::vector<double>& l,
                             std::vector<double>& acc, int64_t D) {
  std::vector<double> gm = m;
  session.reduce_over_ranks(gm.data(), static_cast<int64_t>(gm.size()), /*max=*/true);
  for (std::size_t u = 0; u < m.size(); ++u) {
    const double f = m[u] == kEmptyMax ? 0.0 : std::exp(m[u] - gm[u]);
    l[u] *= f;
    for (int64_t e = 0; e < D; ++e) acc[u * D + e] *= f;
  }
  session.reduce_over_ranks(l.data(), static_cast<int64_t>(l.size()), /*max=*/false);
  session.reduce_over_ranks(acc.data(), static_cast<int64_t>(acc.size()), /*max=*/false);
  m = std::move(gm);
}

}  // namespace ringattn::check
