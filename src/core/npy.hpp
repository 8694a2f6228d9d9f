// NumPy .npy files: read (v1/v2/v3 headers, little-endian f2/f4/f8, C order) and atomic write.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "ringattn/tensor.hpp"

namespace ringattn {

// An owning host array read from (or to be written to) a .npy file, C order.
struct NpyArray {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  std::vector<unsigned char> data;  // numel * dtype_size(dtype) bytes, little-endian

  int64_t numel() const;
  // A contiguous host view of the data (rank 1..4); throws for more than 4 dimensions.
  TensorView view();
  std::string shape_string() const;  // "(2, 128, 8, 64)"
};

// Reads `path`. Accepts '<f2' (fp16), '<f4', '<f8' ('|' or '=' byte order on this little-endian
// host too), fortran_order False. Throws ringattn::Error (kIo / kInvalidArgument) naming the file
// and the fix for: a missing file, bad magic, an unknown version, an unparsable header, a big-endian
// or non-float dtype, Fortran order, and data shorter or longer than the shape says.
NpyArray read_npy(const std::string& path);
// Reads a 1-D '<i4' or '<i8' array (e.g. cu_seqlens.npy) as int64; throws naming the file otherwise.
std::vector<int64_t> read_npy_int_vector(const std::string& path);

// Writes a contiguous host view as C-order .npy: fp64 -> '<f8', fp32 -> '<f4', fp16 -> '<f2',
// bf16 -> '<f4' (NumPy has no bfloat16; values are widened exactly). Writes `path`.tmp.<pid> in the
// same directory and renames it over `path`, so readers never see a half-written file; the
// temporary is removed when anything fails.
void write_npy(const std::string& path, const TensorView& view);

// Throws naming `path` when `array` does not have exactly `expected` as its shape;
// `what` describes the expected axes, e.g. "[batch, seq, heads, head_dim]".
void expect_npy_shape(const NpyArray& array, const std::vector<int64_t>& expected, const std::string& path,
                      const std::string& what);

// The header dictionary text NumPy would write, e.g. "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }".
std::string npy_header_dict(const char* descr, const std::vector<int64_t>& shape);

}  // namespace ringattn
