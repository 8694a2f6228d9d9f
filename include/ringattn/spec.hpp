// The attention problem: shapes, masking, layout and precision, validated before any work starts.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "ringattn/mask.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// How the global sequence is split over the ring (see DESIGN.md "Masks are positions").
enum class Layout {
  kContiguous,  // rank r owns positions [r*c, (r+1)*c)
  kZigzag,      // 2p pieces; rank r owns pieces r and 2p-1-r
  kStriped,     // position t lives on rank t mod p
  kAuto,        // resolved per problem: contiguous with a window, zigzag for causal, else contiguous
  kBalanced,    // kBalancedBlock-token blocks given to ranks so that visible pairs per rank even out
};

// Tokens per block of the balanced layout.
inline constexpr int64_t kBalancedBlock = 128;

const char* layout_name(Layout layout);
Layout parse_layout(std::string_view name);  // throws ringattn::Error naming --layout

struct AttentionSpec {
  int64_t batch = 1;
  int64_t seq_len = 0;  // global sequence length, all ranks together
  int heads = 0;        // query heads
  int kv_heads = 0;     // key/value heads; heads % kv_heads == 0 (GQA/MQA). 0 means = heads.
  int head_dim = 0;
  MaskSpec mask;        // which keys each query sees (mask.hpp); default: every key
  double softmax_scale = 0.0;  // 0 means 1/sqrt(head_dim)
  Layout layout = Layout::kContiguous;
  DType dtype = DType::kF32;

  double scale() const;
  int effective_kv_heads() const { return kv_heads > 0 ? kv_heads : heads; }
  int group_size() const { return heads / effective_kv_heads(); }
  // Local (per-rank) sequence length for a ring of `world` ranks.
  int64_t local_seq(int world) const { return seq_len / world; }
  // Throws ringattn::Error naming the offending flag and the fix.
  void validate(int world) const;
  // The layout a ring of `world` ranks uses: kAuto resolved (contiguous when a window is given,
  // zigzag for causal without one when seq_len divides by 2 * world, else contiguous).
  Layout resolved_layout(int world) const;
  // One line with every field, used for cross-rank agreement checks and logs.
  std::string describe() const;
};

// Parses "4096", "4K", "1M", "2m" (K = 1024, M = 1024^2, G = 1024^3); throws naming `flag`.
int64_t parse_size(std::string_view text, std::string_view flag);

// FLOPs of one forward pass as peers count them: 4*B*S^2*H*d, half when causal (the dense-equivalent).
double forward_flops(const AttentionSpec& spec);
// FLOPs of one forward pass on visible pairs only: 4*d*(visible pairs over all query heads and batch rows).
double visible_forward_flops(const AttentionSpec& spec);

}  // namespace ringattn
