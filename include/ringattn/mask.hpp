// The attention mask as data and the one visibility rule of the runtime (host and device): visible, classify, bounds, counts.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define RINGATTN_MASK_HD __host__ __device__ __forceinline__
#else
#define RINGATTN_MASK_HD inline
#endif

namespace ringattn {

// Visibility of a block of (query, key) pairs: none, some, or every pair visible.
enum class Visibility { kEmpty, kPartial, kFull };

// Plain data, passed by value to kernels. Query position i sees key position j when all hold:
//  - same document (when `doc_offsets` is set);
//  - j <= i when `causal`;
//  - when the head is patterned (see `patterned_head`) and at least one pattern is given, at least
//    one given pattern holds: window (i - left <= j <= i + right, -1 = unbounded on that side),
//    stride ((i - j) mod stride == 0), global (i or j among the first `global_tokens` positions of
//    its document).
// Positions are global (0 .. seq_len-1), so every layout computes the same problem.
struct Mask {
  bool causal = false;
  bool has_window = false;
  int64_t window_left = -1;   // -1: unbounded to the left
  int64_t window_right = -1;  // -1: unbounded to the right
  int64_t stride = 0;         // 0: no strided pattern
  int64_t global_tokens = 0;  // 0: no global pattern
  int mask_heads = 0;         // K > 0: the patterns apply to query heads 0..K-1 only; 0: to every head
  // Documents: num_docs + 1 strictly increasing offsets from 0 to seq_len (cu_seqlens), in the
  // memory of whoever evaluates the mask (host or device); nullptr: one document.
  const int64_t* doc_offsets = nullptr;
  int num_docs = 0;

  RINGATTN_MASK_HD bool has_pattern() const { return has_window || stride > 0 || global_tokens > 0; }
  // Whether query head `head` is subject to the patterns.
  RINGATTN_MASK_HD bool patterned_head(int head) const {
    return has_pattern() && (mask_heads <= 0 || head < mask_heads);
  }
  // Whether some head is patterned and some is not (the two head kinds of a mask).
  RINGATTN_MASK_HD bool mixed_heads(int heads) const { return has_pattern() && mask_heads > 0 && mask_heads < heads; }
  // True when every pair is visible (no causal rule, no documents, no pattern).
  RINGATTN_MASK_HD bool dense() const { return !causal && doc_offsets == nullptr && !has_pattern(); }
};

// The host-side mask of an AttentionSpec: owns the document offsets; view() gives the plain Mask.
struct MaskSpec {
  bool causal = false;
  bool has_window = false;
  int64_t window_left = -1;
  int64_t window_right = -1;
  int64_t stride = 0;
  int64_t global_tokens = 0;
  int mask_heads = 0;
  std::vector<int64_t> doc_offsets;  // empty: one document; else cu_seqlens (n_docs + 1 entries)

  bool has_pattern() const { return has_window || stride > 0 || global_tokens > 0; }
  bool has_documents() const { return !doc_offsets.empty(); }
  // The plain view; valid while this MaskSpec lives and is not modified.
  Mask view() const;
  // Throws ringattn::Error naming the flag (--window, --doc-lens, --stride, --global-tokens,
  // --mask-heads) and the fix when a value is outside the semantics.
  void validate(int64_t seq_len, int heads, int kv_heads) const;
  // "causal window=4095,0 stride=64 global=4 heads<8 docs=16" or "dense"; stable, for agreement checks.
  std::string describe() const;
};

// Document offsets from a list of lengths (each >= 1); throws naming `flag` when a length is < 1
// or the lengths do not sum to `seq_len`.
std::vector<int64_t> doc_offsets_from_lengths(const std::vector<int64_t>& lengths, int64_t seq_len,
                                              const char* flag = "--doc-lens");

// ---- the rule --------------------------------------------------------------------------------

// Index of the document holding position `pos` (0 without documents).
RINGATTN_MASK_HD int doc_index(const Mask& m, int64_t pos) {
  if (m.doc_offsets == nullptr) return 0;
  int lo = 0, hi = m.num_docs - 1;  // the last d with doc_offsets[d] <= pos
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (m.doc_offsets[mid] <= pos) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}
// First position of document d, and one past its last (INT64_MAX / 0 bounds without documents).
RINGATTN_MASK_HD int64_t doc_begin(const Mask& m, int d) { return m.doc_offsets ? m.doc_offsets[d] : 0; }
RINGATTN_MASK_HD int64_t doc_end(const Mask& m, int d) { return m.doc_offsets ? m.doc_offsets[d + 1] : INT64_MAX; }

namespace mask_detail {
// a / b for a >= 0 and b > 0, in 32 bits when both fit (a 64-bit division is a subroutine call on
// the GPU that takes many registers; the kernels classify tiles with these in their loops).
RINGATTN_MASK_HD int64_t quot(int64_t a, int64_t b) {
  if (a <= INT32_MAX && b <= INT32_MAX) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}
// Whether s (> 0) divides d, of either sign. In 32 bits when both fit: a 64-bit remainder is a
// subroutine call on the GPU, and the kernels' per-element test runs it for every pair.
RINGATTN_MASK_HD bool divides(int64_t s, int64_t d) {
  if (s <= INT32_MAX && d >= INT32_MIN && d <= INT32_MAX) return static_cast<int32_t>(d) % static_cast<int32_t>(s) == 0;
  return d % s == 0;
}
}  // namespace mask_detail

// The rule once the document is known: [doc_lo, doc_hi) is the document of q or of k (a pair is
// visible only inside one document, so either will do; kernels hoist it out of their per-element
// loops), [0, INT64_MAX) without documents.
RINGATTN_MASK_HD bool visible_in_doc(const Mask& m, int64_t q, int64_t k, int64_t doc_lo, int64_t doc_hi,
                                     bool patterned) {
  if (m.causal && k > q) return false;
  if (q < doc_lo || q >= doc_hi || k < doc_lo || k >= doc_hi) return false;
  if (!patterned || !m.has_pattern()) return true;
  // i - left <= j <= i + right, as differences (a side up to INT64_MAX must not overflow).
  if (m.has_window && (m.window_left < 0 || q - k <= m.window_left) && (m.window_right < 0 || k - q <= m.window_right)) {
    return true;
  }
  if (m.stride > 0 && mask_detail::divides(m.stride, q - k)) return true;
  if (m.global_tokens > 0 && (q - doc_lo < m.global_tokens || k - doc_lo < m.global_tokens)) return true;
  return false;
}

// Query position q sees key position k (for a head that is patterned or not).
RINGATTN_MASK_HD bool visible(const Mask& m, int64_t q, int64_t k, bool patterned) {
  if (m.doc_offsets == nullptr) return visible_in_doc(m, q, k, 0, INT64_MAX, patterned);
  const int d = doc_index(m, q);
  return visible_in_doc(m, q, k, m.doc_offsets[d], m.doc_offsets[d + 1], patterned);
}

namespace mask_detail {

RINGATTN_MASK_HD Visibility both(Visibility a, Visibility b) {
  if (a == Visibility::kEmpty || b == Visibility::kEmpty) return Visibility::kEmpty;
  if (a == Visibility::kFull && b == Visibility::kFull) return Visibility::kFull;
  return Visibility::kPartial;
}
RINGATTN_MASK_HD Visibility either(Visibility a, Visibility b) {
  if (a == Visibility::kFull || b == Visibility::kFull) return Visibility::kFull;
  if (a == Visibility::kEmpty && b == Visibility::kEmpty) return Visibility::kEmpty;
  return Visibility::kPartial;
}
// Floor and ceiling of a / s (s > 0) without overflow for any s.
RINGATTN_MASK_HD int64_t floor_div(int64_t a, int64_t s) { return a >= 0 ? quot(a, s) : -quot(-(a + 1), s) - 1; }
RINGATTN_MASK_HD int64_t ceil_div(int64_t a, int64_t s) { return a > 0 ? quot(a - 1, s) + 1 : -quot(-a, s); }
// Whether [lo, hi] holds a multiple of s (s > 0).
RINGATTN_MASK_HD bool holds_multiple(int64_t lo, int64_t hi, int64_t s) { return floor_div(hi, s) >= ceil_div(lo, s); }

}  // namespace mask_detail

// Visibility of every (q, k) with q in [q_min, q_max] and k in [k_min, k_max] (inclusive position
// bounds). kFull and kEmpty are exact for the whole box, so they hold for any subset of it (a
// tile of strided positions); kPartial means the per-element rule must run.
RINGATTN_MASK_HD Visibility classify(const Mask& m, int64_t q_min, int64_t q_max, int64_t k_min, int64_t k_max,
                                     bool patterned) {
  using mask_detail::both;
  using mask_detail::either;
  if (q_min > q_max || k_min > k_max) return Visibility::kEmpty;
  Visibility v = Visibility::kFull;
  if (m.causal) {
    if (k_min > q_max) return Visibility::kEmpty;
    if (k_max > q_min) v = Visibility::kPartial;
  }
  int64_t start = 0;
  bool one_doc = true;  // the whole box lies in one document starting at `start`
  if (m.doc_offsets != nullptr) {
    const int dq0 = doc_index(m, q_min), dq1 = doc_index(m, q_max);
    const int dk0 = doc_index(m, k_min), dk1 = doc_index(m, k_max);
    if (dq1 < dk0 || dk1 < dq0) return Visibility::kEmpty;
    one_doc = dq0 == dq1 && dk0 == dk1 && dq0 == dk0;
    if (!one_doc) v = Visibility::kPartial;
    start = m.doc_offsets[dq0];
  }
  if (!patterned || !m.has_pattern()) return v;
  // Union of the given patterns over the box (documents and causal handled above).
  Visibility p = Visibility::kEmpty;
  if (m.has_window) {
    const int64_t d_min = q_min - k_max, d_max = q_max - k_min;  // d = q - k
    const bool left_ok_all = m.window_left < 0 || d_max <= m.window_left;
    const bool right_ok_all = m.window_right < 0 || -d_min <= m.window_right;
    const bool left_none = m.window_left >= 0 && d_min > m.window_left;
    const bool right_none = m.window_right >= 0 && -d_max > m.window_right;
    p = either(p, (left_none || right_none) ? Visibility::kEmpty
                  : (left_ok_all && right_ok_all) ? Visibility::kFull
                                                  : Visibility::kPartial);
  }
  if (m.stride > 0) {
    const int64_t d_min = q_min - k_max, d_max = q_max - k_min;
    Visibility s = Visibility::kPartial;
    if (!mask_detail::holds_multiple(d_min, d_max, m.stride)) {
      s = Visibility::kEmpty;
    } else if (m.stride == 1 || (d_min == d_max)) {
      s = Visibility::kFull;
    }
    p = either(p, s);
  }
  if (m.global_tokens > 0) {
    Visibility g = Visibility::kPartial;
    if (one_doc) {
      if (q_max - start < m.global_tokens || k_max - start < m.global_tokens) {
        g = Visibility::kFull;
      } else if (q_min - start >= m.global_tokens && k_min - start >= m.global_tokens) {
        g = Visibility::kEmpty;
      }
    } else {
      // Several documents: empty when no position of the box is among its document's first N.
      const int dq0 = doc_index(m, q_min), dk0 = doc_index(m, k_min);
      const int dq1 = doc_index(m, q_max), dk1 = doc_index(m, k_max);
      const bool q_none = dq0 == dq1 && q_min - doc_begin(m, dq0) >= m.global_tokens;
      const bool k_none = dk0 == dk1 && k_min - doc_begin(m, dk0) >= m.global_tokens;
      if (q_none && k_none) g = Visibility::kEmpty;
    }
    p = either(p, g);
  }
  return both(v, p);
}

// The two head kinds together: what a block holds for some head (used to skip a whole step).
RINGATTN_MASK_HD Visibility classify_any_head(const Mask& m, int heads, int64_t q_min, int64_t q_max, int64_t k_min,
                                              int64_t k_max) {
  const Visibility pat = classify(m, q_min, q_max, k_min, k_max, m.has_pattern());
  if (!m.mixed_heads(heads)) return pat;
  const Visibility plain = classify(m, q_min, q_max, k_min, k_max, false);
  if (pat == plain) return pat;
  return (pat == Visibility::kEmpty && plain == Visibility::kEmpty) ? Visibility::kEmpty : Visibility::kPartial;
}

// Hull [*k_lo, *k_hi] of the key positions that some query in [q_min, q_max] may see (a superset:
// the kernels' key-tile range of a query tile, forward); *k_lo > *k_hi when none. seq_len bounds it.
RINGATTN_MASK_HD void key_bounds(const Mask& m, int64_t seq_len, int64_t q_min, int64_t q_max, bool patterned,
                                 int64_t* k_lo, int64_t* k_hi) {
  int64_t lo = 0, hi = seq_len - 1;
  if (m.doc_offsets != nullptr) {
    lo = m.doc_offsets[doc_index(m, q_min)];
    hi = m.doc_offsets[doc_index(m, q_max) + 1] - 1;
  }
  if (m.causal && q_max < hi) hi = q_max;
  // Only a window alone narrows further (stride and global keys reach the whole document).
  if (patterned && m.has_window && m.stride <= 0 && m.global_tokens <= 0) {
    if (m.window_left >= 0 && q_min - m.window_left > lo) lo = q_min - m.window_left;
    if (m.window_right >= 0 && m.window_right < hi - q_max) hi = q_max + m.window_right;
  }
  *k_lo = lo;
  *k_hi = hi;
}

// Hull [*q_lo, *q_hi] of the query positions that may see some key in [k_min, k_max] (the query
// range of a key tile, backward); *q_lo > *q_hi when none.
RINGATTN_MASK_HD void query_bounds(const Mask& m, int64_t seq_len, int64_t k_min, int64_t k_max, bool patterned,
                                   int64_t* q_lo, int64_t* q_hi) {
  int64_t lo = 0, hi = seq_len - 1;
  if (m.doc_offsets != nullptr) {
    lo = m.doc_offsets[doc_index(m, k_min)];
    hi = m.doc_offsets[doc_index(m, k_max) + 1] - 1;
  }
  if (m.causal && k_min > lo) lo = k_min;
  if (patterned && m.has_window && m.stride <= 0 && m.global_tokens <= 0) {
    if (m.window_right >= 0 && k_min - m.window_right > lo) lo = k_min - m.window_right;
    if (m.window_left >= 0 && m.window_left < hi - k_max) hi = k_max + m.window_left;
  }
  *q_lo = lo;
  *q_hi = hi;
}

// Number of key positions in [0, seq_len) that query position q sees (exact, O(log docs)).
int64_t count_visible_keys(const Mask& m, int64_t seq_len, int64_t q, bool patterned);

// Visible (query, key) pairs of the query positions [q_begin, q_end) (stride q_step), summed over
// `heads` query heads (the first m.mask_heads patterned) and `batch` rows.
double count_visible_pairs(const Mask& m, int64_t seq_len, int64_t q_begin, int64_t q_end, int64_t q_step, int heads,
                           int64_t batch);

}  // namespace ringattn
