// Distributed sampled check: each rank folds the sampled query rows over its own K/V chunk in fp64; lse-merge across ranks.
#include "check/check.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime.h>
#endif

#include "attn/reference.hpp"
#include "check/lse_merge.hpp"
#include "plan/plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"

namespace ringattn {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Copies `height` rows of `width` bytes (pitches in bytes) from the host or the device to the host.
void copy_rows_to_host(void* dst, std::size_t dpitch, const void* src, std::size_t spitch, std::size_t width,
                       std::size_t height, Device device) {
  if (width == 0 || height == 0) return;
  if (device == Device::kHost) {
    for (std::size_t r = 0; r < height; ++r) {
      std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
    }
    return;
  }
#ifdef RINGATTN_HAVE_CUDA
  const cudaError_t e = cudaMemcpy2D(dst, dpitch, src, spitch, width, height, cudaMemcpyDeviceToHost);
  if (e != cudaSuccess) {
    fail(ErrorKind::kCuda, std::string("cudaMemcpy2D (check: device to host) failed: ") + cudaGetErrorString(e),
         "an earlier kernel may have faulted; rerun with CUDA_LAUNCH_BLOCKING=1");
  }
#else
  fail(ErrorKind::kInternal, "check got a device tensor in a build without CUDA", "");
#endif
}

// Widens `n` contiguous values of `dtype` to double.
template <typename Out>
void widen(const void* src, DType dtype, int64_t n, Out* dst) {
  switch (dtype) {
    case DType::kF64: {
      auto* s = static_cast<const double*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(s[i]);
      break;
    }
    case DType::kF32: {
      auto* s = static_cast<const float*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(s[i]);
      break;
    }
    case DType::kBF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(bf16_to_float(s[i]));
      break;
    }
    case DType::kF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Out>(fp16_to_float(s[i]));
      break;
    }
  }
}

// Runs fn(t) on `threads` threads (t = 0..threads-1) and joins them.
template <typename Fn>
void parallel(int threads, Fn&& fn) {
  if (threads <= 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) pool.emplace_back([&fn, t] { fn(t); });
  for (auto& th : pool) th.join();
}

struct Sample {
  int64_t batch = 0;
  int64_t position = 0;  // global position
  int owner = 0;
  int64_t local_row = 0;
};

// Local row of global `pos` in `cp`, or -1.
int64_t local_row_of(const ChunkPositions& cp, int64_t pos) {
  int64_t base = 0;
  for (int s = 0; s < cp.num_segments; ++s) {
    const Segment& g = cp.segment(s);
    const int64_t off = pos - g.start;
    if (off >= 0 && off % g.stride == 0 && off / g.stride < g.count) return base + off / g.stride;
    base += g.count;
  }
  return -1;
}

std::vector<Sample> draw_samples(const AttentionSpec& spec, const RankLayout& ranks, int64_t want, uint64_t seed) {
  const int world = ranks.world();
  const int64_t B = spec.batch, S = spec.seq_len;
  want = std::max<int64_t>(1, std::min(want, B * S));
  std::set<std::pair<int64_t, int64_t>> picked;
  picked.insert({0, 0});                         // sees one key when causal
  if (want > 1) picked.insert({B - 1, S - 1});  // sees every key
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> pick_b(0, B - 1), pick_s(0, S - 1);
  while (static_cast<int64_t>(picked.size()) < want) picked.insert({pick_b(rng), pick_s(rng)});
  std::vector<ChunkPositions> chunks;
  for (int r = 0; r < world; ++r) chunks.push_back(ranks.positions(r));
  std::vector<Sample> out;
  for (const auto& [b, pos] : picked) {
    Sample s{b, pos, -1, -1};
    for (int r = 0; r < world && s.owner < 0; ++r) {
      const int64_t row = local_row_of(chunks[r], pos);
      if (row >= 0) {
        s.owner = r;
        s.local_row = row;
      }
    }
    RINGATTN_CHECK(s.owner >= 0, ErrorKind::kInternal, "position " + std::to_string(pos) + " has no owner", "");
    out.push_back(s);
  }
  return out;
}

int default_threads(int world) {
  if (const char* env = std::getenv("RINGATTN_CHECK_THREADS")) {
    const int t = std::atoi(env);
    if (t > 0) return t;
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, world));
}

}  // namespace

SampledCheckResult distributed_sampled_check(const AttentionSpec& spec_in, Session& session, const TensorView& q,
                                             const TensorView& k, const TensorView& v, const TensorView& out,
                                             const TensorView& lse, const SampledCheckOptions& options) {
  const int rank = session.rank(), world = session.world();
  AttentionSpec spec = spec_in;
  if (spec.kv_heads == 0) spec.kv_heads = spec.heads;
  const int64_t B = spec.batch, Sl = spec.local_seq(world);
  const int64_t H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim, group = H / Hkv;
  const double scale = spec.scale();
  for (const TensorView* t : {&q, &k, &v, &out}) {
    RINGATTN_CHECK(t->rank == 4 && t->shape[0] == B && t->shape[1] == Sl && t->shape[3] == D && t->is_contiguous(),
                   ErrorKind::kInvalidArgument, "sampled check got " + t->describe(),
                   "pass this rank's contiguous (B, S_local, heads, head_dim) chunks");
  }
  RINGATTN_CHECK(lse.rank == 3 && lse.shape[0] == B && lse.shape[1] == H && lse.shape[2] == Sl && lse.is_contiguous(),
                 ErrorKind::kInvalidArgument, "sampled check got lse " + lse.describe(), "pass (B, H, S_local)");
  auto sum = [&](double* data, int64_t n) { session.reduce_over_ranks(data, n, /*max=*/false); };
  auto max = [&](double* data, int64_t n) { session.reduce_over_ranks(data, n, /*max=*/true); };
  const RankLayout ranks = layout_ranks(spec, world);
  const int threads = options.threads > 0 ? options.threads : default_threads(world);
  const std::vector<Sample> samples = draw_samples(spec, ranks, options.samples, options.seed);
  const int64_t n = static_cast<int64_t>(samples.size());
  const int64_t HD = H * D;

  // 1. Every rank gets the sampled query rows (owners fill theirs, the sum hands them out).
  std::vector<double> qs(static_cast<std::size_t>(n * HD), 0.0);
  std::vector<char> raw(static_cast<std::size_t>(HD) * 8);
  for (int64_t i = 0; i < n; ++i) {
    const Sample& s = samples[i];
    if (s.owner != rank) continue;
    const std::size_t row_bytes = static_cast<std::size_t>(HD) * dtype_size(q.dtype);
    const char* src = static_cast<const char*>(q.data) + static_cast<std::size_t>(s.batch * Sl + s.local_row) * row_bytes;
    copy_rows_to_host(raw.data(), row_bytes, src, row_bytes, row_bytes, 1, q.device);
    widen(raw.data(), q.dtype, HD, qs.data() + i * HD);
  }
  sum(qs.data(), n * HD);

  // 2. Partial attention of every sample row against this rank's own K/V chunk, in fp64.
  const ChunkPositions k_pos = ranks.positions(rank);
  std::vector<int64_t> q_pos(n);
  for (int64_t i = 0; i < n; ++i) q_pos[i] = samples[i].position;
  std::vector<double> m(static_cast<std::size_t>(n * H), check::kEmptyMax), l(static_cast<std::size_t>(n * H), 0.0);
  std::vector<double> acc(static_cast<std::size_t>(n * HD), 0.0);
  const int64_t block = std::max<int64_t>(1, options.block_rows);
  const std::size_t kv_row_elems = static_cast<std::size_t>(Hkv * D);
  const std::size_t kv_row_bytes = kv_row_elems * dtype_size(k.dtype);
  std::vector<char> kraw(block * kv_row_bytes), vraw(block * kv_row_bytes);
  // K/V widened to float (exact for bf16, fp16 and fp32 inputs) or, for fp64 inputs, to double.
  const bool wide = k.dtype == DType::kF64;
  std::vector<float> kf(wide ? 0 : block * kv_row_elems), vf(wide ? 0 : block * kv_row_elems);
  std::vector<double> kd(wide ? block * kv_row_elems : 0), vd(wide ? block * kv_row_elems : 0);
  std::vector<int64_t> kp(block);
  for (int64_t b = 0; b < B; ++b) {
    std::vector<int64_t> units;  // (sample, head) pairs of this batch
    for (int64_t i = 0; i < n; ++i) {
      if (samples[i].batch != b) continue;
      for (int64_t h = 0; h < H; ++h) units.push_back(i * H + h);
    }
    if (units.empty()) continue;
    for (int64_t j0 = 0; j0 < Sl; j0 += block) {
      const int64_t rows = std::min(block, Sl - j0);
      const std::size_t off = static_cast<std::size_t>(b * Sl + j0) * kv_row_bytes;
      copy_rows_to_host(kraw.data(), rows * kv_row_bytes, static_cast<const char*>(k.data) + off, rows * kv_row_bytes,
                        rows * kv_row_bytes, 1, k.device);
      copy_rows_to_host(vraw.data(), rows * kv_row_bytes, static_cast<const char*>(v.data) + off, rows * kv_row_bytes,
                        rows * kv_row_bytes, 1, v.device);
      for (int64_t j = 0; j < rows; ++j) kp[j] = k_pos.at(j0 + j);
      // kb, vb: this block's K and V rows, widened here to float or double, then the partials.
      auto partials = [&](auto* kb, auto* vb) {
        parallel(threads, [&](int t) {
          const int64_t per = (rows + threads - 1) / threads, lo = t * per, hi = std::min(rows, lo + per);
          if (lo >= hi) return;
          widen(kraw.data() + lo * kv_row_bytes, k.dtype, (hi - lo) * kv_row_elems, kb + lo * kv_row_elems);
          widen(vraw.data() + lo * kv_row_bytes, v.dtype, (hi - lo) * kv_row_elems, vb + lo * kv_row_elems);
        });
        parallel(threads, [&](int t) {
          for (std::size_t u = t; u < units.size(); u += threads) {
            const int64_t i = units[u] / H, h = units[u] % H, hk = h / group;
            const double* qr = qs.data() + i * HD + h * D;
            double& mi = m[i * H + h];
            double& li = l[i * H + h];
            double* ai = acc.data() + i * HD + h * D;
            for (int64_t j = 0; j < rows; ++j) {
              if (!reference_visible(spec.mask, q_pos[i], kp[j], static_cast<int>(h))) continue;
              const auto* kr = kb + j * kv_row_elems + hk * D;
              double d0 = 0, d1 = 0, d2 = 0, d3 = 0;
              int64_t d = 0;
              for (; d + 4 <= D; d += 4) {
                d0 += qr[d] * kr[d];
                d1 += qr[d + 1] * kr[d + 1];
                d2 += qr[d + 2] * kr[d + 2];
                d3 += qr[d + 3] * kr[d + 3];
              }
              for (; d < D; ++d) d0 += qr[d] * kr[d];
              check::fold_key(mi, li, ai, (d0 + d1 + d2 + d3) * scale, vb + j * kv_row_elems + hk * D, D);
            }
          }
        });
      };
      if (wide) {
        partials(kd.data(), vd.data());
      } else {
        partials(kf.data(), vf.data());
      }
    }
  }

  // 3. Exact merge over ranks (lse_merge.hpp).
  check::merge_over_ranks(session, m, l, acc, D);

  // 4. Owners compare their ring output and lse rows with the merged reference.
  double max_abs = 0.0, max_ref = 0.0, max_lse = 0.0, err2 = 0.0, ref2 = 0.0, bad = 0.0;
  std::vector<double> got(static_cast<std::size_t>(HD)), got_lse(static_cast<std::size_t>(H));
  std::vector<char> lraw(static_cast<std::size_t>(H) * 8);
  for (int64_t i = 0; i < n; ++i) {
    const Sample& s = samples[i];
    if (s.owner != rank) continue;
    const std::size_t row_bytes = static_cast<std::size_t>(HD) * dtype_size(out.dtype);
    copy_rows_to_host(raw.data(), row_bytes,
                      static_cast<const char*>(out.data) + static_cast<std::size_t>(s.batch * Sl + s.local_row) * row_bytes,
                      row_bytes, row_bytes, 1, out.device);
    widen(raw.data(), out.dtype, HD, got.data());
    const std::size_t le = dtype_size(lse.dtype);
    copy_rows_to_host(lraw.data(), le,
                      static_cast<const char*>(lse.data) + static_cast<std::size_t>(s.batch * H * Sl + s.local_row) * le,
                      static_cast<std::size_t>(Sl) * le, le, static_cast<std::size_t>(H), lse.device);
    widen(lraw.data(), lse.dtype, H, got_lse.data());
    for (int64_t h = 0; h < H; ++h) {
      const int64_t u = i * H + h;
      const bool empty = l[u] == 0.0;
      const double ref_lse = check::partial_lse(m[u], l[u]);
      if (empty) {
        if (got_lse[h] != kNegInf) bad += 1;
      } else if (!std::isfinite(got_lse[h])) {
        bad += 1;
      } else {
        max_lse = std::max(max_lse, std::abs(got_lse[h] - ref_lse) / std::max(1.0, std::abs(ref_lse)));
      }
      for (int64_t e = 0; e < D; ++e) {
        const double ref = check::partial_out(l[u], acc[u * D + e]);
        const double o = got[h * D + e];
        if (!std::isfinite(o) || (empty && o != 0.0)) {
          bad += 1;
          continue;
        }
        max_abs = std::max(max_abs, std::abs(o - ref));
        max_ref = std::max(max_ref, std::abs(ref));
        err2 += (o - ref) * (o - ref);
        ref2 += ref * ref;
      }
    }
  }
  double maxes[3] = {max_abs, max_ref, max_lse};
  double sums[3] = {err2, ref2, bad};
  max(maxes, 3);
  sum(sums, 3);

  SampledCheckResult r;
  r.rows = n;
  r.max_abs_err = maxes[0];
  r.max_ref = maxes[1];
  r.max_rel_err = maxes[1] > 0 ? maxes[0] / maxes[1] : maxes[0];
  r.max_lse_err = maxes[2];
  r.rel_l2_err = sums[1] > 0 ? std::sqrt(sums[0] / sums[1]) : std::sqrt(sums[0]);
  r.bad_values = static_cast<int64_t>(sums[2]);
  r.tolerance = options.tolerance > 0 ? options.tolerance : check_tolerance(spec.dtype);
  r.pass = r.bad_values == 0 && r.max_rel_err <= r.tolerance && r.max_lse_err <= r.tolerance;
  return r;
}

}  // namespace ringattn
