# One GPU (~4-8 min): per-instruction stall attribution (Nsight Compute source view, SASS) of the Hopper backward step kernel.
# shellcheck shell=bash
#
# Usage: bench/run.sh bwd-profile     (was scripts/device_bwd_profile.sh)
# Env: KERNELS (RINGATTN_BWD_SM90_NO_TMA values: 0 the TMA kernel, 1 its cp.async fallback; "0"),
#      CAUSAL ("0 1": non-causal and causal), SEQ (tokens, 16K), TOP (instructions listed, 40).
# Writes $OUT/summary_v<V>.txt (speed of light, warp states), /tmp/source_v<V>.csv (the SASS source
# view) and $OUT/top_stalls_v<V>.txt: the TOP SASS instructions by sampled stalls with their stall
# reasons, so the next kernel change aims at the instructions that wait, not at a guess. The library
# is built with -lineinfo (CMakeLists.txt), so the release build serves; no tests are built.
SEQ=${SEQ:-16K}
TOP=${TOP:-40}
ra_header
ra_build ringattn_cli
if dry; then echo "[dry-run] ncu --set full --import-source yes on $BUILD/bin/ringattn bench --backward (KERNELS=${KERNELS:-0}, CAUSAL=${CAUSAL:-0 1})" >&2; return 0; fi
for v0 in ${KERNELS:-0}; do
for c in ${CAUSAL:-0 1}; do
  v=${v0}c$c
  flags=""
  [ "$c" = 1 ] && flags=--causal
  rep=/tmp/ringattn_bwd_v$v
  rm -f "$rep.ncu-rep"
  RINGATTN_BWD_SM90_NO_TMA=$v0 timeout 240 ncu --clock-control none --kernel-name regex:flash_bwd_sm90 \
    --launch-skip 1 --launch-count 1 --set full --import-source yes -o "$rep" \
    "$BUILD/bin/ringattn" bench -b "$SEQ" -e "$SEQ" -n 1 -w 1 -c 0 --no-baseline --dtype bf16 --heads 32 \
    --head-dim 128 --backward $flags >"$OUT/ncu_run_v$v.log" 2>&1
  rc=$?
  ra_result "ncu v$v" "$rc" "RINGATTN_BWD_SM90_NO_TMA=$v0 causal=$c"
  echo "# variant $v: ncu exit $rc at $(elapsed) s"
  [ -f "$rep.ncu-rep" ] || { tail -20 "$OUT/ncu_run_v$v.log"; continue; }
  ncu --import "$rep.ncu-rep" --section SpeedOfLight --section WarpStateStats --print-details all \
    >"$OUT/summary_v$v.txt" 2>&1
  grep -E "Duration|Compute \(SM\) Throughput|Warp Cycles Per Issued|Stall" "$OUT/summary_v$v.txt" | head -24
  ncu --import "$rep.ncu-rep" --page source --print-source sass --csv >"/tmp/source_v$v.csv" 2>"/tmp/source_err_v$v.log"
  python3 - "/tmp/source_v$v.csv" "$TOP" >"$OUT/top_stalls_v$v.txt" <<'PY'
import csv, sys
path, top = sys.argv[1], int(sys.argv[2])
rows = list(csv.reader(open(path, errors="replace")))
# The header row is the first one naming a SASS column; stall columns are the sampling ones.
hi = next((i for i, r in enumerate(rows) if any("Source" in c for c in r)), None)
if hi is None:
    print("no source table in the ncu output"); sys.exit(0)
head = rows[hi]
src = next(i for i, c in enumerate(head) if "Source" in c)
samp = [i for i, c in enumerate(head) if "Sampling" in c and "All" in c]
reasons = [i for i, c in enumerate(head) if c.startswith("stall_") or "Stall" in c]
def num(x):
    try: return float(x.replace(",", ""))
    except Exception: return 0.0
body = [r for r in rows[hi + 1:] if len(r) == len(head)]
key = samp[0] if samp else None
if key is None:
    print("columns:", head); sys.exit(0)
total = sum(num(r[key]) for r in body) or 1.0
body.sort(key=lambda r: -num(r[key]))
print(f"# top {top} SASS instructions by sampled warp stalls ({head[key]}), share of all samples")
for r in body[:top]:
    why = sorted(((num(r[i]), head[i]) for i in reasons if i != key), reverse=True)[:3]
    why_s = ", ".join(f"{n.replace('Warp Stall Sampling', '').strip()} {v:.0f}" for v, n in why if v > 0)
    print(f"{100 * num(r[key]) / total:5.1f}%  {r[src][:70]:<70}  {why_s}")
PY
  head -"$(( TOP + 1 ))" "$OUT/top_stalls_v$v.txt"
done
done
echo "# done in $(elapsed) s"
