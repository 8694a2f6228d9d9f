#!/usr/bin/env bash
# One device call for the backward kernels (single GPU): build, GPU backward tests on the Hopper kernel
# (RINGATTN_BWD_KERNEL=wgmma, the default: TMA kernel), its cp.async fallback (RINGATTN_BWD_SM90_NO_TMA=1)
# and the mma.sync kernel (=mma), the scheduler-level fwd+bwd test, compute-sanitizer memcheck and
# racecheck on the Hopper kernels, the official fwd+bwd bench (ringattn bench --backward, 16K and 64K,
# causal and not) per kernel, and PyTorch SDPA (flash, cuDNN) in the same call. Short table last.
# Every step has its own timeout and the whole script stops starting new steps near $BUDGET seconds.
# Env: MMA=0 (skip the mma.sync kernel's bench), SAN=0 (skip compute-sanitizer), AB_ENV="NAME=VALUE ..." (per word:
# run the head_dim 128 tests and bench the Hopper kernel again under that environment variable, label
# wgmma-ab<i>; e.g. RINGATTN_BWD_SM90_NO_TMA=1), BASE_TREE=DIR (a source tree of an earlier commit, e.g. from
# `git archive <sha> | tar -x -C .base`, carried: built and benched too, label base), NCU=1 (Nsight Compute on one 16K launch of the Hopper
# kernel: speed of light, warp states).
# The SDPA numbers here come from the peer script's protocol (a short burst right after its idle start,
# at boost clock) while our bench runs on a GPU the earlier sizes warmed: to compare with cuDNN under
# equal conditions use scripts/onegpu_vs_cudnn.py (scripts/device_onegpu.sh; docs/BACKWARD_NOTES.md v10).
set -u -o pipefail
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BIN=build/bin
T0=$(date +%s)
BUDGET=${BUDGET:-370}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step timeout: min(want, time left - reserve)
tmo() { local l; l=$(( $(left) - ${2:-5} )); [ "$l" -lt "$1" ] && echo $(( l > 1 ? l : 1 )) || echo "$1"; }
NEW='FlashBwd/FlashBwdTest.MatchesReference/Bwd_whole_bf16_d128_full_packed:FlashBwd/FlashBwdTest.MatchesReference/Bwd_zigzag4_bf16_d128_causal'

echo "## device"; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
echo "## commit $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"

echo "## build"
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
  cmake --build build -j16 --target ringattn_gpu_tests ringattn_cli >>"$OUT/build.log" 2>&1
rc=$?
grep -E "bwd.*spill|error" "$OUT/build.log" | head -10
echo "build rc=$rc in $(( $(date +%s) - T0 )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }

echo "## GPU backward tests, wgmma (default)"
timeout "$(tmo 90 200)" "$BIN/ringattn_gpu_tests" --gtest_filter='FlashBwd/*:FlashBwdAccumulate.*:FlashBwdFold.*:FlashBwdCastSum.*:CudaBackend.*' 2>&1 | tee "$OUT/tests_wgmma.log" |
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |tests? ran|Failure" | head -20
grep -E "d128.*\(wgmma\)" "$OUT/tests_wgmma.log" | head -3

echo "## GPU backward tests, Hopper fallback without TMA (RINGATTN_BWD_SM90_NO_TMA=1), head_dim 128"
RINGATTN_BWD_SM90_NO_TMA=1 timeout "$(tmo 45 180)" "$BIN/ringattn_gpu_tests" --gtest_filter='FlashBwd/*d128*' 2>&1 |
  tee "$OUT/tests_notma.log" | grep -E "^\[  (FAILED|PASSED) |tests? ran|Failure" | head -12

i=0
for ab in ${AB_ENV:-}; do
  i=$((i + 1))
  echo "## GPU backward tests under $ab, head_dim 128 (the variant the wgmma-ab$i bench times)"
  env "$ab" timeout "$(tmo 45 175)" "$BIN/ringattn_gpu_tests" --gtest_filter='FlashBwd/*d128*' 2>&1 |
    tee "$OUT/tests_ab$i.log" | grep -E "^\[  (FAILED|PASSED) |tests? ran|Failure" | head -12
done

if [ "${SAN:-1}" = 1 ]; then
echo "## compute-sanitizer memcheck and racecheck (Hopper kernels)"
timeout "$(tmo 60 180)" compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" --gtest_filter="$NEW" \
  >"$OUT/sanitizer.log" 2>&1
echo "memcheck rc=$?" | tee -a "$OUT/sanitizer.log"
RINGATTN_BWD_SM90_NO_TMA=1 timeout "$(tmo 40 170)" compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" \
  --gtest_filter="${NEW%%:*}" >"$OUT/sanitizer_notma.log" 2>&1
echo "memcheck without TMA rc=$?" | tee -a "$OUT/sanitizer.log"
timeout "$(tmo 90 150)" compute-sanitizer --tool racecheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" \
  --gtest_filter="${NEW##*:}" >"$OUT/racecheck.log" 2>&1
echo "racecheck rc=$? $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck.log")" | tee -a "$OUT/sanitizer.log"
grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" "$OUT/sanitizer.log" | head -8
fi

if [ -n "${BASE_TREE:-}" ]; then
  echo "## build of the baseline tree $BASE_TREE"
  cmake -S "$BASE_TREE" -B build-base -DCMAKE_BUILD_TYPE=Release -DRINGATTN_BUILD_TESTS=OFF >"$OUT/build_base.log" 2>&1 &&
    cmake --build build-base -j16 --target ringattn_cli >>"$OUT/build_base.log" 2>&1 || { tail -20 "$OUT/build_base.log"; BASE_TREE=; }
fi

bench() {  # label, RINGATTN_BWD_KERNEL, extra flags, extra environment variable NAME=VALUE, binary directory
  echo "### ringattn bench --backward ${3:-nc}, $1 (RINGATTN_BWD_KERNEL=$2 ${4:-})" | tee -a "$OUT/bench.log"
  local extra=${4:-RINGATTN_BWD_KERNEL=$2}
  local run=(env RINGATTN_BWD_KERNEL="$2" "$extra")
  command -v mpirun >/dev/null && run=(mpirun --allow-run-as-root -np 1 -x RINGATTN_BWD_KERNEL="$2" -x "$extra")
  timeout "$(tmo 45 60)" "${run[@]}" "${5:-$BIN}/ringattn" bench -b 16K -e 64K -f 4 --layout contiguous -c 0 --dtype bf16 \
    --heads 32 --head-dim 128 -n 3 -w 1 --backward ${3:-} 2>&1 | tee -a "$OUT/bench.log" | grep -vE "^#  |^# (sweep|ring eff|backend)" | tail -4
}
echo "## fwd+bwd bench (official number)"
bench wgmma wgmma ""
bench wgmma wgmma --causal
if [ -n "${BASE_TREE:-}" ]; then
  bench base wgmma "" "" build-base/bin
  bench base wgmma --causal "" build-base/bin
fi
i=0
for ab in ${AB_ENV:-}; do  # A/B experiments: the same kernel under NAME=VALUE
  i=$((i + 1))
  bench "wgmma-ab$i" wgmma "" "$ab"
  bench "wgmma-ab$i" wgmma --causal "$ab"
done
if [ "${MMA:-1}" = 1 ]; then
  bench mma mma ""
  bench mma mma --causal
fi
if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
  echo "## ncu, Hopper kernel, one 16K non-causal launch"
  timeout "$(tmo 60 60)" ncu --clock-control none --kernel-name regex:flash_bwd_sm90 \
    --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
    "$BIN/ringattn" bench -b 16K -e 16K -n 1 -w 1 -c 0 --no-baseline --dtype bf16 --heads 32 --head-dim 128 --backward \
    >"$OUT/ncu.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc|Issue Slots Busy|Warp Cycles Per Issued|Stall|Pipe" \
    "$OUT/ncu.txt" | head -24
fi

echo "## torch SDPA peers (same call)"
PEER_SEQS=16384,65536 timeout "$(tmo 100 55)" python3 tests/bench/peers/torch_sdpa.py 2>&1 | grep -v efficient | tee "$OUT/torch.txt"

echo "## GPU backward tests, mma"
RINGATTN_BWD_KERNEL=mma timeout "$(tmo 60 25)" "$BIN/ringattn_gpu_tests" --gtest_filter='FlashBwd/*' 2>&1 | tee "$OUT/tests_mma.log" |
  grep -E "^\[  (FAILED|PASSED) |tests? ran|Failure" | head -20

echo "## scheduler-level fwd+bwd test (wgmma)"
timeout "$(tmo 40 3)" "$BIN/ringattn_gpu_tests" --gtest_filter='RingGpuBackward*' 2>&1 | tee "$OUT/ring.log" |
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |tests? ran|Failure" | head -10

echo "## summary ($(( $(date +%s) - T0 )) s)"
for f in tests_wgmma tests_notma tests_mma ring $(cd "$OUT" && ls tests_ab*.log 2>/dev/null | sed "s/.log$//"); do echo "$f: $(grep -hE "^\[  (PASSED|FAILED) " "$OUT/$f.log" 2>/dev/null | tr '\n' ' ')"; done
grep -h "rc=" "$OUT/sanitizer.log"
python3 - "$OUT/bench.log" "$OUT/torch.txt" <<'PY'
import sys, json, re
rows = {}
kern = None; causal = None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"### ringattn bench --backward (\S*), ([\w-]+) ", line)
    if m: causal = m.group(1) == "--causal"; kern = m.group(2); continue
    f = line.split()
    if kern and len(f) > 4 and f[0].isdigit():
        rows[(int(f[0]), causal, kern)] = f[3]
for line in open(sys.argv[2], errors="replace"):
    try: r = json.loads(line)
    except Exception: continue
    if "fwdbwd_tflops" in r and "gqa" not in r:
        rows[(r["S"], r["causal"], "torch_" + r["backend"])] = f'{r["fwdbwd_tflops"]:.1f}'
ours = sorted({k for (_, _, k) in rows if not k.startswith("torch_")})
kinds = tuple(ours) + ("torch_flash", "torch_cudnn")
print("fwd+bwd TFLOP/s | S | causal | " + " | ".join(kinds))
for S in (16384, 65536):
    for c in (False, True):
        print(f"| {S} | {int(c)} | " + " | ".join(rows.get((S, c, k), "-") for k in kinds) + " |")
PY
