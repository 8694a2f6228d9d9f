# One GPU, one call (~7-9 min): build, every GPU test, memcheck, the kernel bench and ours vs cuDNN (the last one-GPU table).
# shellcheck shell=bash
#
# Usage: bench/run.sh all-onegpu     (new: build + all GPU tests + the one-GPU benches in one command)
# Expected durations on an H200 (fresh build directory; an incremental build is far shorter):
#   build (ringattn_gpu_tests, ringattn_cli, ringattn_kernel_bench)    ~2-3 min
#   every test of the one-GPU binary (forward, backward, backend, scheduler)   ~1-2 min
#   compute-sanitizer memcheck on the one-rank output paths             ~1 min
#   kernel bench, forward, default kernel, 16K and 64K, d 128           ~20 s
#   ours vs torch cuDNN fwd+bwd, equal protocols (bench/onegpu_vs_cudnn.py, ROUNDS=2)   ~2.5 min
# The budget (BUDGET_S, default 530) keeps the call under the device's 10 minutes: a step that would
# start too late is skipped and says so in the result table. The last table is the one of
# docs/BENCHMARKS.md's latest one-GPU measurement (ours / cuDNN, burst and sustained).
# Env: GPU_FILTER (gtest filter, default every test), ROUNDS, SEQS (bench/onegpu_vs_cudnn.py), SAN=0.
ra_budget 530
ra_header
ra_build ringattn_gpu_tests ringattn_cli ringattn_kernel_bench
ra_gtest gpu-tests "$(tmo 200 260)" "$OUT/gpu_tests.log" -- --gtest_filter="${GPU_FILTER:-*}"
if [ "${SAN:-1}" = 1 ] && left 260; then
  rt "$(tmo 90 200)" compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/bin/ringattn_gpu_tests" \
    --gtest_filter='FlashFwd.SingleStepWritesWhatFinalizeWrites:FlashBwd/FlashBwdTest.MatchesReference/Bwd_whole_bf16_d128_causal_final' \
    >"$OUT/memcheck.log" 2>&1
  ra_result memcheck $? "$(grep -m1 'ERROR SUMMARY' "$OUT/memcheck.log")"
else
  ra_result memcheck skip "SAN=0 or budget"
fi
if left 200; then
  echo "## kernel bench (forward, default kernel)"
  rt 60 "$BUILD/bin/ringattn_kernel_bench" -n 5 -w 1 -s 16K,64K -d 128 -J "$OUT/kernel_bench.json" | grep -v "^#"
  ra_result kernel-bench "${PIPESTATUS[0]}" "-s 16K,64K -d 128"
fi
if left 150; then
  rt "$(tmo 330 5)" env RINGATTN_BIN="$BUILD/bin/ringattn" python3 bench/onegpu_vs_cudnn.py >"$OUT/fair.txt" 2>&1
  ra_result onegpu_vs_cudnn $? "at $(elapsed) s"
  tail -12 "$OUT/fair.txt" | tee "$OUT/table.txt"
else
  ra_result onegpu_vs_cudnn skip budget
fi
