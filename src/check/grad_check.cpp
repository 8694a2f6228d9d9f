// --check for the backward pass: streamed fp64 reference gradients on sampled rows, summed across ranks.
#include "check/grad_check.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>

#include "attn/reference.hpp"
#include "check/check.hpp"
#include "check/lse_merge.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr int64_t kKvBlockRows = 2048;  // key rows streamed per block for the dQ reference
constexpr double kInf = std::numeric_limits<double>::infinity();

// Runs fn(i) for i in [0, n) on all hardware threads.
template <typename Fn>
void parallel_for(int64_t n, Fn fn) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(n, std::thread::hardware_concurrency()));
  std::atomic<int64_t> next{0};
  std::vector<std::thread> pool;
  for (int64_t t = 0; t < threads; ++t) {
    pool.emplace_back([&] {
      for (int64_t i = next++; i < n; i = next++) fn(i);
    });
  }
  for (auto& th : pool) th.join();
}

// Elementwise sum of `values` over the ranks, in place.
void sum_over_ranks_inplace(Session& session, std::vector<double>& values) {
  session.reduce_over_ranks(values.data(), static_cast<int64_t>(values.size()), /*max=*/false);
}

// Max |got - ref| and max |ref| accumulated per gradient.
struct ErrAcc {
  double err = 0.0, ref = 0.0;
  int64_t non_finite = 0;
  void add(double got, double want) {
    if (!std::isfinite(got)) {
      ++non_finite;
      return;
    }
    err = std::max(err, std::fabs(got - want));
    ref = std::max(ref, std::fabs(want));
  }
};

}  // namespace

GradCheckResult check_gradients(Session& session, const AttentionSpec& spec, const ChunkPositions& pos,
                                const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& dout, const TensorView& out, const TensorView& lse,
                                const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                const std::vector<int64_t>& q_rows, const std::vector<int64_t>& k_rows) {
  const int64_t B = spec.batch, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const int64_t Sl = q.shape[1], group = H / Hkv;
  const double scale = spec.scale();
  auto qi = [&](int64_t b, int64_t i, int64_t h) { return ((b * Sl + i) * H + h) * D; };
  auto ki = [&](int64_t b, int64_t i, int64_t h) { return ((b * Sl + i) * Hkv + h) * D; };

  const int world = session.world();
  const int rank = session.rank();

  // ---- dQ on sampled query rows: every rank's rows against every rank's own K/V, merged -----------
  // The sampled rows of all ranks (position, q, dO) go to every rank; each computes fp64 partials
  // over its own K/V chunk (online softmax, then dQ with the merged reference lse and O), and the
  // partials are merged exactly over ranks. No rank regenerates or receives another rank's K/V.
  const int64_t nq_local = static_cast<int64_t>(q_rows.size());
  const int64_t nq = static_cast<int64_t>(session.max_over_ranks(static_cast<double>(nq_local)));
  RINGATTN_CHECK(nq == nq_local, ErrorKind::kInternal, "ranks sampled different numbers of query rows", "");
  const int64_t row_elems = B * H * D;
  const int64_t rows_all = world * nq;
  std::vector<double> q_pos_all(static_cast<std::size_t>(rows_all), 0.0);
  std::vector<double> qd_all(static_cast<std::size_t>(rows_all * 2 * row_elems), 0.0);  // [row][q | dO][b][h][d]
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t i = q_rows[r];
    q_pos_all[rank * nq + r] = static_cast<double>(pos.at(i));
    double* dst = &qd_all[(rank * nq + r) * 2 * row_elems];
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t d = 0; d < D; ++d) {
          dst[(b * H + h) * D + d] = load_as_double(q, qi(b, i, h) + d);
          dst[row_elems + (b * H + h) * D + d] = load_as_double(dout, qi(b, i, h) + d);
        }
      }
    }
  }
  sum_over_ranks_inplace(session, q_pos_all);  // each slot is written by one rank, zero elsewhere
  sum_over_ranks_inplace(session, qd_all);
  const int64_t units = rows_all * B * H;  // one (row, batch, head) per unit
  auto q_of = [&](int64_t u) { return &qd_all[(u / (B * H)) * 2 * row_elems + (u % (B * H)) * D]; };
  auto do_of = [&](int64_t u) { return q_of(u) + row_elems; };
  std::vector<double> m(units, -kInf), l(units, 0.0), o(units * D, 0.0), delta(units, 0.0), dq_ref(units * D, 0.0);
  // Streams this rank's K/V in blocks widened to fp64: per_block(first local row, rows, k, v), with
  // k/v laid out (b, row, kv head, d).
  const int64_t kv_row = Hkv * D;
  std::vector<double> kb(static_cast<std::size_t>(B * kKvBlockRows * kv_row)), vb(kb.size());
  std::vector<int64_t> kp(static_cast<std::size_t>(kKvBlockRows));
  auto stream_local_kv = [&](auto&& per_block) {
    for (int64_t first = 0; first < Sl; first += kKvBlockRows) {
      const int64_t n = std::min(kKvBlockRows, Sl - first);
      parallel_for(B * n, [&](int64_t r) {
        const int64_t b = r / n, j = r % n;
        for (int64_t e = 0; e < kv_row; ++e) {
          kb[(b * n + j) * kv_row + e] = load_as_double(k, ki(b, first + j, 0) + e);
          vb[(b * n + j) * kv_row + e] = load_as_double(v, ki(b, first + j, 0) + e);
        }
      });
      for (int64_t j = 0; j < n; ++j) kp[j] = pos.at(first + j);
      per_block(n);
    }
  };
  auto visible = [&](int64_t u, int64_t key_pos) {
    return reference_visible(spec.mask, static_cast<int64_t>(q_pos_all[u / (B * H)]), key_pos, static_cast<int>(u % H));
  };
  auto score = [&](int64_t u, int64_t n, int64_t j) {
    const int64_t b = (u / H) % B, h = u % H;
    const double* qr = q_of(u);
    const double* kr = &kb[((b * n + j) * Hkv + h / group) * D];
    double sc = 0.0;
    for (int64_t d = 0; d < D; ++d) sc += qr[d] * kr[d];
    return sc * scale;
  };
  // Pass 1: partial online softmax per unit over this rank's keys, then the exact merge.
  stream_local_kv([&](int64_t n) {
    parallel_for(units, [&](int64_t u) {
      const int64_t b = (u / H) % B, h = u % H;
      for (int64_t j = 0; j < n; ++j) {
        if (!visible(u, kp[j])) continue;
        check::fold_key(m[u], l[u], &o[u * D], score(u, n, j), &vb[((b * n + j) * Hkv + h / group) * D], D);
      }
    });
  });
  check::merge_over_ranks(session, m, l, o, D);
  for (int64_t u = 0; u < units; ++u) {
    if (l[u] == 0.0) continue;
    double dsum = 0.0;
    const double* dor = do_of(u);
    for (int64_t d = 0; d < D; ++d) {
      o[u * D + d] /= l[u];
      dsum += dor[d] * o[u * D + d];
    }
    delta[u] = dsum;
    m[u] = check::partial_lse(m[u], l[u]);  // m now holds the reference lse
  }
  // Pass 2: partial dQ = scale * sum_j P_ij (dO_i . V_j - D_i) K_j over this rank's keys, summed.
  stream_local_kv([&](int64_t n) {
    parallel_for(units, [&](int64_t u) {
      if (l[u] == 0.0) return;
      const int64_t b = (u / H) % B, h = u % H;
      const double* dor = do_of(u);
      for (int64_t j = 0; j < n; ++j) {
        if (!visible(u, kp[j])) continue;
        const double pj = std::exp(score(u, n, j) - m[u]);
        const int64_t base = ((b * n + j) * Hkv + h / group) * D;
        double dp = 0.0;
        for (int64_t d = 0; d < D; ++d) dp += dor[d] * vb[base + d];
        const double ds = pj * (dp - delta[u]) * scale;
        for (int64_t d = 0; d < D; ++d) dq_ref[u * D + d] += ds * kb[base + d];
      }
    });
  });
  sum_over_ranks_inplace(session, dq_ref);
  ErrAcc dq_err;
  for (int64_t r = 0; r < nq; ++r) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t u = ((rank * nq + r) * B + b) * H + h;
        for (int64_t d = 0; d < D; ++d) dq_err.add(load_as_double(dq, qi(b, q_rows[r], h) + d), dq_ref[u * D + d]);
      }
    }
  }

  // ---- dK/dV on sampled key rows: every rank adds its own queries' share ----------------------------
  // Gather the sampled key rows of every rank: their global positions and K/V values.
  const int64_t nk_local = static_cast<int64_t>(k_rows.size());
  const int64_t nk = static_cast<int64_t>(session.max_over_ranks(static_cast<double>(nk_local)));
  RINGATTN_CHECK(nk == nk_local, ErrorKind::kInternal, "ranks sampled different numbers of key rows", "");
  const int64_t row_vals = B * Hkv * D;
  std::vector<double> key_pos(static_cast<std::size_t>(world * nk), 0.0);
  std::vector<double> key_kv(static_cast<std::size_t>(world * nk * 2 * row_vals), 0.0);
  for (int64_t s = 0; s < nk; ++s) {
    const int64_t j = k_rows[s];
    key_pos[rank * nk + s] = static_cast<double>(pos.at(j));
    double* dst = &key_kv[(rank * nk + s) * 2 * row_vals];
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hkv; ++h) {
        for (int64_t d = 0; d < D; ++d) {
          dst[(b * Hkv + h) * D + d] = load_as_double(k, ki(b, j, h) + d);
          dst[row_vals + (b * Hkv + h) * D + d] = load_as_double(v, ki(b, j, h) + d);
        }
      }
    }
  }
  sum_over_ranks_inplace(session, key_pos);  // each slot is written by one rank, zero elsewhere
  sum_over_ranks_inplace(session, key_kv);
  // D_i = dO_i . O_i from the forward's output, once per local (row, batch, head).
  std::vector<double> d_local(static_cast<std::size_t>(Sl * B * H));
  parallel_for(Sl, [&](int64_t i) {
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        double s = 0.0;
        for (int64_t d = 0; d < D; ++d) s += load_as_double(dout, qi(b, i, h) + d) * load_as_double(out, qi(b, i, h) + d);
        d_local[(i * B + b) * H + h] = s;
      }
    }
  });
  const int64_t key_units = world * nk * B * Hkv;
  std::vector<double> dkv_ref(static_cast<std::size_t>(key_units * 2 * D), 0.0);
  parallel_for(key_units, [&](int64_t u) {
    const int64_t key = u / (B * Hkv), b = (u / Hkv) % B, hk = u % Hkv;
    const double kp = key_pos[key];
    const double* krow = &key_kv[key * 2 * row_vals + (b * Hkv + hk) * D];
    const double* vrow = krow + row_vals;
    double* dk_out = &dkv_ref[u * 2 * D];
    double* dv_out = dk_out + D;
    for (int64_t i = 0; i < Sl; ++i) {
      const int64_t qpos = pos.at(i);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        if (!reference_visible(spec.mask, qpos, static_cast<int64_t>(kp), static_cast<int>(h))) continue;
        const double row_lse = load_as_double(lse, (b * H + h) * Sl + i);
        if (row_lse == -kInf) continue;
        double s = 0.0, dp = 0.0;
        for (int64_t d = 0; d < D; ++d) {
          s += load_as_double(q, qi(b, i, h) + d) * krow[d];
          dp += load_as_double(dout, qi(b, i, h) + d) * vrow[d];
        }
        const double p = std::exp(s * scale - row_lse);
        const double ds = p * (dp - d_local[(i * B + b) * H + h]) * scale;
        for (int64_t d = 0; d < D; ++d) {
          dv_out[d] += p * load_as_double(dout, qi(b, i, h) + d);
          dk_out[d] += ds * load_as_double(q, qi(b, i, h) + d);
        }
      }
    }
  });
  sum_over_ranks_inplace(session, dkv_ref);
  ErrAcc dk_err, dv_err;
  for (int64_t s = 0; s < nk; ++s) {
    const int64_t j = k_rows[s];
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t hk = 0; hk < Hkv; ++hk) {
        const int64_t u = ((rank * nk + s) * B + b) * Hkv + hk;
        for (int64_t d = 0; d < D; ++d) {
          dk_err.add(load_as_double(dk, ki(b, j, hk) + d), dkv_ref[u * 2 * D + d]);
          dv_err.add(load_as_double(dv, ki(b, j, hk) + d), dkv_ref[u * 2 * D + D + d]);
        }
      }
    }
  }

  GradCheckResult res;
  res.tolerance = check_tolerance(spec.dtype);
  auto rel = [&](const ErrAcc& e) {
    const double ref = session.max_over_ranks(e.ref), err = session.max_over_ranks(e.err);
    return ref > 0.0 ? err / ref : err;
  };
  res.dq_rel_err = rel(dq_err);
  res.dk_rel_err = rel(dk_err);
  res.dv_rel_err = rel(dv_err);
  res.non_finite = static_cast<int64_t>(
      session.sum_over_ranks(static_cast<double>(dq_err.non_finite + dk_err.non_finite + dv_err.non_finite)));
  res.dq_rows = static_cast<int64_t>(session.sum_over_ranks(static_cast<double>(nq)));
  res.dkv_rows = world * nk;
  res.sampled = session.max_over_ranks((nq < Sl || nk < Sl) ? 1.0 : 0.0) > 0.0;
  res.pass = res.non_finite == 0 && res.dq_rel_err <= res.tolerance && res.dk_rel_err <= res.tolerance &&
             res.dv_rel_err <= res.tolerance;
  return res;
}

}  // namespace ringattn
