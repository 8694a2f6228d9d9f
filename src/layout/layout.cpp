// Global positions of every rank's chunk, tile/chunk visibility under the causal rule, shard/unshard on the host.
#include "ringattn/layout.hpp"

#include <cstring>

#include "ringattn/error.hpp"

namespace ringattn {

int64_t ChunkPositions::min_in(int64_t lo, int64_t hi) const {
  int64_t best = INT64_MAX;
  int64_t base = 0;
  for (int s = 0; s < num_segments; ++s) {
    const Segment& g = segment(s);
    const int64_t a = std::max(lo, base), b = std::min(hi, base + g.count);
    if (a < b) best = std::min(best, g.start + g.stride * (a - base));
    base += g.count;
  }
  return best;
}

int64_t ChunkPositions::max_in(int64_t lo, int64_t hi) const {
  int64_t best = INT64_MIN;
  int64_t base = 0;
  for (int s = 0; s < num_segments; ++s) {
    const Segment& g = segment(s);
    const int64_t a = std::max(lo, base), b = std::min(hi, base + g.count);
    if (a < b) best = std::max(best, g.start + g.stride * (b - 1 - base));
    base += g.count;
  }
  return best;
}

ChunkPositions positions_from(const std::vector<Segment>& segments) {
  ChunkPositions p;
  p.num_segments = static_cast<int>(segments.size());
  if (segments.size() <= static_cast<std::size_t>(kMaxSegments)) {
    for (std::size_t i = 0; i < segments.size(); ++i) p.seg[i] = segments[i];
  } else {
    p.list = segments.data();
  }
  return p;
}

std::vector<Segment> slice_segments(const ChunkPositions& p, int64_t lo, int64_t hi) {
  std::vector<Segment> out;
  int64_t base = 0;
  for (int s = 0; s < p.num_segments; ++s) {
    const Segment& g = p.segment(s);
    const int64_t a = std::max(lo, base), b = std::min(hi, base + g.count);
    if (a < b) out.push_back({g.start + g.stride * (a - base), g.stride, b - a});
    base += g.count;
  }
  return out;
}

int64_t layout_divisor(Layout layout, int world) {
  switch (layout) {
    case Layout::kZigzag: return 2 * static_cast<int64_t>(world);
    case Layout::kBalanced: return kBalancedBlock * static_cast<int64_t>(world);
    default: return static_cast<int64_t>(world);
  }
}

ChunkPositions chunk_positions(Layout layout, int64_t seq_len, int rank, int world) {
  RINGATTN_CHECK(world >= 1 && rank >= 0 && rank < world, ErrorKind::kInternal,
                 "rank " + std::to_string(rank) + " outside ring of " + std::to_string(world), "");
  RINGATTN_CHECK(seq_len % layout_divisor(layout, world) == 0, ErrorKind::kInvalidArgument,
                 "sequence length " + std::to_string(seq_len) + " not divisible by " +
                     std::to_string(layout_divisor(layout, world)) + " for the " + layout_name(layout) + " layout",
                 "choose --seq-len as a multiple of that number");
  RINGATTN_CHECK(layout != Layout::kAuto && layout != Layout::kBalanced, ErrorKind::kInternal,
                 std::string("chunk_positions got the ") + layout_name(layout) + " layout, which the ring plan resolves",
                 "");
  ChunkPositions p;
  const int64_t c = seq_len / world;
  switch (layout) {
    case Layout::kAuto:
    case Layout::kBalanced:
      break;
    case Layout::kContiguous:
      p.num_segments = 1;
      p.seg[0] = {rank * c, 1, c};
      break;
    case Layout::kZigzag: {
      const int64_t half = c / 2;
      p.num_segments = 2;
      p.seg[0] = {rank * half, 1, half};
      p.seg[1] = {(2 * int64_t{world} - 1 - rank) * half, 1, half};
      break;
    }
    case Layout::kStriped:
      p.num_segments = 1;
      p.seg[0] = {rank, world, c};
      break;
  }
  return p;
}

Visibility classify_tile(const Mask& mask, bool patterned, const ChunkPositions& q, int64_t q_lo, int64_t q_hi,
                         const ChunkPositions& k, int64_t k_lo, int64_t k_hi) {
  if (q_lo >= q_hi || k_lo >= k_hi) return Visibility::kEmpty;
  return classify(mask, q.min_in(q_lo, q_hi), q.max_in(q_lo, q_hi), k.min_in(k_lo, k_hi), k.max_in(k_lo, k_hi),
                  patterned);
}

Visibility classify_chunks(const Mask& mask, int heads, const ChunkPositions& q, const ChunkPositions& k) {
  if (q.size() == 0 || k.size() == 0) return Visibility::kEmpty;
  // Segment by segment: a zigzag chunk's two pieces are far apart, their hull would be partial.
  Visibility all = Visibility::kEmpty;
  bool first = true;
  int64_t qb = 0;
  for (int a = 0; a < q.num_segments; ++a) {
    const int64_t qn = q.segment(a).count;
    int64_t kb = 0;
    for (int b = 0; b < k.num_segments; ++b) {
      const int64_t kn = k.segment(b).count;
      const Visibility v = classify_any_head(mask, heads, q.min_in(qb, qb + qn), q.max_in(qb, qb + qn),
                                             k.min_in(kb, kb + kn), k.max_in(kb, kb + kn));
      if (first) {
        all = v;
        first = false;
      } else if (v != all) {
        all = (v == Visibility::kEmpty && all == Visibility::kEmpty) ? Visibility::kEmpty : Visibility::kPartial;
      }
      kb += kn;
    }
    qb += qn;
  }
  return all;
}

Visibility classify_chunks(const ChunkPositions& q, const ChunkPositions& k, bool causal) {
  Mask m;
  m.causal = causal;
  return classify_chunks(m, 1, q, k);
}

namespace {

void move_rows(const TensorView& local, const TensorView& global, const ChunkPositions& positions, int seq_dim,
               bool to_global) {
  RINGATTN_CHECK(local.device == Device::kHost && global.device == Device::kHost, ErrorKind::kInternal,
                 "host shard/unshard got a device tensor", "use the device-side helpers");
  RINGATTN_CHECK(local.dtype == global.dtype && local.rank == global.rank, ErrorKind::kInvalidArgument,
                 "shard/unshard between " + local.describe() + " and " + global.describe(),
                 "both tensors need the same dtype and rank");
  RINGATTN_CHECK(local.is_contiguous() && global.is_contiguous(), ErrorKind::kInvalidArgument,
                 "shard/unshard needs contiguous tensors", "make a contiguous copy first");
  RINGATTN_CHECK(local.shape[seq_dim] == positions.size(), ErrorKind::kInvalidArgument,
                 "local tensor " + local.describe() + " has " + std::to_string(local.shape[seq_dim]) +
                     " rows, the layout gives " + std::to_string(positions.size()),
                 "allocate seq_len / ranks rows per rank");
  int64_t outer = 1, inner = 1;
  for (int d = 0; d < seq_dim; ++d) {
    RINGATTN_CHECK(local.shape[d] == global.shape[d], ErrorKind::kInvalidArgument,
                   "shape mismatch " + local.describe() + " vs " + global.describe(), "");
    outer *= local.shape[d];
  }
  for (int d = seq_dim + 1; d < local.rank; ++d) inner *= local.shape[d];
  const std::size_t row_bytes = static_cast<std::size_t>(inner) * dtype_size(local.dtype);
  const int64_t local_rows = local.shape[seq_dim], global_rows = global.shape[seq_dim];
  auto* lb = static_cast<char*>(local.data);
  auto* gb = static_cast<char*>(global.data);
  for (int64_t o = 0; o < outer; ++o) {
    for (int64_t i = 0; i < local_rows; ++i) {
      const int64_t g = positions.at(i);
      RINGATTN_CHECK(g >= 0 && g < global_rows, ErrorKind::kInvalidArgument,
                     "position " + std::to_string(g) + " outside global tensor " + global.describe(), "");
      char* l = lb + (o * local_rows + i) * row_bytes;
      char* gp = gb + (o * global_rows + g) * row_bytes;
      if (to_global) {
        std::memcpy(gp, l, row_bytes);
      } else {
        std::memcpy(l, gp, row_bytes);
      }
    }
  }
}

}  // namespace

void shard_rows(const TensorView& global, const TensorView& local, const ChunkPositions& positions, int seq_dim) {
  move_rows(local, global, positions, seq_dim, false);
}

void unshard_rows(const TensorView& local, const TensorView& global, const ChunkPositions& positions, int seq_dim) {
  move_rows(local, global, positions, seq_dim, true);
}

}  // namespace ringattn
