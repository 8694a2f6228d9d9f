// GPU backward kernels (flash_bwd_*) against the fp64 reference backward and the CPU backend, called directly.
//
// Tolerance: the GPU kernel takes bf16/fp16 inputs and rounds P and dS to the input precision before
// the tensor-core products (as every flash backward does). The test runs a plain CPU implementation
// with exactly those roundings (fp64 otherwise) on the same inputs; its error against the exact
// answer is what the input precision costs. The GPU result must stay within 2x that error plus a
// quarter ulp of the input precision, everything relative to max|exact| of each tensor.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "attn/cuda/flash_bwd.hpp"
#include "attn/reference.hpp"
#include "ringattn/backend.hpp"
#include "ringattn/layout.hpp"

namespace ringattn {
namespace {

using namespace ringattn::cuda;

#define CUDA_OK(call) ASSERT_EQ((call), cudaSuccess) << #call

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

double round_to(DType dt, double x) {
  const float f = static_cast<float>(x);
  return dt == DType::kBF16 ? bf16_to_float(float_to_bf16(f)) : fp16_to_float(float_to_fp16(f));
}
uint16_t bits_of(DType dt, double x) {
  const float f = static_cast<float>(x);
  return dt == DType::kBF16 ? float_to_bf16(f) : float_to_fp16(f);
}
double from_bits(DType dt, uint16_t b) { return dt == DType::kBF16 ? bf16_to_float(b) : fp16_to_float(b); }
double ulp(DType dt) { return dt == DType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11); }

struct Case {
  const char* name;
  DType dtype;
  int batch, heads, kv_heads, head_dim;
  int64_t seq;  // global sequence length
  bool causal;
  Layout layout;
  int world;          // chunks of the sequence (1: the whole sequence in one step)
  int rank;           // whose query chunk is tested
  bool packed = false;  // q, k, v as slices of one (B, S, 3, H, D) buffer (row stride 3*H*D)
  bool hide = false;    // lse = -inf on every 7th query row (rows that see no key contribute nothing)
  DkvWrite write = DkvWrite::kAdd;  // how the steps write dK/dV (kStore, kFinal: over poisoned buffers)
};

std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.name; }

template <typename T>
struct DeviceBuf {
  T* ptr = nullptr;
  explicit DeviceBuf(std::size_t n) {
    if (cudaMalloc(&ptr, std::max<std::size_t>(n, 1) * sizeof(T)) != cudaSuccess) ptr = nullptr;
  }
  ~DeviceBuf() { cudaFree(ptr); }
  DeviceBuf(const DeviceBuf&) = delete;
  DeviceBuf& operator=(const DeviceBuf&) = delete;
};

// Relative error max|a - ref| / max|ref|; infinite when a holds NaN/inf.
double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
  double e = 0.0, m = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    e = std::max(e, std::fabs(a[i] - ref[i]));
    m = std::max(m, std::fabs(ref[i]));
  }
  return m > 0 ? e / m : e;
}

class FlashBwdTest : public ::testing::TestWithParam<Case> {};

// The whole check of one case with the kernel the environment selects (see flash_bwd.hpp).
void check_case(const Case& c);

TEST_P(FlashBwdTest, MatchesReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible: GPU backward test skipped";
  check_case(GetParam());
}

void check_case(const Case& c) {
  const int B = c.batch, H = c.heads, Hkv = c.kv_heads, D = c.head_dim;
  const int64_t S = c.seq;
  const int group = H / Hkv;
  AttentionSpec spec;
  spec.batch = B;
  spec.seq_len = S;
  spec.heads = H;
  spec.kv_heads = Hkv;
  spec.head_dim = D;
  spec.mask.causal = c.causal;
  spec.layout = c.layout;
  spec.dtype = DType::kF64;
  const double scale = spec.scale();

  // Global inputs, rounded to the input dtype (every reference sees exactly what the GPU sees).
  std::mt19937_64 rng(1234 + S * 7 + D + H * 13 + (c.causal ? 1 : 0));
  std::normal_distribution<double> normal(0.0, 1.0);
  auto rand_vec = [&](std::size_t n) {
    std::vector<double> v(n);
    for (auto& x : v) x = round_to(c.dtype, normal(rng));
    return v;
  };
  const std::size_t nq = static_cast<std::size_t>(B) * S * H * D, nk = static_cast<std::size_t>(B) * S * Hkv * D;
  std::vector<double> q = rand_vec(nq), k = rand_vec(nk), v = rand_vec(nk), dout = rand_vec(nq);

  // This rank's query chunk and every K/V chunk.
  const ChunkPositions q_pos = chunk_positions(c.layout, S, c.rank, c.world);
  const int64_t Sq = q_pos.size();
  auto gather = [&](const std::vector<double>& src, const ChunkPositions& pos, int heads) {
    std::vector<double> out(static_cast<std::size_t>(B) * pos.size() * heads * D);
    for (int b = 0; b < B; ++b)
      for (int64_t i = 0; i < pos.size(); ++i)
        std::memcpy(&out[((b * pos.size() + i) * heads) * D], &src[((b * S + pos.at(i)) * heads) * D],
                    sizeof(double) * heads * D);
    return out;
  };
  std::vector<double> q_loc = gather(q, q_pos, H), do_loc = gather(dout, q_pos, H);

  // Forward (fp64) for this chunk's queries against the whole sequence: out rounded as the GPU gets it.
  std::vector<double> out_loc(q_loc.size()), lse_loc(static_cast<std::size_t>(B) * H * Sq);
  {
    std::vector<double> kk = k, vv = v;
    TensorView qv = make_view(q_loc.data(), DType::kF64, Device::kHost, {B, Sq, H, D});
    TensorView kv = make_view(kk.data(), DType::kF64, Device::kHost, {B, S, Hkv, D});
    TensorView vv_ = make_view(vv.data(), DType::kF64, Device::kHost, {B, S, Hkv, D});
    TensorView ov = make_view(out_loc.data(), DType::kF64, Device::kHost, {B, Sq, H, D});
    TensorView lv = make_view(lse_loc.data(), DType::kF64, Device::kHost, {B, H, Sq});
    reference_attention(spec, qv, q_pos, kv, vv_, identity_positions(S), ov, lv);
  }
  for (auto& x : out_loc) x = round_to(c.dtype, x);
  for (auto& x : lse_loc) x = static_cast<float>(x);
  if (c.hide) {
    for (std::size_t r = 0; r < lse_loc.size(); ++r)
      if (r % 7 == 3) lse_loc[r] = -std::numeric_limits<double>::infinity();
  }

  // Plain same-precision backward (P and dS rounded like the kernel), over global keys.
  std::vector<double> em_dq(q_loc.size(), 0.0), em_dk(nk, 0.0), em_dv(nk, 0.0);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      const int hk = h / group;
      for (int64_t i = 0; i < Sq; ++i) {
        const double* qr = &q_loc[((b * Sq + i) * H + h) * D];
        const double* dr = &do_loc[((b * Sq + i) * H + h) * D];
        const double* orow = &out_loc[((b * Sq + i) * H + h) * D];
        const double lse = lse_loc[(b * H + h) * Sq + i];
        if (std::isinf(lse)) continue;
        double delta = 0;
        for (int d = 0; d < D; ++d) delta += static_cast<double>(static_cast<float>(dr[d] * orow[d]));
        double* dqr = &em_dq[((b * Sq + i) * H + h) * D];
        for (int64_t j = 0; j < S; ++j) {
          if (c.causal && j > q_pos.at(i)) continue;
          const double* kr = &k[((b * S + j) * Hkv + hk) * D];
          const double* vr = &v[((b * S + j) * Hkv + hk) * D];
          double s = 0, dp = 0;
          for (int d = 0; d < D; ++d) {
            s += qr[d] * kr[d];
            dp += dr[d] * vr[d];
          }
          const double p = std::exp(s * scale - lse);
          const double pr = round_to(c.dtype, p);
          const double ds = round_to(c.dtype, p * (dp - delta));
          double* dkr = &em_dk[((b * S + j) * Hkv + hk) * D];
          double* dvr = &em_dv[((b * S + j) * Hkv + hk) * D];
          for (int d = 0; d < D; ++d) {
            dvr[d] += pr * dr[d];
            dqr[d] += scale * ds * kr[d];
            dkr[d] += scale * ds * qr[d];
          }
        }
      }
    }
  }
  for (auto& x : em_dq) x = round_to(c.dtype, x);

  // Exact answer: the fp64 reference backward for a whole sequence, the CPU backend (fp32, the
  // ring's own chunk-by-chunk algorithm) for a chunked one.
  std::vector<double> ex_dq(q_loc.size()), ex_dk(nk, 0.0), ex_dv(nk, 0.0);
  ASSERT_TRUE(c.world > 1 || !c.hide) << "hidden rows need the CPU backend as the exact reference";
  if (c.world == 1) {
    TensorView qv = make_view(q.data(), DType::kF64, Device::kHost, {B, S, H, D});
    TensorView kv = make_view(k.data(), DType::kF64, Device::kHost, {B, S, Hkv, D});
    TensorView vv = make_view(v.data(), DType::kF64, Device::kHost, {B, S, Hkv, D});
    TensorView dv_ = make_view(dout.data(), DType::kF64, Device::kHost, {B, S, H, D});
    TensorView dqv = make_view(ex_dq.data(), DType::kF64, Device::kHost, {B, S, H, D});
    TensorView dkv = make_view(ex_dk.data(), DType::kF64, Device::kHost, {B, S, Hkv, D});
    TensorView dvv = make_view(ex_dv.data(), DType::kF64, Device::kHost, {B, S, Hkv, D});
    reference_attention_backward(spec, qv, kv, vv, dv_, dqv, dkv, dvv);
  } else {
    AttentionSpec s32 = spec;
    s32.dtype = DType::kF32;
    auto cpu = make_cpu_backend();
    const int64_t Sk = S / c.world;
    cpu->prepare(s32, Sq, Sk);
    auto to_f32 = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    std::vector<float> qf = to_f32(q_loc), of = to_f32(out_loc), df = to_f32(do_loc), lf = to_f32(lse_loc);
    cpu->backward_begin(make_view(qf.data(), DType::kF32, Device::kHost, {B, Sq, H, D}), make_view(of.data(), DType::kF32, Device::kHost, {B, Sq, H, D}),
                        make_view(df.data(), DType::kF32, Device::kHost, {B, Sq, H, D}), make_view(lf.data(), DType::kF32, Device::kHost, {B, H, Sq}), q_pos);
    for (int ch = 0; ch < c.world; ++ch) {
      const ChunkPositions kp = chunk_positions(c.layout, S, ch, c.world);
      std::vector<float> kf = to_f32(gather(k, kp, Hkv)), vf = to_f32(gather(v, kp, Hkv));
      std::vector<float> dkf(kf.size(), 0.f), dvf(kf.size(), 0.f);
      cpu->backward_step(make_view(kf.data(), DType::kF32, Device::kHost, {B, Sk, Hkv, D}),
                         make_view(vf.data(), DType::kF32, Device::kHost, {B, Sk, Hkv, D}), kp,
                         make_view(dkf.data(), DType::kF32, Device::kHost, {B, Sk, Hkv, D}),
                         make_view(dvf.data(), DType::kF32, Device::kHost, {B, Sk, Hkv, D}));
      for (int b = 0; b < B; ++b)
        for (int64_t j = 0; j < Sk; ++j)
          for (int e = 0; e < Hkv * D; ++e) {
            ex_dk[((b * S + kp.at(j)) * Hkv) * D + e] = dkf[((b * Sk + j) * Hkv) * D + e];
            ex_dv[((b * S + kp.at(j)) * Hkv) * D + e] = dvf[((b * Sk + j) * Hkv) * D + e];
          }
    }
    std::vector<float> dqf(q_loc.size());
    cpu->backward_end(make_view(dqf.data(), DType::kF32, Device::kHost, {B, Sq, H, D}));
    ex_dq.assign(dqf.begin(), dqf.end());
  }

  // ---- GPU ----
  CUDA_OK(cudaSetDevice(0));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  auto upload_bits = [&](const std::vector<double>& x, uint16_t* dst) {
    std::vector<uint16_t> bits(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) bits[i] = bits_of(c.dtype, x[i]);
    return cudaMemcpy(dst, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice);
  };
  FlashBwdParams p;
  p.dtype = c.dtype;
  p.batch = B;
  p.heads = H;
  p.kv_heads = Hkv;
  p.head_dim = D;
  p.seq_q = static_cast<int>(Sq);
  p.scale = static_cast<float>(scale);
  p.causal = c.causal;

  // q (optionally a slice of a packed qkv buffer), out, dout, dq.
  const int64_t q_row = c.packed ? 3LL * H * D : 1LL * H * D;
  DeviceBuf<uint16_t> q_d(static_cast<std::size_t>(B) * Sq * q_row), o_d(q_loc.size()), do_d(q_loc.size()),
      dq_d(q_loc.size());
  ASSERT_TRUE(q_d.ptr && o_d.ptr && do_d.ptr && dq_d.ptr);
  if (c.packed) {
    CUDA_OK(cudaMemset(q_d.ptr, 0xff, static_cast<std::size_t>(B) * Sq * q_row * 2));
    std::vector<uint16_t> bits(static_cast<std::size_t>(B) * Sq * q_row, 0xffff);
    for (int b = 0; b < B; ++b)
      for (int64_t i = 0; i < Sq; ++i)
        for (int e = 0; e < H * D; ++e) bits[(b * Sq + i) * q_row + e] = bits_of(c.dtype, q_loc[((b * Sq + i) * H) * D + e]);
    CUDA_OK(cudaMemcpy(q_d.ptr, bits.data(), bits.size() * 2, cudaMemcpyHostToDevice));
  } else {
    CUDA_OK(upload_bits(q_loc, q_d.ptr));
  }
  CUDA_OK(upload_bits(out_loc, o_d.ptr));
  CUDA_OK(upload_bits(do_loc, do_d.ptr));
  CUDA_OK(cudaMemset(dq_d.ptr, 0xff, q_loc.size() * 2));  // poison: NaN in bf16 and fp16
  p.q = q_d.ptr;
  p.q_batch_stride = Sq * q_row;
  p.q_row_stride = q_row;
  p.q_head_stride = D;
  p.out = o_d.ptr;
  p.dout = do_d.ptr;
  p.dq = dq_d.ptr;
  p.out_batch_stride = p.dout_batch_stride = p.dq_batch_stride = Sq * H * D;
  p.out_row_stride = p.dout_row_stride = p.dq_row_stride = H * D;
  p.out_head_stride = p.dout_head_stride = p.dq_head_stride = D;

  DeviceBuf<float> lse_d(lse_loc.size());
  {
    std::vector<float> lf(lse_loc.begin(), lse_loc.end());
    CUDA_OK(cudaMemcpy(lse_d.ptr, lf.data(), lf.size() * 4, cudaMemcpyHostToDevice));
  }
  p.lse = lse_d.ptr;
  p.lse_batch_stride = H * Sq;
  p.lse_head_stride = Sq;
  p.lse_row_stride = 1;

  // Workspace, poisoned (NaN) to prove preprocess fills it.
  const std::size_t dq_acc_bytes = flash_bwd_dq_accum_bytes(B, H, D, Sq);
  DeviceBuf<float> dq_acc(dq_acc_bytes / 4), lse2_d(flash_bwd_row_vector_bytes(B, H, Sq) / 4),
      delta_d(flash_bwd_row_vector_bytes(B, H, Sq) / 4);
  CUDA_OK(cudaMemset(dq_acc.ptr, 0xff, dq_acc_bytes));
  CUDA_OK(cudaMemset(lse2_d.ptr, 0xff, flash_bwd_row_vector_bytes(B, H, Sq)));
  CUDA_OK(cudaMemset(delta_d.ptr, 0xff, flash_bwd_row_vector_bytes(B, H, Sq)));
  p.dq_accum = dq_acc.ptr;
  p.lse_log2 = lse2_d.ptr;
  p.delta = delta_d.ptr;

  flash_bwd_preprocess(p, stream);

  // One step per K/V chunk; each chunk's dK/dV accumulators start from random values (the step adds).
  const int64_t Sk = S / c.world;
  const int64_t k_row = c.packed ? 3LL * Hkv * D : 1LL * Hkv * D;
  std::vector<double> gpu_dk(nk), gpu_dv(nk);
  std::uniform_real_distribution<float> init(-1.f, 1.f);
  for (int ch = 0; ch < c.world; ++ch) {
    const ChunkPositions kp = chunk_positions(c.layout, S, ch, c.world);
    std::vector<double> kc = gather(k, kp, Hkv), vc = gather(v, kp, Hkv);
    DeviceBuf<uint16_t> k_d(static_cast<std::size_t>(B) * Sk * k_row), v_d(static_cast<std::size_t>(B) * Sk * k_row);
    ASSERT_TRUE(k_d.ptr && v_d.ptr);
    if (c.packed) {
      std::vector<uint16_t> kb(static_cast<std::size_t>(B) * Sk * k_row, 0xffff), vb = kb;
      for (int b = 0; b < B; ++b)
        for (int64_t j = 0; j < Sk; ++j)
          for (int e = 0; e < Hkv * D; ++e) {
            kb[(b * Sk + j) * k_row + e] = bits_of(c.dtype, kc[((b * Sk + j) * Hkv) * D + e]);
            vb[(b * Sk + j) * k_row + e] = bits_of(c.dtype, vc[((b * Sk + j) * Hkv) * D + e]);
          }
      CUDA_OK(cudaMemcpy(k_d.ptr, kb.data(), kb.size() * 2, cudaMemcpyHostToDevice));
      CUDA_OK(cudaMemcpy(v_d.ptr, vb.data(), vb.size() * 2, cudaMemcpyHostToDevice));
    } else {
      CUDA_OK(upload_bits(kc, k_d.ptr));
      CUDA_OK(upload_bits(vc, v_d.ptr));
    }
    // kAdd: the accumulators start from random values (the step adds); kStore: from NaN, kFinal: the
    // 16-bit outputs from NaN (a step that read them or left a row unwritten shows NaN).
    std::vector<float> dk0(kc.size()), dv0(kc.size());
    for (auto& x : dk0) x = c.write == DkvWrite::kAdd ? init(rng) : std::numeric_limits<float>::quiet_NaN();
    for (auto& x : dv0) x = c.write == DkvWrite::kAdd ? init(rng) : std::numeric_limits<float>::quiet_NaN();
    DeviceBuf<float> dk_d(kc.size()), dv_d(kc.size());
    DeviceBuf<uint16_t> dk16_d(kc.size()), dv16_d(kc.size());
    ASSERT_TRUE(dk_d.ptr && dv_d.ptr && dk16_d.ptr && dv16_d.ptr);
    CUDA_OK(cudaMemcpy(dk_d.ptr, dk0.data(), dk0.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(dv_d.ptr, dv0.data(), dv0.size() * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemset(dk16_d.ptr, 0xff, kc.size() * 2));
    CUDA_OK(cudaMemset(dv16_d.ptr, 0xff, kc.size() * 2));
    p.seq_k = static_cast<int>(Sk);
    p.k = k_d.ptr;
    p.v = v_d.ptr;
    p.k_batch_stride = p.v_batch_stride = Sk * k_row;
    p.k_row_stride = p.v_row_stride = k_row;
    p.k_head_stride = p.v_head_stride = D;
    p.dkv_write = c.write;
    p.dk_accum = dk_d.ptr;
    p.dv_accum = dv_d.ptr;
    p.dk_out = dk16_d.ptr;
    p.dv_out = dv16_d.ptr;
    p.dk_batch_stride = p.dv_batch_stride = Sk * Hkv * D;
    p.dk_row_stride = p.dv_row_stride = Hkv * D;
    p.dk_head_stride = p.dv_head_stride = D;
    flash_bwd_step(p, q_pos, kp, stream);
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaGetLastError());
    std::vector<float> dkh(kc.size()), dvh(kc.size());
    if (c.write == DkvWrite::kFinal) {
      std::vector<uint16_t> kb(kc.size()), vb(kc.size());
      CUDA_OK(cudaMemcpy(kb.data(), dk16_d.ptr, kb.size() * 2, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(vb.data(), dv16_d.ptr, vb.size() * 2, cudaMemcpyDeviceToHost));
      for (std::size_t i = 0; i < kb.size(); ++i) {
        dkh[i] = static_cast<float>(from_bits(c.dtype, kb[i]));
        dvh[i] = static_cast<float>(from_bits(c.dtype, vb[i]));
      }
    } else {
      CUDA_OK(cudaMemcpy(dkh.data(), dk_d.ptr, dkh.size() * 4, cudaMemcpyDeviceToHost));
      CUDA_OK(cudaMemcpy(dvh.data(), dv_d.ptr, dvh.size() * 4, cudaMemcpyDeviceToHost));
    }
    const bool add = c.write == DkvWrite::kAdd;
    for (int b = 0; b < B; ++b)
      for (int64_t j = 0; j < Sk; ++j)
        for (int e = 0; e < Hkv * D; ++e) {
          const std::size_t l = ((b * Sk + j) * Hkv) * D + e, g = ((b * S + kp.at(j)) * Hkv) * D + e;
          gpu_dk[g] = static_cast<double>(dkh[l]) - (add ? dk0[l] : 0.0);
          gpu_dv[g] = static_cast<double>(dvh[l]) - (add ? dv0[l] : 0.0);
        }
  }
  flash_bwd_finalize(p, stream);
  CUDA_OK(cudaStreamSynchronize(stream));
  std::vector<uint16_t> dqb(q_loc.size());
  CUDA_OK(cudaMemcpy(dqb.data(), dq_d.ptr, dqb.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<double> gpu_dq(dqb.size());
  for (std::size_t i = 0; i < dqb.size(); ++i) gpu_dq[i] = from_bits(c.dtype, dqb[i]);
  CUDA_OK(cudaStreamDestroy(stream));

  // The dK/dV subtraction of the random start loses a little: allow fp32 rounding of |start| ~ 1.
  const struct {
    const char* name;
    const std::vector<double>& gpu;
    const std::vector<double>& plain;
    const std::vector<double>& exact;
  } outs[] = {{"dq", gpu_dq, em_dq, ex_dq}, {"dk", gpu_dk, em_dk, ex_dk}, {"dv", gpu_dv, em_dv, ex_dv}};
  for (const auto& o : outs) {
    const double plain = rel_err(o.plain, o.exact);
    const double err = rel_err(o.gpu, o.exact);
    const double tol = 2.0 * plain + 0.25 * ulp(c.dtype);
    std::printf("[ %-28s ] %s (%s): gpu err %.3e, plain %s err %.3e, tol %.3e\n", c.name, o.name,
                flash_bwd_uses_wgmma(D) ? "wgmma" : "mma", err, dtype_name(c.dtype), plain, tol);
    EXPECT_LE(err, tol) << o.name << " of " << c.name;
  }
}

const Case kCases[] = {
    {"Bwd_whole_bf16_d64_causal_gqa", DType::kBF16, 2, 4, 2, 64, 200, true, Layout::kContiguous, 1, 0},
    {"Bwd_whole_bf16_d128_full_packed", DType::kBF16, 1, 2, 2, 128, 257, false, Layout::kContiguous, 1, 0, true},
    {"Bwd_whole_fp16_d128_causal_mqa", DType::kF16, 1, 4, 1, 128, 130, true, Layout::kContiguous, 1, 0},
    {"Bwd_whole_fp16_d64_full_short", DType::kF16, 2, 2, 2, 64, 77, false, Layout::kContiguous, 1, 0},
    {"Bwd_whole_bf16_d128_causal_long", DType::kBF16, 1, 2, 1, 128, 1000, true, Layout::kContiguous, 1, 0},
    {"Bwd_zigzag4_bf16_d128_causal", DType::kBF16, 1, 4, 2, 128, 320, true, Layout::kZigzag, 4, 1},
    {"Bwd_zigzag2_fp16_d64_causal", DType::kF16, 2, 2, 1, 64, 276, true, Layout::kZigzag, 2, 0},
    {"Bwd_striped3_fp16_d64_causal", DType::kF16, 2, 4, 2, 64, 210, true, Layout::kStriped, 3, 2},
    {"Bwd_striped2_bf16_d128_causal", DType::kBF16, 1, 2, 2, 128, 300, true, Layout::kStriped, 2, 1},
    {"Bwd_contig2_bf16_d64_full", DType::kBF16, 1, 2, 2, 64, 258, false, Layout::kContiguous, 2, 1},
    {"Bwd_contig3_bf16_d128_causal", DType::kBF16, 1, 2, 1, 128, 390, true, Layout::kContiguous, 3, 1},
    {"Bwd_zigzag2_bf16_d64_hidden_rows", DType::kBF16, 2, 2, 2, 64, 264, true, Layout::kZigzag, 2, 1, false, true},
    // head_dim 128 cases for the wgmma kernel (RINGATTN_BWD_KERNEL=wgmma, the default on sm_90a).
    {"Bwd_whole_fp16_d128_full_gqa_b2", DType::kF16, 2, 4, 2, 128, 333, false, Layout::kContiguous, 1, 0},
    {"Bwd_zigzag2_bf16_d128_hidden_rows", DType::kBF16, 1, 2, 2, 128, 264, true, Layout::kZigzag, 2, 1, false, true},
    {"Bwd_contig2_fp16_d128_full_packed", DType::kF16, 1, 2, 1, 128, 300, false, Layout::kContiguous, 2, 0, true},
    // Steps that store (kStore: the ring's shares) or round into the gradients (kFinal: one rank),
    // over NaN: chunks no query sees (contig3 rank 0: chunks 1, 2), partly visible tiles, hidden rows.
    {"Bwd_contig3_bf16_d128_causal_store", DType::kBF16, 1, 2, 1, 128, 390, true, Layout::kContiguous, 3, 0, false,
     false, DkvWrite::kStore},
    {"Bwd_zigzag4_bf16_d128_causal_store", DType::kBF16, 1, 4, 2, 128, 320, true, Layout::kZigzag, 4, 1, false, false,
     DkvWrite::kStore},
    {"Bwd_zigzag2_fp16_d64_hidden_store", DType::kF16, 2, 2, 1, 64, 264, true, Layout::kZigzag, 2, 1, false, true,
     DkvWrite::kStore},
    {"Bwd_whole_bf16_d128_causal_final", DType::kBF16, 1, 2, 1, 128, 1000, true, Layout::kContiguous, 1, 0, false,
     false, DkvWrite::kFinal},
    {"Bwd_whole_fp16_d128_full_gqa_final", DType::kF16, 2, 4, 2, 128, 333, false, Layout::kContiguous, 1, 0, false,
     false, DkvWrite::kFinal},
    {"Bwd_whole_bf16_d64_causal_final", DType::kBF16, 2, 4, 2, 64, 200, true, Layout::kContiguous, 1, 0, false, false,
     DkvWrite::kFinal},
    {"Bwd_contig3_bf16_d64_causal_final", DType::kBF16, 1, 2, 2, 64, 390, true, Layout::kContiguous, 3, 0, false, false,
     DkvWrite::kFinal},
};

// gtest prints a parameter with PrintTo (else as raw bytes: pointers and padding).
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

INSTANTIATE_TEST_SUITE_P(FlashBwd, FlashBwdTest, ::testing::ValuesIn(kCases),
                         [](const ::testing::TestParamInfo<Case>& info) { return std::string(info.param.name); });

// flash_bwd_accumulate or flash_bwd_fold (both dst += src, src untouched) over n elements at
// an aligned (vectorised when n allows) and an unaligned (scalar) offset; the elements around the
// range stay as they were. fold_blocks caps the fold's grid (0: none).
void check_accumulate(bool fold, int64_t n, unsigned fold_blocks = 0) {
  std::vector<float> a(n + 8), b(n + 8);
  std::mt19937 rng(fold ? 5 : 3);
  std::uniform_real_distribution<float> u(-2.f, 2.f);
  for (auto& x : a) x = u(rng);
  for (auto& x : b) x = u(rng);
  DeviceBuf<float> da(n + 8), db(n + 8);
  ASSERT_TRUE(da.ptr && db.ptr);
  for (const int offset : {0, 1}) {  // 1: not 16-byte aligned, scalar path
    CUDA_OK(cudaMemcpy(da.ptr, a.data(), (n + 8) * 4, cudaMemcpyHostToDevice));
    CUDA_OK(cudaMemcpy(db.ptr, b.data(), (n + 8) * 4, cudaMemcpyHostToDevice));
    if (fold) {
      flash_bwd_fold(da.ptr + offset, db.ptr + offset, n, fold_blocks, nullptr);
    } else {
      flash_bwd_accumulate(da.ptr + offset, db.ptr + offset, n, nullptr);
    }
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<float> r(n + 8), rs(n + 8);
    CUDA_OK(cudaMemcpy(r.data(), da.ptr, (n + 8) * 4, cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(rs.data(), db.ptr, (n + 8) * 4, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < n + 8; ++i) {
      const bool inside = i >= offset && i < offset + n;
      ASSERT_EQ(r[i], inside ? a[i] + b[i] : a[i]) << "dst element " << i << " offset " << offset;
      ASSERT_EQ(rs[i], b[i]) << "src element " << i << " offset " << offset;
    }
  }
}

TEST(FlashBwdAccumulate, AddsInPlace) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible: GPU accumulate test skipped";
  check_accumulate(false, 100003);
}

TEST(FlashBwdFold, AddsAndLeavesTheSource) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible: GPU fold test skipped";
  check_accumulate(true, 100003);  // scalar path
  check_accumulate(true, 100000);  // float4 path (aligned offset), unrolled grid-stride
  check_accumulate(true, 100000, 3);  // a capped grid: many strides per thread
}

// flash_bwd_cast_sum: dst = round(a + b), bf16 and fp16, vectorised and scalar paths, odd length,
// against the host's round-to-nearest-even of the fp32 sum; the 16-bit words past n stay untouched.
TEST(FlashBwdCastSum, RoundsTheSumOnce) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible: GPU cast_sum test skipped";
  const int64_t n = 100003;
  std::vector<float> a(n + 8), b(n + 8);
  std::mt19937 rng(4);
  std::uniform_real_distribution<float> u(-3.f, 3.f);
  for (auto& x : a) x = u(rng);
  for (auto& x : b) x = u(rng);
  DeviceBuf<float> da(n + 8), db(n + 8);
  DeviceBuf<uint16_t> dd(n + 8);
  ASSERT_TRUE(da.ptr && db.ptr && dd.ptr);
  CUDA_OK(cudaMemcpy(da.ptr, a.data(), (n + 8) * 4, cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(db.ptr, b.data(), (n + 8) * 4, cudaMemcpyHostToDevice));
  constexpr uint16_t kPoison = 0x7fff;
  for (const DType dt : {DType::kBF16, DType::kF16}) {
    for (const int offset : {0, 1}) {  // 1: not aligned, scalar path
      std::vector<uint16_t> fill(n + 8, kPoison);
      CUDA_OK(cudaMemcpy(dd.ptr, fill.data(), (n + 8) * 2, cudaMemcpyHostToDevice));
      flash_bwd_cast_sum(da.ptr + offset, db.ptr + offset, dd.ptr + offset, dt, n, nullptr);
      CUDA_OK(cudaDeviceSynchronize());
      std::vector<uint16_t> r(n + 8);
      CUDA_OK(cudaMemcpy(r.data(), dd.ptr, (n + 8) * 2, cudaMemcpyDeviceToHost));
      for (int64_t i = 0; i < n + 8; ++i) {
        const bool inside = i >= offset && i < offset + n;
        const uint16_t want = inside ? bits_of(dt, a[i] + b[i]) : kPoison;
        ASSERT_EQ(r[i], want) << dtype_name(dt) << " element " << i << " offset " << offset;
      }
    }
  }
}

// Speed of one whole-sequence backward (preprocess + step + finalize) on one GPU; not part of the suite.
// Run: ringattn_gpu_tests --gtest_also_run_disabled_tests --gtest_filter='FlashBwdBench.*'
// Env: RINGATTN_BWD_BENCH_SEQ (16384), RINGATTN_BWD_BENCH_HEADS (32), RINGATTN_BWD_BENCH_DIM (128),
// RINGATTN_BWD_BENCH_ITERS (5). FLOPs: backward = 2.5 x forward, forward = 4 B S^2 H d (half when causal).
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoi(v) : fallback;
}

TEST(FlashBwdBench, DISABLED_Speed) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device visible: backward bench skipped";
  const int S = env_int("RINGATTN_BWD_BENCH_SEQ", 16384), H = env_int("RINGATTN_BWD_BENCH_HEADS", 32);
  const int D = env_int("RINGATTN_BWD_BENCH_DIM", 128), iters = env_int("RINGATTN_BWD_BENCH_ITERS", 5);
  const int B = 1;
  const std::size_t n = static_cast<std::size_t>(B) * S * H * D;
  std::vector<uint16_t> host(n);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  DeviceBuf<uint16_t> q(n), k(n), v(n), o(n), dout(n), dq(n);
  DeviceBuf<float> lse(static_cast<std::size_t>(B) * H * S), dq_acc(flash_bwd_dq_accum_bytes(B, H, D, S) / 4),
      dk_acc(n), dv_acc(n),
      lse2(flash_bwd_row_vector_bytes(B, H, S) / 4), delta(flash_bwd_row_vector_bytes(B, H, S) / 4);
  ASSERT_TRUE(q.ptr && k.ptr && v.ptr && o.ptr && dout.ptr && dq.ptr && lse.ptr && dq_acc.ptr && dk_acc.ptr &&
              dv_acc.ptr && lse2.ptr && delta.ptr);
  for (uint16_t* dst : {q.ptr, k.ptr, v.ptr, o.ptr, dout.ptr}) {
    for (auto& x : host) x = float_to_bf16(u(rng));
    CUDA_OK(cudaMemcpy(dst, host.data(), n * 2, cudaMemcpyHostToDevice));
  }
  {
    std::vector<float> l(static_cast<std::size_t>(B) * H * S, std::log(static_cast<float>(S)));
    CUDA_OK(cudaMemcpy(lse.ptr, l.data(), l.size() * 4, cudaMemcpyHostToDevice));
  }
  CUDA_OK(cudaMemset(dk_acc.ptr, 0, n * 4));
  CUDA_OK(cudaMemset(dv_acc.ptr, 0, n * 4));
  FlashBwdParams p;
  p.dtype = DType::kBF16;
  p.batch = B;
  p.heads = p.kv_heads = H;
  p.head_dim = D;
  p.seq_q = p.seq_k = S;
  p.scale = 1.f / std::sqrt(static_cast<float>(D));
  p.q = q.ptr;
  p.k = k.ptr;
  p.v = v.ptr;
  p.out = o.ptr;
  p.dout = dout.ptr;
  p.dq = dq.ptr;
  p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.out_batch_stride = p.dout_batch_stride =
      p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = static_cast<int64_t>(S) * H * D;
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.out_row_stride = p.dout_row_stride = p.dq_row_stride =
      p.dk_row_stride = p.dv_row_stride = static_cast<int64_t>(H) * D;
  p.q_head_stride = p.k_head_stride = p.v_head_stride = p.out_head_stride = p.dout_head_stride =
      p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = D;
  p.lse = lse.ptr;
  p.lse_batch_stride = static_cast<int64_t>(H) * S;
  p.lse_head_stride = S;
  p.lse_row_stride = 1;
  p.dk_accum = dk_acc.ptr;
  p.dv_accum = dv_acc.ptr;
  p.dq_accum = dq_acc.ptr;
  p.lse_log2 = lse2.ptr;
  p.delta = delta.ptr;
  const ChunkPositions pos = identity_positions(S);
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreate(&stream));
  cudaEvent_t e0, e1, e2, e3;
  for (cudaEvent_t* e : {&e0, &e1, &e2, &e3}) CUDA_OK(cudaEventCreate(e));
  for (const bool causal : {false, true}) {
    p.causal = causal;
    std::vector<float> total_ms, step_ms;
    for (int it = 0; it < iters + 1; ++it) {
      CUDA_OK(cudaEventRecord(e0, stream));
      flash_bwd_preprocess(p, stream);
      CUDA_OK(cudaEventRecord(e1, stream));
      flash_bwd_step(p, pos, pos, stream);
      CUDA_OK(cudaEventRecord(e2, stream));
      flash_bwd_finalize(p, stream);
      CUDA_OK(cudaEventRecord(e3, stream));
      CUDA_OK(cudaEventSynchronize(e3));
      float t = 0, st = 0;
      CUDA_OK(cudaEventElapsedTime(&t, e0, e3));
      CUDA_OK(cudaEventElapsedTime(&st, e1, e2));
      if (it > 0) {  // the first run is the warm-up
        total_ms.push_back(t);
        step_ms.push_back(st);
      }
    }
    std::sort(total_ms.begin(), total_ms.end());
    std::sort(step_ms.begin(), step_ms.end());
    const double t = total_ms[total_ms.size() / 2], st = step_ms[step_ms.size() / 2];
    const double flops = 2.5 * 4.0 * B * static_cast<double>(S) * S * H * D * (causal ? 0.5 : 1.0);
    std::printf("BWD-BENCH bf16 B=%d S=%d H=%d D=%d causal=%d : backward %.3f ms (step %.3f ms) %.1f TFLOP/s "
                "(step alone %.1f)\n",
                B, S, H, D, causal ? 1 : 0, t, st, flops / (t * 1e-3) / 1e12, flops / (st * 1e-3) / 1e12);
  }
  std::vector<uint16_t> check(n);
  CUDA_OK(cudaMemcpy(check.data(), dq.ptr, n * 2, cudaMemcpyDeviceToHost));
  std::size_t bad = 0;
  for (uint16_t b : check) bad += std::isfinite(bf16_to_float(b)) ? 0 : 1;
  EXPECT_EQ(bad, 0u) << "non-finite dQ values in the bench run";
  for (cudaEvent_t e : {e0, e1, e2, e3}) cudaEventDestroy(e);
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace ringattn
