# Forward-kernel work, one GPU (~4 min): tests on both kernels and each wgmma variant, sanitizer, kernel bench, SDPA peers.
# shellcheck shell=bash
#
# Usage: bench/run.sh kernel     (was scripts/device_kernel.sh)
# Build, forward GPU tests on both kernels (default: the Hopper wgmma kernel where it runs;
# RINGATTN_FWD_KERNEL=mma: the mma.sync kernel) and on each wgmma variant (RINGATTN_SM90_VARIANT=1,
# 4, 5), a SASS count (HMMA / HGMMA / LDL+STL per forward kernel), compute-sanitizer memcheck and
# racecheck on a small filter, the kernel bench (bench/kernel_bench.cu) of every variant and of
# (B, H, S, D) storage, PyTorch SDPA peers (forward only, 16k and 64k), and a side-by-side table
# (bench/compare.py) last. Logs and JSON go to $OUT (packed into logs.tgz).
KBIN=$BUILD/bin
FWD_FILTER='*FlashFwd*:CudaBackend.*'
SMALL_FILTER='MmaAndWgmma/FlashFwdKernels.MatchReference/wgmma_1_*:MmaAndWgmma/FlashFwdKernels.MatchReference/wgmma_3_*:FlashFwd.BatchTwo:DtypesHeadDimsMasks/FlashFwdBasic.*/bf16_d128_causal:Layouts/FlashFwdRing.*/zigzag_causal_d128_bf16'
ra_header
ra_build ringattn_gpu_tests ringattn_kernel_bench
if ! dry; then
  echo "## SASS: HMMA / HGMMA / LDL+STL per forward kernel"
  cuobjdump -sass "$KBIN/ringattn_kernel_bench" >"$OUT/sass.txt" 2>&1
  awk '/Function : .*flash_fwd/ {name=$3} name && /HMMA/ {h[name]++} name && /HGMMA/ {g[name]++} name && /(LDL|STL)/ {l[name]++} END {for (n in h) printf "%6d HMMA %4d HGMMA %4d LDL/STL %s\n", h[n], g[n], l[n], substr(n, 1, 100); for (n in g) if (!(n in h)) printf "%6d HMMA %4d HGMMA %4d LDL/STL %s\n", 0, g[n], l[n], substr(n, 1, 100)}' "$OUT/sass.txt"
fi

echo "## GPU forward tests, default kernel choice (wgmma where it runs)"
ra_gtest fwd-tests 150 "$OUT/tests.log" -- --gtest_filter="$FWD_FILTER"
echo "## GPU forward tests, RINGATTN_FWD_KERNEL=mma"
ra_gtest fwd-tests-mma 100 "$OUT/tests_mma.log" RINGATTN_FWD_KERNEL=mma -- --gtest_filter="$FWD_FILTER"
WG_FILTER='MmaAndWgmma/FlashFwdKernels.MatchReference/wgmma_*:MmaAndWgmma/FlashFwdSections.EveryBlockOnce/wgmma_*:Layouts/*:*FlashFwdBasic*'
for sv in 1 4 5; do
  echo "## GPU tests of the wgmma kernel, RINGATTN_SM90_VARIANT=$sv"
  ra_gtest "fwd-tests-sv$sv" 60 "$OUT/tests_sv$sv.log" RINGATTN_SM90_VARIANT=$sv -- --gtest_filter="$WG_FILTER"
done

echo "## compute-sanitizer (memcheck, racecheck) on: $SMALL_FILTER"
rt 100 compute-sanitizer --tool memcheck --error-exitcode 9 "$KBIN/ringattn_gpu_tests" --gtest_filter="$SMALL_FILTER" \
  >"$OUT/sanitizer.log" 2>&1
ra_result memcheck $? "$(grep -m1 'ERROR SUMMARY' "$OUT/sanitizer.log")"
rt 60 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 "$KBIN/ringattn_gpu_tests" \
  --gtest_filter='FlashFwd.BatchTwo:DtypesHeadDimsMasks/FlashFwdBasic.*/bf16_d128_causal' >"$OUT/racecheck.log" 2>&1
ra_result racecheck $? "$(grep -m1 'RACECHECK SUMMARY' "$OUT/racecheck.log")"

echo "## kernel bench"
kbench() {  # name, env..., then bench args after --
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  rt 60 env "${envs[@]}" "$KBIN/ringattn_kernel_bench" -n 5 -w 1 -J "$OUT/bench_$name.json" "$@" | grep -v "^#"
}
for sv in 1 4 5; do
  echo "# wgmma s$sv"
  kbench "wgmma$sv" RINGATTN_FWD_KERNEL=wgmma RINGATTN_SM90_VARIANT=$sv -- -s 16K,64K -d 128
  kbench "wgmma${sv}_64" RINGATTN_FWD_KERNEL=wgmma RINGATTN_SM90_VARIANT=$sv -- -s 16K -d 64
done
echo "# mma"
kbench mma RINGATTN_FWD_KERNEL=mma -- -s 16K,64K -d 128
kbench mma_64 RINGATTN_FWD_KERNEL=mma -- -s 16K -d 64
echo "# wgmma default, (B, H, S, D) storage"
kbench wgmma_bhsd RINGATTN_FWD_KERNEL=wgmma -- -s 16K,64K -d 128 -L bhsd

echo "## torch SDPA peers (forward only, 16k and 64k)"
ra_peer_sdpa 120 PEER_SEQS=16384,65536 PEER_FWD_ONLY=1 >"$OUT/torch.jsonl" 2>&1
ra_result peer-sdpa $? "$(grep -c fwd_tflops "$OUT/torch.jsonl" 2>/dev/null) rows"

echo "## side by side (forward TFLOP/s, bf16, batch 1, 32 heads)"
dry || python3 bench/compare.py "$OUT"/bench_*.json "$OUT/torch.jsonl" | tee "$OUT/table.txt"
