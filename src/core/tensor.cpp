// Tensor views, dtype names and sizes, and host-side bf16/fp16 conversions.
#include "ringattn/tensor.hpp"

#include <cmath>
#include <cstring>
#include <sstream>

#include "ringattn/error.hpp"

namespace ringattn {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kF64: return 8;
    case DType::kF32: return 4;
    case DType::kBF16: return 2;
    case DType::kF16: return 2;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kF64: return "fp64";
    case DType::kF32: return "fp32";
    case DType::kBF16: return "bf16";
    case DType::kF16: return "fp16";
  }
  return "?";
}

DType parse_dtype(std::string_view name) {
  if (name == "fp64" || name == "float64" || name == "f64") return DType::kF64;
  if (name == "fp32" || name == "float32" || name == "f32") return DType::kF32;
  if (name == "bf16" || name == "bfloat16") return DType::kBF16;
  if (name == "fp16" || name == "float16" || name == "f16" || name == "half") return DType::kF16;
  fail(ErrorKind::kInvalidArgument, "unknown dtype '" + std::string(name) + "' for --dtype",
       "use one of fp64, fp32, bf16, fp16");
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank; ++i) n *= shape[i];
  return n;
}

bool TensorView::is_contiguous() const {
  int64_t expected = 1;
  for (int i = rank - 1; i >= 0; --i) {
    if (shape[i] != 1 && stride[i] != expected) return false;
    expected *= shape[i];
  }
  return true;
}

std::string TensorView::describe() const {
  std::ostringstream os;
  os << dtype_name(dtype) << "[";
  for (int i = 0; i < rank; ++i) os << (i ? ", " : "") << shape[i];
  os << "] on " << (device == Device::kHost ? "host" : "cuda");
  return os.str();
}

TensorView make_view(void* data, DType dtype, Device device, std::initializer_list<int64_t> shape) {
  TensorView v;
  v.data = data;
  v.dtype = dtype;
  v.device = device;
  v.rank = static_cast<int>(shape.size());
  RINGATTN_CHECK(v.rank >= 1 && v.rank <= kMaxRank, ErrorKind::kInternal, "tensor rank out of range", "");
  int i = 0;
  for (int64_t s : shape) v.shape[i++] = s;
  int64_t st = 1;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.stride[d] = st;
    st *= v.shape[d];
  }
  return v;
}

float bf16_to_float(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_bf16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  if (std::isnan(value)) return 0x7fc0;
  uint32_t rounding = 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float fp16_to_float(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ff;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t float_to_fp16(float value) {
  uint32_t u;
  std::memcpy(&u, &value, 4);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  if (std::isnan(value)) return static_cast<uint16_t>(sign | 0x7e00);
  float a = std::fabs(value);
  if (a >= 65520.0f) return static_cast<uint16_t>(sign | 0x7c00);
  if (a < 6.103515625e-05f) {  // subnormal range: quantise to multiples of 2^-24, ties to even
    float q = a * 16777216.0f;
    float r = std::nearbyint(q);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(r));
  }
  uint32_t abs_bits = u & 0x7fffffffu;
  uint32_t rounding = 0xfff + ((abs_bits >> 13) & 1);
  abs_bits += rounding;
  uint32_t exp = (abs_bits >> 23) - 127 + 15;
  uint32_t mant = (abs_bits >> 13) & 0x3ff;
  return static_cast<uint16_t>(sign | (exp << 10) | mant);
}

double load_as_double(const TensorView& view, int64_t i) {
  switch (view.dtype) {
    case DType::kF64: return static_cast<const double*>(view.data)[i];
    case DType::kF32: return static_cast<const float*>(view.data)[i];
    case DType::kBF16: return bf16_to_float(static_cast<const uint16_t*>(view.data)[i]);
    case DType::kF16: return fp16_to_float(static_cast<const uint16_t*>(view.data)[i]);
  }
  return 0.0;
}

void store_from_double(const TensorView& view, int64_t i, double value) {
  switch (view.dtype) {
    case DType::kF64: static_cast<double*>(view.data)[i] = value; break;
    case DType::kF32: static_cast<float*>(view.data)[i] = static_cast<float>(value); break;
    case DType::kBF16:
      static_cast<uint16_t*>(view.data)[i] = float_to_bf16(static_cast<float>(value));
      break;
    case DType::kF16:
      static_cast<uint16_t*>(view.data)[i] = float_to_fp16(static_cast<float>(value));
      break;
  }
}

}  // namespace ringattn
