# One GPU (~6 min): the backward kernels' tests (Hopper, its fallback, mma.sync), sanitizers, fwd+bwd bench beside SDPA, ncu.
# shellcheck shell=bash
#
# Usage: bench/run.sh bwd     (was scripts/device_bwd.sh)
# Build, GPU backward tests on the Hopper kernel (RINGATTN_BWD_KERNEL=wgmma, the default: TMA kernel),
# its cp.async fallback (RINGATTN_BWD_SM90_NO_TMA=1) and the mma.sync kernel (=mma), the
# scheduler-level fwd+bwd test, compute-sanitizer memcheck and racecheck on the Hopper kernels, the
# official fwd+bwd bench (ringattn bench --backward, 16K and 64K, causal and not) per kernel, and
# PyTorch SDPA (flash, cuDNN) in the same call. Short table last. Every step has its own timeout and
# the suite stops starting new steps near BUDGET_S (default 370) seconds.
# Env: MMA=0 (skip the mma.sync kernel's bench), SAN=0 (skip compute-sanitizer), AB_ENV="NAME=VALUE ..."
# (per word: run the head_dim 128 tests and bench the Hopper kernel again under that environment
# variable, label wgmma-ab<i>; e.g. RINGATTN_BWD_SM90_NO_TMA=1), BASE_TREE=DIR (a source tree of an
# earlier commit, e.g. from `git archive <sha> | tar -x -C .base`, carried: built and benched too,
# label base), NCU=1 (Nsight Compute on one 16K launch of the Hopper kernel: speed of light, warp states).
# The SDPA numbers here come from the peer script's protocol (a short burst right after its idle start,
# at boost clock) while our bench runs on a GPU the earlier sizes warmed: to compare with cuDNN under
# equal conditions use bench/run.sh onegpu (bench/onegpu_vs_cudnn.py; docs/BACKWARD_NOTES.md v10).
ra_budget 370
BIN=$BUILD/bin
NEW='FlashBwd/FlashBwdTest.MatchesReference/Bwd_whole_bf16_d128_full_packed:FlashBwd/FlashBwdTest.MatchesReference/Bwd_zigzag4_bf16_d128_causal'

ra_header
ra_build ringattn_gpu_tests ringattn_cli

echo "## GPU backward tests, wgmma (default)"
ra_gtest tests-wgmma "$(tmo 90 200)" "$OUT/tests_wgmma.log" -- \
  --gtest_filter='FlashBwd/*:FlashBwdAccumulate.*:FlashBwdFold.*:FlashBwdCastSum.*:CudaBackend.*'
grep -E "d128.*\(wgmma\)" "$OUT/tests_wgmma.log" | head -3

echo "## GPU backward tests, Hopper fallback without TMA (RINGATTN_BWD_SM90_NO_TMA=1), head_dim 128"
ra_gtest tests-notma "$(tmo 45 180)" "$OUT/tests_notma.log" RINGATTN_BWD_SM90_NO_TMA=1 -- --gtest_filter='FlashBwd/*d128*'

i=0
for ab in ${AB_ENV:-}; do
  i=$((i + 1))
  echo "## GPU backward tests under $ab, head_dim 128 (the variant the wgmma-ab$i bench times)"
  ra_gtest "tests-ab$i" "$(tmo 45 175)" "$OUT/tests_ab$i.log" "$ab" -- --gtest_filter='FlashBwd/*d128*'
done

if [ "${SAN:-1}" = 1 ]; then
echo "## compute-sanitizer memcheck and racecheck (Hopper kernels)"
rt "$(tmo 60 180)" compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" --gtest_filter="$NEW" \
  >"$OUT/sanitizer.log" 2>&1
rc=$?; ra_result memcheck "$rc" "$NEW"; echo "memcheck rc=$rc" | tee -a "$OUT/sanitizer.log"
rt "$(tmo 40 170)" env RINGATTN_BWD_SM90_NO_TMA=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" \
  --gtest_filter="${NEW%%:*}" >"$OUT/sanitizer_notma.log" 2>&1
rc=$?; ra_result memcheck-notma "$rc"; echo "memcheck without TMA rc=$rc" | tee -a "$OUT/sanitizer.log"
rt "$(tmo 90 150)" compute-sanitizer --tool racecheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" \
  --gtest_filter="${NEW##*:}" >"$OUT/racecheck.log" 2>&1
rc=$?; ra_result racecheck "$rc"; echo "racecheck rc=$rc $(grep -E 'RACECHECK SUMMARY' "$OUT/racecheck.log")" | tee -a "$OUT/sanitizer.log"
grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" "$OUT/sanitizer.log" | head -8
fi

if [ -n "${BASE_TREE:-}" ]; then
  echo "## build of the baseline tree $BASE_TREE"
  ra_build_tree "$BASE_TREE" build-base "$OUT/build_base.log" ringattn_cli || { tail -20 "$OUT/build_base.log"; BASE_TREE=; }
fi

bench() {  # label, RINGATTN_BWD_KERNEL, extra flags, extra environment variable NAME=VALUE, binary directory
  echo "### ringattn bench --backward ${3:-nc}, $1 (RINGATTN_BWD_KERNEL=$2 ${4:-})" | tee -a "$OUT/bench.log"
  local extra=${4:-RINGATTN_BWD_KERNEL=$2}
  local run=(env RINGATTN_BWD_KERNEL="$2" "$extra")
  command -v mpirun >/dev/null && run=(mpirun --allow-run-as-root -np 1 -x RINGATTN_BWD_KERNEL="$2" -x "$extra")
  rt "$(tmo 45 60)" "${run[@]}" "${5:-$BIN}/ringattn" bench -b 16K -e 64K -f 4 --layout contiguous -c 0 --dtype bf16 \
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
  rt "$(tmo 60 60)" ncu --clock-control none --kernel-name regex:flash_bwd_sm90 \
    --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
    "$BIN/ringattn" bench -b 16K -e 16K -n 1 -w 1 -c 0 --no-baseline --dtype bf16 --heads 32 --head-dim 128 --backward \
    >"$OUT/ncu.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Executed Ipc|Issue Slots Busy|Warp Cycles Per Issued|Stall|Pipe" \
    "$OUT/ncu.txt" | head -24
fi

echo "## torch SDPA peers (same call)"
ra_peer_sdpa "$(tmo 100 55)" PEER_SEQS=16384,65536 2>&1 | grep -v efficient | tee "$OUT/torch.txt"

echo "## GPU backward tests, mma"
ra_gtest tests-mma "$(tmo 60 25)" "$OUT/tests_mma.log" RINGATTN_BWD_KERNEL=mma -- --gtest_filter='FlashBwd/*'

echo "## scheduler-level fwd+bwd test (wgmma)"
ra_gtest ring-bwd "$(tmo 40 3)" "$OUT/ring.log" -- --gtest_filter='RingGpuBackward*'

echo "## summary ($(elapsed) s)"
for f in tests_wgmma tests_notma tests_mma ring $(cd "$OUT" && ls tests_ab*.log 2>/dev/null | sed "s/.log$//"); do echo "$f: $(grep -hE "^\[  (PASSED|FAILED) " "$OUT/$f.log" 2>/dev/null | tr '\n' ' ')"; done
grep -h "rc=" "$OUT/sanitizer.log"
dry || python3 - "$OUT/bench.log" "$OUT/torch.txt" <<'PY'
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
