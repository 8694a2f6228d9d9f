// apply_nccl_p2p_channel_default: sets NCCL_MIN_P2P_NCHANNELS from 3 ranks up, never over the user's value.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "comm/nccl_env.hpp"

namespace ringattn {
namespace {

class NcclEnv : public ::testing::Test {
 protected:
  void SetUp() override {
    if (const char* v = std::getenv(kMinP2pChannelsEnv)) saved_ = v;
    unsetenv(kMinP2pChannelsEnv);
  }
  void TearDown() override {
    if (saved_.empty()) {
      unsetenv(kMinP2pChannelsEnv);
    } else {
      setenv(kMinP2pChannelsEnv, saved_.c_str(), 1);
    }
  }
  std::string saved_;
};

TEST_F(NcclEnv, TwoRanksKeepNcclDefaults) {
  EXPECT_FALSE(apply_nccl_p2p_channel_default(1));
  EXPECT_FALSE(apply_nccl_p2p_channel_default(2));
  EXPECT_EQ(std::getenv(kMinP2pChannelsEnv), nullptr);
}

TEST_F(NcclEnv, ThreeRanksAndUpAskForMoreChannels) {
  for (int world : {3, 4, 8}) {
    unsetenv(kMinP2pChannelsEnv);
    EXPECT_TRUE(apply_nccl_p2p_channel_default(world)) << world;
    const char* v = std::getenv(kMinP2pChannelsEnv);
    ASSERT_NE(v, nullptr);
    EXPECT_EQ(std::string(v), "64");
  }
}

TEST_F(NcclEnv, UserValueWins) {
  setenv(kMinP2pChannelsEnv, "4", 1);
  EXPECT_FALSE(apply_nccl_p2p_channel_default(4));
  EXPECT_EQ(std::string(std::getenv(kMinP2pChannelsEnv)), "4");
}

}  // namespace
}  // namespace ringattn
