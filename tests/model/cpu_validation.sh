#!/usr/bin/env bash
# The scaling model against CPU ring runs on this machine: calibrate, bench at p = NP, plan, compare within 25%.
# cpu_validation.sh CLI PYTHON WORKDIR NP MPIEXEC... -n. Exit 0 pass, 1 fail.
# The cores are shared with other jobs, so each rank count calibrates right before it measures.
set -uo pipefail
cli=$1 py=$2 work=$3 np=$4
shift 4
mpi=("$@")
readonly TOLERANCE=0.25
readonly SEQ=1536  # divisible by 2p for p = 2..4 (zigzag), about 0.3 s per fwd+bwd pass on one core
problem=(--heads 4 --head-dim 32 --dtype fp32)
rm -rf "$work" && mkdir -p "$work"
die() { echo "FAIL: $*" >&2; exit 1; }

c=$((SEQ / np))
echo "+ calibrate at $np ranks, $c tokens per step"
timeout 240 "${mpi[@]}" "$np" "$cli" bench --calibrate "$work/cpu.toml" --backend cpu "${problem[@]}" -b "$c" -e "$c" \
  -n 3 -w 1 || die "calibration failed"
for case in "causal_zigzag_backward:--causal --layout zigzag --backward" "dense_contiguous_forward:--layout contiguous"; do
  name=${case%%:*}
  read -r -a flags <<<"${case#*:}"
  timeout 240 "${mpi[@]}" "$np" "$cli" bench --backend cpu "${problem[@]}" -b $SEQ -e $SEQ -n 3 -w 1 -c 0 "${flags[@]}" \
    -J "$work/bench_$name.json" >/dev/null || die "bench $name failed"
  "$cli" plan --machine "$work/cpu.toml" --np "$np" "${problem[@]}" --seq-len $SEQ "${flags[@]}" \
    --json "$work/plan_$name.json" >/dev/null || die "plan $name failed"
  "$py" - "$work/bench_$name.json" "$work/plan_$name.json" "$name" "$np" "$TOLERANCE" <<'PY' || exit 1
import json, sys
bench, plan, name, np, tol = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3], sys.argv[4], float(sys.argv[5])
m, p = bench["results"][0], plan["predictions"][0]
ratio = p["time_ms"] / m["time_ms"]
print(f"p = {np} {name}: predicted {p['time_ms']:.1f} ms (eff {100 * p['ring_efficiency']:.1f}%), "
      f"measured {m['time_ms']:.1f} ms (eff {100 * m['ring_efficiency']:.1f}%): {ratio:.3f}")
sys.exit(0 if abs(ratio - 1) <= tol else f"FAIL: the model is {100 * (ratio - 1):+.1f}% off (tolerance {100 * tol:.0f}%)")
PY
done
echo "OK"
