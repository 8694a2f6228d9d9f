// Environment defaults ringattn gives NCCL before creating its own communicator.
#include "comm/nccl_env.hpp"

#include <cstdlib>

namespace ringattn {

bool apply_nccl_p2p_channel_default(int world) {
  if (world < kMinRanksForP2pChannels || std::getenv(kMinP2pChannelsEnv) != nullptr) return false;
  return setenv(kMinP2pChannelsEnv, kMinP2pChannelsForRing, 0) == 0;
}

}  // namespace ringattn
