// A ring problem of the MPI + GPU tests: layout, mask, heads, head_dim, dtype, batch, length; its name and spec.
#pragma once

#include <cstdint>
#include <string>

#include "ringattn/layout.hpp"
#include "ringattn/spec.hpp"

namespace ringattn::test {

struct Case {
  Layout layout;
  bool causal;
  int heads;
  int kv_heads;
  int head_dim;
  DType dtype;
  int64_t batch;
  int64_t seq_len;
};

inline std::string case_name(const Case& c) {
  return std::string(layout_name(c.layout)) + (c.causal ? "_causal" : "_full") + "_h" + std::to_string(c.heads) +
         "kv" + std::to_string(c.kv_heads) + "_d" + std::to_string(c.head_dim) + "_" + dtype_name(c.dtype) + "_b" +
         std::to_string(c.batch) + "_s" + std::to_string(c.seq_len);
}

inline AttentionSpec spec_of(const Case& c) {
  AttentionSpec s;
  s.batch = c.batch;
  s.seq_len = c.seq_len;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.mask.causal = c.causal;
  s.layout = c.layout;
  s.dtype = c.dtype;
  return s;
}

}  // namespace ringattn::test
