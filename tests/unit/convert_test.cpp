// Host bf16/fp16 <-> fp32 conversions: exact round trips, round-to-nearest-even, specials.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "ringattn/tensor.hpp"

namespace ringattn {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

TEST(Convert, EveryBf16RoundTripsExactly) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(f))));
      continue;
    }
    ASSERT_EQ(float_to_bf16(f), b) << "bits " << b;
  }
}

TEST(Convert, EveryFp16RoundTripsExactly) {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = fp16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(fp16_to_float(float_to_fp16(f))));
      continue;
    }
    ASSERT_EQ(float_to_fp16(f), b) << "bits " << b << " value " << f;
  }
}

TEST(Convert, Bf16RoundsToNearestEven) {
  // 1 + 2^-8 lies halfway between bf16 1.0 and 1 + 2^-7: ties go to the even mantissa (1.0).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 0x1.0p-8f)), 1.0f);
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(bf16_to_float(float_to_bf16(1.0f + 3 * 0x1.0p-8f)), 1.0f + 0x1.0p-6f);
  // Just above halfway rounds up.
  EXPECT_EQ(bf16_to_float(float_to_bf16(from_bits(0x3f808001u))), 1.0f + 0x1.0p-7f);
  EXPECT_EQ(bf16_to_float(float_to_bf16(-2.5f)), -2.5f);
  EXPECT_TRUE(std::isinf(bf16_to_float(float_to_bf16(std::numeric_limits<float>::infinity()))));
}

TEST(Convert, Fp16RoundsToNearestEvenAndSaturates) {
  EXPECT_EQ(fp16_to_float(float_to_fp16(1.0f + 0x1.0p-11f)), 1.0f);                 // tie -> even
  EXPECT_EQ(fp16_to_float(float_to_fp16(1.0f + 3 * 0x1.0p-11f)), 1.0f + 0x1.0p-9f);  // tie -> even
  EXPECT_EQ(fp16_to_float(float_to_fp16(65504.0f)), 65504.0f);
  EXPECT_TRUE(std::isinf(fp16_to_float(float_to_fp16(70000.0f))));
  EXPECT_EQ(fp16_to_float(float_to_fp16(0x1.0p-24f)), 0x1.0p-24f);  // smallest subnormal
  EXPECT_EQ(fp16_to_float(float_to_fp16(0x1.0p-26f)), 0.0f);        // underflows to zero
  EXPECT_EQ(fp16_to_float(float_to_fp16(-0.0f)), 0.0f);
  EXPECT_TRUE(std::signbit(fp16_to_float(float_to_fp16(-0.0f))));
}

TEST(Convert, RelativeErrorWithinHalfAnUlp) {
  for (float x = -1000.0f; x < 1000.0f; x += 0.37f) {
    if (x == 0.0f) continue;
    EXPECT_LE(std::fabs(bf16_to_float(float_to_bf16(x)) - x), std::fabs(x) * 0x1.0p-8f);
    EXPECT_LE(std::fabs(fp16_to_float(float_to_fp16(x)) - x), std::fabs(x) * 0x1.0p-11f);
  }
}

TEST(Convert, LoadStoreThroughViews) {
  uint16_t b[2] = {0, 0};
  const TensorView v = make_view(b, DType::kBF16, Device::kHost, {2});
  store_from_double(v, 1, 3.0);
  EXPECT_EQ(load_as_double(v, 1), 3.0);
  double d[1];
  const TensorView w = make_view(d, DType::kF64, Device::kHost, {1});
  store_from_double(w, 0, 0.1);
  EXPECT_EQ(load_as_double(w, 0), 0.1);
}

}  // namespace
}  // namespace ringattn
