#!/usr/bin/env bash
# One device call on one GPU: build, the one-GPU test suite (forward, backward, backend, scheduler),
# compute-sanitizer memcheck on the one-rank output paths, then ours against cuDNN under equal
# protocols (scripts/onegpu_vs_cudnn.py). Short table last.
# Env: OUT, GPU_FILTER (gtest filter), ROUNDS (onegpu_vs_cudnn.py), RINGATTN_COMMIT.
set -u -o pipefail
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
export OUT
cd "$(dirname "$0")/.."
T0=$(date +%s)
echo "## $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader), commit ${RINGATTN_COMMIT:-?}, $(date -u +%FT%TZ)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
  cmake --build build -j16 --target ringattn_gpu_tests ringattn_cli >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - T0 )) s"
FILTER=${GPU_FILTER:-'FlashFwd*:FlashBwd*:CudaBackend*:RingGpu*'}
timeout 200 build/bin/ringattn_gpu_tests --gtest_filter="$FILTER" >"$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/gpu_tests.log" | tr '\n' ' ')"
grep -E "^\[  FAILED  \]|Failure" "$OUT/gpu_tests.log" | head -10
timeout 90 compute-sanitizer --tool memcheck --error-exitcode 9 build/bin/ringattn_gpu_tests \
  --gtest_filter='FlashFwd.SingleStepWritesWhatFinalizeWrites:FlashBwd/FlashBwdTest.MatchesReference/Bwd_whole_bf16_d128_causal_final:FlashBwd/FlashBwdTest.MatchesReference/Bwd_contig3_bf16_d128_causal_store' \
  >"$OUT/memcheck.log" 2>&1
echo "memcheck rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log")"
echo "tests done at $(( $(date +%s) - T0 )) s"
RINGATTN_BIN=build/bin/ringattn timeout 330 python3 scripts/onegpu_vs_cudnn.py >"$OUT/fair.txt" 2>&1
echo "onegpu_vs_cudnn rc=$? at $(( $(date +%s) - T0 )) s"
tail -12 "$OUT/fair.txt"
