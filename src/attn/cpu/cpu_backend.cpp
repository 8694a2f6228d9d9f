// CpuBackend: blockwise online-softmax attention (forward and backward) on the host in fp64 or fp32.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "ringattn/backend.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr int64_t kTileQ = 32;  // query rows per tile
constexpr int64_t kTileK = 64;  // key rows per tile

// Widens a host tensor of any dtype into a contiguous T buffer.
// max that keeps a NaN (std::max(m, NaN) is m): a NaN score must reach the output as NaN, as in
// the reference, not leave the row looking fully masked (out = 0, lse = -inf).
template <typename T>
T nan_max(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

template <typename T>
void widen(const TensorView& src, std::vector<T>& dst) {
  const int64_t n = src.numel();
  dst.resize(static_cast<std::size_t>(n));
  if (n == 0) return;  // a zero-size view may have no data pointer: memcpy(_, nullptr, 0) is undefined
  if (src.dtype == DType::kF32 && std::is_same_v<T, float>) {
    std::memcpy(dst.data(), src.data, n * sizeof(float));
  } else if (src.dtype == DType::kF64 && std::is_same_v<T, double>) {
    std::memcpy(dst.data(), src.data, n * sizeof(double));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(load_as_double(src, i));
  }
}

std::vector<int64_t> expand_positions(const ChunkPositions& p) {
  std::vector<int64_t> out(static_cast<std::size_t>(p.size()));
  for (int64_t i = 0; i < p.size(); ++i) out[i] = p.at(i);
  return out;
}

template <typename T>
class CpuEngine {
 public:
  void prepare(const AttentionSpec& spec, int64_t q_rows, int64_t k_rows) {
    spec_ = spec;
    mask_ = spec_.mask.view();  // points into spec_'s document offsets
    B_ = spec.batch;
    H_ = spec.heads;
    Hkv_ = spec.effective_kv_heads();
    D_ = spec.head_dim;
    Sq_ = q_rows;
    (void)k_rows;  // each step takes its rows from the K/V it is given
    const auto q_elems = static_cast<std::size_t>(B_ * Sq_ * H_ * D_);
    acc_.assign(q_elems, T(0));
    m_.assign(static_cast<std::size_t>(B_ * H_ * Sq_), T(0));
    l_.assign(m_.size(), T(0));
  }

  void forward_begin(const TensorView& q, const ChunkPositions& q_pos) {
    widen(q, q_);
    q_pos_ = q_pos;
    q_abs_ = expand_positions(q_pos);
    std::fill(acc_.begin(), acc_.end(), T(0));
    std::fill(m_.begin(), m_.end(), -std::numeric_limits<T>::infinity());
    std::fill(l_.begin(), l_.end(), T(0));
  }

  void forward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos) {
    const int64_t Sk = rows_of(k, k_pos, "k");
    widen(k, k_);
    widen(v, v_);
    const std::vector<int64_t> k_abs = expand_positions(k_pos);
    const T scale = static_cast<T>(spec_.scale());
    const int64_t group = H_ / Hkv_;
    std::vector<T> s(kTileK);
    for (int64_t b = 0; b < B_; ++b) {
      for (int64_t h = 0; h < H_; ++h) {
        const int64_t hk = h / group;
        const bool patterned = mask_.patterned_head(static_cast<int>(h));
        for (int64_t i0 = 0; i0 < Sq_; i0 += kTileQ) {
          const int64_t i1 = std::min(Sq_, i0 + kTileQ);
          for (int64_t j0 = 0; j0 < Sk; j0 += kTileK) {
            const int64_t j1 = std::min(Sk, j0 + kTileK);
            const Visibility vis = tile_visibility(patterned, q_abs_, i0, i1, k_abs, j0, j1);
            if (vis == Visibility::kEmpty) continue;
            for (int64_t i = i0; i < i1; ++i) {
              const T* qr = &q_[((b * Sq_ + i) * H_ + h) * D_];
              T tile_max = -std::numeric_limits<T>::infinity();
              for (int64_t j = j0; j < j1; ++j) {
                if (vis == Visibility::kPartial && !visible(mask_, q_abs_[i], k_abs[j], patterned)) {
                  s[j - j0] = -std::numeric_limits<T>::infinity();
                  continue;
                }
                const T* kr = &k_[((b * Sk + j) * Hkv_ + hk) * D_];
                T dot = 0;
                for (int64_t d = 0; d < D_; ++d) dot += qr[d] * kr[d];
                s[j - j0] = dot * scale;
                tile_max = nan_max(tile_max, s[j - j0]);
              }
              if (tile_max == -std::numeric_limits<T>::infinity()) continue;
              const std::size_t row = static_cast<std::size_t>((b * H_ + h) * Sq_ + i);
              const T m_new = nan_max(m_[row], tile_max);
              const T correction = std::exp(m_[row] - m_new);  // exp(-inf) = 0 for a fresh row
              T* acc = &acc_[((b * Sq_ + i) * H_ + h) * D_];
              for (int64_t d = 0; d < D_; ++d) acc[d] *= correction;
              T sum = 0;
              for (int64_t j = j0; j < j1; ++j) {
                if (s[j - j0] == -std::numeric_limits<T>::infinity()) continue;
                const T p = std::exp(s[j - j0] - m_new);
                sum += p;
                const T* vr = &v_[((b * Sk + j) * Hkv_ + hk) * D_];
                for (int64_t d = 0; d < D_; ++d) acc[d] += p * vr[d];
              }
              l_[row] = l_[row] * correction + sum;
              m_[row] = m_new;
            }
          }
        }
      }
    }
  }

  void forward_end(const TensorView& out, const TensorView& lse) {
    for (int64_t b = 0; b < B_; ++b) {
      for (int64_t h = 0; h < H_; ++h) {
        for (int64_t i = 0; i < Sq_; ++i) {
          const std::size_t row = static_cast<std::size_t>((b * H_ + h) * Sq_ + i);
          const bool empty = l_[row] == T(0);
          const int64_t o = ((b * Sq_ + i) * H_ + h) * D_;
          for (int64_t d = 0; d < D_; ++d) {
            store_from_double(out, o + d, empty ? 0.0 : static_cast<double>(acc_[o + d] / l_[row]));
          }
          store_from_double(lse, static_cast<int64_t>(row),
                            empty ? -std::numeric_limits<double>::infinity()
                                  : static_cast<double>(m_[row] + std::log(l_[row])));
        }
      }
    }
  }

  void backward_begin(const TensorView& q, const TensorView& out, const TensorView& dout, const TensorView& lse,
                      const ChunkPositions& q_pos) {
    widen(q, q_);
    widen(dout, do_);
    widen(lse, lse_);
    std::vector<T> o;
    widen(out, o);
    q_pos_ = q_pos;
    q_abs_ = expand_positions(q_pos);
    delta_.assign(static_cast<std::size_t>(B_ * H_ * Sq_), T(0));
    for (int64_t b = 0; b < B_; ++b) {
      for (int64_t h = 0; h < H_; ++h) {
        for (int64_t i = 0; i < Sq_; ++i) {
          const int64_t base = ((b * Sq_ + i) * H_ + h) * D_;
          T sum = 0;
          for (int64_t d = 0; d < D_; ++d) sum += do_[base + d] * o[base + d];
          delta_[(b * H_ + h) * Sq_ + i] = sum;
        }
      }
    }
    std::fill(acc_.begin(), acc_.end(), T(0));  // dQ accumulator
  }

  void backward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos, const TensorView& dk,
                     const TensorView& dv) {
    const int64_t Sk = rows_of(k, k_pos, "k");
    RINGATTN_CHECK(dk.numel() == k.numel() && dv.numel() == k.numel(), ErrorKind::kInternal,
                   "dK/dV accumulators " + dk.describe() + " do not match k " + k.describe(), "");
    widen(k, k_);
    widen(v, v_);
    T* dk_acc = static_cast<T*>(dk.data);
    T* dv_acc = static_cast<T*>(dv.data);
    const std::vector<int64_t> k_abs = expand_positions(k_pos);
    const T scale = static_cast<T>(spec_.scale());
    const int64_t group = H_ / Hkv_;
    for (int64_t b = 0; b < B_; ++b) {
      for (int64_t h = 0; h < H_; ++h) {
        const int64_t hk = h / group;
        const bool patterned = mask_.patterned_head(static_cast<int>(h));
        for (int64_t i0 = 0; i0 < Sq_; i0 += kTileQ) {
          const int64_t i1 = std::min(Sq_, i0 + kTileQ);
          for (int64_t j0 = 0; j0 < Sk; j0 += kTileK) {
            const int64_t j1 = std::min(Sk, j0 + kTileK);
            const Visibility vis = tile_visibility(patterned, q_abs_, i0, i1, k_abs, j0, j1);
            if (vis == Visibility::kEmpty) continue;
            for (int64_t i = i0; i < i1; ++i) {
              const T row_lse = lse_[(b * H_ + h) * Sq_ + i];
              if (row_lse == -std::numeric_limits<T>::infinity()) continue;
              const int64_t qo = ((b * Sq_ + i) * H_ + h) * D_;
              const T* qr = &q_[qo];
              const T* dor = &do_[qo];
              T* dqr = &acc_[qo];
              const T row_delta = delta_[(b * H_ + h) * Sq_ + i];
              for (int64_t j = j0; j < j1; ++j) {
                if (vis == Visibility::kPartial && !visible(mask_, q_abs_[i], k_abs[j], patterned)) continue;
                const int64_t ko = ((b * Sk + j) * Hkv_ + hk) * D_;
                const T* kr = &k_[ko];
                const T* vr = &v_[ko];
                T dot = 0, dp = 0;
                for (int64_t d = 0; d < D_; ++d) {
                  dot += qr[d] * kr[d];
                  dp += dor[d] * vr[d];
                }
                const T p = std::exp(dot * scale - row_lse);
                const T ds = p * (dp - row_delta) * scale;
                for (int64_t d = 0; d < D_; ++d) {
                  dv_acc[ko + d] += p * dor[d];
                  dqr[d] += ds * kr[d];
                  dk_acc[ko + d] += ds * qr[d];
                }
              }
            }
          }
        }
      }
    }
  }

  void backward_end(const TensorView& dq) {
    for (int64_t i = 0; i < static_cast<int64_t>(acc_.size()); ++i) store_from_double(dq, i, acc_[i]);
  }

 private:
  AttentionSpec spec_;
  Mask mask_;
  // The mask's class of rows [i0, i1) x [j0, j1) from the expanded positions (a scan of the tile's
  // rows: the balanced layout's long segment lists would make a per-tile segment walk dominate).
  Visibility tile_visibility(bool patterned, const std::vector<int64_t>& q, int64_t i0, int64_t i1,
                             const std::vector<int64_t>& k, int64_t j0, int64_t j1) const {
    const auto [q_lo, q_hi] = std::minmax_element(q.begin() + i0, q.begin() + i1);
    const auto [k_lo, k_hi] = std::minmax_element(k.begin() + j0, k.begin() + j1);
    return classify(mask_, *q_lo, *q_hi, *k_lo, *k_hi, patterned);
  }
  // Rows of a visiting K/V chunk (or a slice of one): k is (B, Sk, Hkv, D) and k_pos covers Sk rows.
  int64_t rows_of(const TensorView& k, const ChunkPositions& k_pos, const char* what) const {
    const int64_t sk = k.rank == 4 ? k.shape[1] : -1;
    RINGATTN_CHECK(sk >= 0 && k.numel() == B_ * sk * Hkv_ * D_ && k_pos.size() == sk, ErrorKind::kInternal,
                   std::string(what) + " " + k.describe() + " does not match " + std::to_string(k_pos.size()) +
                       " key positions",
                   "");
    return sk;
  }

  int64_t B_ = 0, H_ = 0, Hkv_ = 0, D_ = 0, Sq_ = 0;
  ChunkPositions q_pos_;
  std::vector<int64_t> q_abs_;
  std::vector<T> q_, k_, v_, acc_, m_, l_, do_, lse_, delta_;
};

class CpuBackend final : public Backend {
 public:
  const char* name() const override { return "cpu"; }
  Device device() const override { return Device::kHost; }

  void prepare(const AttentionSpec& spec, int64_t q_rows, int64_t k_rows) override {
    wide_ = spec.dtype == DType::kF64;
    if (wide_) {
      f64_.prepare(spec, q_rows, k_rows);
    } else {
      f32_.prepare(spec, q_rows, k_rows);
    }
  }
  void forward_begin(const TensorView& q, const ChunkPositions& q_pos) override {
    wide_ ? f64_.forward_begin(q, q_pos) : f32_.forward_begin(q, q_pos);
  }
  void forward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos) override {
    wide_ ? f64_.forward_step(k, v, k_pos) : f32_.forward_step(k, v, k_pos);
  }
  void forward_end(const TensorView& out, const TensorView& lse) override {
    wide_ ? f64_.forward_end(out, lse) : f32_.forward_end(out, lse);
  }
  void backward_begin(const TensorView& q, const TensorView& out, const TensorView& dout, const TensorView& lse,
                      const ChunkPositions& q_pos) override {
    wide_ ? f64_.backward_begin(q, out, dout, lse, q_pos) : f32_.backward_begin(q, out, dout, lse, q_pos);
  }
  void backward_step(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos, const TensorView& dk,
                     const TensorView& dv) override {
    const DType acc = wide_ ? DType::kF64 : DType::kF32;
    RINGATTN_CHECK(dk.dtype == acc && dv.dtype == acc, ErrorKind::kInternal, "dK/dV accumulators of wrong dtype", "");
    wide_ ? f64_.backward_step(k, v, k_pos, dk, dv) : f32_.backward_step(k, v, k_pos, dk, dv);
  }
  // 16-bit outputs: the step adds into zeroed fp32 scratch, rounded into dk_out/dv_out once.
  void backward_step_into(const TensorView& k, const TensorView& v, const ChunkPositions& k_pos,
                          const TensorView& dk_out, const TensorView& dv_out) override {
    const DType acc = wide_ ? DType::kF64 : DType::kF32;
    if (dk_out.dtype == acc && dv_out.dtype == acc) {
      Backend::backward_step_into(k, v, k_pos, dk_out, dv_out);
      return;
    }
    RINGATTN_CHECK(dk_out.rank == 4 && dv_out.rank == 4 && dk_out.numel() == dv_out.numel(), ErrorKind::kInternal,
                   "dK/dV outputs " + dk_out.describe() + ", " + dv_out.describe() + " must be (B, Sk, Hkv, D)", "");
    std::vector<float> dk32(static_cast<std::size_t>(dk_out.numel()), 0.f), dv32(dk32.size(), 0.f);
    const auto& sh = dk_out.shape;
    const TensorView dk_acc = make_view(dk32.data(), DType::kF32, Device::kHost, {sh[0], sh[1], sh[2], sh[3]});
    const TensorView dv_acc = make_view(dv32.data(), DType::kF32, Device::kHost, {sh[0], sh[1], sh[2], sh[3]});
    backward_step(k, v, k_pos, dk_acc, dv_acc);
    cast_accumulator(dk_acc, dk_out);
    cast_accumulator(dv_acc, dv_out);
  }
  void backward_end(const TensorView& dq) override { wide_ ? f64_.backward_end(dq) : f32_.backward_end(dq); }

  void cast_accumulator(const TensorView& acc, const TensorView& dst) override {
    for (int64_t i = 0; i < acc.numel(); ++i) store_from_double(dst, i, load_as_double(acc, i));
  }
  void zero(const TensorView& acc) override { std::memset(acc.data, 0, acc.nbytes()); }
  void accumulate(const TensorView& dst, const TensorView& src) override {
    for (int64_t i = 0; i < dst.numel(); ++i) store_from_double(dst, i, load_as_double(dst, i) + load_as_double(src, i));
  }

  void* allocate(std::size_t bytes) override {
    RINGATTN_CHECK(!embedded_, ErrorKind::kInternal,
                   "an embedded ring asked the CPU backend for " + std::to_string(bytes) + " bytes",
                   "every buffer of an embedded pass comes from its workspace (RingAttention::lay_out_workspace)");
    blocks_.emplace_back(new unsigned char[bytes == 0 ? 1 : bytes]());
    return blocks_.back().get();
  }
  void copy(void* dst, const void* src, std::size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);  // zero-size buffers may be null
  }
  int mark() override {
    marks_.push_back(std::chrono::steady_clock::now());
    return static_cast<int>(marks_.size()) - 1;
  }
  std::vector<double> synchronize_and_read_marks() override {
    std::vector<double> ms;
    for (const auto& t : marks_) ms.push_back(std::chrono::duration<double, std::milli>(t - marks_.front()).count());
    return ms;
  }
  void reset_marks() override { marks_.clear(); }
  // Embedded: the ring's buffers come from the caller's workspace; the engines keep their own host
  // vectors (scratch_bytes() is 0).
  void set_embedded(bool on) override { embedded_ = on; }

 private:
  bool embedded_ = false;
  bool wide_ = false;
  CpuEngine<double> f64_;
  CpuEngine<float> f32_;
  std::vector<std::unique_ptr<unsigned char[]>> blocks_;
  std::vector<std::chrono::steady_clock::time_point> marks_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

#ifndef RINGATTN_HAVE_CUDA
std::unique_ptr<Backend> make_cuda_backend(void*) {
  fail(ErrorKind::kInvalidArgument, "this ringattn was built without CUDA, so --backend cuda is unavailable",
       "rebuild with nvcc on PATH (or -DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc), or use --backend cpu");
}
bool cuda_backend_available() { return false; }
#endif

}  // namespace ringattn
