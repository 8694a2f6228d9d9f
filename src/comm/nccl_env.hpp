// Environment defaults ringattn gives NCCL before creating its own communicator (host-only, testable without NCCL).
#pragma once

namespace ringattn {

// NCCL gives one send/recv at least p2pnChannelsPerPeer channels, halved until min * ranks <=
// p2pnChannels: with its defaults (32 and 32 on H100/H200) 16 at 2 ranks but only 8 at 4, and 8
// channels leave a hop's K/V exposed at 8k tokens per GPU (docs/BENCHMARKS.md, 2026-11-28). From
// kMinRanksForP2pChannels ranks up, unless NCCL_MIN_P2P_NCHANNELS is already set, sets it to
// kMinP2pChannelsForRing (16 channels per send/recv at 4 ranks). Returns whether it set it. Call
// before NCCL's first call in the process: NCCL reads its parameters once.
bool apply_nccl_p2p_channel_default(int world);

inline constexpr const char* kMinP2pChannelsEnv = "NCCL_MIN_P2P_NCHANNELS";
inline constexpr const char* kMinP2pChannelsForRing = "64";
inline constexpr int kMinRanksForP2pChannels = 3;

}  // namespace ringattn
