#!/usr/bin/env bash
# One device call: per-kernel GPU time of one fwd+bwd pass (ours under ncu, torch cuDNN under torch.profiler), one GPU.
# Env: S (tokens, default 16384), CAUSAL (1 default), SKIP_BUILD=1 (use build/bin/ringattn as built), OUT. Prints a per-kernel table for each, sums last.
set -u -o pipefail
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
S=${S:-16384}
CAUSAL=${CAUSAL:-1}
flag=$([ "$CAUSAL" = 1 ] && echo --causal)
echo "## device"; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -x build/bin/ringattn ]; then  # SKIP_BUILD=1: the CLI another script built
  cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >"$OUT/build.log" 2>&1 &&
    cmake --build build -j16 --target ringattn_cli >>"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
fi
echo "## ours: ncu, one pass after one warm-up, S=$S causal=$CAUSAL"
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  build/bin/ringattn bench -b "$S" -e "$S" -n 1 -w 1 -c 0 --no-baseline --dtype bf16 --heads 32 --head-dim 128 \
  --backward $flag >"$OUT/ncu_ours.csv" 2>"$OUT/ncu_ours.err"
echo "ncu rc=$?"
python3 - "$OUT/ncu_ours.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi, ii, ui = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("ID"), hdr.index("Metric Unit")
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}
ks = [(int(r[ii]), r[ki], float(r[vi].replace(",", "")) * scale.get(r[ui], float("nan"))) for r in rows if r[vi]]
half = len(ks) // 2  # the second (timed) pass
tot = collections.OrderedDict()
for _, name, us in ks[half:]:
    n = name.split("(")[0].split("<")[0][-60:]
    tot[n] = tot.get(n, 0) + us
for n, us in tot.items(): print(f"{us:10.1f} us  {n}")
print(f"{sum(tot.values()):10.1f} us  total (ours, second pass of {len(ks)} launches)")
PY
echo "## torch cuDNN: torch.profiler, S=$S causal=$CAUSAL"
S=$S CAUSAL=$CAUSAL timeout 120 python3 - <<'PY'
import os, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.profiler import profile, ProfilerActivity
S = int(os.environ["S"]); causal = os.environ["CAUSAL"] == "1"
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn_like(q, requires_grad=True); v = torch.randn_like(q, requires_grad=True); do = torch.randn_like(q)
def fb():
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal); o.backward(do)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    for _ in range(3): fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3): fb()
        torch.cuda.synchronize()
tot = 0.0
for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
    if e.device_time_total <= 0: continue
    us = e.device_time_total / 3; tot += us
    print(f"{us:10.1f} us  {e.key[:60]} (x{e.count // 3})")
print(f"{tot:10.1f} us  total (cuDNN, per pass)")
PY
