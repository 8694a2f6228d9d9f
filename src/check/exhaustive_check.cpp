// The tolerance table and the exhaustive check: streamed fp64 reference rows (mask from the reference) merged by lse.
#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "attn/reference.hpp"
#include "check/check.hpp"
#include "check/inputs.hpp"
#include "check/lse_merge.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// Elements of one streamed K (or V) block in the check.
constexpr int64_t kCheckBlockElems = int64_t{1} << 22;
// Mixed into the seed of the row sample so that it differs from the inputs' counters.
constexpr uint64_t kRowSampleSalt = 0x5eedull << 32;

// An owning contiguous host tensor.
struct Buffer {
  std::vector<double> storage;  // doubles for 8-byte alignment
  TensorView view;
};
Buffer make_buffer(DType dtype, std::initializer_list<int64_t> shape) {
  Buffer b;
  b.view = make_view(nullptr, dtype, Device::kHost, shape);
  b.storage.resize((b.view.nbytes() + sizeof(double) - 1) / sizeof(double));
  b.view.data = b.storage.data();
  return b;
}

ChunkPositions run_of(int64_t first, int64_t n) {
  ChunkPositions p;
  p.num_segments = 1;
  p.seg[0] = {first, 1, n};
  return p;
}

}  // namespace

double check_tolerance(DType dtype) {
  switch (dtype) {
    case DType::kF64: return 1e-10;
    case DType::kF32: return 1e-4;
    case DType::kBF16: return 2e-2;
    case DType::kF16: return 4e-3;
  }
  return 0.0;
}

KvBlockSource seeded_kv_source(uint64_t seed, int64_t seq_len) {
  return [seed, seq_len](int64_t first, const TensorView& k, const TensorView& v) {
    fill_random_rows(k, run_of(first, k.shape[1]), seq_len, seed, TensorId::kK);
    fill_random_rows(v, run_of(first, k.shape[1]), seq_len, seed, TensorId::kV);
  };
}

KvBlockSource global_kv_source(const TensorView& k_global, const TensorView& v_global) {
  return [k_global, v_global](int64_t first, const TensorView& k, const TensorView& v) {
    shard_rows(k_global, k, run_of(first, k.shape[1]), 1);
    shard_rows(v_global, v, run_of(first, k.shape[1]), 1);
  };
}

std::vector<int64_t> choose_check_rows(const AttentionSpec& spec, int world, int rank, uint64_t seed,
                                       int64_t requested, bool* sampled) {
  const int64_t local = spec.local_seq(world);
  const double per_row = static_cast<double>(spec.batch) * spec.heads * static_cast<double>(spec.seq_len) *
                         spec.head_dim * (spec.mask.causal ? 0.5 : 1.0);
  int64_t n = local;
  if (requested > 0) {
    n = std::min(requested, local);
  } else if (requested == 0 && per_row * static_cast<double>(local) > kFullCheckBudget) {
    n = std::clamp(static_cast<int64_t>(kFullCheckBudget / per_row), kMinSampleRows, kMaxSampleRows);
    n = std::min(n, local);
  }
  std::vector<int64_t> rows;
  if (n >= local) {
    *sampled = false;
    rows.resize(local);
    for (int64_t i = 0; i < local; ++i) rows[i] = i;
    return rows;
  }
  *sampled = true;
  std::set<int64_t> pick = {0, local - 1};  // chunk edges: where layouts cut the sequence
  uint64_t counter = splitmix64(seed ^ kRowSampleSalt ^ static_cast<uint64_t>(rank));
  while (static_cast<int64_t>(pick.size()) < n) {
    counter = splitmix64(counter);
    pick.insert(static_cast<int64_t>(counter % static_cast<uint64_t>(local)));
  }
  rows.assign(pick.begin(), pick.end());
  return rows;
}

CheckResult check_against_reference(const AttentionSpec& spec, const TensorView& q, const ChunkPositions& q_pos,
                                    const TensorView& out, const TensorView& lse, const std::vector<int64_t>& rows,
                                    const KvBlockSource& kv, int64_t block_rows) {
  const int64_t B = spec.batch, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const int64_t S = spec.seq_len, Sl = q.shape[1];
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  RINGATTN_CHECK(q.device == Device::kHost && out.device == Device::kHost && lse.device == Device::kHost,
                 ErrorKind::kInternal, "check needs host tensors", "");
  RINGATTN_CHECK(out.shape[1] == Sl && lse.shape[2] == Sl, ErrorKind::kInternal, "check: shapes disagree", "");

  // One (B, 1, H, D) query tensor per checked row, in the run's dtype (the values the ring used).
  std::vector<Buffer> q_rows;
  std::vector<ChunkPositions> q_row_pos;
  int64_t last_needed = 0;
  for (int64_t i : rows) {
    Buffer t = make_buffer(q.dtype, {B, 1, H, D});
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t e = 0; e < H * D; ++e) store_from_double(t.view, b * H * D + e, load_as_double(q, (b * Sl + i) * H * D + e));
    }
    q_rows.push_back(std::move(t));
    q_row_pos.push_back(run_of(q_pos.at(i), 1));
    last_needed = std::max(last_needed, q_pos.at(i));
  }
  if (!spec.mask.causal) last_needed = S - 1;

  // Running fp64 partials of every (row, b, h), merged block by block (lse_merge.hpp).
  const int64_t units = n_rows * B * H;
  std::vector<double> acc_m(static_cast<std::size_t>(units), check::kEmptyMax);
  std::vector<double> acc_l(static_cast<std::size_t>(units), 0.0);
  std::vector<double> acc_o(static_cast<std::size_t>(units * D), 0.0);
  const int64_t block = std::clamp<int64_t>(block_rows > 0 ? block_rows : kCheckBlockElems / (B * Hkv * D), 1, S);
  Buffer o_tmp = make_buffer(DType::kF64, {B, 1, H, D});
  Buffer l_tmp = make_buffer(DType::kF64, {B, H, 1});
  Buffer k_blk, v_blk;
  for (int64_t j0 = 0; j0 <= last_needed && j0 < S; j0 += block) {
    const int64_t n = std::min(block, S - j0);
    if (k_blk.view.rank == 0 || k_blk.view.shape[1] != n) {
      k_blk = make_buffer(spec.dtype, {B, n, Hkv, D});
      v_blk = make_buffer(spec.dtype, {B, n, Hkv, D});
    }
    kv(j0, k_blk.view, v_blk.view);
    const ChunkPositions k_pos = run_of(j0, n);
    for (int64_t r = 0; r < n_rows; ++r) {
      if (spec.mask.causal && j0 > q_row_pos[r].seg[0].start) continue;  // the whole block is in the future
      reference_attention(spec, q_rows[r].view, q_row_pos[r], k_blk.view, v_blk.view, k_pos, o_tmp.view, l_tmp.view);
      const auto* o = o_tmp.view.as<double>();
      const auto* l = l_tmp.view.as<double>();
      for (int64_t bh = 0; bh < B * H; ++bh) {
        if (l[bh] == -kInf) continue;  // the block's keys are all masked for this row
        const int64_t u = r * B * H + bh;
        // A block's normalised result is the partial (lse, 1, out).
        check::merge_partial(acc_m[u], acc_l[u], &acc_o[u * D], l[bh], 1.0, o + bh * D, D);
      }
    }
  }

  CheckResult res;
  res.rows = n_rows;
  res.tolerance = check_tolerance(spec.dtype);
  for (int64_t r = 0; r < n_rows; ++r) {
    const int64_t i = rows[r];
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < H; ++h) {
        const int64_t bh = b * H + h, u = r * B * H + bh;
        const double ref_l = check::partial_lse(acc_m[u], acc_l[u]);
        const double got_l = load_as_double(lse, bh * Sl + i);
        const int64_t o0 = ((b * Sl + i) * H + h) * D;
        if (ref_l == -kInf) {  // no visible key: lse = -inf and out = 0 exactly
          bool ok = got_l == -kInf;
          for (int64_t d = 0; d < D; ++d) ok = ok && load_as_double(out, o0 + d) == 0.0;
          if (!ok) ++res.mismatched;
          continue;
        }
        if (!std::isfinite(got_l)) {
          ++res.mismatched;
        } else {
          res.max_lse_err = std::max(res.max_lse_err, std::fabs(got_l - ref_l) / std::max(1.0, std::fabs(ref_l)));
        }
        for (int64_t d = 0; d < D; ++d) {
          const double want = check::partial_out(acc_l[u], acc_o[u * D + d]);
          const double got = load_as_double(out, o0 + d);
          res.max_ref = std::max(res.max_ref, std::fabs(want));
          if (!std::isfinite(got)) {
            ++res.mismatched;
            continue;
          }
          res.max_abs_err = std::max(res.max_abs_err, std::fabs(got - want));
        }
      }
    }
  }
  res.max_rel_err = res.max_ref > 0.0 ? res.max_abs_err / res.max_ref : res.max_abs_err;
  res.pass = res.mismatched == 0 && res.max_rel_err <= res.tolerance && res.max_lse_err <= res.tolerance;
  return res;
}

CheckResult reduce_check(Session& session, const CheckResult& local) {
  CheckResult g = local;
  g.max_abs_err = session.max_over_ranks(local.max_abs_err);
  g.max_ref = session.max_over_ranks(local.max_ref);
  g.max_lse_err = session.max_over_ranks(local.max_lse_err);
  g.rows = static_cast<int64_t>(session.sum_over_ranks(static_cast<double>(local.rows)));
  g.mismatched = static_cast<int64_t>(session.sum_over_ranks(static_cast<double>(local.mismatched)));
  g.sampled = session.max_over_ranks(local.sampled ? 1.0 : 0.0) > 0.0;
  g.max_rel_err = g.max_ref > 0.0 ? g.max_abs_err / g.max_ref : g.max_abs_err;
  const bool all_pass = session.sum_over_ranks(local.pass ? 0.0 : 1.0) == 0.0;
  g.pass = all_pass && g.mismatched == 0 && g.max_rel_err <= g.tolerance && g.max_lse_err <= g.tolerance;
  return g;
}

}  // namespace ringattn
