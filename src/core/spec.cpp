// AttentionSpec validation, size parsing with K/M/G suffixes, layout names and the FLOP count.
#include "ringattn/spec.hpp"

#include <cctype>
#include <climits>
#include <cmath>
#include <cstdint>
#include <sstream>

#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"

namespace ringattn {
namespace {
constexpr int64_t kMaxTokens = int64_t{1} << 40;        // a sequence length of 1024G tokens
constexpr int64_t kMaxHeadDim = 1024;                   // beyond any model; bounds the per-row buffers
constexpr int64_t kMaxTensorBytes = int64_t{1} << 48;   // one global tensor in fp64: 256 TiB
}  // namespace

const char* layout_name(Layout layout) {
  switch (layout) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kZigzag: return "zigzag";
    case Layout::kStriped: return "striped";
    case Layout::kAuto: return "auto";
    case Layout::kBalanced: return "balanced";
  }
  return "?";
}

Layout parse_layout(std::string_view name) {
  if (name == "contiguous") return Layout::kContiguous;
  if (name == "zigzag") return Layout::kZigzag;
  if (name == "striped") return Layout::kStriped;
  if (name == "auto") return Layout::kAuto;
  if (name == "balanced") return Layout::kBalanced;
  fail(ErrorKind::kInvalidArgument, "unknown layout '" + std::string(name) + "' for --layout",
       "use one of auto, contiguous, zigzag, striped, balanced");
}

double AttentionSpec::scale() const {
  return softmax_scale > 0.0 ? softmax_scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

void AttentionSpec::validate(int world) const {
  auto bad = [](const std::string& msg, const std::string& hint) {
    fail(ErrorKind::kInvalidArgument, msg, hint);
  };
  if (world < 1) bad("ring size " + std::to_string(world) + " is not positive", "launch at least one rank");
  if (batch < 1) bad("--batch " + std::to_string(batch) + " must be at least 1", "pass --batch 1 or more");
  if (heads < 1) bad("--heads " + std::to_string(heads) + " must be at least 1", "pass --heads 1 or more");
  if (kv_heads < 0) bad("--kv-heads " + std::to_string(kv_heads) + " is negative", "omit it or pass a divisor of --heads");
  if (head_dim < 1) bad("--head-dim " + std::to_string(head_dim) + " must be at least 1", "pass e.g. --head-dim 128");
  if (head_dim > kMaxHeadDim) {
    bad("--head-dim " + std::to_string(head_dim) + " is above the limit of " + std::to_string(kMaxHeadDim),
        "pass a head dimension of at most " + std::to_string(kMaxHeadDim) + " (models use 64 to 256)");
  }
  if (seq_len > kMaxTokens) {
    bad("--seq-len " + std::to_string(seq_len) + " is above the limit of 2^40 tokens", "pass at most 1024G tokens");
  }
  // Every size the runtime multiplies: elements of the largest tensor (q/out: batch * seq_len *
  // heads * head_dim) and its bytes in fp64, checked so that nothing downstream wraps.
  int64_t elems = 1;
  const int64_t factors[] = {batch, seq_len, heads, head_dim, 8};
  for (int64_t f : factors) {
    if (f > 0 && __builtin_mul_overflow(elems, f, &elems)) elems = INT64_MAX;
  }
  if (seq_len >= 1 && batch >= 1 && heads >= 1 && elems > kMaxTensorBytes) {
    bad("the problem is too large: --batch " + std::to_string(batch) + " x --seq-len " + std::to_string(seq_len) +
            " x --heads " + std::to_string(heads) + " x --head-dim " + std::to_string(head_dim) +
            " elements exceed the limit of 2^48 bytes (256 TiB) per tensor",
        "use a smaller --batch, --seq-len, --heads or --head-dim");
  }
  if (heads % effective_kv_heads() != 0) {
    bad("--kv-heads " + std::to_string(effective_kv_heads()) + " does not divide --heads " + std::to_string(heads),
        "pick kv heads that divide the query heads (GQA/MQA), e.g. --heads 32 --kv-heads 8");
  }
  if (softmax_scale < 0.0 || !std::isfinite(softmax_scale)) {
    bad("softmax scale " + std::to_string(softmax_scale) + " must be finite and >= 0", "pass 0 for 1/sqrt(head_dim)");
  }
  if (seq_len < 1) bad("--seq-len " + std::to_string(seq_len) + " must be at least 1", "pass e.g. --seq-len 4K");
  mask.validate(seq_len, heads, effective_kv_heads());
  const Layout used = resolved_layout(world);
  const int64_t divisor = layout_divisor(used, world);
  if (seq_len % divisor != 0) {
    const int64_t up = (seq_len + divisor - 1) / divisor * divisor;
    bad("--seq-len " + std::to_string(seq_len) + " is not divisible by " + std::to_string(divisor) + " as the " +
            layout_name(used) + " layout on " + std::to_string(world) + " ranks requires",
        "use a multiple of " + std::to_string(divisor) + ", e.g. --seq-len " + std::to_string(up));
  }
}

std::string AttentionSpec::describe() const {
  std::ostringstream os;
  os << "batch=" << batch << " seq_len=" << seq_len << " heads=" << heads << " kv_heads=" << effective_kv_heads()
     << " head_dim=" << head_dim << " mask=" << mask.describe() << " scale=" << scale()
     << " layout=" << layout_name(layout) << " dtype=" << dtype_name(dtype);
  return os.str();
}

int64_t parse_size(std::string_view text, std::string_view flag) {
  auto bad = [&] {
    fail(ErrorKind::kInvalidArgument,
         "cannot read '" + std::string(text) + "' as a size for " + std::string(flag),
         "write a positive integer with an optional K, M or G suffix, e.g. 4096, 64K, 1M");
  };
  if (text.empty()) bad();
  int64_t multiplier = 1;
  std::string_view digits = text;
  switch (std::toupper(static_cast<unsigned char>(text.back()))) {
    case 'K': multiplier = int64_t{1} << 10; digits.remove_suffix(1); break;
    case 'M': multiplier = int64_t{1} << 20; digits.remove_suffix(1); break;
    case 'G': multiplier = int64_t{1} << 30; digits.remove_suffix(1); break;
    default: break;
  }
  if (digits.empty()) bad();
  int64_t value = 0;
  for (char c : digits) {
    if (!std::isdigit(static_cast<unsigned char>(c))) bad();
    value = value * 10 + (c - '0');
    if (value > kMaxTokens) break;  // the check below names the limit
  }
  if (value > kMaxTokens / multiplier) {
    fail(ErrorKind::kInvalidArgument,
         "'" + std::string(text) + "' for " + std::string(flag) + " is above the limit of 2^40 = " +
             std::to_string(kMaxTokens) + " tokens",
         "pass at most 1024G (2^40) tokens");
  }
  return value * multiplier;
}

double forward_flops(const AttentionSpec& spec) {
  const double s = static_cast<double>(spec.seq_len);
  const double f = 4.0 * static_cast<double>(spec.batch) * s * s * spec.heads * spec.head_dim;
  return spec.mask.causal ? 0.5 * f : f;
}

double visible_forward_flops(const AttentionSpec& spec) {
  const Mask m = spec.mask.view();
  if (m.dense()) return forward_flops(spec);
  return 4.0 * spec.head_dim * count_visible_pairs(m, spec.seq_len, 0, spec.seq_len, 1, spec.heads, spec.batch);
}

Layout AttentionSpec::resolved_layout(int world) const {
  if (layout != Layout::kAuto) return layout;
  if (mask.has_window) return Layout::kContiguous;
  if (mask.causal && world > 0 && seq_len % (2 * static_cast<int64_t>(world)) == 0) return Layout::kZigzag;
  return Layout::kContiguous;
}

}  // namespace ringattn
