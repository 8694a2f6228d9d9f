// CLI helpers: seeded inputs independent of the rank count, the streamed --check, row sampling, JSON, directories.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "attn/reference.hpp"
#include "cli_common.hpp"

namespace ringattn::cli {
namespace {

TEST(Random, DeterministicStandardNormal) {
  EXPECT_EQ(random_normal(1, TensorId::kQ, 12345), random_normal(1, TensorId::kQ, 12345));
  EXPECT_NE(random_normal(1, TensorId::kQ, 12345), random_normal(2, TensorId::kQ, 12345));
  EXPECT_NE(random_normal(1, TensorId::kQ, 12345), random_normal(1, TensorId::kK, 12345));
  const int n = 200000;
  double sum = 0, sq = 0, mx = 0;
  for (int i = 0; i < n; ++i) {
    const double x = random_normal(7, TensorId::kV, static_cast<uint64_t>(i));
    ASSERT_TRUE(std::isfinite(x));
    sum += x;
    sq += x * x;
    mx = std::max(mx, std::fabs(x));
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(sq / n, 1.0, 0.02);
  EXPECT_GT(mx, 3.5);  // has tails, not uniform
}

// Each rank generates only its rows; together they equal the one-process global tensor, for
// every layout and rank count (so --seed defines the same global problem for any -np).
TEST(Random, RowsDependOnGlobalPositionOnly) {
  for (DType dt : {DType::kF32, DType::kBF16, DType::kF64}) {
    for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
      for (int world : {1, 2, 3, 4}) {
        const int64_t B = 2, H = 3, D = 4, S = layout_divisor(layout, world) * 3;
        HostTensor global = make_host_tensor(dt, {B, S, H, D});
        fill_random_rows(global.view, chunk_positions(Layout::kContiguous, S, 0, 1), S, 99, TensorId::kK);
        for (int r = 0; r < world; ++r) {
          const ChunkPositions p = chunk_positions(layout, S, r, world);
          HostTensor local = make_host_tensor(dt, {B, p.size(), H, D});
          HostTensor expected = make_host_tensor(dt, {B, p.size(), H, D});
          fill_random_rows(local.view, p, S, 99, TensorId::kK);
          shard_rows(global.view, expected.view, p, 1);
          ASSERT_EQ(std::memcmp(local.view.data, expected.view.data, local.view.nbytes()), 0)
              << dtype_name(dt) << " " << layout_name(layout) << " world " << world << " rank " << r;
        }
      }
    }
  }
}

TEST(Random, GlobalIndexIsTheFlatIndex) {
  HostTensor t = make_host_tensor(DType::kF64, {2, 4, 3, 5});
  fill_random_rows(t.view, chunk_positions(Layout::kContiguous, 4, 0, 1), 4, 5, TensorId::kQ);
  for (int64_t i = 0; i < t.view.numel(); ++i) {
    ASSERT_EQ(t.view.as<double>()[i], random_normal(5, TensorId::kQ, static_cast<uint64_t>(i)));
  }
}

TEST(Random, ManyThreadsGiveTheSameValues) {
  // Big enough to use the threaded path; must equal the element-wise definition.
  HostTensor t = make_host_tensor(DType::kF32, {1, 4096, 4, 64});
  fill_random_rows(t.view, chunk_positions(Layout::kContiguous, 4096, 0, 1), 4096, 3, TensorId::kV);
  for (int64_t i = 0; i < t.view.numel(); i += 997) {
    ASSERT_EQ(t.view.as<float>()[i], static_cast<float>(random_normal(3, TensorId::kV, static_cast<uint64_t>(i))));
  }
}

struct Problem {
  AttentionSpec spec;
  ChunkPositions pos;
  HostTensor q, out, lse, k_global, v_global;
};

// The ring's output for rank `rank`, computed here by the naive reference over the whole sequence.
Problem make_problem(DType dt, bool causal, Layout layout, int rank, int world) {
  Problem p;
  p.spec.batch = 2;
  p.spec.seq_len = 24;
  p.spec.heads = 4;
  p.spec.kv_heads = 2;
  p.spec.head_dim = 8;
  p.spec.mask.causal = causal;
  p.spec.layout = layout;
  p.spec.dtype = dt;
  const int64_t B = 2, S = 24, H = 4, Hkv = 2, D = 8;
  p.pos = chunk_positions(layout, S, rank, world);
  const int64_t Sl = p.pos.size();
  p.q = make_host_tensor(dt, {B, Sl, H, D});
  fill_random_rows(p.q.view, p.pos, S, 11, TensorId::kQ);
  p.k_global = make_host_tensor(dt, {B, S, Hkv, D});
  p.v_global = make_host_tensor(dt, {B, S, Hkv, D});
  seeded_kv_source(11, S)(0, p.k_global.view, p.v_global.view);
  HostTensor out64 = make_host_tensor(DType::kF64, {B, Sl, H, D});
  p.lse = make_host_tensor(DType::kF64, {B, H, Sl});
  reference_attention(p.spec, p.q.view, p.pos, p.k_global.view, p.v_global.view, identity_positions(S), out64.view,
                      p.lse.view);
  p.out = convert_host(out64.view, dt);
  return p;
}

std::vector<int64_t> all_rows(int64_t n) {
  std::vector<int64_t> r(n);
  for (int64_t i = 0; i < n; ++i) r[i] = i;
  return r;
}

TEST(Check, ExactOutputPassesWithStreamedBlocks) {
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    for (bool causal : {false, true}) {
      Problem p = make_problem(DType::kF64, causal, layout, 1, 3);
      const std::vector<int64_t> rows = all_rows(p.pos.size());
      for (int64_t block : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{24}}) {
        const CheckResult r = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view, rows,
                                                      seeded_kv_source(11, 24), block);
        EXPECT_TRUE(r.pass) << layout_name(layout) << " causal " << causal << " block " << block;
        EXPECT_LT(r.max_abs_err, 1e-13);
        EXPECT_LT(r.max_lse_err, 1e-13);
        EXPECT_EQ(r.rows, p.pos.size());
        EXPECT_EQ(r.mismatched, 0);
        EXPECT_GT(r.max_ref, 0.1);
      }
    }
  }
}

TEST(Check, GlobalSourceEqualsSeededSource) {
  Problem p = make_problem(DType::kF32, true, Layout::kZigzag, 0, 2);
  const std::vector<int64_t> rows = {0, 3, 5};
  const CheckResult a = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view, rows,
                                                seeded_kv_source(11, 24), 7);
  const CheckResult b = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view, rows,
                                                global_kv_source(p.k_global.view, p.v_global.view), 7);
  EXPECT_EQ(a.max_abs_err, b.max_abs_err);
  EXPECT_TRUE(a.pass);
  EXPECT_EQ(a.rows, 3);
}

TEST(Check, WrongOutputFailsAndNonFiniteIsCounted) {
  Problem p = make_problem(DType::kF64, true, Layout::kStriped, 2, 3);
  const std::vector<int64_t> rows = all_rows(p.pos.size());
  p.out.view.as<double>()[17] += 1e-6;
  CheckResult r = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view, rows,
                                          seeded_kv_source(11, 24));
  EXPECT_FALSE(r.pass);
  EXPECT_NEAR(r.max_abs_err, 1e-6, 1e-9);
  p.out.view.as<double>()[17] = std::nan("");
  r = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view, rows, seeded_kv_source(11, 24));
  EXPECT_FALSE(r.pass);
  EXPECT_EQ(r.mismatched, 1);
  p = make_problem(DType::kF64, false, Layout::kStriped, 2, 3);
  p.lse.view.as<double>()[3] += 1e-3;
  r = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view, rows, seeded_kv_source(11, 24));
  EXPECT_FALSE(r.pass);
  EXPECT_GT(r.max_lse_err, 1e-4);
}

TEST(Check, Bf16OutputPassesWithItsTolerance) {
  Problem p = make_problem(DType::kBF16, true, Layout::kContiguous, 1, 2);
  const CheckResult r = check_against_reference(p.spec, p.q.view, p.pos, p.out.view, p.lse.view,
                                                all_rows(p.pos.size()), seeded_kv_source(11, 24));
  EXPECT_TRUE(r.pass);
  EXPECT_GT(r.max_abs_err, 0.0);  // the output was rounded to bf16
  EXPECT_LE(r.max_rel_err, 0x1.0p-8);
}

TEST(Check, TolerancesOrderedByPrecision) {
  EXPECT_LT(check_tolerance(DType::kF64), check_tolerance(DType::kF32));
  EXPECT_LT(check_tolerance(DType::kF32), check_tolerance(DType::kF16));
  EXPECT_LE(check_tolerance(DType::kF16), check_tolerance(DType::kBF16));
  EXPECT_LE(check_tolerance(DType::kF64), 1e-10);
}

TEST(Check, AllRowsWhenCheapSampleWhenLarge) {
  AttentionSpec s;
  s.batch = 1;
  s.seq_len = 4096;
  s.heads = 8;
  s.head_dim = 64;
  bool sampled = true;
  std::vector<int64_t> rows = choose_check_rows(s, 4, 0, 0, 0, &sampled);
  EXPECT_FALSE(sampled);
  EXPECT_EQ(rows.size(), 1024u);
  s.seq_len = 1 << 20;
  s.heads = 32;
  s.head_dim = 128;
  for (int rank : {0, 5}) {
    rows = choose_check_rows(s, 8, rank, 0, 0, &sampled);
    EXPECT_TRUE(sampled);
    EXPECT_GE(rows.size(), static_cast<std::size_t>(kMinSampleRows));
    EXPECT_LE(rows.size(), static_cast<std::size_t>(kMaxSampleRows));
    EXPECT_TRUE(std::is_sorted(rows.begin(), rows.end()));
    EXPECT_EQ(std::set<int64_t>(rows.begin(), rows.end()).size(), rows.size());
    EXPECT_EQ(rows.front(), 0);
    EXPECT_EQ(rows.back(), s.seq_len / 8 - 1);
  }
  rows = choose_check_rows(s, 8, 0, 0, 10, &sampled);
  EXPECT_EQ(rows.size(), 10u);
  s.seq_len = 64;
  rows = choose_check_rows(s, 2, 1, 0, -1, &sampled);
  EXPECT_FALSE(sampled);
  EXPECT_EQ(rows.size(), 32u);
}

TEST(Json, WritesNestedObjectsAndEscapes) {
  JsonWriter j;
  j.begin_object().field("a", 1).field("b", 2.5).field("c", true).field("s", "q\"x\\\n");
  j.begin_array("arr").value(1.0).value(std::string("t")).raw("", "{\"k\":1}").end_array();
  j.begin_object("o").field("nan", std::nan("")).field("inf", -INFINITY).end_object();
  j.end_object();
  EXPECT_EQ(j.str(),
            "{\"a\":1,\"b\":2.5,\"c\":true,\"s\":\"q\\\"x\\\\\\n\",\"arr\":[1,\"t\",{\"k\":1}],"
            "\"o\":{\"nan\":null,\"inf\":null}}");
  EXPECT_EQ(json_number(0.1), "0.10000000000000001");
}

TEST(Files, WritableDirectoryIsCreatedAndFilesAreReplacedAtomically) {
  namespace fs = std::filesystem;
  const fs::path base = fs::temp_directory_path() / ("ringattn_cli_test_" + std::to_string(getpid()));
  const std::string nested = (base / "a" / "b").string();
  EXPECT_NO_THROW(ensure_writable_dir(nested, "--save"));
  EXPECT_TRUE(fs::is_directory(nested));
  EXPECT_TRUE(fs::is_empty(nested));  // the probe file is gone
  const std::string file = (base / "plain").string();
  std::ofstream(file) << "x";
  try {
    ensure_writable_dir(file + "/sub", "--save");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--save"), std::string::npos);
  }
  EXPECT_THROW(ensure_writable_dir(file, "--save"), Error);  // exists, not a directory
  write_text_file(file, "{}\n");
  std::ifstream in(file);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "{}\n");
  fs::remove_all(base);
}

TEST(Flags, SpecFromFlagsParsesNamesAndSizes) {
  ProblemFlags f;
  f.seq_len = "2K";
  f.layout = "striped";
  f.dtype = "bf16";
  f.kv_heads = 2;
  AttentionSpec s = spec_from_flags(f);
  EXPECT_EQ(s.seq_len, 2048);
  EXPECT_EQ(s.layout, Layout::kStriped);
  EXPECT_EQ(s.dtype, DType::kBF16);
  EXPECT_EQ(s.effective_kv_heads(), 2);
  f.backend = "gpu";
  EXPECT_THROW(session_options_from_flags(f), Error);
  f.backend = "cpu";
  f.timeout_s = -1;
  EXPECT_THROW(session_options_from_flags(f), Error);
  f.timeout_s = 2;
  EXPECT_DOUBLE_EQ(session_options_from_flags(f).timeout_ms, 2000.0);
}

}  // namespace
}  // namespace ringattn::cli

// ---- mask flags -----------------------------------------------------------------------------------

namespace ringattn::cli {
namespace {

TEST(CliMaskFlags, WindowTakesExactlyTwoIntegersAtLeastMinusOne) {
  int64_t l = 0, r = 0;
  parse_window("4095,0", &l, &r);
  EXPECT_EQ(l, 4095);
  EXPECT_EQ(r, 0);
  parse_window("-1,7", &l, &r);
  EXPECT_EQ(l, -1);
  EXPECT_EQ(r, 7);
  for (const char* bad : {"5", "1,2,3", "a,0", "0,", "-2,0", "0,-5", "1.5,0", ""}) {
    EXPECT_THROW(parse_window(bad, &l, &r), ringattn::Error) << bad;
  }
}

TEST(CliMaskFlags, LengthsArePositiveIntegers) {
  EXPECT_EQ(parse_lengths("3,1,4", "--doc-lens"), (std::vector<int64_t>{3, 1, 4}));
  for (const char* bad : {"3,0,4", "3,-1", "x", "3,,4", "3,"}) {
    EXPECT_THROW(parse_lengths(bad, "--doc-lens"), ringattn::Error) << bad;
  }
}

TEST(CliMaskFlags, SpecFromFlagsCarriesTheMask) {
  ProblemFlags f;
  f.seq_len = "64";
  f.heads = 4;
  f.kv_heads = 2;
  f.causal = true;
  f.window = "7,0";
  f.stride = "5";
  f.global_tokens = "2";
  f.mask_heads = "2";
  f.doc_lens = "20,44";
  AttentionSpec spec = spec_from_flags(f);
  apply_doc_lens(f, spec);
  EXPECT_EQ(spec.layout, Layout::kAuto);
  EXPECT_TRUE(spec.mask.causal && spec.mask.has_window);
  EXPECT_EQ(spec.mask.window_left, 7);
  EXPECT_EQ(spec.mask.stride, 5);
  EXPECT_EQ(spec.mask.global_tokens, 2);
  EXPECT_EQ(spec.mask.mask_heads, 2);
  EXPECT_EQ(spec.mask.doc_offsets, (std::vector<int64_t>{0, 20, 64}));
  f.stride = "0";
  EXPECT_THROW(spec_from_flags(f), ringattn::Error);
}

}  // namespace
}  // namespace ringattn::cli
