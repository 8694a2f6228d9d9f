// .npy reader and writer (format spec: numpy.lib.format), strict about everything it cannot honour.
#include "core/npy.hpp"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicLen = 6;
constexpr uint64_t kMaxDataBytes = uint64_t{1} << 48;  // larger arrays are corrupt headers, not inputs
constexpr std::size_t kAlign = 64;  // header + preamble padded to a multiple of this (NumPy >= 1.14)
constexpr const char* kSaveHint = "save it with numpy.save(path, np.ascontiguousarray(x, dtype=np.float32)) "
                                  "or dtype=np.float64";

[[noreturn]] void bad_file(const std::string& path, const std::string& what, const std::string& hint = kSaveHint) {
  fail(ErrorKind::kInvalidArgument, "'" + path + "' is not a usable .npy file: " + what, hint);
}

// Finds the value text of key `key` in the header dict: everything after "'key':" up to the
// matching top-level comma or closing brace.
std::string dict_value(const std::string& dict, const std::string& key, const std::string& path) {
  std::size_t at = dict.find("'" + key + "'");
  if (at == std::string::npos) at = dict.find("\"" + key + "\"");
  if (at == std::string::npos) bad_file(path, "header has no '" + key + "' entry");
  std::size_t colon = dict.find(':', at + key.size() + 2);
  if (colon == std::string::npos) bad_file(path, "header entry '" + key + "' has no value");
  std::size_t i = colon + 1;
  while (i < dict.size() && dict[i] == ' ') ++i;
  int depth = 0;
  std::size_t j = i;
  for (; j < dict.size(); ++j) {
    const char c = dict[j];
    if (c == '(' || c == '[') ++depth;
    if (c == ')' || c == ']') --depth;
    if (depth == 0 && (c == ',' || c == '}')) break;
  }
  std::string v = dict.substr(i, j - i);
  while (!v.empty() && v.back() == ' ') v.pop_back();
  return v;
}

std::string strip_quotes(const std::string& s) {
  if (s.size() >= 2 && (s.front() == '\'' || s.front() == '"') && s.back() == s.front()) {
    return s.substr(1, s.size() - 2);
  }
  return s;
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
  if (text.size() < 2 || text.front() != '(' || text.back() != ')') bad_file(path, "shape '" + text + "' is not a tuple");
  std::vector<int64_t> shape;
  std::string body = text.substr(1, text.size() - 2);
  std::stringstream ss(body);
  std::string item;
  while (std::getline(ss, item, ',')) {
    std::size_t a = item.find_first_not_of(" L");
    if (a == std::string::npos) continue;  // the empty item after "(3,"
    std::size_t b = item.find_last_not_of(" L");
    item = item.substr(a, b - a + 1);
    int64_t v = 0;
    for (char c : item) {
      if (c < '0' || c > '9') bad_file(path, "shape '" + text + "' has a non-integer entry");
      v = v * 10 + (c - '0');
      if (v > (int64_t{1} << 48)) bad_file(path, "shape '" + text + "' is absurdly large");
    }
    shape.push_back(v);
  }
  return shape;
}

const char* descr_of(DType dtype) {
  switch (dtype) {
    case DType::kF64: return "<f8";
    case DType::kF32: return "<f4";
    case DType::kF16: return "<f2";
    case DType::kBF16: return "<f4";  // widened: NumPy has no bfloat16
  }
  return "?";
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    s += std::to_string(shape[i]);
    if (shape.size() == 1 || i + 1 < shape.size()) s += ",";
    if (i + 1 < shape.size()) s += " ";
  }
  return s + ")";
}

}  // namespace

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

TensorView NpyArray::view() {
  RINGATTN_CHECK(!shape.empty() && shape.size() <= static_cast<std::size_t>(kMaxRank), ErrorKind::kInvalidArgument,
                 "array of shape " + shape_string() + " has no tensor view", "use 1 to 4 dimensions");
  TensorView v;
  v.data = data.data();
  v.dtype = dtype;
  v.device = Device::kHost;
  v.rank = static_cast<int>(shape.size());
  int64_t st = 1;
  for (int d = v.rank - 1; d >= 0; --d) {
    v.shape[d] = shape[d];
    v.stride[d] = st;
    st *= shape[d];
  }
  return v;
}

std::string NpyArray::shape_string() const { return shape_text(shape); }

std::string npy_header_dict(const char* descr, const std::vector<int64_t>& shape) {
  return std::string("{'descr': '") + descr + "', 'fortran_order': False, 'shape': " + shape_text(shape) + ", }";
}

namespace {

// Reads `path`; float dtypes always, and '<i4' / '<i8' when `int_bytes` is set (then *int_bytes is
// 4 or 8 and a.dtype only stands for the element size: fp32 or fp64), else *int_bytes = 0.
NpyArray read_npy_any(const std::string& path, int* int_bytes) {
  if (int_bytes != nullptr) *int_bytes = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    fail(ErrorKind::kIo, "cannot open '" + path + "': " + std::strerror(errno),
         "check the path; --load DIR expects DIR/q.npy, DIR/k.npy and DIR/v.npy");
  }
  in.seekg(0, std::ios::end);
  const auto file_size = static_cast<uint64_t>(in.tellg());
  in.seekg(0);
  char pre[10] = {0};
  if (file_size < 10 || !in.read(pre, 10)) bad_file(path, "file is too short for a .npy header");
  if (std::memcmp(pre, kMagic, kMagicLen) != 0) bad_file(path, "bad magic (not written by numpy.save)");
  const int major = static_cast<unsigned char>(pre[6]);
  uint64_t header_len = 0;
  uint64_t preamble = 0;
  if (major == 1) {
    header_len = static_cast<unsigned char>(pre[8]) | (static_cast<unsigned>(static_cast<unsigned char>(pre[9])) << 8);
    preamble = 10;
  } else if (major == 2 || major == 3) {
    char more[2];
    if (!in.read(more, 2)) bad_file(path, "file is too short for a version 2 header");
    const unsigned char b[4] = {static_cast<unsigned char>(pre[8]), static_cast<unsigned char>(pre[9]),
                                static_cast<unsigned char>(more[0]), static_cast<unsigned char>(more[1])};
    header_len = b[0] | (b[1] << 8) | (static_cast<uint64_t>(b[2]) << 16) | (static_cast<uint64_t>(b[3]) << 24);
    preamble = 12;
  } else {
    bad_file(path, "unsupported format version " + std::to_string(major));
  }
  if (preamble + header_len > file_size) bad_file(path, "header is truncated");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(header_len))) bad_file(path, "header is truncated");
  const std::size_t open = header.find('{'), close = header.rfind('}');
  if (open == std::string::npos || close == std::string::npos || close < open) {
    bad_file(path, "header is not a dictionary");
  }
  const std::string dict = header.substr(open, close - open + 1);

  NpyArray a;
  const std::string descr = strip_quotes(dict_value(dict, "descr", path));
  if (descr.size() != 3 || (descr[0] != '<' && descr[0] != '|' && descr[0] != '=')) {
    if (!descr.empty() && descr[0] == '>') {
      bad_file(path, "dtype '" + descr + "' is big-endian", "convert with x.astype('<f4') (or '<f8') before saving");
    }
    bad_file(path, "dtype '" + descr + "' is not supported (need float16, float32 or float64)");
  }
  const std::string kind = descr.substr(1);
  if (kind == "f8") {
    a.dtype = DType::kF64;
  } else if (kind == "f4") {
    a.dtype = DType::kF32;
  } else if (kind == "f2") {
    a.dtype = DType::kF16;
  } else if (int_bytes != nullptr && (kind == "i4" || kind == "i8")) {
    *int_bytes = kind == "i4" ? 4 : 8;
    a.dtype = kind == "i4" ? DType::kF32 : DType::kF64;
  } else {
    bad_file(path, "dtype '" + descr + "' is not supported (need float16, float32 or float64)");
  }
  const std::string fortran = dict_value(dict, "fortran_order", path);
  if (fortran == "True") {
    bad_file(path, "array is in Fortran order", "save np.ascontiguousarray(x) so the file is in C order");
  } else if (fortran != "False") {
    bad_file(path, "fortran_order '" + fortran + "' is neither True nor False");
  }
  a.shape = parse_shape(dict_value(dict, "shape", path), path);
  // The byte count, checked: a shape whose product wraps would pass the truncation check below.
  uint64_t want = dtype_size(a.dtype);
  for (int64_t d : a.shape) {
    if (__builtin_mul_overflow(want, static_cast<uint64_t>(d), &want) || want > kMaxDataBytes) {
      bad_file(path, "shape " + a.shape_string() + " needs more than 2^48 bytes", "the header is corrupt; write the file again");
    }
  }
  const uint64_t have = file_size - preamble - header_len;
  if (have < want) {
    bad_file(path, "data is truncated: shape " + a.shape_string() + " needs " + std::to_string(want) +
                       " bytes, the file holds " + std::to_string(have),
             "the file was cut short (disk full or an interrupted copy?); write it again");
  }
  if (have > want) {
    bad_file(path, "file has " + std::to_string(have - want) + " bytes after the data of shape " + a.shape_string(),
             "the file is corrupt or not a single array; write it again with numpy.save");
  }
  a.data.resize(want);
  if (want > 0 && !in.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(want))) {
    fail(ErrorKind::kIo, "reading the data of '" + path + "' failed", "check the file system");
  }
  return a;
}

}  // namespace

NpyArray read_npy(const std::string& path) { return read_npy_any(path, nullptr); }

std::vector<int64_t> read_npy_int_vector(const std::string& path) {
  int int_bytes = 0;
  NpyArray a = read_npy_any(path, &int_bytes);
  if (int_bytes == 0) {
    bad_file(path, "dtype is a float, expected int32 or int64", "save it with numpy.save(path, x.astype(np.int64))");
  }
  if (a.shape.size() != 1) {
    bad_file(path, "shape " + a.shape_string() + " is not one-dimensional", "save a 1-D integer array");
  }
  std::vector<int64_t> out(static_cast<std::size_t>(a.numel()));
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (int_bytes == 4) {
      int32_t v;
      std::memcpy(&v, a.data.data() + 4 * i, 4);
      out[i] = v;
    } else {
      std::memcpy(&out[i], a.data.data() + 8 * i, 8);
    }
  }
  return out;
}

void write_npy(const std::string& path, const TensorView& view) {
  RINGATTN_CHECK(view.device == Device::kHost, ErrorKind::kInternal, "write_npy got a device tensor", "copy to host first");
  RINGATTN_CHECK(view.is_contiguous(), ErrorKind::kInternal, "write_npy got a strided tensor", "");
  std::vector<int64_t> shape(view.shape.begin(), view.shape.begin() + view.rank);
  std::string dict = npy_header_dict(descr_of(view.dtype), shape);
  // Preamble (10 bytes for v1, 12 for v2) + dict + padding spaces + '\n' is a multiple of 64.
  int major = 1;
  std::size_t preamble = 10;
  if (dict.size() + 1 + preamble > 65535) {
    major = 2;
    preamble = 12;
  }
  const std::size_t total = (preamble + dict.size() + 1 + kAlign - 1) / kAlign * kAlign;
  std::string header = dict + std::string(total - preamble - dict.size() - 1, ' ') + "\n";
  std::string pre(kMagic, kMagicLen);
  pre += static_cast<char>(major);
  pre += '\0';
  const uint64_t hl = header.size();
  pre += static_cast<char>(hl & 0xff);
  pre += static_cast<char>((hl >> 8) & 0xff);
  if (major == 2) {
    pre += static_cast<char>((hl >> 16) & 0xff);
    pre += static_cast<char>((hl >> 24) & 0xff);
  }

  const std::string tmp = path + ".tmp." + std::to_string(getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    fail(ErrorKind::kIo, "cannot create '" + tmp + "': " + std::strerror(errno),
         "make the output directory writable or pick another with --save");
  }
  bool ok = std::fwrite(pre.data(), 1, pre.size(), f) == pre.size() &&
            std::fwrite(header.data(), 1, header.size(), f) == header.size();
  if (ok && view.dtype == DType::kBF16) {
    const auto* src = static_cast<const uint16_t*>(view.data);
    std::vector<float> buf;
    constexpr int64_t kChunk = 1 << 16;
    for (int64_t i = 0; ok && i < view.numel(); i += kChunk) {
      const int64_t n = std::min(kChunk, view.numel() - i);
      buf.resize(n);
      for (int64_t j = 0; j < n; ++j) buf[j] = bf16_to_float(src[i + j]);
      ok = std::fwrite(buf.data(), sizeof(float), n, f) == static_cast<std::size_t>(n);
    }
  } else if (ok && view.nbytes() > 0) {
    ok = std::fwrite(view.data, 1, view.nbytes(), f) == view.nbytes();
  }
  const int saved_errno = errno;
  ok = (std::fflush(f) == 0) && ok;
  ok = (fsync(fileno(f)) == 0) && ok;
  ok = (std::fclose(f) == 0) && ok;
  if (!ok) {
    std::remove(tmp.c_str());
    fail(ErrorKind::kIo, "writing '" + tmp + "' failed: " + std::strerror(saved_errno ? saved_errno : errno),
         "check free space and permissions of the --save directory");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    fail(ErrorKind::kIo, "cannot rename '" + tmp + "' to '" + path + "': " + std::strerror(e),
         "check permissions of the --save directory");
  }
}

void expect_npy_shape(const NpyArray& array, const std::vector<int64_t>& expected, const std::string& path,
                      const std::string& what) {
  if (array.shape != expected) {
    fail(ErrorKind::kInvalidArgument,
         "'" + path + "' has shape " + array.shape_string() + ", expected " + shape_text(expected) + " " + what,
         "write the array in that shape (global token order) or change the flags to match the file");
  }
}

}  // namespace ringattn
