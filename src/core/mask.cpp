// MaskSpec validation and description, document offsets from lengths, exact visible-key counts.
#include "ringattn/mask.hpp"

#include <algorithm>
#include <sstream>

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

int64_t floor_div(int64_t a, int64_t b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Positions j in [a, b] with j = r (mod s); optional residue: all of them.
int64_t count_in(int64_t a, int64_t b, bool residue, int64_t r, int64_t s) {
  if (a > b) return 0;
  if (!residue) return b - a + 1;
  return floor_div(b - r, s) - floor_div(a - 1 - r, s);
}

}  // namespace

Mask MaskSpec::view() const {
  Mask m;
  m.causal = causal;
  m.has_window = has_window;
  m.window_left = window_left;
  m.window_right = window_right;
  m.stride = stride;
  m.global_tokens = global_tokens;
  m.mask_heads = mask_heads;
  if (!doc_offsets.empty()) {
    m.doc_offsets = doc_offsets.data();
    m.num_docs = static_cast<int>(doc_offsets.size()) - 1;
  }
  return m;
}

void MaskSpec::validate(int64_t seq_len, int heads, int kv_heads) const {
  auto bad = [](const std::string& msg, const std::string& hint) { fail(ErrorKind::kInvalidArgument, msg, hint); };
  if (has_window && (window_left < -1 || window_right < -1)) {
    bad("--window " + std::to_string(window_left) + "," + std::to_string(window_right) + " has a side below -1",
        "give LEFT,RIGHT with each side >= 0, or -1 for unbounded (e.g. --window 4095,0)");
  }
  if (stride < 0) bad("--stride " + std::to_string(stride) + " must be positive", "pass --stride S with S >= 1, or omit it");
  if (global_tokens < 0) {
    bad("--global-tokens " + std::to_string(global_tokens) + " is negative", "pass --global-tokens N with N >= 1, or omit it");
  }
  if (mask_heads < 0) bad("--mask-heads " + std::to_string(mask_heads) + " is negative", "pass 1..heads, or omit it");
  if (mask_heads > 0) {
    if (!has_pattern()) {
      bad("--mask-heads " + std::to_string(mask_heads) + " without a pattern",
          "add --window, --stride or --global-tokens (the patterns --mask-heads restricts), or omit --mask-heads");
    }
    if (mask_heads > heads) {
      bad("--mask-heads " + std::to_string(mask_heads) + " exceeds the " + std::to_string(heads) + " query heads",
          "pass at most --heads");
    }
    const int kv = kv_heads > 0 ? kv_heads : heads;
    const int group = kv > 0 && heads % kv == 0 ? heads / kv : 1;
    if (mask_heads % group != 0) {
      bad("--mask-heads " + std::to_string(mask_heads) + " is not a multiple of heads / kv_heads = " +
              std::to_string(group) + " (a kv head serves one kind of head)",
          "pass a multiple of " + std::to_string(group));
    }
  }
  if (!doc_offsets.empty()) {
    const std::size_t n = doc_offsets.size();
    bool ok = n >= 2 && doc_offsets.front() == 0 && doc_offsets.back() == seq_len;
    for (std::size_t i = 1; ok && i < n; ++i) ok = doc_offsets[i] > doc_offsets[i - 1];
    if (!ok) {
      bad("document offsets must rise strictly from 0 to the sequence length " + std::to_string(seq_len) + " (got " +
              std::to_string(n) + " offsets from " + std::to_string(doc_offsets.front()) + " to " +
              std::to_string(doc_offsets.back()) + ")",
          "give --doc-lens with positive lengths summing to --seq-len, or a cu_seqlens.npy [n_docs + 1] from 0 to seq_len");
    }
  }
}

std::string MaskSpec::describe() const {
  std::ostringstream os;
  bool any = false;
  auto sep = [&] { os << (any ? " " : ""); any = true; };
  if (causal) { sep(); os << "causal"; }
  if (has_window) { sep(); os << "window=" << window_left << "," << window_right; }
  if (stride > 0) { sep(); os << "stride=" << stride; }
  if (global_tokens > 0) { sep(); os << "global=" << global_tokens; }
  if (mask_heads > 0) { sep(); os << "mask_heads=" << mask_heads; }
  if (!doc_offsets.empty()) {
    sep();
    // The offsets themselves are agreed through a hash: a million documents stay one line.
    uint64_t h = 1469598103934665603ull;
    for (int64_t v : doc_offsets) h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull;
    os << "docs=" << doc_offsets.size() - 1 << "#" << std::hex << h << std::dec;
  }
  if (!any) os << "dense";
  return os.str();
}

std::vector<int64_t> doc_offsets_from_lengths(const std::vector<int64_t>& lengths, int64_t seq_len, const char* flag) {
  std::vector<int64_t> off{0};
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    if (lengths[i] < 1) {
      fail(ErrorKind::kInvalidArgument,
           std::string(flag) + " length " + std::to_string(i + 1) + " is " + std::to_string(lengths[i]),
           "every document needs at least one token");
    }
    if (lengths[i] > seq_len - off.back()) {
      fail(ErrorKind::kInvalidArgument,
           std::string(flag) + " lengths exceed the sequence length " + std::to_string(seq_len) + " at document " +
               std::to_string(i + 1),
           "the lengths must sum to --seq-len");
    }
    off.push_back(off.back() + lengths[i]);
  }
  if (off.back() != seq_len) {
    fail(ErrorKind::kInvalidArgument,
         std::string(flag) + " lengths sum to " + std::to_string(off.back()) + ", not the sequence length " +
             std::to_string(seq_len),
         "the lengths must sum to --seq-len");
  }
  return off;
}

int64_t count_visible_keys(const Mask& m, int64_t seq_len, int64_t q, bool patterned) {
  int64_t ds = 0, de = seq_len;
  if (m.doc_offsets != nullptr) {
    const int d = doc_index(m, q);
    ds = m.doc_offsets[d];
    de = m.doc_offsets[d + 1];
  }
  const int64_t b_lo = ds, b_hi = m.causal ? std::min(q, de - 1) : de - 1;
  if (!patterned || !m.has_pattern()) return std::max<int64_t>(0, b_hi - b_lo + 1);
  // Inclusion-exclusion over the given patterns; each is an interval of the base range, the
  // strided one with the residue q mod stride.
  struct Set { int64_t lo, hi; bool residue; };
  Set sets[3];
  int n = 0;
  if (m.has_window) {
    const int64_t lo = m.window_left < 0 ? b_lo : std::max(b_lo, q - m.window_left);
    // q + right as min(b_hi, .) without overflow (a side may be as large as INT64_MAX).
    const int64_t hi = m.window_right < 0 || m.window_right >= b_hi - q ? b_hi : q + m.window_right;
    sets[n++] = {lo, hi, false};
  }
  if (m.stride > 0) sets[n++] = {b_lo, b_hi, true};
  if (m.global_tokens > 0) {
    const bool q_global = q - ds < m.global_tokens;
    sets[n++] = {b_lo, q_global ? b_hi : std::min(b_hi, ds + m.global_tokens - 1), false};
  }
  const int64_t s = m.stride > 0 ? m.stride : 1;
  const int64_t r = ((q % s) + s) % s;
  int64_t total = 0;
  for (int subset = 1; subset < (1 << n); ++subset) {
    int64_t lo = b_lo, hi = b_hi;
    bool residue = false;
    int bits = 0;
    for (int i = 0; i < n; ++i) {
      if (!(subset & (1 << i))) continue;
      ++bits;
      lo = std::max(lo, sets[i].lo);
      hi = std::min(hi, sets[i].hi);
      residue = residue || sets[i].residue;
    }
    const int64_t c = count_in(lo, hi, residue, r, s);
    total += (bits % 2 == 1) ? c : -c;
  }
  return total;
}

double count_visible_pairs(const Mask& m, int64_t seq_len, int64_t q_begin, int64_t q_end, int64_t q_step, int heads,
                           int64_t batch) {
  const int patterned_heads = !m.has_pattern() ? 0 : (m.mask_heads > 0 ? std::min(m.mask_heads, heads) : heads);
  const int plain_heads = heads - patterned_heads;
  double sum = 0.0;
  for (int64_t q = q_begin; q < q_end; q += q_step) {
    if (patterned_heads > 0) sum += static_cast<double>(patterned_heads) * count_visible_keys(m, seq_len, q, true);
    if (plain_heads > 0) sum += static_cast<double>(plain_heads) * count_visible_keys(m, seq_len, q, false);
  }
  return sum * static_cast<double>(batch);
}

}  // namespace ringattn
