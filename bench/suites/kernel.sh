#!/usr/bin/env bash
# One device call for forward-kernel work (~4 min): build, forward GPU tests on both kernels
# (default: the Hopper wgmma kernel where it runs; RINGATTN_FWD_KERNEL=mma: the mma.sync kernel) and
# on each wgmma variant (RINGATTN_SM90_VARIANT=1, 4, 5), compute-sanitizer on a small filter, kernel
# bench of every variant and of (B, H, S, D) storage, PyTorch SDPA peers (forward only, 16k and
# 64k), and a side-by-side table printed last. Logs and JSON go to $OUT (packed into logs.tgz).
set -u -o pipefail
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BIN=build/bin
FWD_FILTER='*FlashFwd*:CudaBackend.*'
SMALL_FILTER='MmaAndWgmma/FlashFwdKernels.MatchReference/10:MmaAndWgmma/FlashFwdKernels.MatchReference/12:FlashFwd.BatchTwo:DtypesHeadDimsMasks/FlashFwdBasic.*/3:Layouts/FlashFwdRing.*/1'

echo "## device"; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total,temperature.gpu --format=csv
echo "## commit $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"

echo "## build"; t0=$(date +%s)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DRINGATTN_BUILD_TESTS=ON >"$OUT/build.log" 2>&1 &&
  cmake --build build -j16 --target ringattn_gpu_tests ringattn_kernel_bench >>"$OUT/build.log" 2>&1
rc=$?
grep -E "spill|error|C75" "$OUT/build.log" | sort | uniq -c | head -20
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
echo "## SASS: HMMA / HGMMA / LDL+STL per forward kernel"
cuobjdump -sass "$BIN/ringattn_kernel_bench" >"$OUT/sass.txt" 2>&1
awk '/Function : .*flash_fwd/ {name=$3} name && /HMMA/ {h[name]++} name && /HGMMA/ {g[name]++} name && /(LDL|STL)/ {l[name]++} END {for (n in h) printf "%6d HMMA %4d HGMMA %4d LDL/STL %s\n", h[n], g[n], l[n], substr(n, 1, 100); for (n in g) if (!(n in h)) printf "%6d HMMA %4d HGMMA %4d LDL/STL %s\n", 0, g[n], l[n], substr(n, 1, 100)}' "$OUT/sass.txt"

echo "## GPU forward tests, default kernel choice (wgmma where it runs)"
timeout 150 "$BIN/ringattn_gpu_tests" --gtest_filter="$FWD_FILTER" 2>&1 | tee "$OUT/tests.log" |
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |tests? ran|Failure|error|Expected|Which is|max \|" | head -40
echo "## GPU forward tests, RINGATTN_FWD_KERNEL=mma"
RINGATTN_FWD_KERNEL=mma timeout 100 "$BIN/ringattn_gpu_tests" --gtest_filter="$FWD_FILTER" 2>&1 |
  tee "$OUT/tests_mma.log" | grep -E "^\[  (FAILED|PASSED) |tests? ran" | head -20

WG_FILTER="$(printf 'MmaAndWgmma/FlashFwdKernels.MatchReference/%d:' 9 10 11 12 13 14 15 16 17)MmaAndWgmma/FlashFwdSections.EveryBlockOnce/2:MmaAndWgmma/FlashFwdSections.EveryBlockOnce/3:Layouts/*:*FlashFwdBasic*"
for sv in 1 4 5; do
  echo "## GPU tests of the wgmma kernel, RINGATTN_SM90_VARIANT=$sv"
  RINGATTN_SM90_VARIANT=$sv timeout 60 "$BIN/ringattn_gpu_tests" --gtest_filter="$WG_FILTER" 2>&1 |
    tee "$OUT/tests_sv$sv.log" | grep -E "^\[  (FAILED|PASSED) |tests? ran" | head -20
done

echo "## compute-sanitizer (memcheck, racecheck) on: $SMALL_FILTER"
{
  timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" --gtest_filter="$SMALL_FILTER"
  echo "memcheck rc=$?"
  timeout 60 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 "$BIN/ringattn_gpu_tests" \
    --gtest_filter='FlashFwd.BatchTwo:DtypesHeadDimsMasks/FlashFwdBasic.*/3'
  echo "racecheck rc=$?"
} >"$OUT/sanitizer.log" 2>&1
grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED" "$OUT/sanitizer.log" | head -20

echo "## kernel bench"
bench() {  # name, env..., then bench args after --
  local name=$1; shift
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  env "${envs[@]}" timeout 60 "$BIN/ringattn_kernel_bench" -n 5 -w 1 -J "$OUT/bench_$name.json" "$@" | grep -v "^#"
}
for sv in 1 4 5; do
  echo "# wgmma s$sv"
  bench "wgmma$sv" RINGATTN_FWD_KERNEL=wgmma RINGATTN_SM90_VARIANT=$sv -- -s 16K,64K -d 128
  bench "wgmma${sv}_64" RINGATTN_FWD_KERNEL=wgmma RINGATTN_SM90_VARIANT=$sv -- -s 16K -d 64
done
echo "# mma"
bench mma RINGATTN_FWD_KERNEL=mma -- -s 16K,64K -d 128
bench mma_64 RINGATTN_FWD_KERNEL=mma -- -s 16K -d 64
echo "# wgmma default, (B, H, S, D) storage"
bench wgmma_bhsd RINGATTN_FWD_KERNEL=wgmma -- -s 16K,64K -d 128 -L bhsd

echo "## torch SDPA peers (forward only, 16k and 64k)"
PEER_SEQS=16384,65536 PEER_FWD_ONLY=1 PYTHONUNBUFFERED=1 timeout 120 python3 tests/bench/peers/torch_sdpa.py \
  >"$OUT/torch.jsonl" 2>&1
echo "torch rc=$?"; grep -c fwd_tflops "$OUT/torch.jsonl"

echo "## side by side (forward TFLOP/s, bf16, batch 1, 32 heads)"
python3 tests/bench/compare.py "$OUT"/bench_*.json "$OUT/torch.jsonl" | tee "$OUT/table.txt"

# Only 8 files come back from a device call: pack the logs and JSON (not the SASS dump) into one.
tar czf /tmp/ringattn_logs.tgz -C "$OUT" --exclude=sass.txt --exclude=table.txt --exclude=run.log . 2>/dev/null
find "$OUT" -maxdepth 1 -type f ! -name table.txt ! -name run.log -delete
mv /tmp/ringattn_logs.tgz "$OUT/logs.tgz"
