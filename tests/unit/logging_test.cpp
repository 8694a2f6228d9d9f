// Logging: level names, flag over environment, and the rank/host prefix on every line.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "core/logging.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

TEST(Logging, ParsesLevelNames) {
  EXPECT_EQ(parse_log_level("trace"), spdlog::level::trace);
  EXPECT_EQ(parse_log_level("DEBUG"), spdlog::level::debug);
  EXPECT_EQ(parse_log_level("warning"), spdlog::level::warn);
  EXPECT_EQ(parse_log_level("off"), spdlog::level::off);
  try {
    parse_log_level("loud");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--log-level"), std::string::npos);
  }
}

TEST(Logging, FlagBeatsEnvironmentBeatsDefault) {
  unsetenv(kLogLevelEnv);
  init_logging();
  EXPECT_EQ(log().level(), spdlog::level::warn);
  setenv(kLogLevelEnv, "debug", 1);
  init_logging();
  EXPECT_EQ(log().level(), spdlog::level::debug);
  init_logging("error");
  EXPECT_EQ(log().level(), spdlog::level::err);
  setenv(kLogLevelEnv, "nonsense", 1);
  try {
    init_logging();
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(kLogLevelEnv), std::string::npos);
  }
  unsetenv(kLogLevelEnv);
  init_logging();
}

TEST(Logging, LinesCarryRankAndHost) {
  ProcessContext ctx = process_context();
  const ProcessContext saved = ctx;
  ctx.rank = 3;
  ctx.world = 4;
  set_process_context(ctx);
  init_logging("info");
  testing::internal::CaptureStderr();
  log().info("hello {}", 42);
  log().flush();
  const std::string err = testing::internal::GetCapturedStderr();
  set_process_context(saved);
  init_logging();
  EXPECT_NE(err.find("[rank 3/4 host " + saved.host), std::string::npos) << err;
  EXPECT_NE(err.find("hello 42"), std::string::npos) << err;
  EXPECT_NE(err.find("info"), std::string::npos) << err;
}

}  // namespace
}  // namespace ringattn
