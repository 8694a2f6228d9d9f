// CpuBackend against the naive fp64 reference: blockwise forward, chunk chaining, hidden rows, backward and finite differences.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <vector>

#include "attn/reference.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn {
namespace {

struct Buf {
  std::vector<double> data;
  TensorView view;
};

Buf random_buf(std::initializer_list<int64_t> shape, std::mt19937_64& rng) {
  Buf b;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  std::uniform_real_distribution<double> dist(-1.5, 1.5);
  b.data.resize(static_cast<std::size_t>(n));
  for (auto& x : b.data) x = dist(rng);
  b.view = make_view(b.data.data(), DType::kF64, Device::kHost, shape);
  return b;
}

Buf poisoned(std::initializer_list<int64_t> shape) {
  Buf b;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  b.data.assign(static_cast<std::size_t>(n), std::numeric_limits<double>::quiet_NaN());
  b.view = make_view(b.data.data(), DType::kF64, Device::kHost, shape);
  return b;
}

double max_abs_diff(const Buf& a, const Buf& b) {
  double e = 0.0;
  for (std::size_t i = 0; i < a.data.size(); ++i) {
    const double x = a.data[i], y = b.data[i];
    if (std::isinf(x) && std::isinf(y) && (x > 0) == (y > 0)) continue;
    const double d = std::fabs(x - y);
    if (std::isnan(d)) return INFINITY;
    e = std::max(e, d);
  }
  return e;
}

AttentionSpec spec_for(int64_t batch, int heads, int kv_heads, int head_dim, bool causal) {
  AttentionSpec s;
  s.batch = batch;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.mask.causal = causal;
  s.dtype = DType::kF64;
  return s;
}

TEST(CpuBackend, BlockwiseForwardEqualsNaiveReference) {
  std::mt19937_64 rng(1);
  for (bool causal : {false, true}) {
    const int64_t B = 2, S = 133, H = 4, Hkv = 2, D = 9;  // S crosses several tiles with a tail
    AttentionSpec spec = spec_for(B, H, Hkv, D, causal);
    spec.seq_len = S;
    Buf q = random_buf({B, S, H, D}, rng), k = random_buf({B, S, Hkv, D}, rng), v = random_buf({B, S, Hkv, D}, rng);
    const ChunkPositions pos = identity_positions(S);
    Buf ref_o = poisoned({B, S, H, D}), ref_l = poisoned({B, H, S});
    reference_attention(spec, q.view, pos, k.view, v.view, pos, ref_o.view, ref_l.view);
    auto be = make_cpu_backend();
    be->prepare(spec, S, S);
    be->forward_begin(q.view, pos);
    be->forward_step(k.view, v.view, pos);
    Buf o = poisoned({B, S, H, D}), l = poisoned({B, H, S});
    be->forward_end(o.view, l.view);
    EXPECT_LT(max_abs_diff(o, ref_o), 1e-13) << "causal=" << causal;
    EXPECT_LT(max_abs_diff(l, ref_l), 1e-13) << "causal=" << causal;
  }
}

// A NaN in one q element makes its row's scores NaN: out and lse of that row must be NaN, as in
// the reference, not 0 and -inf (a masked row); every other row stays exact. In two key chunks,
// and in fp32 too (a NaN in K poisons every row that sees that key).
TEST(CpuBackend, NanInAnInputPropagatesLikeTheReference) {
  std::mt19937_64 rng(7);
  const int64_t B = 1, S = 96, H = 2, D = 8;
  for (DType dtype : {DType::kF64, DType::kF32}) {
    AttentionSpec spec = spec_for(B, H, H, D, false);
    spec.seq_len = S;
    spec.dtype = dtype;
    Buf q = random_buf({B, S, H, D}, rng), k = random_buf({B, S, H, D}, rng), v = random_buf({B, S, H, D}, rng);
    const int64_t bad_row = 5, bad_head = 1;
    q.data[((0 * S + bad_row) * H + bad_head) * D + 3] = std::numeric_limits<double>::quiet_NaN();
    const ChunkPositions pos = identity_positions(S);
    Buf ref_o = poisoned({B, S, H, D}), ref_l = poisoned({B, H, S});
    reference_attention(spec, q.view, pos, k.view, v.view, pos, ref_o.view, ref_l.view);
    // The backend in `dtype`: inputs rounded, outputs widened back.
    auto narrow = [&](const Buf& b) {
      std::vector<float> f(b.data.begin(), b.data.end());
      return f;
    };
    std::vector<float> qf = narrow(q), kf = narrow(k), vf = narrow(v), of(ref_o.data.size()), lf(ref_l.data.size());
    auto be = make_cpu_backend();
    be->prepare(spec, S, S);
    Buf o = poisoned({B, S, H, D}), l = poisoned({B, H, S});
    ChunkPositions first = identity_positions(S / 2), second = identity_positions(S / 2);
    second.seg[0].start = S / 2;
    if (dtype == DType::kF64) {
      be->forward_begin(q.view, pos);
      TensorView k1 = k.view, v1 = v.view, k2 = k.view, v2 = v.view;
      k1.shape[1] = v1.shape[1] = k2.shape[1] = v2.shape[1] = S / 2;
      k2.data = k.data.data() + S / 2 * H * D;
      v2.data = v.data.data() + S / 2 * H * D;
      be->forward_step(k1, v1, first);
      be->forward_step(k2, v2, second);
      be->forward_end(o.view, l.view);
    } else {
      auto view32 = [&](std::vector<float>& x, std::initializer_list<int64_t> shape) {
        return make_view(x.data(), DType::kF32, Device::kHost, shape);
      };
      be->forward_begin(view32(qf, {B, S, H, D}), pos);
      be->forward_step(view32(kf, {B, S, H, D}), view32(vf, {B, S, H, D}), pos);
      be->forward_end(view32(of, {B, S, H, D}), view32(lf, {B, H, S}));
      o.data.assign(of.begin(), of.end());
      l.data.assign(lf.begin(), lf.end());
    }
    const double tol = dtype == DType::kF64 ? 1e-13 : 1e-5;
    for (int64_t i = 0; i < S; ++i) {
      for (int64_t h = 0; h < H; ++h) {
        const bool bad = i == bad_row && h == bad_head;
        const double lse = l.data[h * S + i];
        ASSERT_EQ(std::isnan(ref_l.data[h * S + i]), bad) << "the reference itself: row " << i << " head " << h;
        EXPECT_EQ(std::isnan(lse), bad) << "lse of row " << i << " head " << h << " is " << lse;
        if (!bad) EXPECT_NEAR(lse, ref_l.data[h * S + i], tol);
        for (int64_t d = 0; d < D; ++d) {
          const double x = o.data[(i * H + h) * D + d];
          EXPECT_EQ(std::isnan(x), bad) << "out of row " << i << " head " << h << " is " << x;
          if (!bad) EXPECT_NEAR(x, ref_o.data[(i * H + h) * D + d], tol);
        }
      }
    }
  }
}

TEST(CpuBackend, ChainedChunksMergeExactlyAndHiddenRowsGiveMinusInfinity) {
  std::mt19937_64 rng(2);
  const int64_t B = 1, Sq = 40, Sk = 24, H = 2, D = 6;
  AttentionSpec spec = spec_for(B, H, H, D, true);
  // Queries at positions 10..49; two key chunks at positions 20..43 and 44..67 (stride 1).
  ChunkPositions qpos;
  qpos.num_segments = 1;
  qpos.seg[0] = {10, 1, Sq};
  ChunkPositions k1, k2;
  k1.num_segments = k2.num_segments = 1;
  k1.seg[0] = {20, 1, Sk};
  k2.seg[0] = {44, 1, Sk};
  Buf q = random_buf({B, Sq, H, D}, rng);
  Buf ka = random_buf({B, Sk, H, D}, rng), va = random_buf({B, Sk, H, D}, rng);
  Buf kb = random_buf({B, Sk, H, D}, rng), vb = random_buf({B, Sk, H, D}, rng);
  // Whole key set = concatenation, with positions as a two-segment chunk.
  Buf kall = poisoned({B, 2 * Sk, H, D}), vall = poisoned({B, 2 * Sk, H, D});
  std::copy(ka.data.begin(), ka.data.end(), kall.data.begin());
  std::copy(kb.data.begin(), kb.data.end(), kall.data.begin() + static_cast<long>(ka.data.size()));
  std::copy(va.data.begin(), va.data.end(), vall.data.begin());
  std::copy(vb.data.begin(), vb.data.end(), vall.data.begin() + static_cast<long>(va.data.size()));
  ChunkPositions kpos_all;
  kpos_all.num_segments = 2;
  kpos_all.seg[0] = k1.seg[0];
  kpos_all.seg[1] = k2.seg[0];
  Buf ref_o = poisoned({B, Sq, H, D}), ref_l = poisoned({B, H, Sq});
  reference_attention(spec, q.view, qpos, kall.view, vall.view, kpos_all, ref_o.view, ref_l.view);

  auto be = make_cpu_backend();
  be->prepare(spec, Sq, Sk);
  be->forward_begin(q.view, qpos);
  be->forward_step(kb.view, vb.view, k2);  // order must not matter
  be->forward_step(ka.view, va.view, k1);
  Buf o = poisoned({B, Sq, H, D}), l = poisoned({B, H, Sq});
  be->forward_end(o.view, l.view);
  EXPECT_LT(max_abs_diff(o, ref_o), 1e-13);
  EXPECT_LT(max_abs_diff(l, ref_l), 1e-13);
  // Queries at positions 10..19 see no key at all: lse = -inf, output exactly 0, never NaN.
  for (int64_t h = 0; h < H; ++h) {
    for (int64_t i = 0; i < 10; ++i) {
      EXPECT_EQ(l.data[h * Sq + i], -std::numeric_limits<double>::infinity());
      for (int64_t d = 0; d < D; ++d) EXPECT_EQ(o.data[(i * H + h) * D + d], 0.0);
    }
  }
}

// Loss = sum(out * dout); its gradient wrt an input element by central differences.
double loss(const AttentionSpec& spec, const Buf& q, const Buf& k, const Buf& v, const Buf& dout) {
  const int64_t S = q.view.shape[1];
  const ChunkPositions pos = identity_positions(S);
  Buf o = poisoned({q.view.shape[0], S, q.view.shape[2], q.view.shape[3]});
  Buf l = poisoned({q.view.shape[0], q.view.shape[2], S});
  reference_attention(spec, q.view, pos, k.view, v.view, pos, o.view, l.view);
  double s = 0.0;
  for (std::size_t i = 0; i < o.data.size(); ++i) s += o.data[i] * dout.data[i];
  return s;
}

// One causal chunk (B, S, H/Hkv, D) in fp64: random inputs and a CPU backend after its forward and
// backward_begin (the output and lse it reads live here too).
struct BackwardProblem {
  int64_t B, S, H, Hkv, D;
  AttentionSpec spec;
  Buf q, k, v, dout, o, l;
  ChunkPositions pos;
  std::unique_ptr<Backend> be;

  BackwardProblem(int64_t b, int64_t s, int64_t h, int64_t hkv, int64_t d, std::mt19937_64& rng)
      : B(b), S(s), H(h), Hkv(hkv), D(d), spec(spec_for(b, static_cast<int>(h), static_cast<int>(hkv),
                                                        static_cast<int>(d), true)),
        q(random_buf({b, s, h, d}, rng)), k(random_buf({b, s, hkv, d}, rng)), v(random_buf({b, s, hkv, d}, rng)),
        dout(random_buf({b, s, h, d}, rng)), o(poisoned({b, s, h, d})), l(poisoned({b, h, s})),
        pos(identity_positions(s)), be(make_cpu_backend()) {
    spec.seq_len = s;
    be->prepare(spec, s, s);
    be->forward_begin(q.view, pos);
    be->forward_step(k.view, v.view, pos);
    be->forward_end(o.view, l.view);
    be->backward_begin(q.view, o.view, dout.view, l.view, pos);
  }
};

TEST(CpuBackend, BackwardMatchesReferenceAndFiniteDifferences) {
  std::mt19937_64 rng(3);
  BackwardProblem pb(1, 12, 4, 2, 3, rng);
  const int64_t B = pb.B, S = pb.S, H = pb.H, Hkv = pb.Hkv, D = pb.D;
  const AttentionSpec& spec = pb.spec;
  Buf &q = pb.q, &k = pb.k, &v = pb.v, &dout = pb.dout;
  const ChunkPositions& pos = pb.pos;
  Backend* be = pb.be.get();
  Buf dk = random_buf({B, S, Hkv, D}, rng), dv = random_buf({B, S, Hkv, D}, rng);
  be->zero(dk.view);
  be->zero(dv.view);
  be->backward_step(k.view, v.view, pos, dk.view, dv.view);
  Buf dq = poisoned({B, S, H, D});
  be->backward_end(dq.view);

  Buf rq = poisoned({B, S, H, D}), rk = poisoned({B, S, Hkv, D}), rv = poisoned({B, S, Hkv, D});
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rq.view, rk.view, rv.view);
  EXPECT_LT(max_abs_diff(dq, rq), 1e-12);
  EXPECT_LT(max_abs_diff(dk, rk), 1e-12);
  EXPECT_LT(max_abs_diff(dv, rv), 1e-12);

  constexpr double kStep = 1e-5;
  for (Buf* x : {&q, &k, &v}) {
    const Buf& grad = x == &q ? dq : (x == &k ? dk : dv);
    for (std::size_t i = 0; i < x->data.size(); i += 5) {
      const double saved = x->data[i];
      x->data[i] = saved + kStep;
      const double up = loss(spec, q, k, v, dout);
      x->data[i] = saved - kStep;
      const double down = loss(spec, q, k, v, dout);
      x->data[i] = saved;
      EXPECT_NEAR(grad.data[i], (up - down) / (2 * kStep), 1e-7) << "element " << i;
    }
  }
}

// backward_step_into stores over whatever the outputs held: fp64 accumulators (poisoned with NaN:
// a step that read them would return NaN), then bf16 gradients, which must equal the fp32 step's
// sums rounded once. A later backward_step adds on top of what backward_step_into stored.
TEST(CpuBackend, BackwardStepIntoStoresOverTheOutputs) {
  std::mt19937_64 rng(11);
  BackwardProblem pb(2, 10, 4, 2, 5, rng);
  const int64_t B = pb.B, S = pb.S, H = pb.H, Hkv = pb.Hkv, D = pb.D;
  const AttentionSpec& spec = pb.spec;
  const Buf &q = pb.q, &k = pb.k, &v = pb.v, &dout = pb.dout;
  const ChunkPositions& pos = pb.pos;
  Backend* be = pb.be.get();
  Buf dk = poisoned({B, S, Hkv, D}), dv = poisoned({B, S, Hkv, D});
  be->backward_step_into(k.view, v.view, pos, dk.view, dv.view);
  Buf once_k = dk, once_v = dv;
  be->backward_step(k.view, v.view, pos, dk.view, dv.view);  // adds the same chunk again: twice
  Buf dq = poisoned({B, S, H, D});
  be->backward_end(dq.view);
  Buf rq = poisoned({B, S, H, D}), rk = poisoned({B, S, Hkv, D}), rv = poisoned({B, S, Hkv, D});
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rq.view, rk.view, rv.view);
  EXPECT_LT(max_abs_diff(once_k, rk), 1e-12);
  EXPECT_LT(max_abs_diff(once_v, rv), 1e-12);
  for (Buf* r : {&rk, &rv})
    for (double& x : r->data) x *= 2.0;
  EXPECT_LT(max_abs_diff(dk, rk), 1e-12);
  EXPECT_LT(max_abs_diff(dv, rv), 1e-12);

  // bf16 inputs: the rounded outputs against fp32 accumulators of the same step, rounded here.
  AttentionSpec s16 = spec;
  s16.dtype = DType::kBF16;
  auto to_bf16 = [](const Buf& b) {
    std::vector<uint16_t> bits(b.data.size());
    for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = float_to_bf16(static_cast<float>(b.data[i]));
    return bits;
  };
  std::vector<uint16_t> q16 = to_bf16(q), k16 = to_bf16(k), v16 = to_bf16(v), do16 = to_bf16(dout);
  std::vector<uint16_t> o16(q16.size()), dq16(q16.size()), dk16(k16.size(), 0x7fc0), dv16(k16.size(), 0x7fc0);
  std::vector<float> l32(static_cast<std::size_t>(B * H * S)), dk32(k16.size(), 0.f), dv32(k16.size(), 0.f);
  auto v16_of = [&](std::vector<uint16_t>& x, int64_t h) {
    return make_view(x.data(), DType::kBF16, Device::kHost, {B, S, h, D});
  };
  const TensorView lse32 = make_view(l32.data(), DType::kF32, Device::kHost, {B, H, S});
  auto be16 = make_cpu_backend();
  be16->prepare(s16, S, S);
  be16->forward_begin(v16_of(q16, H), pos);
  be16->forward_step(v16_of(k16, Hkv), v16_of(v16, Hkv), pos);
  be16->forward_end(v16_of(o16, H), lse32);
  be16->backward_begin(v16_of(q16, H), v16_of(o16, H), v16_of(do16, H), lse32, pos);
  be16->backward_step_into(v16_of(k16, Hkv), v16_of(v16, Hkv), pos, v16_of(dk16, Hkv), v16_of(dv16, Hkv));
  be16->backward_step(v16_of(k16, Hkv), v16_of(v16, Hkv), pos,
                      make_view(dk32.data(), DType::kF32, Device::kHost, {B, S, Hkv, D}),
                      make_view(dv32.data(), DType::kF32, Device::kHost, {B, S, Hkv, D}));
  be16->backward_end(v16_of(dq16, H));
  for (std::size_t i = 0; i < dk16.size(); ++i) {
    ASSERT_EQ(dk16[i], float_to_bf16(dk32[i])) << "dk element " << i;
    ASSERT_EQ(dv16[i], float_to_bf16(dv32[i])) << "dv element " << i;
  }
}

}  // namespace
}  // namespace ringattn
