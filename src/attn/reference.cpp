// Naive fp64 softmax attention with position-based causal masking (the independent reference).
#include "attn/reference.hpp"

#include <cmath>
#include <limits>

#include "ringattn/error.hpp"

namespace ringattn {

ChunkPositions identity_positions(int64_t n) {
  ChunkPositions p;
  p.num_segments = 1;
  p.seg[0] = {0, 1, n};
  return p;
}

void reference_attention(const AttentionSpec& spec, const TensorView& q, const ChunkPositions& q_pos,
                         const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                         const TensorView& out, const TensorView& lse, const std::vector<int64_t>* rows) {
  RINGATTN_CHECK(out.dtype == DType::kF64 && lse.dtype == DType::kF64, ErrorKind::kInternal,
                 "reference writes fp64 outputs", "");
  const int64_t B = q.shape[0], Sq = q.shape[1], H = q.shape[2], D = q.shape[3];
  const int64_t Sk = k.shape[1], Hkv = k.shape[2];
  const int64_t group = H / Hkv;
  const double scale = spec.scale();
  std::vector<int64_t> all;
  if (!rows) {
    all.resize(Sq);
    for (int64_t i = 0; i < Sq; ++i) all[i] = i;
    rows = &all;
  }
  std::vector<double> scores(Sk), qrow(D), acc(D);
  auto* o = static_cast<double*>(out.data);
  auto* l = static_cast<double*>(lse.data);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / group;
      for (int64_t i : *rows) {
        for (int64_t d = 0; d < D; ++d) qrow[d] = load_as_double(q, ((b * Sq + i) * H + h) * D + d);
        const int64_t qp = q_pos.at(i);
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < Sk; ++j) {
          if (spec.causal && k_pos.at(j) > qp) {
            scores[j] = -std::numeric_limits<double>::infinity();
            continue;
          }
          double s = 0.0;
          const int64_t kb = ((b * Sk + j) * Hkv + hk) * D;
          for (int64_t d = 0; d < D; ++d) s += qrow[d] * load_as_double(k, kb + d);
          scores[j] = s * scale;
          mx = std::max(mx, scores[j]);
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        double* orow = o + ((b * Sq + i) * H + h) * D;
        double& lrow = l[(b * H + h) * Sq + i];
        if (mx == -std::numeric_limits<double>::infinity()) {
          for (int64_t d = 0; d < D; ++d) orow[d] = 0.0;
          lrow = -std::numeric_limits<double>::infinity();
          continue;
        }
        double sum = 0.0;
        for (int64_t j = 0; j < Sk; ++j) {
          if (scores[j] == -std::numeric_limits<double>::infinity()) continue;
          const double p = std::exp(scores[j] - mx);
          sum += p;
          const int64_t vb = ((b * Sk + j) * Hkv + hk) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * load_as_double(v, vb + d);
        }
        for (int64_t d = 0; d < D; ++d) orow[d] = acc[d] / sum;
        lrow = mx + std::log(sum);
      }
    }
  }
}

}  // namespace ringattn
