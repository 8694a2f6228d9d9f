// Tensor views and dtypes: the non-owning description of every buffer that crosses the public API.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace ringattn {

enum class DType { kF64, kF32, kBF16, kF16 };
enum class Device { kHost, kCuda };

std::size_t dtype_size(DType dtype);
const char* dtype_name(DType dtype);
// Parses "fp64|fp32|bf16|fp16" (also "float64", "float32", "bfloat16", "float16"); throws ringattn::Error.
DType parse_dtype(std::string_view name);

inline constexpr int kMaxRank = 4;

// A strided view of up to 4 dimensions; strides count elements, not bytes.
// Attention tensors use (batch, seq, heads, head_dim); lse uses (batch, heads, seq).
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device = Device::kHost;
  int rank = 0;
  std::array<int64_t, kMaxRank> shape{};
  std::array<int64_t, kMaxRank> stride{};

  int64_t numel() const;
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
  bool is_contiguous() const;
  std::string describe() const;  // e.g. "bf16[1, 4096, 32, 128] on cuda"

  template <typename T>
  T* as() const { return static_cast<T*>(data); }
};

// A row-major contiguous view over `data`.
TensorView make_view(void* data, DType dtype, Device device, std::initializer_list<int64_t> shape);

// bf16 / fp16 <-> fp32 on the host (round to nearest even).
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float value);
float fp16_to_float(uint16_t bits);
uint16_t float_to_fp16(float value);

// Reads element i (flat, contiguous index) of a host view of any dtype as double.
double load_as_double(const TensorView& view, int64_t flat_index);
// Stores a double into element i of a host view of any dtype, rounding to its dtype.
void store_from_double(const TensorView& view, int64_t flat_index, double value);

}  // namespace ringattn
