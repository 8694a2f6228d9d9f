# Our `ringattn bench` and PyTorch context_parallel on the same GPUs (NP, default 4), side by side (~4 min).
# shellcheck shell=bash
#
# Usage: bench/run.sh vs-peers     (was scripts/bench_vs_peers.sh BUILD_DIR; BUILD=dir now, default build/release)
# Env: NP (4), SEQS (32768,131072: total tokens), BENCH_ARGS (extra bench flags), BENCH_TIMEOUT,
# PEER_TIMEOUT (seconds), SKIP_BUILD=1 (use $BUILD/bin/ringattn as built). Shape: bf16, batch 1,
# 32 heads, head_dim 128, causal, zigzag.
ra_header
if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -x "$BUILD/bin/ringattn" ]; then ra_build ringattn_cli; fi
ra_vs_peers
