// The CUDA kernels under every mask (window, stride, global tokens, documents, per-head patterns and
// their combinations), forward and backward, through CudaBackend, against fp64 references built on
// reference_visible (the semantics' text, never mask.hpp).
//
// Forward tolerance as flash_fwd_test.cpp: kFwdTolUnits unit roundoffs of the dtype times max|ref|.
// Backward tolerance as flash_bwd_test.cpp: a plain implementation in the input precision (P and dS
// rounded before the products, out rounded as the forward wrote it) errs by `plain` against the
// exact fp64 answer; the GPU must stay within 2 plain + a quarter unit roundoff, relative to the
// largest exact value of each tensor.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/reference.hpp"
#include "gpu_test_util.hpp"
#include "ringattn/backend.hpp"
#include "ringattn/layout.hpp"

namespace ringattn::test {
namespace {

constexpr double kFwdTolUnits = 4.0;
constexpr double kLseTol = 2e-3;
constexpr double kInf = std::numeric_limits<double>::infinity();

double unit_roundoff(DType dtype) { return dtype == DType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11); }
double round_to(DType dt, double x) {
  const float f = static_cast<float>(x);
  return dt == DType::kBF16 ? bf16_to_float(float_to_bf16(f)) : fp16_to_float(float_to_fp16(f));
}

// Sets an environment variable for the scope of a test (the kernels read their choice per call).
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (had_) {
      setenv(name_.c_str(), old_.c_str(), 1);
    } else {
      unsetenv(name_.c_str());
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  bool had_ = false;
  std::string old_;
};

// ---- masks ---------------------------------------------------------------------------------------

struct MaskCase {
  const char* name;
  std::function<MaskSpec(int64_t seq)> make;
};

MaskSpec window(bool causal, int64_t left, int64_t right) {
  MaskSpec m;
  m.causal = causal;
  m.has_window = true;
  m.window_left = left;
  m.window_right = right;
  return m;
}
std::vector<int64_t> doc_lengths(int64_t seq) {  // uneven documents, none tile-aligned
  const int64_t pattern[] = {100, 37, 190, 6, 61, 129, 1, 77};
  std::vector<int64_t> out;
  int64_t left = seq;
  for (int i = 0; left > 0; ++i) {
    const int64_t l = std::min(left, pattern[i % 8]);
    out.push_back(l);
    left -= l;
  }
  return out;
}

const MaskCase kMasks[] = {
    {"window_causal_37", [](int64_t) { return window(true, 37, 0); }},
    {"window_causal_300", [](int64_t) { return window(true, 300, 0); }},  // full tiles inside the band
    {"window_symmetric_50", [](int64_t) { return window(false, 50, 50); }},
    {"window_left_unbounded_right_9", [](int64_t) { return window(false, -1, 9); }},
    {"stride_16_causal",
     [](int64_t) {
       MaskSpec m;
       m.causal = true;
       m.stride = 16;
       return m;
     }},
    {"global_5_window_30_causal",
     [](int64_t) {
       MaskSpec m = window(true, 30, 0);
       m.global_tokens = 5;
       return m;
     }},
    {"documents_causal",
     [](int64_t seq) {
       MaskSpec m;
       m.causal = true;
       m.doc_offsets = doc_offsets_from_lengths(doc_lengths(seq), seq);
       return m;
     }},
    {"documents_window_global_stride",
     [](int64_t seq) {
       MaskSpec m = window(true, 20, 0);
       m.stride = 7;
       m.global_tokens = 3;
       m.doc_offsets = doc_offsets_from_lengths(doc_lengths(seq), seq);
       return m;
     }},
    {"documents_bidirectional",
     [](int64_t seq) {
       MaskSpec m;
       m.doc_offsets = doc_offsets_from_lengths(doc_lengths(seq), seq);
       return m;
     }},
    {"mask_heads_window_causal",  // query heads 0, 1 windowed, 2, 3 causal only
     [](int64_t) {
       MaskSpec m = window(true, 25, 0);
       m.mask_heads = 2;
       return m;
     }},
    {"mask_heads_stride_documents",
     [](int64_t seq) {
       MaskSpec m;
       m.stride = 5;
       m.mask_heads = 2;
       m.doc_offsets = doc_offsets_from_lengths(doc_lengths(seq), seq);
       return m;
     }},
};
constexpr int kNumMasks = sizeof(kMasks) / sizeof(kMasks[0]);

// ---- problem -------------------------------------------------------------------------------------

struct Problem {
  DType dtype = DType::kBF16;
  int64_t batch = 1;
  int heads = 4;
  int kv_heads = 2;
  int head_dim = 128;
  int64_t seq = 448;  // not a multiple of any tile
  Layout layout = Layout::kContiguous;
  int world = 1;
};

AttentionSpec spec_of(const Problem& pr, const MaskSpec& mask) {
  AttentionSpec s;
  s.batch = pr.batch;
  s.seq_len = pr.seq;
  s.heads = pr.heads;
  s.kv_heads = pr.kv_heads;
  s.head_dim = pr.head_dim;
  s.mask = mask;
  s.layout = pr.layout;
  s.dtype = pr.dtype;
  return s;
}

ChunkPositions positions_of(const Problem& pr, int rank) {
  return pr.world == 1 ? identity_positions(pr.seq) : chunk_positions(pr.layout, pr.seq, rank, pr.world);
}

// Forward over the ring: every rank's query chunk folds every K/V chunk (own first), compared with
// reference_attention on the whole sequence.
void check_forward(const Problem& pr, const MaskSpec& mask, uint32_t seed) {
  std::mt19937 rng(seed);
  const int hkv = pr.kv_heads;
  HostTensor q(pr.dtype, {pr.batch, pr.seq, pr.heads, pr.head_dim});
  HostTensor k(pr.dtype, {pr.batch, pr.seq, hkv, pr.head_dim});
  HostTensor v(pr.dtype, {pr.batch, pr.seq, hkv, pr.head_dim});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  const AttentionSpec spec = spec_of(pr, mask);
  const int64_t rows = pr.seq / pr.world;
  std::vector<std::unique_ptr<DeviceTensor>> dk, dv;
  std::vector<ChunkPositions> kpos;
  for (int s = 0; s < pr.world; ++s) {
    const ChunkPositions pos = positions_of(pr, s);
    HostTensor hk(pr.dtype, {pr.batch, rows, hkv, pr.head_dim}), hv(pr.dtype, {pr.batch, rows, hkv, pr.head_dim});
    shard_rows(k.view, hk.view, pos, 1);
    shard_rows(v.view, hv.view, pos, 1);
    dk.push_back(std::make_unique<DeviceTensor>(pr.dtype, std::initializer_list<int64_t>{pr.batch, rows, hkv, pr.head_dim}));
    dv.push_back(std::make_unique<DeviceTensor>(pr.dtype, std::initializer_list<int64_t>{pr.batch, rows, hkv, pr.head_dim}));
    dk.back()->upload(hk);
    dv.back()->upload(hv);
    kpos.push_back(pos);
  }
  auto backend = make_cuda_backend();
  backend->prepare(spec, rows, rows);
  for (int r = 0; r < pr.world; ++r) {
    const ChunkPositions qpos = positions_of(pr, r);
    HostTensor hq(pr.dtype, {pr.batch, rows, pr.heads, pr.head_dim});
    shard_rows(q.view, hq.view, qpos, 1);
    DeviceTensor dq(pr.dtype, {pr.batch, rows, pr.heads, pr.head_dim});
    DeviceTensor dout(pr.dtype, {pr.batch, rows, pr.heads, pr.head_dim});
    DeviceTensor dlse(DType::kF32, {pr.batch, pr.heads, rows});
    dq.upload(hq);
    dout.poison();
    dlse.poison();
    backend->forward_begin(dq.view, qpos);
    if (pr.world == 1) {
      backend->forward_step_into(dk[0]->view, dv[0]->view, kpos[0], dout.view, dlse.view);  // the one-step path
    } else {
      for (int step = 0; step < pr.world; ++step) {
        const int s = (r - step + pr.world) % pr.world;
        backend->forward_step(dk[s]->view, dv[s]->view, kpos[s]);
      }
      backend->forward_end(dout.view, dlse.view);
    }
    RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
    HostTensor out(pr.dtype, {pr.batch, rows, pr.heads, pr.head_dim}), lse(DType::kF32, {pr.batch, pr.heads, rows});
    dout.download(out);
    dlse.download(lse);
    HostTensor ref_out(DType::kF64, {pr.batch, rows, pr.heads, pr.head_dim});
    HostTensor ref_lse(DType::kF64, {pr.batch, pr.heads, rows});
    reference_attention(spec, hq.view, qpos, k.view, v.view, identity_positions(pr.seq), ref_out.view, ref_lse.view);
    double max_ref = 0, max_err = 0, max_lse_err = 0;
    int64_t nan = 0, bad_empty = 0;
    for (int64_t i = 0; i < ref_out.view.numel(); ++i) {
      const double a = load_as_double(ref_out.view, i), g = load_as_double(out.view, i);
      if (!std::isfinite(g)) ++nan;
      max_ref = std::max(max_ref, std::abs(a));
      max_err = std::max(max_err, std::abs(a - g));
    }
    for (int64_t i = 0; i < ref_lse.view.numel(); ++i) {
      const double a = load_as_double(ref_lse.view, i), g = load_as_double(lse.view, i);
      if (std::isinf(a)) {
        bad_empty += !(std::isinf(g) && g < 0);
        continue;
      }
      if (!std::isfinite(g)) ++nan;
      max_lse_err = std::max(max_lse_err, std::abs(a - g) / std::max(1.0, std::abs(a)));
    }
    const double tol = kFwdTolUnits * unit_roundoff(pr.dtype) * std::max(max_ref, 1e-3);
    SCOPED_TRACE("rank " + std::to_string(r) + " of " + std::to_string(pr.world) + " " + layout_name(pr.layout) + " " +
                 dtype_name(pr.dtype) + " d" + std::to_string(pr.head_dim) + " mask '" + mask.describe() + "'");
    EXPECT_EQ(nan, 0) << "non-finite outputs";
    EXPECT_EQ(bad_empty, 0) << "rows that see no key must have lse = -inf";
    EXPECT_LE(max_err, tol) << "max |out - ref| " << max_err << " (max |ref| " << max_ref << ")";
    EXPECT_LE(max_lse_err, kLseTol) << "lse error";
  }
}

// ---- backward references ---------------------------------------------------------------------------

// fp64 backward of queries q (B, Sq, H, D) at q_pos against keys k, v (B, Sk, Hkv, D) at k_pos, from
// out and lse as given (lse -inf: the row sees nothing). With `round_dt`, P and dS are rounded to that
// dtype before the products (the plain same-precision implementation); dq then rounded too.
struct Grads {
  std::vector<double> dq, dk, dv;
};
Grads backward_reference(const AttentionSpec& spec, const std::vector<double>& q, const ChunkPositions& q_pos,
                         const std::vector<double>& k, const std::vector<double>& v, const ChunkPositions& k_pos,
                         const std::vector<double>& dout, const std::vector<double>& out, const std::vector<double>& lse,
                         const DType* round_dt) {
  const int64_t B = spec.batch, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const int64_t Sq = q_pos.size(), Sk = k_pos.size(), group = H / Hkv;
  const double scale = spec.scale();
  Grads g{std::vector<double>(q.size(), 0.0), std::vector<double>(k.size(), 0.0), std::vector<double>(k.size(), 0.0)};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / group;
      for (int64_t i = 0; i < Sq; ++i) {
        const double l = lse[(b * H + h) * Sq + i];
        if (std::isinf(l)) continue;
        const double* qr = &q[((b * Sq + i) * H + h) * D];
        const double* dr = &dout[((b * Sq + i) * H + h) * D];
        const double* orow = &out[((b * Sq + i) * H + h) * D];
        double delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += dr[d] * orow[d];
        if (round_dt) delta = static_cast<float>(delta);
        double* dqr = &g.dq[((b * Sq + i) * H + h) * D];
        for (int64_t j = 0; j < Sk; ++j) {
          if (!reference_visible(spec.mask, q_pos.at(i), k_pos.at(j), static_cast<int>(h))) continue;
          const double* kr = &k[((b * Sk + j) * Hkv + hk) * D];
          const double* vr = &v[((b * Sk + j) * Hkv + hk) * D];
          double s = 0, dp = 0;
          for (int64_t d = 0; d < D; ++d) {
            s += qr[d] * kr[d];
            dp += dr[d] * vr[d];
          }
          double p = std::exp(s * scale - l), ds = p * (dp - delta);
          if (round_dt) {
            ds = round_to(*round_dt, ds);
            p = round_to(*round_dt, p);
          }
          double* dkr = &g.dk[((b * Sk + j) * Hkv + hk) * D];
          double* dvr = &g.dv[((b * Sk + j) * Hkv + hk) * D];
          for (int64_t d = 0; d < D; ++d) {
            dvr[d] += p * dr[d];
            dqr[d] += scale * ds * kr[d];
            dkr[d] += scale * ds * qr[d];
          }
        }
      }
    }
  if (round_dt)
    for (auto& x : g.dq) x = round_to(*round_dt, x);
  return g;
}

double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double e = 0.0, m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return kInf;
    e = std::max(e, std::fabs(a[i] - ref[i]));
    m = std::max(m, std::fabs(ref[i]));
  }
  return m > 0 ? e / m : e;
}

HostTensor host_of(DType dt, std::initializer_list<int64_t> shape, const std::vector<double>& x) {
  HostTensor t(dt, shape);
  for (int64_t i = 0; i < t.view.numel(); ++i) store_from_double(t.view, i, x[static_cast<std::size_t>(i)]);
  return t;
}
std::vector<double> doubles_of(const HostTensor& t) {
  std::vector<double> x(static_cast<std::size_t>(t.view.numel()));
  for (int64_t i = 0; i < t.view.numel(); ++i) x[static_cast<std::size_t>(i)] = load_as_double(t.view, i);
  return x;
}
// Rows of a (B, S, heads, D) array at the chunk positions `pos` (gather) or back into place (scatter, +=).
std::vector<double> gather(const std::vector<double>& g, int64_t B, int64_t S, int64_t heads, int64_t D,
                           const ChunkPositions& pos) {
  std::vector<double> out(static_cast<std::size_t>(B * pos.size() * heads * D));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < pos.size(); ++i)
      std::copy_n(&g[((b * S + pos.at(i)) * heads) * D], heads * D, &out[((b * pos.size() + i) * heads) * D]);
  return out;
}
void scatter_add(std::vector<double>& g, const std::vector<double>& local, int64_t B, int64_t S, int64_t heads,
                 int64_t D, const ChunkPositions& pos) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t i = 0; i < pos.size(); ++i)
      for (int64_t e = 0; e < heads * D; ++e)
        g[((b * S + pos.at(i)) * heads) * D + e] += local[((b * pos.size() + i) * heads) * D + e];
}

// Backward over the ring with the kernel the environment selects: every rank's query chunk against
// every K/V chunk (dK/dV per step into fp32 accumulators), assembled in global order and compared with
// the references over the whole sequence (or, with q_pos/k_pos given, over those rows only).
void check_backward(const Problem& pr, const MaskSpec& mask, uint32_t seed, const ChunkPositions* q_only = nullptr,
                    const ChunkPositions* k_only = nullptr) {
  const AttentionSpec spec = spec_of(pr, mask);
  const int64_t B = pr.batch, H = pr.heads, Hkv = pr.kv_heads, D = pr.head_dim;
  const ChunkPositions all_q = q_only ? *q_only : identity_positions(pr.seq);
  const ChunkPositions all_k = k_only ? *k_only : identity_positions(pr.seq);
  const int64_t Sq = all_q.size(), Sk = all_k.size();
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto rand_vec = [&](std::size_t n) {
    std::vector<double> x(n);
    for (auto& e : x) e = round_to(pr.dtype, normal(rng));
    return x;
  };
  const std::vector<double> q = rand_vec(B * Sq * H * D), dout = rand_vec(B * Sq * H * D);
  const std::vector<double> k = rand_vec(B * Sk * Hkv * D), v = rand_vec(B * Sk * Hkv * D);
  // The exact forward (out, lse) over these rows, then as the GPU forward hands it on.
  std::vector<double> out(q.size()), lse(static_cast<std::size_t>(B * H * Sq));
  {
    std::vector<double> qq = q, kk = k, vv = v;
    reference_attention(spec, make_view(qq.data(), DType::kF64, Device::kHost, {B, Sq, H, D}), all_q,
                        make_view(kk.data(), DType::kF64, Device::kHost, {B, Sk, Hkv, D}),
                        make_view(vv.data(), DType::kF64, Device::kHost, {B, Sk, Hkv, D}), all_k,
                        make_view(out.data(), DType::kF64, Device::kHost, {B, Sq, H, D}),
                        make_view(lse.data(), DType::kF64, Device::kHost, {B, H, Sq}));
  }
  std::vector<double> out_r = out, lse_r = lse;
  for (auto& x : out_r) x = round_to(pr.dtype, x);
  for (auto& x : lse_r) x = static_cast<float>(x);
  const Grads exact = backward_reference(spec, q, all_q, k, v, all_k, dout, out, lse, nullptr);
  const Grads plain = backward_reference(spec, q, all_q, k, v, all_k, dout, out_r, lse_r, &pr.dtype);

  // GPU: chunks of the rows (the world's layout over the sequence, or one chunk of the given rows).
  const int world = q_only ? 1 : pr.world;
  auto chunk = [&](const ChunkPositions& whole, int r) { return q_only ? whole : positions_of(pr, r); };
  const int64_t rows_q = Sq / world, rows_k = Sk / world;
  Grads gpu{std::vector<double>(q.size(), 0.0), std::vector<double>(k.size(), 0.0), std::vector<double>(k.size(), 0.0)};
  auto backend = make_cuda_backend();
  backend->prepare(spec, rows_q, rows_k);
  // Global row index of a position: for q_only / k_only the rows are listed in position order.
  const ChunkPositions q_rows_all = identity_positions(Sq), k_rows_all = identity_positions(Sk);
  for (int r = 0; r < world; ++r) {
    const ChunkPositions qp = chunk(all_q, r);
    const ChunkPositions q_index = q_only ? q_rows_all : qp;  // rows of the global arrays
    DeviceTensor d_q(pr.dtype, {B, rows_q, H, D}), d_o(pr.dtype, {B, rows_q, H, D}), d_do(pr.dtype, {B, rows_q, H, D});
    DeviceTensor d_lse(DType::kF32, {B, H, rows_q}), d_dq(pr.dtype, {B, rows_q, H, D});
    d_q.upload(host_of(pr.dtype, {B, rows_q, H, D}, gather(q, B, Sq, H, D, q_index)));
    d_o.upload(host_of(pr.dtype, {B, rows_q, H, D}, gather(out_r, B, Sq, H, D, q_index)));
    d_do.upload(host_of(pr.dtype, {B, rows_q, H, D}, gather(dout, B, Sq, H, D, q_index)));
    {
      std::vector<double> l(static_cast<std::size_t>(B * H * rows_q));
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < rows_q; ++i) l[(b * H + h) * rows_q + i] = lse_r[(b * H + h) * Sq + q_index.at(i)];
      d_lse.upload(host_of(DType::kF32, {B, H, rows_q}, l));
    }
    d_dq.poison();
    backend->backward_begin(d_q.view, d_o.view, d_do.view, d_lse.view, qp);
    for (int s = 0; s < world; ++s) {
      const ChunkPositions kp = chunk(all_k, s);
      const ChunkPositions k_index = k_only ? k_rows_all : kp;
      DeviceTensor d_k(pr.dtype, {B, rows_k, Hkv, D}), d_v(pr.dtype, {B, rows_k, Hkv, D});
      DeviceTensor d_dk(DType::kF32, {B, rows_k, Hkv, D}), d_dv(DType::kF32, {B, rows_k, Hkv, D});
      d_k.upload(host_of(pr.dtype, {B, rows_k, Hkv, D}, gather(k, B, Sk, Hkv, D, k_index)));
      d_v.upload(host_of(pr.dtype, {B, rows_k, Hkv, D}, gather(v, B, Sk, Hkv, D, k_index)));
      backend->zero(d_dk.view);
      backend->zero(d_dv.view);
      backend->backward_step(d_k.view, d_v.view, kp, d_dk.view, d_dv.view);
      RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
      HostTensor hk(DType::kF32, {B, rows_k, Hkv, D}), hv(DType::kF32, {B, rows_k, Hkv, D});
      d_dk.download(hk);
      d_dv.download(hv);
      scatter_add(gpu.dk, doubles_of(hk), B, Sk, Hkv, D, k_index);
      scatter_add(gpu.dv, doubles_of(hv), B, Sk, Hkv, D, k_index);
    }
    backend->backward_end(d_dq.view);
    RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
    HostTensor hdq(pr.dtype, {B, rows_q, H, D});
    d_dq.download(hdq);
    scatter_add(gpu.dq, doubles_of(hdq), B, Sq, H, D, q_index);
  }
  // Rows that see no key: exactly zero.
  int64_t nonzero_empty = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < Sq; ++i)
        if (std::isinf(lse[(b * H + h) * Sq + i]))
          for (int64_t d = 0; d < D; ++d) nonzero_empty += gpu.dq[((b * Sq + i) * H + h) * D + d] != 0.0;
  const char* kernel = cuda::flash_bwd_uses_wgmma(static_cast<int>(D))
                           ? (std::getenv("RINGATTN_BWD_SM90_NO_TMA") ? "wgmma cp.async" : "wgmma tma")
                           : "mma";
  SCOPED_TRACE(std::string(kernel) + " " + dtype_name(pr.dtype) + " d" + std::to_string(D) + " x" +
               std::to_string(world) + " " + layout_name(pr.layout) + " mask '" + mask.describe() + "'");
  EXPECT_EQ(nonzero_empty, 0) << "dq of rows that see no key must be zero";
  const struct {
    const char* name;
    const std::vector<double>& gpu;
    const std::vector<double>& plain;
    const std::vector<double>& exact;
  } outs[] = {{"dq", gpu.dq, plain.dq, exact.dq}, {"dk", gpu.dk, plain.dk, exact.dk}, {"dv", gpu.dv, plain.dv, exact.dv}};
  for (const auto& o : outs) {
    const double p_err = rel_err(o.plain, o.exact), err = rel_err(o.gpu, o.exact);
    const double tol = 2.0 * p_err + 0.25 * unit_roundoff(pr.dtype);
    EXPECT_LE(err, tol) << o.name << ": gpu error " << err << ", plain " << dtype_name(pr.dtype) << " error " << p_err;
  }
}

// ---- the suites ------------------------------------------------------------------------------------

// Forward: every mask x {bf16, fp16} x {d64, d128} x {mma.sync, wgmma}, on one step (the whole
// sequence) and on a 4-rank zigzag ring (2-segment chunks, visiting chunks at arbitrary positions).
struct FwdParam {
  int mask;
  DType dtype;
  int head_dim;
  const char* kernel;  // RINGATTN_FWD_KERNEL
  int world;
  Layout layout;
};

class MaskedFwd : public ::testing::TestWithParam<FwdParam> {};

TEST_P(MaskedFwd, MatchesReference) {
  RINGATTN_SKIP_WITHOUT_GPU();
  const FwdParam& fp = GetParam();
  const ScopedEnv env("RINGATTN_FWD_KERNEL", fp.kernel);
  Problem pr;
  pr.dtype = fp.dtype;
  pr.head_dim = fp.head_dim;
  pr.world = fp.world;
  pr.layout = fp.layout;
  pr.seq = fp.world == 1 ? 453 : 8 * 60;  // zigzag x4: chunks of two 60-row halves
  SCOPED_TRACE(std::string("kernel ") + fp.kernel);
  check_forward(pr, kMasks[fp.mask].make(pr.seq), 1000u + static_cast<uint32_t>(fp.mask * 17 + fp.head_dim));
}

std::vector<FwdParam> fwd_params() {
  std::vector<FwdParam> out;
  for (int m = 0; m < kNumMasks; ++m)
    for (DType dt : {DType::kBF16, DType::kF16})
      for (int d : {64, 128})
        for (const char* kernel : {"mma", "wgmma"}) {
          out.push_back({m, dt, d, kernel, 1, Layout::kContiguous});
          if (dt == DType::kBF16) out.push_back({m, dt, d, kernel, 4, Layout::kZigzag});
        }
  return out;
}

std::string fwd_name(const ::testing::TestParamInfo<FwdParam>& info) {
  const FwdParam& p = info.param;
  return std::string(kMasks[p.mask].name) + "_" + dtype_name(p.dtype) + "_d" + std::to_string(p.head_dim) + "_" +
         p.kernel + "_x" + std::to_string(p.world);
}

INSTANTIATE_TEST_SUITE_P(EveryMask, MaskedFwd, ::testing::ValuesIn(fwd_params()), fwd_name);

// Backward: every mask x {bf16, fp16} x {d64, d128} on each backward kernel the head_dim has
// (mma.sync; at d128 also the Hopper TMA kernel and its cp.async fallback), whole sequence and rings.
struct BwdParam {
  int mask;
  DType dtype;
  int head_dim;
  const char* kernel;  // "mma", "tma" or "cpasync"
  int world;
  Layout layout;
};

class MaskedBwd : public ::testing::TestWithParam<BwdParam> {};

TEST_P(MaskedBwd, MatchesReference) {
  RINGATTN_SKIP_WITHOUT_GPU();
  const BwdParam& bp = GetParam();
  const std::string kernel = bp.kernel;
  const ScopedEnv choice("RINGATTN_BWD_KERNEL", kernel == "mma" ? "mma" : "wgmma");
  const ScopedEnv no_tma("RINGATTN_BWD_SM90_NO_TMA", kernel == "cpasync" ? "1" : nullptr);
  if (kernel != "mma" && !cuda::flash_bwd_uses_wgmma(bp.head_dim)) GTEST_SKIP() << "no sm_90a device: wgmma backward not run";
  Problem pr;
  pr.dtype = bp.dtype;
  pr.head_dim = bp.head_dim;
  pr.world = bp.world;
  pr.layout = bp.layout;
  pr.seq = bp.world == 1 ? 333 : (bp.layout == Layout::kZigzag ? 8 * 44 : 3 * 110);
  check_backward(pr, kMasks[bp.mask].make(pr.seq), 2000u + static_cast<uint32_t>(bp.mask * 31 + bp.head_dim));
}

std::vector<BwdParam> bwd_params() {
  std::vector<BwdParam> out;
  for (int m = 0; m < kNumMasks; ++m) {
    out.push_back({m, DType::kBF16, 128, "tma", 1, Layout::kContiguous});
    out.push_back({m, DType::kF16, 128, "tma", 1, Layout::kContiguous});
    out.push_back({m, DType::kBF16, 128, "cpasync", 1, Layout::kContiguous});
    out.push_back({m, DType::kF16, 128, "mma", 1, Layout::kContiguous});
    out.push_back({m, DType::kBF16, 64, "mma", 1, Layout::kContiguous});
    out.push_back({m, DType::kF16, 64, "mma", 1, Layout::kContiguous});
    out.push_back({m, DType::kBF16, 128, "tma", 4, Layout::kZigzag});
    out.push_back({m, DType::kBF16, 64, "mma", 3, Layout::kStriped});
  }
  return out;
}

std::string bwd_name(const ::testing::TestParamInfo<BwdParam>& info) {
  const BwdParam& p = info.param;
  return std::string(kMasks[p.mask].name) + "_" + dtype_name(p.dtype) + "_d" + std::to_string(p.head_dim) + "_" +
         p.kernel + "_x" + std::to_string(p.world);
}

INSTANTIATE_TEST_SUITE_P(EveryMask, MaskedBwd, ::testing::ValuesIn(bwd_params()), bwd_name);

// Rows that see no key: queries at positions 0..199 against keys at 200..399 under a bidirectional
// window reaching 10 to the right: rows 0..189 see nothing (out = 0, lse = -inf, dq = 0), 190..199
// see a few keys. Forward on both kernels, backward on every backward kernel.
class MaskedEmptyRows : public ::testing::TestWithParam<const char*> {};

TEST_P(MaskedEmptyRows, ForwardAndBackward) {
  RINGATTN_SKIP_WITHOUT_GPU();
  const std::string kernel = GetParam();
  const ScopedEnv fwd("RINGATTN_FWD_KERNEL", kernel == "mma" ? "mma" : "wgmma");
  const ScopedEnv bwd("RINGATTN_BWD_KERNEL", kernel == "mma" ? "mma" : "wgmma");
  const ScopedEnv no_tma("RINGATTN_BWD_SM90_NO_TMA", kernel == "cpasync" ? "1" : nullptr);
  constexpr int64_t kRows = 200;
  const MaskSpec mask = window(false, 30, 10);
  ChunkPositions qpos, kpos;
  qpos.num_segments = kpos.num_segments = 1;
  qpos.seg[0] = {0, 1, kRows};
  kpos.seg[0] = {kRows, 1, kRows};
  for (int d : {64, 128}) {
    Problem pr;
    pr.head_dim = d;
    pr.seq = 2 * kRows;
    // Forward through the backend, one step (the step writes out and lse).
    const AttentionSpec spec = spec_of(pr, mask);
    std::mt19937 rng(77 + d);
    HostTensor q(pr.dtype, {1, kRows, pr.heads, d}), k(pr.dtype, {1, kRows, pr.kv_heads, d});
    HostTensor v(pr.dtype, {1, kRows, pr.kv_heads, d});
    fill_normal(q, rng);
    fill_normal(k, rng);
    fill_normal(v, rng);
    DeviceTensor dq(pr.dtype, {1, kRows, pr.heads, d}), dk(pr.dtype, {1, kRows, pr.kv_heads, d});
    DeviceTensor dv(pr.dtype, {1, kRows, pr.kv_heads, d}), dout(pr.dtype, {1, kRows, pr.heads, d});
    DeviceTensor dlse(DType::kF32, {1, pr.heads, kRows});
    dq.upload(q);
    dk.upload(k);
    dv.upload(v);
    dout.poison();
    dlse.poison();
    for (int pass = 0; pass < 2; ++pass) {  // 0: forward_step_into (one step), 1: step + forward_end
      auto backend = make_cuda_backend();
      backend->prepare(spec, kRows, kRows);
      backend->forward_begin(dq.view, qpos);
      if (pass == 0) {
        backend->forward_step_into(dk.view, dv.view, kpos, dout.view, dlse.view);
      } else {
        backend->forward_step(dk.view, dv.view, kpos);
        backend->forward_end(dout.view, dlse.view);
      }
      RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
      HostTensor out(pr.dtype, {1, kRows, pr.heads, d}), lse(DType::kF32, {1, pr.heads, kRows});
      dout.download(out);
      dlse.download(lse);
      HostTensor ref_out(DType::kF64, {1, kRows, pr.heads, d}), ref_lse(DType::kF64, {1, pr.heads, kRows});
      reference_attention(spec, q.view, qpos, k.view, v.view, kpos, ref_out.view, ref_lse.view);
      int64_t empty = 0, wrong = 0;
      double max_err = 0, max_ref = 0;
      for (int64_t i = 0; i < ref_lse.view.numel(); ++i) {
        const double a = load_as_double(ref_lse.view, i), g = load_as_double(lse.view, i);
        if (std::isinf(a)) {
          ++empty;
          wrong += !(std::isinf(g) && g < 0);
        } else {
          wrong += !(std::abs(a - g) <= kLseTol * std::max(1.0, std::abs(a)));
        }
      }
      for (int64_t i = 0; i < ref_out.view.numel(); ++i) {
        const double a = load_as_double(ref_out.view, i), g = load_as_double(out.view, i);
        max_ref = std::max(max_ref, std::abs(a));
        max_err = std::max(max_err, std::isfinite(g) ? std::abs(a - g) : kInf);
      }
      SCOPED_TRACE(kernel + " d" + std::to_string(d) + " pass " + std::to_string(pass));
      EXPECT_EQ(empty, 190 * pr.heads) << "the reference's empty rows (queries 0..189)";
      EXPECT_EQ(wrong, 0) << "lse wrong (rows that see nothing: -inf)";
      EXPECT_LE(max_err, kFwdTolUnits * unit_roundoff(pr.dtype) * std::max(max_ref, 1e-3)) << "out (0 for empty rows)";
    }
    // Backward on the same rows (out and lse from the fp64 reference).
    if (kernel != "mma" && !cuda::flash_bwd_uses_wgmma(d)) continue;
    check_backward(pr, mask, 3000u + d, &qpos, &kpos);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, MaskedEmptyRows, ::testing::Values("mma", "tma", "cpasync"));

}  // namespace
}  // namespace ringattn::test
