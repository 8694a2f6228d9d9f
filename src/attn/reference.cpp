// Naive fp64 softmax attention with the mask semantics written out from their text (the independent reference).
#include "attn/reference.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "ringattn/error.hpp"

namespace ringattn {

// The semantics of the masks issue, implemented here from their wording and not through
// mask.hpp, so that a bug in the runtime's visibility module cannot hide from the tests.
bool reference_visible(const MaskSpec& m, int64_t i, int64_t j, int head) {
  const std::vector<int64_t>& cu = m.doc_offsets;
  int64_t doc_i = 0, doc_j = 0, first_of_doc = 0;
  if (!cu.empty()) {  // document index: how many offsets after the first are <= the position
    doc_i = std::upper_bound(cu.begin() + 1, cu.end(), i) - (cu.begin() + 1);
    doc_j = std::upper_bound(cu.begin() + 1, cu.end(), j) - (cu.begin() + 1);
    first_of_doc = cu[static_cast<std::size_t>(doc_i)];
  }
  if (doc_i != doc_j) return false;
  if (m.causal && !(j <= i)) return false;
  const bool any_pattern = m.has_window || m.stride > 0 || m.global_tokens > 0;
  if (!any_pattern) return true;
  if (m.mask_heads > 0 && head >= m.mask_heads) return true;  // not a patterned head
  bool window = false, stride = false, global = false;
  if (m.has_window) {
    // i - left <= j <= i + right, written as differences so that a side near INT64_MAX cannot wrap
    const bool left_ok = m.window_left == -1 || i - j <= m.window_left;
    const bool right_ok = m.window_right == -1 || j - i <= m.window_right;
    window = left_ok && right_ok;
  }
  if (m.stride > 0) {
    int64_t r = (i - j) % m.stride;
    if (r < 0) r += m.stride;
    stride = r == 0;
  }
  if (m.global_tokens > 0) {
    // j's document is i's (checked above), so both count from the same first position.
    global = (i - first_of_doc) < m.global_tokens || (j - first_of_doc) < m.global_tokens;
  }
  return window || stride || global;
}

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
          if (!reference_visible(spec.mask, qp, k_pos.at(j), static_cast<int>(h))) {
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

namespace ringattn {

void reference_attention_backward(const AttentionSpec& spec, const TensorView& q, const TensorView& k,
                                  const TensorView& v, const TensorView& dout, const TensorView& dq,
                                  const TensorView& dk, const TensorView& dv) {
  const int64_t B = q.shape[0], S = q.shape[1], H = q.shape[2], D = q.shape[3], Hkv = k.shape[2];
  const int64_t group = H / Hkv;
  const double scale = spec.scale();
  auto* dqp = static_cast<double*>(dq.data);
  auto* dkp = static_cast<double*>(dk.data);
  auto* dvp = static_cast<double*>(dv.data);
  std::fill(dqp, dqp + dq.numel(), 0.0);
  std::fill(dkp, dkp + dk.numel(), 0.0);
  std::fill(dvp, dvp + dv.numel(), 0.0);
  std::vector<double> P(static_cast<std::size_t>(S * S)), dP(P.size()), O(static_cast<std::size_t>(S * D));
  auto qi = [&](int64_t b, int64_t i, int64_t h, int64_t d) { return ((b * S + i) * H + h) * D + d; };
  auto ki = [&](int64_t b, int64_t j, int64_t h, int64_t d) { return ((b * S + j) * Hkv + h) * D + d; };
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < S; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          double s = -std::numeric_limits<double>::infinity();
          if (reference_visible(spec.mask, i, j, static_cast<int>(h))) {
            s = 0.0;
            for (int64_t d = 0; d < D; ++d) s += load_as_double(q, qi(b, i, h, d)) * load_as_double(k, ki(b, j, hk, d));
            s *= scale;
          }
          P[i * S + j] = s;
          mx = std::max(mx, s);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < S; ++j) {
          P[i * S + j] = mx == -std::numeric_limits<double>::infinity() ? 0.0 : std::exp(P[i * S + j] - mx);
          sum += P[i * S + j];
        }
        for (int64_t j = 0; j < S; ++j) P[i * S + j] = sum > 0.0 ? P[i * S + j] / sum : 0.0;  // no key: P = 0
        for (int64_t d = 0; d < D; ++d) {
          double o = 0.0;
          for (int64_t j = 0; j < S; ++j) o += P[i * S + j] * load_as_double(v, ki(b, j, hk, d));
          O[i * D + d] = o;
        }
      }
      for (int64_t i = 0; i < S; ++i) {
        double delta = 0.0;
        for (int64_t d = 0; d < D; ++d) delta += load_as_double(dout, qi(b, i, h, d)) * O[i * D + d];
        for (int64_t j = 0; j < S; ++j) {
          double dp = 0.0;
          for (int64_t d = 0; d < D; ++d) dp += load_as_double(dout, qi(b, i, h, d)) * load_as_double(v, ki(b, j, hk, d));
          const double p = P[i * S + j];
          const double ds = p * (dp - delta) * scale;
          for (int64_t d = 0; d < D; ++d) {
            dvp[ki(b, j, hk, d)] += p * load_as_double(dout, qi(b, i, h, d));
            dqp[qi(b, i, h, d)] += ds * load_as_double(k, ki(b, j, hk, d));
            dkp[ki(b, j, hk, d)] += ds * load_as_double(q, qi(b, i, h, d));
          }
        }
      }
    }
  }
}

}  // namespace ringattn
