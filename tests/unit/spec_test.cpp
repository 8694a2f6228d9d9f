// AttentionSpec validation, size parsing with K/M/G suffixes, and layout/dtype names.
#include <gtest/gtest.h>

#include <string>

#include "ringattn/error.hpp"
#include "ringattn/spec.hpp"

namespace ringattn {
namespace {

// Runs `fn`, expects a ringattn::Error whose message contains every one of `needles`.
template <typename F>
void expect_error_naming(F fn, std::initializer_list<const char*> needles) {
  try {
    fn();
    FAIL() << "no error thrown";
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' missing in: " << msg;
  }
}

AttentionSpec good_spec() {
  AttentionSpec s;
  s.batch = 2;
  s.seq_len = 96;
  s.heads = 8;
  s.kv_heads = 2;
  s.head_dim = 64;
  s.layout = Layout::kZigzag;
  return s;
}

TEST(ParseSize, PlainAndSuffixed) {
  EXPECT_EQ(parse_size("4096", "--seq-len"), 4096);
  EXPECT_EQ(parse_size("4K", "--seq-len"), 4096);
  EXPECT_EQ(parse_size("4k", "--seq-len"), 4096);
  EXPECT_EQ(parse_size("1M", "--seq-len"), 1 << 20);
  EXPECT_EQ(parse_size("2m", "--seq-len"), 2 << 20);
  EXPECT_EQ(parse_size("1G", "--seq-len"), int64_t{1} << 30);
  EXPECT_EQ(parse_size("0", "--seq-len"), 0);
}

TEST(ParseSize, RejectsGarbageNamingTheFlag) {
  for (const char* bad : {"", "K", "4Q", "-5", "1.5K", "12 ", "abc", "99999999999999999"}) {
    expect_error_naming([&] { parse_size(bad, "--seq-len"); }, {"--seq-len", "hint"});
  }
}

TEST(Spec, ValidSpecPasses) {
  AttentionSpec s = good_spec();
  EXPECT_NO_THROW(s.validate(3));  // 96 % (2*3) == 0
  EXPECT_EQ(s.group_size(), 4);
  EXPECT_DOUBLE_EQ(s.scale(), 0.125);
  s.softmax_scale = 0.5;
  EXPECT_DOUBLE_EQ(s.scale(), 0.5);
  s.kv_heads = 0;
  EXPECT_EQ(s.effective_kv_heads(), 8);
  EXPECT_NO_THROW(s.validate(1));
}

TEST(Spec, SequenceNotDivisibleNamesFlagAndFix) {
  AttentionSpec s = good_spec();
  expect_error_naming([&] { s.validate(5); }, {"--seq-len 96", "divisible by 10", "zigzag", "hint"});
  s.layout = Layout::kContiguous;
  expect_error_naming([&] { s.validate(5); }, {"--seq-len", "divisible by 5"});
  s.layout = Layout::kStriped;
  EXPECT_NO_THROW(s.validate(4));
}

TEST(Spec, KvHeadsMustDivideHeads) {
  AttentionSpec s = good_spec();
  s.kv_heads = 3;
  expect_error_naming([&] { s.validate(1); }, {"--kv-heads 3", "--heads 8"});
  s.kv_heads = -1;
  expect_error_naming([&] { s.validate(1); }, {"--kv-heads"});
}

TEST(Spec, NonPositiveSizesNameTheirFlag) {
  {
    AttentionSpec s = good_spec();
    s.batch = 0;
    expect_error_naming([&] { s.validate(1); }, {"--batch"});
  }
  {
    AttentionSpec s = good_spec();
    s.heads = 0;
    expect_error_naming([&] { s.validate(1); }, {"--heads"});
  }
  {
    AttentionSpec s = good_spec();
    s.head_dim = 0;
    expect_error_naming([&] { s.validate(1); }, {"--head-dim"});
  }
  {
    AttentionSpec s = good_spec();
    s.seq_len = 0;
    expect_error_naming([&] { s.validate(1); }, {"--seq-len"});
  }
}

TEST(Spec, DescribeCarriesEveryField) {
  const std::string d = good_spec().describe();
  for (const char* f : {"batch=2", "seq_len=96", "heads=8", "kv_heads=2", "head_dim=64", "layout=zigzag", "dtype=fp32"}) {
    EXPECT_NE(d.find(f), std::string::npos) << d;
  }
}

TEST(Spec, ForwardFlopsHalveWhenCausal) {
  AttentionSpec s = good_spec();
  const double full = 4.0 * 2 * 96.0 * 96.0 * 8 * 64;
  EXPECT_DOUBLE_EQ(forward_flops(s), full);
  s.mask.causal = true;
  EXPECT_DOUBLE_EQ(forward_flops(s), full / 2);
}

TEST(Names, LayoutsAndDtypesRoundTrip) {
  for (Layout l : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) EXPECT_EQ(parse_layout(layout_name(l)), l);
  for (DType t : {DType::kF64, DType::kF32, DType::kBF16, DType::kF16}) EXPECT_EQ(parse_dtype(dtype_name(t)), t);
  EXPECT_EQ(parse_dtype("float32"), DType::kF32);
  EXPECT_EQ(parse_dtype("bfloat16"), DType::kBF16);
  expect_error_naming([] { parse_layout("diagonal"); }, {"--layout", "zigzag"});
  expect_error_naming([] { parse_dtype("fp8"); }, {"--dtype", "bf16"});
}

}  // namespace
}  // namespace ringattn
