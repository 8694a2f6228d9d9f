// A masked p-rank ring on one GPU (loopback transport, one CudaBackend and stream per rank, one thread
// each): forward + backward through RingAttention against the fp64 reference (reference_visible).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "attn/reference.hpp"
#include "gpu_test_util.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn::test {
namespace {

// Relative to max|ref|, as ring_backward_gpu_test.cpp: bf16 unit roundoff 2^-8 = 3.9e-3.
constexpr double kBf16GradTolerance = 4.0 * 3.9e-3;
constexpr double kBf16OutTolerance = 2.0 * 3.9e-3;
constexpr int64_t kSeq = 512;

double rel_error(const HostTensor& got, const HostTensor& want) {
  double max_ref = 0.0, max_err = 0.0;
  for (int64_t i = 0; i < want.view.numel(); ++i) {
    const double w = load_as_double(want.view, i), g = load_as_double(got.view, i);
    if (std::isinf(w) && std::isinf(g) && (w > 0) == (g > 0)) continue;  // lse of a row that sees nothing
    if (std::isinf(w)) return INFINITY;
    max_ref = std::max(max_ref, std::fabs(w));
    const double d = std::fabs(g - w);
    if (std::isnan(d)) return INFINITY;
    max_err = std::max(max_err, d);
  }
  return max_err / std::max(max_ref, 1e-30);
}

// Runs body(rank) on one thread per rank and rethrows the first failure.
void run_ranks(int world, const std::function<void(int)>& body) {
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        cudaSetDevice(0);
        body(r);
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

MaskSpec window(bool causal, int64_t left, int64_t right) {
  MaskSpec m;
  m.causal = causal;
  m.has_window = true;
  m.window_left = left;
  m.window_right = right;
  return m;
}

struct RingMask {
  const char* name;
  MaskSpec mask;
};

std::vector<RingMask> ring_masks() {
  std::vector<RingMask> out;
  out.push_back({"window_causal_37", window(true, 37, 0)});
  out.push_back({"window_symmetric_50", window(false, 50, 50)});
  MaskSpec m;
  m.causal = true;
  m.stride = 16;
  out.push_back({"stride_16_causal", m});
  m = window(true, 30, 0);
  m.global_tokens = 5;
  out.push_back({"global_5_window_30", m});
  m = MaskSpec{};
  m.causal = true;
  m.doc_offsets = doc_offsets_from_lengths({100, 37, 190, 6, 61, 118}, kSeq);
  out.push_back({"documents_causal", m});
  m = window(true, 20, 0);
  m.stride = 7;
  m.global_tokens = 3;
  m.doc_offsets = doc_offsets_from_lengths({100, 37, 190, 6, 61, 118}, kSeq);
  out.push_back({"documents_window_global_stride", m});
  m = window(true, 25, 0);
  m.mask_heads = 2;
  out.push_back({"mask_heads_window", m});
  return out;
}

// The inputs and the fp64 reference of one spec (the same for every layout and ring size: cached).
struct RingCase {
  HostTensor q, k, v, dout, ro, rl, rdq, rdk, rdv;
  explicit RingCase(const AttentionSpec& spec)
      : q(DType::kBF16, {spec.batch, spec.seq_len, spec.heads, spec.head_dim}),
        k(DType::kBF16, {spec.batch, spec.seq_len, spec.effective_kv_heads(), spec.head_dim}),
        v(DType::kBF16, {spec.batch, spec.seq_len, spec.effective_kv_heads(), spec.head_dim}),
        dout(DType::kBF16, {spec.batch, spec.seq_len, spec.heads, spec.head_dim}),
        ro(DType::kF64, {spec.batch, spec.seq_len, spec.heads, spec.head_dim}),
        rl(DType::kF64, {spec.batch, spec.heads, spec.seq_len}),
        rdq(DType::kF64, {spec.batch, spec.seq_len, spec.heads, spec.head_dim}),
        rdk(DType::kF64, {spec.batch, spec.seq_len, spec.effective_kv_heads(), spec.head_dim}),
        rdv(DType::kF64, {spec.batch, spec.seq_len, spec.effective_kv_heads(), spec.head_dim}) {
    std::mt19937 rng(static_cast<unsigned>(spec.seq_len + spec.head_dim));
    fill_normal(q, rng);
    fill_normal(k, rng);
    fill_normal(v, rng);
    fill_normal(dout, rng);
    const ChunkPositions all = identity_positions(spec.seq_len);
    reference_attention(spec, q.view, all, k.view, v.view, all, ro.view, rl.view);
    reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rdq.view, rdk.view, rdv.view);
  }
};
const RingCase& ring_case(const AttentionSpec& spec) {
  static std::map<std::string, std::unique_ptr<RingCase>> cache;
  std::string key = spec.mask.describe() + " d" + std::to_string(spec.head_dim) + " S" + std::to_string(spec.seq_len);
  for (int64_t o : spec.mask.doc_offsets) key += " " + std::to_string(o);
  auto& slot = cache[key];
  if (!slot) slot = std::make_unique<RingCase>(spec);
  return *slot;
}

// Forward and backward of `spec` on `world` ranks of one GPU against the global fp64 reference.
void check_ring(const AttentionSpec& spec, int world, const std::string& what) {
  const int64_t B = spec.batch, H = spec.heads, Hkv = spec.effective_kv_heads(), D = spec.head_dim;
  const RingCase& rc = ring_case(spec);
  const HostTensor &q = rc.q, &k = rc.k, &v = rc.v, &dout = rc.dout, &ro = rc.ro, &rl = rc.rl;
  const HostTensor &rdq = rc.rdq, &rdk = rc.rdk, &rdv = rc.rdv;

  std::vector<cudaStream_t> streams(static_cast<std::size_t>(world));
  std::vector<void*> stream_ptrs;
  for (auto& s : streams) {
    ASSERT_EQ(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), cudaSuccess);
    stream_ptrs.push_back(s);
  }
  auto transports = make_loopback_transports(world, stream_ptrs);
  run_ranks(world, [&](int r) {
    RingAttention ring(spec, make_cuda_backend(stream_ptrs[static_cast<std::size_t>(r)]),
                       std::move(transports[static_cast<std::size_t>(r)]));
    const int64_t n = ring.local_seq();
    const ChunkPositions pos = ring.positions();
    auto shard = [&](const HostTensor& g, DType dt, std::initializer_list<int64_t> shape, int seq_dim) {
      HostTensor l(dt, shape);
      shard_rows(g.view, l.view, pos, seq_dim);
      return l;
    };
    const HostTensor lq = shard(q, DType::kBF16, {B, n, H, D}, 1), lk = shard(k, DType::kBF16, {B, n, Hkv, D}, 1);
    const HostTensor lv = shard(v, DType::kBF16, {B, n, Hkv, D}, 1), ldo = shard(dout, DType::kBF16, {B, n, H, D}, 1);
    DeviceTensor d_q(DType::kBF16, {B, n, H, D}), d_k(DType::kBF16, {B, n, Hkv, D}), d_v(DType::kBF16, {B, n, Hkv, D});
    DeviceTensor d_do(DType::kBF16, {B, n, H, D}), d_out(DType::kBF16, {B, n, H, D}), d_lse(DType::kF32, {B, H, n});
    DeviceTensor d_dq(DType::kBF16, {B, n, H, D}), d_dk(DType::kBF16, {B, n, Hkv, D}), d_dv(DType::kBF16, {B, n, Hkv, D});
    d_q.upload(lq);
    d_k.upload(lk);
    d_v.upload(lv);
    d_do.upload(ldo);
    for (DeviceTensor* t : {&d_out, &d_lse, &d_dq, &d_dk, &d_dv}) t->poison();
    ring.forward(d_q.view, d_k.view, d_v.view, d_out.view, d_lse.view);
    ring.backward(d_q.view, d_k.view, d_v.view, d_out.view, d_lse.view, d_do.view, d_dq.view, d_dk.view, d_dv.view);
    ASSERT_EQ(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_ptrs[static_cast<std::size_t>(r)])), cudaSuccess);
    HostTensor out(DType::kBF16, {B, n, H, D}), lse(DType::kF32, {B, H, n}), gdq(DType::kBF16, {B, n, H, D});
    HostTensor gdk(DType::kBF16, {B, n, Hkv, D}), gdv(DType::kBF16, {B, n, Hkv, D});
    d_out.download(out);
    d_lse.download(lse);
    d_dq.download(gdq);
    d_dk.download(gdk);
    d_dv.download(gdv);
    const std::string at = what + " rank " + std::to_string(r) + "/" + std::to_string(world);
    EXPECT_LT(rel_error(out, shard(ro, DType::kF64, {B, n, H, D}, 1)), kBf16OutTolerance) << "out " << at;
    EXPECT_LT(rel_error(lse, shard(rl, DType::kF64, {B, H, n}, 2)), 1e-3) << "lse " << at;
    EXPECT_LT(rel_error(gdq, shard(rdq, DType::kF64, {B, n, H, D}, 1)), kBf16GradTolerance) << "dq " << at;
    EXPECT_LT(rel_error(gdk, shard(rdk, DType::kF64, {B, n, Hkv, D}, 1)), kBf16GradTolerance) << "dk " << at;
    EXPECT_LT(rel_error(gdv, shard(rdv, DType::kF64, {B, n, Hkv, D}, 1)), kBf16GradTolerance) << "dv " << at;
  });
  for (auto& s : streams) cudaStreamDestroy(s);
}

struct RingParam {
  int mask;
  Layout layout;
  int world;
};

class MaskedRingGpu : public ::testing::TestWithParam<RingParam> {};

// Every mask on 2 and 4 ranks, contiguous (direct plans: halos of the needed rows), zigzag (two-run
// chunks) and striped (the neighbour ring); head_dim 128 (the Hopper kernels where they run).
TEST_P(MaskedRingGpu, ForwardBackwardMatchFp64Reference) {
  RINGATTN_SKIP_WITHOUT_GPU();
  const RingParam& rp = GetParam();
  const RingMask m = ring_masks()[static_cast<std::size_t>(rp.mask)];
  AttentionSpec spec;
  spec.batch = 1;
  spec.seq_len = kSeq;
  spec.heads = 4;
  spec.kv_heads = 2;
  spec.head_dim = 128;
  spec.dtype = DType::kBF16;
  spec.layout = rp.layout;
  spec.mask = m.mask;
  check_ring(spec, rp.world, std::string(m.name) + " " + layout_name(rp.layout));
}

std::vector<RingParam> ring_params() {
  std::vector<RingParam> out;
  const int n = static_cast<int>(ring_masks().size());
  for (int m = 0; m < n; ++m)
    for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped})
      for (int world : {2, 4}) out.push_back({m, layout, world});
  return out;
}

INSTANTIATE_TEST_SUITE_P(EveryMask, MaskedRingGpu, ::testing::ValuesIn(ring_params()),
                         [](const ::testing::TestParamInfo<RingParam>& info) {
                           return std::string(ring_masks()[static_cast<std::size_t>(info.param.mask)].name) + "_" +
                                  layout_name(info.param.layout) + "_p" + std::to_string(info.param.world);
                         });

}  // namespace
}  // namespace ringattn::test
