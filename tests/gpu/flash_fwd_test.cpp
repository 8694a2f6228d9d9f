// CudaBackend forward against the fp64 reference: dtypes, head dims, masks, GQA, tails, ring chaining.
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "attn/reference.hpp"
#include "gpu_test_util.hpp"
#include "ringattn/backend.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"

namespace ringattn::test {
namespace {

// Tolerance. The inputs are drawn in the test dtype, so the reference sees exactly the same
// numbers; the kernel then rounds P to the dtype for the P V product and rounds the output once.
// A plain implementation in that precision errs by about one unit roundoff u (2^-8 bf16, 2^-11
// fp16) relative to the output's magnitude; we allow kTolUnits * u * max|ref|.
constexpr double kTolUnits = 4.0;
constexpr double kLseTol = 2e-3;  // lse is fp32 arithmetic on exact products: far below this

double unit_roundoff(DType dtype) { return dtype == DType::kBF16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11); }

struct Case {
  DType dtype = DType::kBF16;
  int64_t batch = 1;
  int heads = 4;
  int kv_heads = 4;
  int head_dim = 128;
  bool causal = false;
  int64_t seq = 256;  // whole sequence (queries and keys)
  Layout layout = Layout::kContiguous;
  int world = 1;  // the K/V sequence is cut into `world` chunks folded one step each
};

std::string describe(const Case& c) {
  return std::string(dtype_name(c.dtype)) + " B" + std::to_string(c.batch) + " H" + std::to_string(c.heads) + "/" +
         std::to_string(c.kv_heads) + " D" + std::to_string(c.head_dim) + (c.causal ? " causal" : " full") + " S" +
         std::to_string(c.seq) + " " + layout_name(c.layout) + " x" + std::to_string(c.world);
}

AttentionSpec spec_of(const Case& c) {
  AttentionSpec s;
  s.batch = c.batch;
  s.seq_len = c.seq;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.mask.causal = c.causal;
  s.layout = c.layout;
  s.dtype = c.dtype;
  return s;
}

// Compares the device result of `rank` with the reference on the whole sequence.
void expect_close(const Case& c, const HostTensor& out, const HostTensor& lse, const HostTensor& ref_out,
                  const HostTensor& ref_lse) {
  double max_ref = 0.0, max_err = 0.0;
  int64_t bad_rows = 0, nan = 0;
  for (int64_t i = 0; i < ref_out.view.numel(); ++i) {
    const double r = load_as_double(ref_out.view, i), g = load_as_double(out.view, i);
    if (!std::isfinite(g)) ++nan;
    max_ref = std::max(max_ref, std::abs(r));
    max_err = std::max(max_err, std::abs(r - g));
  }
  double max_lse_err = 0.0;
  for (int64_t i = 0; i < ref_lse.view.numel(); ++i) {
    const double r = load_as_double(ref_lse.view, i), g = load_as_double(lse.view, i);
    if (std::isinf(r)) {
      if (!(std::isinf(g) && g < 0)) ++bad_rows;
      continue;
    }
    if (!std::isfinite(g)) ++nan;
    max_lse_err = std::max(max_lse_err, std::abs(r - g) / std::max(1.0, std::abs(r)));
  }
  const double tol = kTolUnits * unit_roundoff(c.dtype) * std::max(max_ref, 1e-3);
  EXPECT_EQ(nan, 0) << describe(c) << ": non-finite outputs";
  EXPECT_EQ(bad_rows, 0) << describe(c) << ": rows that see nothing must have lse = -inf";
  EXPECT_LE(max_err, tol) << describe(c) << ": max |out - ref| " << max_err << " (max |ref| " << max_ref << ")";
  EXPECT_LE(max_lse_err, kLseTol) << describe(c) << ": lse error";
}

// Runs every rank's query chunk of case c through the backend, folding the K/V chunks of all
// ranks in ring order, and checks each against the fp64 reference over the whole sequence.
void run_case(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  const int hkv = c.kv_heads;
  HostTensor q(c.dtype, {c.batch, c.seq, c.heads, c.head_dim});
  HostTensor k(c.dtype, {c.batch, c.seq, hkv, c.head_dim});
  HostTensor v(c.dtype, {c.batch, c.seq, hkv, c.head_dim});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  const AttentionSpec spec = spec_of(c);
  const int64_t rows = c.seq / c.world;

  // K/V chunks of every rank, on the device.
  std::vector<std::unique_ptr<DeviceTensor>> dk, dv;
  std::vector<ChunkPositions> kpos;
  for (int s = 0; s < c.world; ++s) {
    const ChunkPositions pos = c.world == 1 ? identity_positions(c.seq) : chunk_positions(c.layout, c.seq, s, c.world);
    HostTensor hk(c.dtype, {c.batch, rows, hkv, c.head_dim}), hv(c.dtype, {c.batch, rows, hkv, c.head_dim});
    shard_rows(k.view, hk.view, pos, 1);
    shard_rows(v.view, hv.view, pos, 1);
    dk.push_back(std::make_unique<DeviceTensor>(c.dtype, std::initializer_list<int64_t>{c.batch, rows, hkv, c.head_dim}));
    dv.push_back(std::make_unique<DeviceTensor>(c.dtype, std::initializer_list<int64_t>{c.batch, rows, hkv, c.head_dim}));
    dk.back()->upload(hk);
    dv.back()->upload(hv);
    kpos.push_back(pos);
  }

  auto backend = make_cuda_backend();
  backend->prepare(spec, rows, rows);
  for (int r = 0; r < c.world; ++r) {
    const ChunkPositions qpos = c.world == 1 ? identity_positions(c.seq) : chunk_positions(c.layout, c.seq, r, c.world);
    HostTensor hq(c.dtype, {c.batch, rows, c.heads, c.head_dim});
    shard_rows(q.view, hq.view, qpos, 1);
    DeviceTensor dq(c.dtype, {c.batch, rows, c.heads, c.head_dim});
    DeviceTensor dout(c.dtype, {c.batch, rows, c.heads, c.head_dim});
    DeviceTensor dlse(DType::kF32, {c.batch, c.heads, rows});
    dq.upload(hq);
    dout.poison();
    dlse.poison();

    backend->forward_begin(dq.view, qpos);
    for (int step = 0; step < c.world; ++step) {
      const int s = (r - step + c.world) % c.world;  // ring order: own chunk first, then from r-1, ...
      backend->forward_step(dk[s]->view, dv[s]->view, kpos[s]);
    }
    backend->forward_end(dout.view, dlse.view);
    RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));

    HostTensor out(c.dtype, {c.batch, rows, c.heads, c.head_dim}), lse(DType::kF32, {c.batch, c.heads, rows});
    dout.download(out);
    dlse.download(lse);
    HostTensor ref_out(DType::kF64, {c.batch, rows, c.heads, c.head_dim}), ref_lse(DType::kF64, {c.batch, c.heads, rows});
    reference_attention(spec, hq.view, qpos, k.view, v.view, identity_positions(c.seq), ref_out.view, ref_lse.view);
    SCOPED_TRACE("rank " + std::to_string(r));
    expect_close(c, out, lse, ref_out, ref_lse);
  }
}

struct Combo {
  DType dtype;
  int head_dim;
  bool causal;
};

// gtest prints a parameter with PrintTo (else as raw bytes, padding included).
void PrintTo(const Combo& c, std::ostream* os) {
  *os << dtype_name(c.dtype) << " d" << c.head_dim << (c.causal ? " causal" : " full");
}

class FlashFwdBasic : public ::testing::TestWithParam<Combo> {};

TEST_P(FlashFwdBasic, MatchesReferenceWithTails) {
  RINGATTN_SKIP_WITHOUT_GPU();
  Case c;
  c.dtype = GetParam().dtype;
  c.head_dim = GetParam().head_dim;
  c.causal = GetParam().causal;
  c.seq = 333;  // not a multiple of any tile
  run_case(c, 1234u + c.head_dim + (c.causal ? 7 : 0));
}

INSTANTIATE_TEST_SUITE_P(DtypesHeadDimsMasks, FlashFwdBasic,
                         ::testing::Values(Combo{DType::kBF16, 64, false}, Combo{DType::kBF16, 64, true},
                                           Combo{DType::kBF16, 128, false}, Combo{DType::kBF16, 128, true},
                                           Combo{DType::kF16, 64, false}, Combo{DType::kF16, 64, true},
                                           Combo{DType::kF16, 128, false}, Combo{DType::kF16, 128, true}),
                         [](const ::testing::TestParamInfo<Combo>& info) {  // e.g. bf16_d128_causal
                           return std::string(dtype_name(info.param.dtype)) + "_d" +
                                  std::to_string(info.param.head_dim) + (info.param.causal ? "_causal" : "_full");
                         });

TEST(FlashFwd, GroupedQueryAttention) {
  RINGATTN_SKIP_WITHOUT_GPU();
  Case c;
  c.heads = 8;
  c.kv_heads = 2;
  c.causal = true;
  c.seq = 333;
  run_case(c, 11u);
}

TEST(FlashFwd, MultiQueryAttention) {
  RINGATTN_SKIP_WITHOUT_GPU();
  Case c;
  c.heads = 4;
  c.kv_heads = 1;
  c.head_dim = 64;
  c.seq = 200;
  run_case(c, 12u);
}

TEST(FlashFwd, BatchTwo) {
  RINGATTN_SKIP_WITHOUT_GPU();
  Case c;
  c.batch = 2;
  c.heads = 2;
  c.kv_heads = 2;
  c.causal = true;
  c.seq = 333;
  run_case(c, 13u);
}

TEST(FlashFwd, ShortSequence) {
  RINGATTN_SKIP_WITHOUT_GPU();
  Case c;
  c.seq = 5;
  c.causal = true;
  run_case(c, 14u);
}

struct RingCase {
  Layout layout;
  bool causal;
  int head_dim;
  DType dtype;
};

void PrintTo(const RingCase& c, std::ostream* os) {
  *os << layout_name(c.layout) << (c.causal ? " causal" : " full") << " d" << c.head_dim << " " << dtype_name(c.dtype);
}

class FlashFwdRing : public ::testing::TestWithParam<RingCase> {};

// Every rank of a 4-rank ring: the step chaining must equal attention over the whole sequence.
TEST_P(FlashFwdRing, ChainedStepsMatchWholeSequence) {
  RINGATTN_SKIP_WITHOUT_GPU();
  Case c;
  c.layout = GetParam().layout;
  c.causal = GetParam().causal;
  c.head_dim = GetParam().head_dim;
  c.dtype = GetParam().dtype;
  c.heads = 4;
  c.kv_heads = 2;
  c.world = 4;
  c.seq = 8 * 88;  // 176 rows per rank: a tail tile in every chunk, zigzag halves of 88
  run_case(c, 21u + static_cast<uint32_t>(c.layout));
}

INSTANTIATE_TEST_SUITE_P(Layouts, FlashFwdRing,
                         ::testing::Values(RingCase{Layout::kContiguous, true, 128, DType::kBF16},
                                           RingCase{Layout::kZigzag, true, 128, DType::kBF16},
                                           RingCase{Layout::kStriped, true, 128, DType::kBF16},
                                           RingCase{Layout::kZigzag, true, 64, DType::kF16},
                                           RingCase{Layout::kStriped, true, 64, DType::kBF16},
                                           RingCase{Layout::kContiguous, false, 128, DType::kF16}),
                         [](const ::testing::TestParamInfo<RingCase>& info) {  // e.g. zigzag_causal_d128_bf16
                           return std::string(layout_name(info.param.layout)) +
                                  (info.param.causal ? "_causal_d" : "_full_d") + std::to_string(info.param.head_dim) +
                                  "_" + dtype_name(info.param.dtype);
                         });

// Both forward kernels (RINGATTN_FWD_KERNEL=mma, and wgmma: the Hopper kernel where it runs, else
// mma.sync again) on cases of several 128-row tiles, so the TMA / mbarrier stages wrap around.
// Sets an environment variable for the scope of a test.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (had_) setenv(name_.c_str(), old_.c_str(), 1);
    else unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_;
  bool had_ = false;
  std::string old_;
};

Case kernel_case(int which) {
  Case c;
  switch (which) {
    case 0: c.seq = 1100; break;                                         // bf16 d128 full, 9 tiles + tail
    case 1: c.seq = 1100; c.causal = true; break;                        // bf16 d128 causal
    case 2: c.seq = 700; c.head_dim = 64; c.dtype = DType::kF16; c.causal = true; break;
    case 3: c.seq = 700; c.head_dim = 64; break;                         // bf16 d64 full
    case 4: c.seq = 600; c.heads = 8; c.kv_heads = 2; c.causal = true; break;  // GQA
    case 5: c.seq = 1200; c.world = 4; c.causal = true; c.layout = Layout::kZigzag; c.kv_heads = 2; break;
    case 6: c.seq = 1200; c.world = 4; c.causal = true; c.layout = Layout::kStriped; c.dtype = DType::kF16; break;
    case 7: c.seq = 300; c.batch = 2; c.heads = 2; c.kv_heads = 2; c.causal = true; break;
    case 8: c.seq = 1024; c.world = 2; c.causal = true; c.head_dim = 64; break;  // contiguous, whole tiles
    default: break;
  }
  return c;
}
constexpr int kKernelCases = 9;

class FlashFwdKernels : public ::testing::TestWithParam<std::tuple<const char*, int>> {};

TEST_P(FlashFwdKernels, MatchReference) {
  RINGATTN_SKIP_WITHOUT_GPU();
  const ScopedEnv kernel("RINGATTN_FWD_KERNEL", std::get<0>(GetParam()));
  const Case c = kernel_case(std::get<1>(GetParam()));
  SCOPED_TRACE(std::string(std::get<0>(GetParam())) + ": " + describe(c));
  run_case(c, 100u + static_cast<uint32_t>(std::get<1>(GetParam())));
}

INSTANTIATE_TEST_SUITE_P(MmaAndWgmma, FlashFwdKernels,
                         ::testing::Combine(::testing::Values("mma", "wgmma"), ::testing::Range(0, kKernelCases)),
                         [](const ::testing::TestParamInfo<FlashFwdKernels::ParamType>& info) {
                           // <kernel>_<case>_<describe(case)>, e.g. wgmma_1_bf16_B1_H4_4_D128_causal_S1100_contiguous_x1
                           std::string name = std::string(std::get<0>(info.param)) + "_" +
                                              std::to_string(std::get<1>(info.param)) + "_" +
                                              describe(kernel_case(std::get<1>(info.param)));
                           for (char& ch : name) {
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           }
                           return name;
                         });

// Block order in sections of 3 (batch, head) pairs out of 8 (a short last section): every query
// tile of every head must still be computed once.
class FlashFwdSections : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

TEST_P(FlashFwdSections, EveryBlockOnce) {
  RINGATTN_SKIP_WITHOUT_GPU();
  const ScopedEnv kernel("RINGATTN_FWD_KERNEL", std::get<0>(GetParam()));
  const ScopedEnv sections("RINGATTN_FWD_SECTION_HEADS", "3");
  Case c;
  c.batch = 2;
  c.heads = 4;
  c.kv_heads = 2;
  c.seq = 600;
  c.causal = std::get<1>(GetParam());
  c.head_dim = c.causal ? 128 : 64;
  run_case(c, 200u + (c.causal ? 1u : 0u));
}

INSTANTIATE_TEST_SUITE_P(MmaAndWgmma, FlashFwdSections,
                         ::testing::Combine(::testing::Values("mma", "wgmma"), ::testing::Bool()),
                         [](const ::testing::TestParamInfo<FlashFwdSections::ParamType>& info) {  // e.g. wgmma_causal
                           return std::string(std::get<0>(info.param)) + (std::get<1>(info.param) ? "_causal" : "_full");
                         });

// Queries at positions 0..99 against keys 50..149 (causal): rows 0..49 see nothing.
TEST(FlashFwd, RowsThatSeeNothing) {
  RINGATTN_SKIP_WITHOUT_GPU();
  constexpr int64_t kRows = 100, kKeyStart = 50, kDim = 64;
  constexpr int kHeads = 2;
  std::mt19937 rng(31);
  AttentionSpec spec;
  spec.heads = kHeads;
  spec.kv_heads = kHeads;
  spec.head_dim = kDim;
  spec.mask.causal = true;
  spec.seq_len = kRows + kKeyStart;
  spec.dtype = DType::kBF16;
  HostTensor q(spec.dtype, {1, kRows, kHeads, kDim}), k(spec.dtype, {1, kRows, kHeads, kDim}),
      v(spec.dtype, {1, kRows, kHeads, kDim});
  fill_normal(q, rng);
  fill_normal(k, rng);
  fill_normal(v, rng);
  ChunkPositions qpos = identity_positions(kRows), kpos;
  kpos.num_segments = 1;
  kpos.seg[0] = {kKeyStart, 1, kRows};
  DeviceTensor dq(spec.dtype, {1, kRows, kHeads, kDim}), dk(spec.dtype, {1, kRows, kHeads, kDim}),
      dv(spec.dtype, {1, kRows, kHeads, kDim}), dout(spec.dtype, {1, kRows, kHeads, kDim}),
      dlse(DType::kF32, {1, kHeads, kRows});
  dq.upload(q);
  dk.upload(k);
  dv.upload(v);
  auto backend = make_cuda_backend();
  backend->prepare(spec, kRows, kRows);

  // Pass 1: the partly visible chunk. Pass 2: a chunk after every query (the step is skipped).
  for (int pass = 0; pass < 2; ++pass) {
    ChunkPositions kp = kpos;
    if (pass == 1) kp.seg[0].start = 1000;
    dout.poison();
    dlse.poison();
    backend->forward_begin(dq.view, qpos);
    backend->forward_step(dk.view, dv.view, kp);
    backend->forward_end(dout.view, dlse.view);
    RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
    HostTensor out(spec.dtype, {1, kRows, kHeads, kDim}), lse(DType::kF32, {1, kHeads, kRows});
    dout.download(out);
    dlse.download(lse);
    HostTensor ref_out(DType::kF64, {1, kRows, kHeads, kDim}), ref_lse(DType::kF64, {1, kHeads, kRows});
    reference_attention(spec, q.view, qpos, k.view, v.view, kp, ref_out.view, ref_lse.view);
    int64_t empty_rows = 0;
    for (int h = 0; h < kHeads; ++h) {
      for (int64_t i = 0; i < kRows; ++i) {
        if (!std::isinf(load_as_double(ref_lse.view, h * kRows + i))) continue;
        ++empty_rows;
        EXPECT_TRUE(std::isinf(lse.view.as<float>()[h * kRows + i]) && lse.view.as<float>()[h * kRows + i] < 0)
            << "pass " << pass << " head " << h << " row " << i;
        for (int64_t d = 0; d < kDim; ++d)
          ASSERT_EQ(load_as_double(out.view, (i * kHeads + h) * kDim + d), 0.0) << "pass " << pass << " row " << i;
      }
    }
    EXPECT_EQ(empty_rows, pass == 0 ? kHeads * kKeyStart : kHeads * kRows);
    Case c;
    c.dtype = spec.dtype;
    expect_close(c, out, lse, ref_out, ref_lse);
  }
}

// forward_step_into (one rank's only step: the kernel writes out and lse) against forward_step then
// forward_end, bit for bit, for the Hopper kernel and the mma.sync kernels (step + finalize inside
// the dispatch), head_dim 64 and 128, causal with every row visible and with rows that see no key.
TEST(FlashFwd, SingleStepWritesWhatFinalizeWrites) {
  RINGATTN_SKIP_WITHOUT_GPU();
  constexpr int64_t kRows = 300;
  constexpr int kHeads = 4, kKvHeads = 2;
  std::mt19937 rng(53);
  for (const char* kernel : {"wgmma", "mma"}) {
    ASSERT_EQ(setenv("RINGATTN_FWD_KERNEL", kernel, 1), 0);
    for (const int64_t dim : {64, 128}) {
      for (const int64_t key_start : {0, 120}) {  // 120: keys at 120..419, rows 0..119 see none
        AttentionSpec spec;
        spec.heads = kHeads;
        spec.kv_heads = kKvHeads;
        spec.head_dim = static_cast<int>(dim);
        spec.mask.causal = true;
        spec.seq_len = kRows + key_start;
        spec.dtype = DType::kBF16;
        HostTensor q(spec.dtype, {1, kRows, kHeads, dim}), k(spec.dtype, {1, kRows, kKvHeads, dim}),
            v(spec.dtype, {1, kRows, kKvHeads, dim});
        fill_normal(q, rng);
        fill_normal(k, rng);
        fill_normal(v, rng);
        DeviceTensor dq(spec.dtype, {1, kRows, kHeads, dim}), dk(spec.dtype, {1, kRows, kKvHeads, dim}),
            dv(spec.dtype, {1, kRows, kKvHeads, dim});
        dq.upload(q);
        dk.upload(k);
        dv.upload(v);
        const ChunkPositions qpos = identity_positions(kRows);
        ChunkPositions kpos;
        kpos.num_segments = 1;
        kpos.seg[0] = {key_start, 1, kRows};
        auto backend = make_cuda_backend();
        backend->prepare(spec, kRows, kRows);
        std::vector<HostTensor> outs, lses;
        for (int path = 0; path < 2; ++path) {
          DeviceTensor dout(spec.dtype, {1, kRows, kHeads, dim}), dlse(DType::kF32, {1, kHeads, kRows});
          dout.poison();
          dlse.poison();
          backend->forward_begin(dq.view, qpos);
          if (path == 0) {
            backend->forward_step(dk.view, dv.view, kpos);
            backend->forward_end(dout.view, dlse.view);
          } else {
            backend->forward_step_into(dk.view, dv.view, kpos, dout.view, dlse.view);
          }
          RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
          outs.emplace_back(spec.dtype, std::initializer_list<int64_t>{1, kRows, kHeads, dim});
          lses.emplace_back(DType::kF32, std::initializer_list<int64_t>{1, kHeads, kRows});
          dout.download(outs.back());
          dlse.download(lses.back());
        }
        const std::string what = std::string(kernel) + " d" + std::to_string(dim) + " keys from " +
                                 std::to_string(key_start);
        ASSERT_EQ(outs[0].bytes, outs[1].bytes) << "out, " << what;
        ASSERT_EQ(lses[0].bytes, lses[1].bytes) << "lse, " << what;
        HostTensor ref_out(DType::kF64, {1, kRows, kHeads, dim}), ref_lse(DType::kF64, {1, kHeads, kRows});
        reference_attention(spec, q.view, qpos, k.view, v.view, kpos, ref_out.view, ref_lse.view);
        Case c;
        c.dtype = spec.dtype;
        expect_close(c, outs[1], lses[1], ref_out, ref_lse);
      }
    }
  }
  unsetenv("RINGATTN_FWD_KERNEL");
}

// q and k as views with a row stride larger than heads * head_dim (e.g. a packed QKV buffer).
TEST(FlashFwd, StridedViews) {
  RINGATTN_SKIP_WITHOUT_GPU();
  constexpr int64_t kRows = 130, kDim = 128, kPack = 3;
  constexpr int kHeads = 2;
  std::mt19937 rng(41);
  AttentionSpec spec;
  spec.heads = kHeads;
  spec.kv_heads = kHeads;
  spec.head_dim = kDim;
  spec.mask.causal = true;
  spec.seq_len = kRows;
  spec.dtype = DType::kBF16;
  HostTensor qkv(spec.dtype, {1, kRows, kPack * kHeads, kDim});
  fill_normal(qkv, rng);
  DeviceTensor dqkv(spec.dtype, {1, kRows, kPack * kHeads, kDim});
  dqkv.upload(qkv);
  auto part = [&](const TensorView& base, int which) {
    TensorView t = base;
    t.shape = {1, kRows, kHeads, kDim};
    t.data = static_cast<char*>(base.data) + which * kHeads * kDim * dtype_size(spec.dtype);
    return t;
  };
  const TensorView q = part(dqkv.view, 0), k = part(dqkv.view, 1), v = part(dqkv.view, 2);
  const TensorView hq = part(qkv.view, 0), hk = part(qkv.view, 1), hv = part(qkv.view, 2);
  DeviceTensor dout(spec.dtype, {1, kRows, kHeads, kDim}), dlse(DType::kF32, {1, kHeads, kRows});
  dout.poison();
  dlse.poison();
  auto backend = make_cuda_backend();
  backend->prepare(spec, kRows, kRows);
  const ChunkPositions pos = identity_positions(kRows);
  backend->forward_begin(q, pos);
  backend->forward_step(k, v, pos);
  backend->forward_end(dout.view, dlse.view);
  RINGATTN_EXPECT_CUDA(cudaStreamSynchronize(static_cast<cudaStream_t>(backend->stream())));
  HostTensor out(spec.dtype, {1, kRows, kHeads, kDim}), lse(DType::kF32, {1, kHeads, kRows});
  dout.download(out);
  dlse.download(lse);
  // The reference reads host views element by element; give it contiguous copies.
  HostTensor cq(spec.dtype, {1, kRows, kHeads, kDim}), ck(spec.dtype, {1, kRows, kHeads, kDim}),
      cv(spec.dtype, {1, kRows, kHeads, kDim});
  const std::size_t row_bytes = kHeads * kDim * dtype_size(spec.dtype);
  for (int64_t i = 0; i < kRows; ++i) {
    std::memcpy(cq.bytes.data() + i * row_bytes, static_cast<char*>(hq.data) + i * hq.stride[1] * 2, row_bytes);
    std::memcpy(ck.bytes.data() + i * row_bytes, static_cast<char*>(hk.data) + i * hk.stride[1] * 2, row_bytes);
    std::memcpy(cv.bytes.data() + i * row_bytes, static_cast<char*>(hv.data) + i * hv.stride[1] * 2, row_bytes);
  }
  HostTensor ref_out(DType::kF64, {1, kRows, kHeads, kDim}), ref_lse(DType::kF64, {1, kHeads, kRows});
  reference_attention(spec, cq.view, pos, ck.view, cv.view, pos, ref_out.view, ref_lse.view);
  Case c;
  expect_close(c, out, lse, ref_out, ref_lse);
}

TEST(CudaBackend, RejectsUnsupportedShapes) {
  RINGATTN_SKIP_WITHOUT_GPU();
  auto backend = make_cuda_backend();
  AttentionSpec spec;
  spec.heads = 2;
  spec.head_dim = 96;
  spec.seq_len = 64;
  spec.dtype = DType::kBF16;
  EXPECT_THROW(backend->prepare(spec, 64, 64), Error);
  spec.head_dim = 64;
  spec.dtype = DType::kF32;
  EXPECT_THROW(backend->prepare(spec, 64, 64), Error);
}

// A CUDA backend prepared for a tiny bf16 problem: enough to call its buffer helpers.
std::unique_ptr<Backend> helper_backend() {
  auto backend = make_cuda_backend();
  AttentionSpec spec;
  spec.heads = 1;
  spec.head_dim = 64;
  spec.seq_len = 16;
  spec.dtype = DType::kBF16;
  backend->prepare(spec, 16, 16);
  return backend;
}

TEST(CudaBackend, MarksAndHelpers) {
  RINGATTN_SKIP_WITHOUT_GPU();
  auto backend = helper_backend();
  constexpr int64_t kN = 1000;
  float* acc = static_cast<float*>(backend->allocate(kN * sizeof(float)));
  float* acc2 = static_cast<float*>(backend->allocate(kN * sizeof(float)));
  void* dst = backend->allocate(kN * 2);
  std::vector<float> host(kN);
  for (int64_t i = 0; i < kN; ++i) host[i] = 0.001f * static_cast<float>(i) - 0.3f;
  RINGATTN_EXPECT_CUDA(cudaMemcpy(acc, host.data(), kN * sizeof(float), cudaMemcpyHostToDevice));
  backend->reset_marks();
  EXPECT_EQ(backend->mark(), 0);
  backend->copy(acc2, acc, kN * sizeof(float));
  backend->cast_accumulator(make_view(acc2, DType::kF32, Device::kCuda, {kN}),
                            make_view(dst, DType::kBF16, Device::kCuda, {kN}));
  EXPECT_EQ(backend->mark(), 1);
  backend->zero(make_view(acc, DType::kF32, Device::kCuda, {kN}));
  const std::vector<double> ms = backend->synchronize_and_read_marks();
  ASSERT_EQ(ms.size(), 2u);
  EXPECT_GE(ms[1], 0.0);
  std::vector<uint16_t> bits(kN);
  std::vector<float> zeros(kN, 1.f);
  RINGATTN_EXPECT_CUDA(cudaMemcpy(bits.data(), dst, kN * 2, cudaMemcpyDeviceToHost));
  RINGATTN_EXPECT_CUDA(cudaMemcpy(zeros.data(), acc, kN * sizeof(float), cudaMemcpyDeviceToHost));
  for (int64_t i = 0; i < kN; ++i) {
    ASSERT_EQ(bits[i], float_to_bf16(host[i])) << i;
    ASSERT_EQ(zeros[i], 0.f) << i;
  }
}

// cast_accumulator at a 16-byte aligned start (eight per thread, then a tail) and at an odd one
// (one by one): every element rounded to nearest even, the 16-bit words around the range untouched.
TEST(CudaBackend, CastRoundsEveryElementOnce) {
  RINGATTN_SKIP_WITHOUT_GPU();
  auto backend = helper_backend();
  constexpr int64_t kCap = 4099;
  float* acc = static_cast<float*>(backend->allocate(kCap * sizeof(float)));
  auto* dst = static_cast<uint16_t*>(backend->allocate(kCap * 2));
  std::vector<float> host(kCap);
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(-40.f, 40.f);
  for (auto& x : host) x = u(rng);
  RINGATTN_EXPECT_CUDA(cudaMemcpy(acc, host.data(), kCap * sizeof(float), cudaMemcpyHostToDevice));
  for (const int64_t offset : {0, 1, 8}) {
    const int64_t n = kCap - 8;
    // The poison goes on the legacy default stream, which does not order the backend's non-blocking
    // stream: wait for it, or the cast may run first and be overwritten.
    RINGATTN_EXPECT_CUDA(cudaMemset(dst, 0xff, kCap * 2));
    RINGATTN_EXPECT_CUDA(cudaDeviceSynchronize());
    backend->cast_accumulator(make_view(acc + offset, DType::kF32, Device::kCuda, {n}),
                              make_view(dst + offset, DType::kBF16, Device::kCuda, {n}));
    backend->synchronize_and_read_marks();
    std::vector<uint16_t> bits(kCap);
    RINGATTN_EXPECT_CUDA(cudaMemcpy(bits.data(), dst, kCap * 2, cudaMemcpyDeviceToHost));
    for (int64_t i = 0; i < kCap; ++i) {
      const bool inside = i >= offset && i < offset + n;
      ASSERT_EQ(bits[i], inside ? float_to_bf16(host[i]) : uint16_t{0xffff}) << "element " << i << " offset " << offset;
    }
  }
}

}  // namespace
}  // namespace ringattn::test
