// Ring forward/backward over MPI equals the single-process fp64 reference for every layout, mask and head grouping.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <set>
#include <vector>

#include "attn/reference.hpp"
#include "plan/plan.hpp"
#include "comm/transports.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn {
namespace {

constexpr double kFp64Tolerance = 1e-12;
constexpr double kFp64GradTolerance = 1e-11;
constexpr double kFp32Tolerance = 2e-5;

int mpi_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int mpi_world() {
  int w = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &w);
  return w;
}

// Deterministic values in [-2, 2): identical on every rank.
std::vector<double> random_values(int64_t n, uint64_t seed) {
  std::vector<double> out(static_cast<std::size_t>(n));
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : out) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    v = static_cast<double>((x * 0x2545F4914F6CDD1Dull) >> 11) / static_cast<double>(1ull << 53) * 4.0 - 2.0;
  }
  return out;
}

// Global tensor stored as fp64 plus a copy in the run's dtype (bytes).
struct Global {
  std::vector<double> f64;
  std::vector<unsigned char> bytes;
  TensorView view;  // in the run's dtype
};

Global make_global(DType dtype, int64_t b, int64_t s, int64_t h, int64_t d, uint64_t seed) {
  Global g;
  g.f64 = random_values(b * s * h * d, seed);
  g.bytes.resize(g.f64.size() * dtype_size(dtype));
  g.view = make_view(g.bytes.data(), dtype, Device::kHost, {b, s, h, d});
  for (int64_t i = 0; i < g.view.numel(); ++i) store_from_double(g.view, i, g.f64[i]);
  return g;
}

struct Local {
  std::vector<unsigned char> bytes;
  TensorView view;
};

Local make_local(DType dtype, std::initializer_list<int64_t> shape) {
  Local l;
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  l.bytes.assign(static_cast<std::size_t>(n) * dtype_size(dtype), 0xFF);  // poison: NaN for floats
  l.view = make_view(l.bytes.data(), dtype, Device::kHost, shape);
  return l;
}

struct Case {
  Layout layout;
  bool causal;
  int heads, kv_heads;
  MaskSpec mask = {};  // the patterns and documents beside `causal`
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (Layout layout : {Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    for (bool causal : {false, true}) {
      cases.push_back({layout, causal, 4, 4});  // MHA
      cases.push_back({layout, causal, 6, 2});  // GQA
      cases.push_back({layout, causal, 3, 1});  // MQA
    }
  }
  return cases;
}

std::string name_of(const Case& c) {
  return std::string(layout_name(c.layout)) + (c.causal ? " causal" : " full") + " H=" + std::to_string(c.heads) +
         " Hkv=" + std::to_string(c.kv_heads) + (c.mask.has_pattern() || c.mask.has_documents() ? " " + c.mask.describe() : "");
}

// Every pattern alone and combined, with documents, on every layout (the masks issue's matrix).
std::vector<Case> mask_cases(int64_t seq) {
  std::vector<MaskSpec> masks;
  MaskSpec m;
  m.has_window = true; m.window_left = 5; m.window_right = 0; masks.push_back(m);       // causal-style window
  m.window_left = 3; m.window_right = 4; masks.push_back(m);                             // symmetric band
  m = MaskSpec{}; m.stride = 4; masks.push_back(m);
  m = MaskSpec{}; m.global_tokens = 3; masks.push_back(m);
  m = MaskSpec{}; m.has_window = true; m.window_left = 2; m.window_right = 2; m.global_tokens = 2; masks.push_back(m);
  m = MaskSpec{}; m.has_window = true; m.window_left = 6; m.window_right = 0; m.stride = 5; masks.push_back(m);
  m = MaskSpec{}; m.has_window = true; m.window_left = 1; m.window_right = 1; m.mask_heads = 2; masks.push_back(m);
  m = MaskSpec{}; m.doc_offsets = doc_offsets_from_lengths({seq / 3, seq / 6, seq - seq / 3 - seq / 6}, seq);
  masks.push_back(m);
  m.has_window = true; m.window_left = 4; m.window_right = 0; masks.push_back(m);       // documents and a window
  m = masks.back(); m.global_tokens = 1; masks.push_back(m);
  std::vector<Case> cases;
  for (Layout layout : {Layout::kAuto, Layout::kContiguous, Layout::kZigzag, Layout::kStriped}) {
    for (const MaskSpec& mask : masks) {
      for (bool causal : {false, true}) {
        Case c{layout, causal, 4, 2, mask};
        c.mask.causal = causal;
        cases.push_back(c);
      }
    }
  }
  return cases;
}

// Runs the ring forward for one case; returns max |ring - reference| over this rank's out and lse.
double forward_error(const Case& c, DType dtype, int64_t batch, int64_t seq, int head_dim) {
  const int world = mpi_world(), rank = mpi_rank();
  AttentionSpec spec;
  spec.batch = batch;
  spec.seq_len = seq;
  spec.heads = c.heads;
  spec.kv_heads = c.kv_heads;
  spec.head_dim = head_dim;
  spec.mask = c.mask;
  spec.mask.causal = c.causal;
  spec.layout = c.layout;
  spec.dtype = dtype;
  Global q = make_global(dtype, batch, seq, c.heads, head_dim, 11);
  Global k = make_global(dtype, batch, seq, c.kv_heads, head_dim, 22);
  Global v = make_global(dtype, batch, seq, c.kv_heads, head_dim, 33);

  Local ref_out = make_local(DType::kF64, {batch, seq, c.heads, head_dim});
  Local ref_lse = make_local(DType::kF64, {batch, c.heads, seq});
  const ChunkPositions all = identity_positions(seq);
  reference_attention(spec, q.view, all, k.view, v.view, all, ref_out.view, ref_lse.view);

  RingAttention ring(spec, make_cpu_backend(), make_mpi_transport(MPI_COMM_WORLD));
  const int64_t c_rows = ring.local_seq();
  const ChunkPositions pos = ring.positions();
  Local lq = make_local(dtype, {batch, c_rows, c.heads, head_dim});
  Local lk = make_local(dtype, {batch, c_rows, c.kv_heads, head_dim});
  Local lv = make_local(dtype, {batch, c_rows, c.kv_heads, head_dim});
  shard_rows(q.view, lq.view, pos, 1);
  shard_rows(k.view, lk.view, pos, 1);
  shard_rows(v.view, lv.view, pos, 1);
  const DType lse_dtype = dtype == DType::kF64 ? DType::kF64 : DType::kF32;
  Local out = make_local(dtype, {batch, c_rows, c.heads, head_dim});
  Local lse = make_local(lse_dtype, {batch, c.heads, c_rows});
  ring.forward(lq.view, lk.view, lv.view, out.view, lse.view);

  Local want_out = make_local(DType::kF64, {batch, c_rows, c.heads, head_dim});
  Local want_lse = make_local(DType::kF64, {batch, c.heads, c_rows});
  shard_rows(ref_out.view, want_out.view, pos, 1);
  shard_rows(ref_lse.view, want_lse.view, pos, 2);
  double err = 0.0;
  for (int64_t i = 0; i < out.view.numel(); ++i) {
    const double d = std::fabs(load_as_double(out.view, i) - load_as_double(want_out.view, i));
    err = std::isnan(d) ? INFINITY : std::max(err, d);
  }
  for (int64_t i = 0; i < lse.view.numel(); ++i) {
    const double d = std::fabs(load_as_double(lse.view, i) - load_as_double(want_lse.view, i));
    err = std::isnan(d) ? INFINITY : std::max(err, d);
  }
  // The ring's hops, or a direct plan's own block and remote hops.
  const RingPlan& plan = ring.plan();
  EXPECT_EQ(static_cast<int>(ring.last_stats().hops.size()),
            plan.route == Route::kRing ? world : static_cast<int>(plan.hops.size()) + 1);
  return err;
}

TEST(RingForward, Fp64EqualsReferenceForEveryLayoutMaskAndGrouping) {
  for (const Case& c : all_cases()) {
    const double err = forward_error(c, DType::kF64, /*batch=*/2, /*seq=*/48, /*head_dim=*/7);
    EXPECT_LT(err, kFp64Tolerance) << name_of(c) << " on " << mpi_world() << " ranks, rank " << mpi_rank();
  }
}

TEST(RingMasks, Fp64ForwardEqualsReferenceForEveryMaskAndLayout) {
  for (const Case& c : mask_cases(48)) {
    const double err = forward_error(c, DType::kF64, /*batch=*/2, /*seq=*/48, /*head_dim=*/5);
    EXPECT_LT(err, kFp64Tolerance) << name_of(c) << " on " << mpi_world() << " ranks, rank " << mpi_rank();
  }
}

TEST(RingForward, Fp32EqualsReferenceWithinFp32Rounding) {
  for (const Case& c : all_cases()) {
    const double err = forward_error(c, DType::kF32, /*batch=*/1, /*seq=*/72, /*head_dim=*/16);
    EXPECT_LT(err, kFp32Tolerance) << name_of(c) << " on " << mpi_world() << " ranks";
  }
}

TEST(RingForward, CausalStepsHiddenByTheMaskAreSkipped) {
  const int world = mpi_world(), rank = mpi_rank();
  Case c{Layout::kContiguous, true, 2, 2};
  forward_error(c, DType::kF64, 1, 24, 4);
  AttentionSpec spec;
  spec.seq_len = 24;
  spec.heads = 2;
  spec.head_dim = 4;
  spec.mask.causal = true;
  spec.dtype = DType::kF64;
  RingAttention ring(spec, make_cpu_backend(), make_mpi_transport(MPI_COMM_WORLD));
  Local q = make_local(DType::kF64, {1, 24 / world, 2, 4});
  std::fill(reinterpret_cast<double*>(q.bytes.data()), reinterpret_cast<double*>(q.bytes.data()) + q.view.numel(), 0.5);
  Local out = make_local(DType::kF64, {1, 24 / world, 2, 4});
  Local lse = make_local(DType::kF64, {1, 2, 24 / world});
  ring.forward(q.view, q.view, q.view, out.view, lse.view);
  // With the contiguous layout rank r sees chunks r, r-1, ..., 0: it computes on exactly those, and
  // a direct plan moves no row of a later rank's chunk to it (the ring skips their compute only).
  std::set<int> computed;
  uint64_t received = 0;
  for (const HopStats& h : ring.last_stats().hops) {
    if (!h.skipped) computed.insert(h.source_rank);
    if (!h.skipped) EXPECT_LE(h.source_rank, rank) << "hop " << h.hop;
    received += h.received_bytes;
  }
  EXPECT_EQ(static_cast<int>(computed.size()), rank + 1);
  const uint64_t chunk_bytes = 2ull * (24 / world) * 2 * 4 * sizeof(double);  // K + V of one chunk
  if (ring.plan().route == Route::kDirect) {
    EXPECT_EQ(received, static_cast<uint64_t>(rank) * chunk_bytes);
  } else {
    EXPECT_EQ(received, static_cast<uint64_t>(world - 1) * chunk_bytes);
  }
}

TEST(RingTransport, AfterKHopsRankHoldsChunkOfRankMinusK) {
  const int world = mpi_world(), rank = mpi_rank();
  if (world == 1) GTEST_SKIP() << "needs at least 2 ranks to exchange";
  // Through the public factory a host program uses with its own communicator.
  MPI_Comm host_comm = MPI_COMM_WORLD;
  auto transport = make_mpi_transport_borrowed(&host_comm);
  constexpr std::size_t kBytes = 4099;  // odd size: no alignment luck
  auto fill = [](int owner, std::vector<unsigned char>& buf) {
    for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>((owner * 131 + i * 7) & 0xFF);
  };
  std::vector<unsigned char> a(kBytes), b(kBytes, 0), expected(kBytes);
  fill(rank, a);
  for (int k = 1; k < world + 1; ++k) {
    transport->start_exchange(a.data(), b.data(), kBytes, k);
    transport->wait(k);
    fill(((rank - k) % world + world) % world, expected);
    EXPECT_EQ(0, std::memcmp(b.data(), expected.data(), kBytes)) << "after " << k << " hops on rank " << rank;
    std::swap(a, b);
  }
}

// An exchange of pieces: each piece lands in its own receive buffer; a host transport runs the
// prologue (the backward's fold) while posting, and rank+1 receives what it wrote.
TEST(RingTransport, PiecesLandInTheirBuffersAfterThePrologue) {
  const int world = mpi_world(), rank = mpi_rank();
  if (world == 1) GTEST_SKIP() << "needs at least 2 ranks to exchange";
  MPI_Comm host_comm = MPI_COMM_WORLD;
  auto transport = make_mpi_transport_borrowed(&host_comm);
  const std::size_t sizes[3] = {17, 0, 4099};  // odd sizes, and an empty piece
  std::vector<unsigned char> send[3], recv[3];
  for (int i = 0; i < 3; ++i) {
    send[i].assign(sizes[i], static_cast<unsigned char>(rank * 10 + i));
    recv[i].assign(sizes[i], 0xEE);
  }
  const ExchangePart parts[3] = {{send[0].data(), recv[0].data(), sizes[0]},
                                 {send[1].data(), recv[1].data(), sizes[1]},
                                 {send[2].data(), recv[2].data(), sizes[2]}};
  bool ran = false;
  transport->start_exchange_pieces(parts, 3, 0, [&](void* stream) {
    EXPECT_EQ(stream, nullptr) << "a host transport runs the prologue itself";
    for (auto& x : send[2]) x = static_cast<unsigned char>(x + 100);
    ran = true;
  });
  EXPECT_TRUE(ran) << "the prologue had not run when the exchange was posted";
  transport->wait(0);
  const int prev = (rank + world - 1) % world;
  for (int i = 0; i < 3; ++i) {
    const unsigned char want = static_cast<unsigned char>(prev * 10 + i + (i == 2 ? 100 : 0));
    for (std::size_t j = 0; j < sizes[i]; ++j) {
      ASSERT_EQ(recv[i][j], want) << "piece " << i << " byte " << j << " on rank " << rank;
    }
  }
}

// Backward through the ring equals the naive fp64 reference gradients.
void backward_case(const Case& c, int64_t batch, int64_t seq, int head_dim) {
  const int world = mpi_world(), rank = mpi_rank();
  AttentionSpec spec;
  spec.batch = batch;
  spec.seq_len = seq;
  spec.heads = c.heads;
  spec.kv_heads = c.kv_heads;
  spec.head_dim = head_dim;
  spec.mask = c.mask;
  spec.mask.causal = c.causal;
  spec.layout = c.layout;
  spec.dtype = DType::kF64;
  const DType f = DType::kF64;
  Global q = make_global(f, batch, seq, c.heads, head_dim, 5);
  Global k = make_global(f, batch, seq, c.kv_heads, head_dim, 6);
  Global v = make_global(f, batch, seq, c.kv_heads, head_dim, 7);
  Global dout = make_global(f, batch, seq, c.heads, head_dim, 8);
  Local rdq = make_local(f, {batch, seq, c.heads, head_dim});
  Local rdk = make_local(f, {batch, seq, c.kv_heads, head_dim});
  Local rdv = make_local(f, {batch, seq, c.kv_heads, head_dim});
  reference_attention_backward(spec, q.view, k.view, v.view, dout.view, rdq.view, rdk.view, rdv.view);

  RingAttention ring(spec, make_cpu_backend(), make_mpi_transport(MPI_COMM_WORLD));
  const int64_t n = ring.local_seq();
  const ChunkPositions pos = ring.positions();
  auto shard = [&](const TensorView& g, int heads) {
    Local l = make_local(f, {batch, n, heads, head_dim});
    shard_rows(g, l.view, pos, 1);
    return l;
  };
  Local lq = shard(q.view, c.heads), lk = shard(k.view, c.kv_heads), lv = shard(v.view, c.kv_heads);
  Local ldo = shard(dout.view, c.heads);
  Local out = make_local(f, {batch, n, c.heads, head_dim});
  Local lse = make_local(f, {batch, c.heads, n});
  ring.forward(lq.view, lk.view, lv.view, out.view, lse.view);
  Local dq = make_local(f, {batch, n, c.heads, head_dim});
  Local dk = make_local(f, {batch, n, c.kv_heads, head_dim});
  Local dv = make_local(f, {batch, n, c.kv_heads, head_dim});
  // Twice: the second pass reuses the ring's message buffers and accumulators, so a share or partial
  // left over from the first would show.
  ring.backward(lq.view, lk.view, lv.view, out.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
  ring.backward(lq.view, lk.view, lv.view, out.view, lse.view, ldo.view, dq.view, dk.view, dv.view);
  // One entry per compute hop, plus the home hop (the finished dK/dV travelling to their owner).
  const std::vector<HopStats>& hops = ring.last_stats().hops;
  if (ring.plan().route == Route::kDirect) {  // own block, remote hops, and the last dK/dV's way home
    ASSERT_EQ(hops.size(), ring.plan().hops.size() + 2);
  } else {
    ASSERT_EQ(static_cast<int>(hops.size()), world > 1 ? world + 1 : 1);
  }
  if (world > 1 && ring.plan().route == Route::kRing) {
    EXPECT_EQ(hops.back().hop, world);
    EXPECT_EQ(hops.back().source_rank, (rank + 1) % world);  // the chunk computed last is rank+1's
  }
  Local wq = shard(rdq.view, c.heads), wk = shard(rdk.view, c.kv_heads), wv = shard(rdv.view, c.kv_heads);
  auto max_err = [](const Local& a, const Local& b) {
    double e = 0.0;
    for (int64_t i = 0; i < a.view.numel(); ++i) {
      const double d = std::fabs(load_as_double(a.view, i) - load_as_double(b.view, i));
      e = std::isnan(d) ? INFINITY : std::max(e, d);
    }
    return e;
  };
  EXPECT_LT(max_err(dq, wq), kFp64GradTolerance) << "dq " << name_of(c) << " rank " << rank << "/" << world;
  EXPECT_LT(max_err(dk, wk), kFp64GradTolerance) << "dk " << name_of(c) << " rank " << rank << "/" << world;
  EXPECT_LT(max_err(dv, wv), kFp64GradTolerance) << "dv " << name_of(c) << " rank " << rank << "/" << world;
}

TEST(RingBackward, Fp64GradientsEqualReferenceForEveryLayoutMaskAndGrouping) {
  for (const Case& c : all_cases()) backward_case(c, /*batch=*/2, /*seq=*/24, /*head_dim=*/5);
}

// One batch entry (the CLI's and most training stacks' case), also through the home hop's telemetry.
TEST(RingBackward, Fp64GradientsWithOneBatchEntry) {
  for (const Case& c : all_cases()) backward_case(c, /*batch=*/1, /*seq=*/24, /*head_dim=*/5);
}

TEST(RingMasks, Fp64GradientsEqualReferenceForEveryMaskAndLayout) {
  for (const Case& c : mask_cases(24)) backward_case(c, /*batch=*/2, /*seq=*/24, /*head_dim=*/3);
}

}  // namespace
}  // namespace ringattn
