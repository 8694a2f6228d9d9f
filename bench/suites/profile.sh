# One GPU (~2-4 min): fwd+bwd per-kernel time of ours (ncu) and cuDNN (torch.profiler), or the SM clock and power while each runs.
# shellcheck shell=bash
#
# Usage: bench/run.sh profile [kernels|clocks]     (was scripts/device_profile.sh)
#   kernels (default): per-kernel GPU time of one fwd+bwd pass, ours under ncu, cuDNN under torch.profiler.
#   clocks: the SM clock and power while each runs, plus both kernels' isolated durations under ncu
#   (kernel speed told apart from clock throttling).
# Env: S (tokens, default 16384), CAUSAL (1 default), SKIP_BUILD=1 (use $BUILD/bin/ringattn as another
# suite built it).
S=${S:-16384}
CAUSAL=${CAUSAL:-1}
flag=$([ "$CAUSAL" = 1 ] && echo --causal)
PBIN=$BUILD/bin/ringattn
ra_header
if [ "${SKIP_BUILD:-0}" != 1 ] || [ ! -x "$PBIN" ]; then ra_build ringattn_cli; fi
if dry; then echo "[dry-run] ncu / torch.profiler on $PBIN bench -b $S -e $S --backward $flag" >&2; return 0; fi
if [ "${1:-kernels}" = clocks ]; then  # ---- clocks mode ----
cat >"$OUT/torch_fb.py" <<'PY'
import os, sys, time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
S = int(os.environ["S"]); causal = os.environ["CAUSAL"] == "1"; iters = int(sys.argv[1])
q = torch.randn(1, 32, S, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn_like(q, requires_grad=True); v = torch.randn_like(q, requires_grad=True); do = torch.randn_like(q)
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    for i in range(iters):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); o = F.scaled_dot_product_attention(q, k, v, is_causal=causal); o.backward(do); b.record()
        torch.cuda.synchronize()
        if iters > 2: print(f"cudnn iter {i} {a.elapsed_time(b):.3f} ms", flush=True)
PY
sample() { nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 20 >"$OUT/smi_$1.csv" & echo $!; }
summ() { python3 - "$OUT/smi_$1.csv" "$1" <<'PY'
import sys
v = []
for l in open(sys.argv[1]):
    f = [x.strip().split()[0] for x in l.split(",")]
    try: v.append((float(f[1]), float(f[2]), float(f[3])))
    except Exception: pass
busy = [x for x in v if x[1] > 150]
if busy:
    print(f"{sys.argv[2]:>6}: {len(busy)} busy samples, SM clock mean {sum(x[0] for x in busy)/len(busy):.0f} MHz "
          f"min {min(x[0] for x in busy):.0f}, power mean {sum(x[1] for x in busy)/len(busy):.0f} W max {max(x[1] for x in busy):.0f}, temp max {max(x[2] for x in busy):.0f} C")
PY
}
echo "## ours: bench, S=$S causal=$CAUSAL, -n 20"
pid=$(sample ours)
"$PBIN" bench -b "$S" -e "$S" -n 20 -w 2 -c 0 --dtype bf16 --heads 32 --head-dim 128 --backward $flag 2>&1 |
  grep -E "^ +[0-9]|per-hop" | tee "$OUT/ours_bench.txt"
kill "$pid"; sleep 0.2
echo "## torch cuDNN, 40 iterations"
pid=$(sample cudnn)
S=$S CAUSAL=$CAUSAL python3 "$OUT/torch_fb.py" 40 | tail -5
kill "$pid"; sleep 0.2
echo "## isolated kernels (ncu, --clock-control none)"
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  env S=$S CAUSAL=$CAUSAL python3 "$OUT/torch_fb.py" 2 >"$OUT/ncu_cudnn.csv" 2>"$OUT/ncu_cudnn.err"
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  "$PBIN" bench -b "$S" -e "$S" -n 1 -w 1 -c 0 --no-baseline --dtype bf16 --heads 32 --head-dim 128 \
  --backward $flag >"$OUT/ncu_ours.csv" 2>"$OUT/ncu_ours.err"
python3 - "$OUT/ncu_cudnn.csv" "$OUT/ncu_ours.csv" <<'PY'
import csv, sys
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}
for path in sys.argv[1:]:
    rows = [r for r in csv.reader(open(path, errors="replace")) if len(r) > 10]
    if not rows: print(path, "no rows"); continue
    h = rows[0]
    for r in rows[1:]:
        us = float(r[h.index("Metric Value")].replace(",", "")) * scale.get(r[h.index("Metric Unit")], float("nan"))
        if us > 50: print(f"{us:10.1f} us  {r[h.index('Kernel Name')][:70]}")
PY
echo "## clocks while running"
summ ours; summ cudnn
return 0
fi
# ---- kernels mode ----
echo "## ours: ncu, one pass after one warm-up, S=$S causal=$CAUSAL"
timeout 120 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
  "$PBIN" bench -b "$S" -e "$S" -n 1 -w 1 -c 0 --no-baseline --dtype bf16 --heads 32 --head-dim 128 \
  --backward $flag >"$OUT/ncu_ours.csv" 2>"$OUT/ncu_ours.err"
ra_result ncu-ours $? "S=$S causal=$CAUSAL"
python3 - "$OUT/ncu_ours.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1], errors="replace")) if len(r) > 10]
hdr = rows[0]; rows = rows[1:]
ki, vi, ii, ui = hdr.index("Kernel Name"), hdr.index("Metric Value"), hdr.index("ID"), hdr.index("Metric Unit")
scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}
ks = [(int(r[ii]), r[ki], float(r[vi].replace(",", "")) * scale.get(r[ui], float("nan"))) for r in rows if r[vi]]
last = max(i for i, (_, name, _) in enumerate(ks) if "flash_fwd" in name)  # the timed pass starts there
tot = collections.OrderedDict()
for _, name, us in ks[last:]:
    n = name.split("(")[0].split("<")[0][-60:]
    tot[n] = tot.get(n, 0) + us
for n, us in tot.items(): print(f"{us:10.1f} us  {n}")
print(f"{sum(tot.values()):10.1f} us  total (ours, the last pass: launches {last}..{len(ks) - 1})")
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
