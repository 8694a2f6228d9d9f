// Global positions of every rank's chunk, tile/chunk visibility under the causal rule, shard/unshard on the host.
#include "ringattn/layout.hpp"

#include <cstring>

#include "ringattn/error.hpp"

namespace ringattn {

int64_t ChunkPositions::min_in(int64_t lo, int64_t hi) const {
  int64_t best = INT64_MAX;
  int64_t base = 0;
  for (int s = 0; s < num_segments; ++s) {
    const int64_t a = std::max(lo, base), b = std::min(hi, base + seg[s].count);
    if (a < b) best = std::min(best, seg[s].start + seg[s].stride * (a - base));
    base += seg[s].count;
  }
  return best;
}

int64_t ChunkPositions::max_in(int64_t lo, int64_t hi) const {
  int64_t best = INT64_MIN;
  int64_t base = 0;
  for (int s = 0; s < num_segments; ++s) {
    const int64_t a = std::max(lo, base), b = std::min(hi, base + seg[s].count);
    if (a < b) best = std::max(best, seg[s].start + seg[s].stride * (b - 1 - base));
    base += seg[s].count;
  }
  return best;
}

int64_t layout_divisor(Layout layout, int world) {
  return layout == Layout::kZigzag ? 2 * static_cast<int64_t>(world) : static_cast<int64_t>(world);
}

ChunkPositions chunk_positions(Layout layout, int64_t seq_len, int rank, int world) {
  RINGATTN_CHECK(world >= 1 && rank >= 0 && rank < world, ErrorKind::kInternal,
                 "rank " + std::to_string(rank) + " outside ring of " + std::to_string(world), "");
  RINGATTN_CHECK(seq_len % layout_divisor(layout, world) == 0, ErrorKind::kInvalidArgument,
                 "sequence length " + std::to_string(seq_len) + " not divisible by " +
                     std::to_string(layout_divisor(layout, world)) + " for the " + layout_name(layout) + " layout",
                 "choose --seq-len as a multiple of that number");
  ChunkPositions p;
  const int64_t c = seq_len / world;
  switch (layout) {
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

Visibility classify_tile(const ChunkPositions& q, int64_t q_lo, int64_t q_hi, const ChunkPositions& k,
                         int64_t k_lo, int64_t k_hi, bool causal) {
  if (q_lo >= q_hi || k_lo >= k_hi) return Visibility::kEmpty;
  if (!causal) return Visibility::kFull;
  const int64_t q_min = q.min_in(q_lo, q_hi), q_max = q.max_in(q_lo, q_hi);
  const int64_t k_min = k.min_in(k_lo, k_hi), k_max = k.max_in(k_lo, k_hi);
  if (k_min > q_max) return Visibility::kEmpty;
  if (k_max <= q_min) return Visibility::kFull;
  return Visibility::kPartial;
}

Visibility classify_chunks(const ChunkPositions& q, const ChunkPositions& k, bool causal) {
  return classify_tile(q, 0, q.size(), k, 0, k.size(), causal);
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
