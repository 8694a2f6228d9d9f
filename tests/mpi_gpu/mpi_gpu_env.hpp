// Shared state of the MPI + GPU tests: the skip reason decided by the main, one Session for all tests.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "ringattn/session.hpp"

namespace ringattn::test {

// Empty when every rank has a GPU of its own; else why every test skips.
std::string& gpu_skip_reason();
// The CUDA session of this process (created on first use, after the skip decision).
Session& session();
void release_session();

}  // namespace ringattn::test

// Skips the test on every rank alike (the decision was reduced over ranks in main).
#define RINGATTN_SKIP_WITHOUT_GPU_PER_RANK()                                        \
  do {                                                                              \
    if (!::ringattn::test::gpu_skip_reason().empty())                               \
      GTEST_SKIP() << ::ringattn::test::gpu_skip_reason();                          \
  } while (0)
