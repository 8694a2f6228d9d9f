// Compile-time tile shapes and shared-memory layout of the forward kernel (FlashAttention-2 structure).
#pragma once

namespace ringattn::cuda {

// One thread block owns kBlockM query rows of one (batch, head) and walks the visible key tiles
// of kBlockN rows. Each warp owns kBlockM / kWarps whole query rows, so row statistics need only
// shuffles among the 4 lanes of a quad.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kWarps_, int kMinBlocksPerSm_ = 2>
struct FlashFwdTraits {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kWarpSize = 32;
  static constexpr int kThreads = kWarps * kWarpSize;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;  // register budget: 64K / (threads * blocks)

  // mma.sync.m16n8k16 tile.
  static constexpr int kMmaM = 16;
  static constexpr int kMmaN = 8;
  static constexpr int kMmaK = 16;

  static constexpr int kRowsPerWarp = kBlockM / kWarps;
  static constexpr int kMTiles = kRowsPerWarp / kMmaM;  // m16 tiles per warp
  static constexpr int kNTilesS = kBlockN / kMmaN;      // n8 tiles of the score tile S
  static constexpr int kNTilesO = kHeadDim / kMmaN;     // n8 tiles of the output accumulator
  static constexpr int kKStepsS = kHeadDim / kMmaK;     // k16 steps of S = Q K^T
  static constexpr int kKStepsO = kBlockN / kMmaK;      // k16 steps of O += P V

  // Shared memory: rows of kHeadDim 2-byte elements cut in 16-byte chunks; chunk c of row r is
  // stored at chunk (c ^ (r & kSwizzleMask)) so the 8 rows an ldmatrix reads hit 8 different banks.
  static constexpr int kElemBytes = 2;
  static constexpr int kChunkBytes = 16;
  static constexpr int kChunkElems = kChunkBytes / kElemBytes;
  static constexpr int kChunksPerRow = kHeadDim / kChunkElems;
  static constexpr int kSwizzleRows = 8;
  static constexpr int kSwizzleMask = kSwizzleRows - 1;

  static constexpr int kSmemQElems = kBlockM * kHeadDim;
  static constexpr int kSmemKElems = kBlockN * kHeadDim;
  static constexpr int kSmemVElems = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (kSmemQElems + kSmemKElems + kSmemVElems) * kElemBytes;

  static_assert(kBlockM % kWarps == 0 && kRowsPerWarp % kMmaM == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % (2 * kMmaN) == 0, "key tile: pairs of n8 tiles (one ldmatrix.x4)");
  static_assert(kHeadDim % (2 * kMmaN) == 0 && kHeadDim % kMmaK == 0, "head_dim: pairs of n8 tiles, k16 steps");
  static_assert(kChunksPerRow % kSwizzleRows == 0, "the XOR swizzle needs 8 chunks per row");
  static_assert(kThreads % kChunksPerRow == 0 && (kThreads / kChunksPerRow) % kSwizzleRows == 0,
                "tile loads: each pass covers whole rows, a multiple of the swizzle period");
  static_assert(kBlockM % (kThreads / kChunksPerRow) == 0, "Q tile loads split evenly over threads");
  static_assert(kBlockN % (kThreads / kChunksPerRow) == 0, "K/V tile loads split evenly over threads");
  static_assert(kSmemBytes <= 227 * 1024, "tiles must fit in Hopper shared memory");
};

}  // namespace ringattn::cuda
