# One GPU (~8 min): the one-GPU test suite, memcheck on the one-rank paths, ours vs cuDNN under equal protocols.
# shellcheck shell=bash
#
# Usage: bench/run.sh onegpu     (was scripts/device_onegpu.sh)
# Build, the one-GPU tests (forward, backward, backend, scheduler), compute-sanitizer memcheck on the
# one-rank output paths, then ours against cuDNN under equal protocols (bench/onegpu_vs_cudnn.py:
# burst after idle and sustained, alternating, each run's SM clock). Short table last. This is the
# call that rebuilds the last one-GPU table of docs/BENCHMARKS.md.
# Env: GPU_FILTER (gtest filter), ROUNDS, SEQS (bench/onegpu_vs_cudnn.py).
ra_header
ra_build ringattn_gpu_tests ringattn_cli
FILTER=${GPU_FILTER:-'FlashFwd*:FlashBwd*:CudaBackend*:RingGpu*'}
ra_gtest gpu-tests 200 "$OUT/gpu_tests.log" -- --gtest_filter="$FILTER"
rt 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/bin/ringattn_gpu_tests" \
  --gtest_filter='FlashFwd.SingleStepWritesWhatFinalizeWrites:FlashBwd/FlashBwdTest.MatchesReference/Bwd_whole_bf16_d128_causal_final:FlashBwd/FlashBwdTest.MatchesReference/Bwd_contig3_bf16_d128_causal_store' \
  >"$OUT/memcheck.log" 2>&1
ra_result memcheck $? "$(grep -m1 'ERROR SUMMARY' "$OUT/memcheck.log")"
note "# tests done at $(elapsed) s"
rt "$(tmo 330 5)" env RINGATTN_BIN="$BUILD/bin/ringattn" python3 bench/onegpu_vs_cudnn.py >"$OUT/fair.txt" 2>&1
ra_result onegpu_vs_cudnn $? "at $(elapsed) s"
tail -12 "$OUT/fair.txt"
