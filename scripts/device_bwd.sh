#!/usr/bin/env bash
# One device call for the backward kernels: build, GPU backward tests, compute-sanitizer, backward bench at
# 16k tokens (32 heads, bf16, hd 128 and 64), the forward bench for fwd+bwd, and PyTorch SDPA in the same call.
set -u -o pipefail
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
BIN=build/bin
SMALL='FlashBwd/FlashBwdTest.MatchesReference/Bwd_zigzag2_fp16_d64_causal'
SMALL2='FlashBwd/FlashBwdTest.MatchesReference/Bwd_whole_bf16_d128_full_packed'

echo "## device"; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader
echo "## commit $(git rev-parse --short HEAD 2>/dev/null) $(date -u +%FT%TZ)"

echo "## build"; t0=$(date +%s)
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
  cmake --build build -j16 --target ringattn_gpu_tests >>"$OUT/build.log" 2>&1
rc=$?
cmake --build build -j16 --target ringattn_kernel_bench >>"$OUT/build.log" 2>&1 || echo "(forward kernel bench did not build)"
grep -E "bwd.*spill|error" "$OUT/build.log" | head -10
echo "build rc=$rc in $(( $(date +%s) - t0 )) s"
[ $rc -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$BIN/ringattn_gpu_tests" | awk '/Function : .*flash_bwd_kernel/ {name=$3} name && /HMMA/ {h[name]++} name && /(LDL|STL)/ {l[name]++} name && /RED/ {r[name]++} END {for (n in h) printf "%6d HMMA %4d LDL/STL %4d RED %s\n", h[n], l[n], r[n], substr(n, 1, 100)}'
fi

echo "## GPU backward tests (variant 0 = default, then variant 1)"
timeout 150 "$BIN/ringattn_gpu_tests" --gtest_filter='FlashBwd/*:FlashBwdAccumulate.*' 2>&1 | tee "$OUT/tests.log" |
  grep -E "gpu err|^\[  (FAILED|PASSED|SKIPPED) |tests? ran|Failure" | head -60
RINGATTN_BWD_VARIANT=1 timeout 150 "$BIN/ringattn_gpu_tests" --gtest_filter='FlashBwd/*:FlashBwdAccumulate.*' 2>&1 | tee "$OUT/tests_v1.log" |
  grep -E "^\[  (FAILED|PASSED) |tests? ran|Failure" | head -20

echo "## compute-sanitizer"
{
  timeout 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$BIN/ringattn_gpu_tests" --gtest_filter="$SMALL:$SMALL2"
  echo "memcheck rc=$?"
  timeout 90 compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 9 "$BIN/ringattn_gpu_tests" --gtest_filter="$SMALL"
  echo "racecheck rc=$?"
} >"$OUT/sanitizer.log" 2>&1
grep -E "rc=|ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Hazard" "$OUT/sanitizer.log" | head -20

echo "## backward bench (ours)"
for v in 0 1; do for d in 128 64; do
  echo "variant $v"; RINGATTN_BWD_VARIANT=$v RINGATTN_BWD_BENCH_DIM=$d timeout 90 "$BIN/ringattn_gpu_tests" --gtest_also_run_disabled_tests \
    --gtest_filter='FlashBwdBench.*' 2>&1 | sed "s/^BWD-BENCH/BWD-BENCH v$v/" | tee -a "$OUT/bench.log" | grep -E "BWD-BENCH|Failure|FAILED"
done; done

echo "## forward bench (K's kernel, for fwd+bwd)"
[ -x "$BIN/ringattn_kernel_bench" ] && timeout 60 "$BIN/ringattn_kernel_bench" -s 16K -d 128 -n 5 -w 1 2>&1 | tail -8

echo "## torch SDPA at 16k (fwd, fwd+bwd; bwd = difference)"
PYTHONUNBUFFERED=1 timeout 120 python3 - <<'PY' 2>&1 | tee "$OUT/torch.txt"
import torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
def bench(fn, iters=5, warm=2):
    for _ in range(warm): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    ts.sort(); return ts[len(ts)//2]
S, H, D = 16384, 32, 128
q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn_like(q, requires_grad=True); v = torch.randn_like(q, requires_grad=True); do = torch.randn_like(q)
for causal in (False, True):
    F_ = 4 * S * S * D * H * (0.5 if causal else 1.0)
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel([be]):
                tf = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                tfb = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(do))
            print(f"TORCH {name:5s} S={S} causal={int(causal)}: fwd {tf:.2f} ms {F_/tf/1e9:.0f} TF/s | fwd+bwd {tfb:.2f} ms "
                  f"{3.5*F_/tfb/1e9:.0f} TF/s | bwd {tfb-tf:.2f} ms {2.5*F_/(tfb-tf)/1e9:.0f} TF/s")
        except Exception as e:
            print(f"TORCH {name} causal={int(causal)}: error {str(e)[:100]}")
PY
echo "## summary"
grep -E "^\[  (PASSED|FAILED) |tests? ran" "$OUT/tests.log" "$OUT/tests_v1.log" | tail -6
grep -E "rc=" "$OUT/sanitizer.log"
grep -h "BWD-BENCH" "$OUT/bench.log"
grep -h "TORCH" "$OUT/torch.txt"
