#!/usr/bin/env bash
# One device call for kernel work: build, GPU tests, compute-sanitizer, kernel bench (every tile
# variant), PyTorch SDPA peers, and a side-by-side table printed last. Logs and JSON go to $OUT.
set -u -o pipefail
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BIN=build/bin
SMALL_FILTER='FlashFwd.RowsThatSeeNothing:FlashFwd.BatchTwo:DtypesHeadDimsMasks/FlashFwdBasic.*/3:Layouts/FlashFwdRing.*/1'

echo "## device"; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total,temperature.gpu --format=csv
echo "## commit $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"

echo "## build"; t0=$(date +%s)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DRINGATTN_BUILD_TESTS=ON >"$OUT/build.log" 2>&1 &&
  cmake --build build -j16 --target ringattn_gpu_tests ringattn_kernel_bench >>"$OUT/build.log" 2>&1
rc=$?
grep -E "spill|error" "$OUT/build.log" | head -20
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
echo "## SASS: HMMA / HGMMA / LDL+STL per forward kernel"
cuobjdump -sass "$BIN/ringattn_kernel_bench" | awk '/Function : .*flash_fwd_kernel/ {name=$3} name && /HMMA/ {h[name]++} name && /HGMMA/ {g[name]++} name && /(LDL|STL)/ {l[name]++} END {for (n in h) printf "%6d HMMA %4d HGMMA %4d LDL/STL %s\n", h[n], g[n], l[n], substr(n, 1, 110)}'

echo "## GPU tests"
"$BIN/ringattn_gpu_tests" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[  (FAILED|PASSED|SKIPPED) |tests? ran|Failure|error" | head -40

echo "## GPU tests of the bf16 tuning variants 1 and 2"
for v in 1 2; do
  RINGATTN_FWD_VARIANT=$v "$BIN/ringattn_gpu_tests" --gtest_filter='*FlashFwdBasic*:*FlashFwdRing*:FlashFwd.*' 2>&1 |
    tee -a "$OUT/tests.log" | grep -E "^\[  (FAILED|PASSED) " | sed "s/^/variant $v: /" | head -20
done

echo "## compute-sanitizer (memcheck, racecheck) on: $SMALL_FILTER"
{
  compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" --gtest_filter="$SMALL_FILTER"
  echo "memcheck rc=$?"
  compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 "$BIN/ringattn_gpu_tests" \
    --gtest_filter='FlashFwd.BatchTwo:DtypesHeadDimsMasks/FlashFwdBasic.*/3'
  echo "racecheck rc=$?"
} >"$OUT/sanitizer.log" 2>&1
grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/sanitizer.log" | head -20

echo "## kernel bench"
for v in 0 1 2; do
  RINGATTN_FWD_VARIANT=$v timeout 120 "$BIN/ringattn_kernel_bench" -s 4K,8K,16K,32K,64K -d 64,128 -n 5 -w 1 \
    -J "$OUT/bench_v$v.json"
done

echo "## torch SDPA peers"
PYTHONUNBUFFERED=1 timeout 200 python3 tests/bench/peers/torch_sdpa.py >"$OUT/torch.jsonl" 2>&1
echo "torch rc=$?"; grep -c fwd_tflops "$OUT/torch.jsonl"

echo "## side by side (forward TFLOP/s, bf16, batch 1, 32 heads; v0..v2 = tile variants)"
python3 tests/bench/compare.py "$OUT"/bench_v*.json "$OUT/torch.jsonl" | tee "$OUT/table.txt"
