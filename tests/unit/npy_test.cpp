// .npy reader/writer: round trips for every dtype, NumPy-written headers, and rejection of broken files.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "core/npy.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

namespace fs = std::filesystem;

class NpyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("ringattn_npy_test_" + std::to_string(getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }

  // Writes a file with an arbitrary header dict and payload (what NumPy would write for valid dicts).
  std::string write_raw(const std::string& name, const std::string& dict, const std::string& payload,
                        const std::string& magic = "\x93NUMPY", int major = 1) {
    const std::size_t pre = major == 1 ? 10 : 12;
    std::string header = dict;
    const std::size_t total = (pre + header.size() + 1 + 63) / 64 * 64;
    header += std::string(total - pre - header.size() - 1, ' ') + "\n";
    std::string bytes = magic;
    bytes += static_cast<char>(major);
    bytes += '\0';
    bytes += static_cast<char>(header.size() & 0xff);
    bytes += static_cast<char>((header.size() >> 8) & 0xff);
    if (major != 1) bytes += std::string(2, '\0');
    bytes += header + payload;
    std::ofstream(path(name), std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    return path(name);
  }

  void expect_rejected(const std::string& file, const std::string& needle) {
    try {
      read_npy(file);
      FAIL() << "accepted " << file;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find(file), std::string::npos) << "message does not name the file: " << msg;
      EXPECT_NE(msg.find(needle), std::string::npos) << "message lacks '" << needle << "': " << msg;
      EXPECT_NE(msg.find("hint"), std::string::npos) << "message has no fix: " << msg;
    }
  }

  fs::path dir_;
};

std::string floats(int n, float v = 0.25f) {
  std::vector<float> x(n, v);
  return std::string(reinterpret_cast<const char*>(x.data()), n * sizeof(float));
}

TEST_F(NpyTest, RoundTripF64F32F16) {
  std::vector<double> d = {1.5, -2.25, 3e-300, 0.0, 1e300, -0.0};
  std::vector<float> f = {1.5f, -2.25f, 3.0f, 0.1f, 7.0f, -1e-30f};
  std::vector<uint16_t> h(6);
  for (int i = 0; i < 6; ++i) h[i] = float_to_fp16(f[i]);
  write_npy(path("d.npy"), make_view(d.data(), DType::kF64, Device::kHost, {2, 3}));
  write_npy(path("f.npy"), make_view(f.data(), DType::kF32, Device::kHost, {1, 2, 3, 1}));
  write_npy(path("h.npy"), make_view(h.data(), DType::kF16, Device::kHost, {6}));
  NpyArray rd = read_npy(path("d.npy"));
  EXPECT_EQ(rd.dtype, DType::kF64);
  EXPECT_EQ(rd.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(std::memcmp(rd.data.data(), d.data(), 6 * sizeof(double)), 0);
  NpyArray rf = read_npy(path("f.npy"));
  EXPECT_EQ(rf.dtype, DType::kF32);
  EXPECT_EQ(rf.shape, (std::vector<int64_t>{1, 2, 3, 1}));
  EXPECT_EQ(std::memcmp(rf.data.data(), f.data(), 6 * sizeof(float)), 0);
  NpyArray rh = read_npy(path("h.npy"));
  EXPECT_EQ(rh.dtype, DType::kF16);
  EXPECT_EQ(rh.shape, (std::vector<int64_t>{6}));
  EXPECT_EQ(std::memcmp(rh.data.data(), h.data(), 6 * sizeof(uint16_t)), 0);
  EXPECT_EQ(rf.view().describe(), "fp32[1, 2, 3, 1] on host");
}

TEST_F(NpyTest, Bf16IsWrittenAsExactFloat32) {
  std::vector<uint16_t> b = {float_to_bf16(1.0f), float_to_bf16(-3.140625f), float_to_bf16(1e-3f)};
  write_npy(path("b.npy"), make_view(b.data(), DType::kBF16, Device::kHost, {3}));
  NpyArray r = read_npy(path("b.npy"));
  ASSERT_EQ(r.dtype, DType::kF32);
  const auto* v = reinterpret_cast<const float*>(r.data.data());
  for (int i = 0; i < 3; ++i) EXPECT_EQ(v[i], bf16_to_float(b[i]));
}

TEST_F(NpyTest, HeaderIsAlignedAndNumpyStyle) {
  std::vector<float> f(4, 1.0f);
  write_npy(path("a.npy"), make_view(f.data(), DType::kF32, Device::kHost, {4}));
  std::ifstream in(path("a.npy"), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_EQ(bytes.substr(0, 6), "\x93NUMPY");
  const std::size_t hl = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
  EXPECT_EQ((10 + hl) % 64, 0u);
  EXPECT_EQ(bytes[10 + hl - 1], '\n');
  EXPECT_NE(bytes.find("{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }"), std::string::npos);
  EXPECT_EQ(bytes.size(), 10 + hl + 16);
  EXPECT_EQ(npy_header_dict("<f8", {2, 3}), "{'descr': '<f8', 'fortran_order': False, 'shape': (2, 3), }");
}

TEST_F(NpyTest, ReadsVersion2AndOtherKeyOrders) {
  const std::string f = write_raw("v2.npy", "{'shape': (2, 2), 'fortran_order': False, 'descr': '<f4'}", floats(4), "\x93NUMPY", 2);
  NpyArray a = read_npy(f);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 2}));
  const std::string g = write_raw("oldstyle.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (3L,), }",
                                  std::string(3 * sizeof(double), '\0'));
  EXPECT_EQ(read_npy(g).shape, (std::vector<int64_t>{3}));  // Python 2 style long literals
}

TEST_F(NpyTest, AtomicWriteLeavesNoTemporaryAndReplaces) {
  std::vector<double> a(10, 1.0), b(3, 2.0);
  write_npy(path("x.npy"), make_view(a.data(), DType::kF64, Device::kHost, {10}));
  write_npy(path("x.npy"), make_view(b.data(), DType::kF64, Device::kHost, {3}));
  EXPECT_EQ(read_npy(path("x.npy")).shape, (std::vector<int64_t>{3}));
  for (const auto& e : fs::directory_iterator(dir_)) {
    EXPECT_EQ(e.path().filename().string().find("tmp"), std::string::npos) << e.path();
  }
}

TEST_F(NpyTest, WriteIntoMissingDirectoryFailsCleanly) {
  std::vector<double> a(2, 1.0);
  const std::string target = path("no/such/dir/out.npy");
  try {
    write_npy(target, make_view(a.data(), DType::kF64, Device::kHost, {2}));
    FAIL() << "write succeeded";
  } catch (const Error& e) {
    EXPECT_EQ(e.kind(), ErrorKind::kIo);
    EXPECT_NE(std::string(e.what()).find("out.npy"), std::string::npos);
  }
  EXPECT_FALSE(fs::exists(target));
}

TEST_F(NpyTest, RejectsMissingFile) { expect_rejected(path("absent.npy"), "cannot open"); }

TEST_F(NpyTest, RejectsBadMagic) {
  expect_rejected(write_raw("m.npy", npy_header_dict("<f4", {2}), floats(2), "\x93NUMPX"), "magic");
}

TEST_F(NpyTest, RejectsTruncatedData) {
  expect_rejected(write_raw("t.npy", npy_header_dict("<f4", {4, 4}), floats(10)), "truncated");
}

TEST_F(NpyTest, RejectsTrailingBytes) {
  expect_rejected(write_raw("x.npy", npy_header_dict("<f4", {2}), floats(3)), "after the data");
}

TEST_F(NpyTest, RejectsTruncatedHeader) {
  const std::string f = path("h.npy");
  std::ofstream(f, std::ios::binary) << std::string("\x93NUMPY\x01\x00\x40\x00{'descr'", 17);
  expect_rejected(f, "truncated");
  const std::string g = path("tiny.npy");
  std::ofstream(g, std::ios::binary) << "\x93NUM";
  expect_rejected(g, "too short");
}

TEST_F(NpyTest, RejectsFortranOrder) {
  expect_rejected(write_raw("f.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }", floats(4)),
                  "Fortran");
}

TEST_F(NpyTest, RejectsUnsupportedDtypes) {
  expect_rejected(write_raw("i.npy", npy_header_dict("<i4", {2}), floats(2)), "<i4");
  expect_rejected(write_raw("c.npy", npy_header_dict("<c8", {2}), floats(4)), "<c8");
  expect_rejected(write_raw("b.npy", npy_header_dict(">f4", {2}), floats(2)), "big-endian");
  expect_rejected(write_raw("u.npy", npy_header_dict("<U10", {2}), floats(20)), "<U10");
}

TEST_F(NpyTest, RejectsBrokenHeaders) {
  expect_rejected(write_raw("v.npy", npy_header_dict("<f4", {2}), floats(2), "\x93NUMPY", 9), "version");
  expect_rejected(write_raw("n.npy", "not a dict at all", floats(2)), "dictionary");
  expect_rejected(write_raw("s.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': 7, }", floats(7)), "tuple");
  expect_rejected(write_raw("k.npy", "{'descr': '<f4', 'fortran_order': False, }", floats(2)), "'shape'");
  expect_rejected(write_raw("q.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (2, x), }", floats(2)),
                  "non-integer");
}

// A shape whose byte count wraps uint64 (2^32 * 2^32 * 4 bytes = 2^66 -> 0) passed the
// truncation check with an empty payload, and then failed without naming the file.
TEST_F(NpyTest, RejectsShapesWhoseSizeWraps) {
  expect_rejected(write_raw("w.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (4294967296, 4294967296), }", ""),
                  "more than 2^48 bytes");
  expect_rejected(
      write_raw("w3.npy", "{'descr': '<f8', 'fortran_order': False, 'shape': (281474976710656, 65536, 1), }", ""),
      "more than 2^48 bytes");
  expect_rejected(write_raw("big.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (70368744177665,), }", ""),
                  "more than 2^48 bytes");
}

// Seeded fuzz of the reader: random dtypes, orders, shapes (small, near 2^32, 2^48 and the int64
// limit), payloads of the right, a shorter or a longer length, corrupted header bytes and cut
// files. Every file is either read with exactly its shape's bytes, or refused with ringattn's
// error naming the file and a fix: never another exception (length_error, bad_alloc), never a crash.
TEST_F(NpyTest, FuzzedFilesAreReadExactlyOrRefusedNamingTheFile) {
  std::mt19937_64 rng(20261204);
  const char* descrs[] = {"<f4", "<f8", "<f2", "<i4", "|u1", ">f4", "<f16", "", "<f"};
  const int64_t dims[] = {0, 1, 2, 3, 7, 64, 4294967295LL, 4294967296LL, 281474976710655LL, 281474976710656LL,
                          9223372036854775807LL};
  auto pick = [&](auto& arr) { return arr[rng() % (sizeof(arr) / sizeof(arr[0]))]; };
  int read_ok = 0, refused = 0;
  for (int iter = 0; iter < 3000; ++iter) {
    const std::string descr = pick(descrs);
    const int rank = static_cast<int>(rng() % 5);
    std::string shape = "(";
    long double want = descr == "<f8" ? 8 : descr == "<f2" ? 2 : 4;
    for (int d = 0; d < rank; ++d) {
      const int64_t n = rng() % 3 == 0 ? pick(dims) : static_cast<int64_t>(rng() % 5);
      shape += std::to_string(n) + (rank == 1 || d + 1 < rank ? ", " : "");
      want *= static_cast<long double>(n);
    }
    shape += ")";
    std::string dict = std::string("{'descr': '") + descr + "', 'fortran_order': " + (rng() % 8 ? "False" : "True") +
                       ", 'shape': " + shape + ", }";
    if (rng() % 6 == 0) dict[rng() % dict.size()] = static_cast<char>(rng() % 256);  // a corrupted byte
    std::size_t payload = want < 4096 ? static_cast<std::size_t>(want) : static_cast<std::size_t>(rng() % 4096);
    if (rng() % 4 == 0) payload += rng() % 9;
    if (rng() % 4 == 0 && payload > 0) payload -= 1 + rng() % payload;
    std::string file = write_raw("fuzz.npy", dict, std::string(payload, '\x3c'));
    if (rng() % 8 == 0) fs::resize_file(file, rng() % (fs::file_size(file) + 1));  // a cut file
    try {
      NpyArray a = read_npy(file);
      long double bytes = static_cast<long double>(dtype_size(a.dtype));
      for (int64_t n : a.shape) bytes *= static_cast<long double>(n);
      ASSERT_EQ(static_cast<long double>(a.data.size()), bytes) << dict;
      ++read_ok;
    } catch (const Error& e) {
      const std::string msg = e.what();
      ASSERT_NE(msg.find(file), std::string::npos) << "iteration " << iter << " (" << dict << "): " << msg;
      ASSERT_NE(msg.find("hint"), std::string::npos) << "iteration " << iter << ": " << msg;
      ++refused;
    } catch (const std::exception& e) {
      FAIL() << "iteration " << iter << " (" << dict << ", " << payload << " payload bytes) threw " << e.what();
    }
  }
  EXPECT_GT(read_ok, 100);  // the fuzz reaches valid files too, not only refusals
  EXPECT_GT(refused, 100);
}

TEST_F(NpyTest, ShapeExpectationNamesFileAndAxes) {
  std::vector<float> f(6, 1.0f);
  write_npy(path("q.npy"), make_view(f.data(), DType::kF32, Device::kHost, {1, 6}));
  NpyArray a = read_npy(path("q.npy"));
  EXPECT_NO_THROW(expect_npy_shape(a, {1, 6}, path("q.npy"), "[a, b]"));
  try {
    expect_npy_shape(a, {1, 3, 2, 1}, path("q.npy"), "[batch, seq, heads, head_dim]");
    FAIL();
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("q.npy"), std::string::npos);
    EXPECT_NE(msg.find("(1, 6)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[batch, seq, heads, head_dim]"), std::string::npos) << msg;
  }
}

}  // namespace
}  // namespace ringattn
