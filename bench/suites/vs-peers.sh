#!/usr/bin/env bash
# Our `ringattn bench` and PyTorch context_parallel (scripts/peers/torch_context_parallel.py) on the same GPUs, in one call; side-by-side table.
#
# Usage: scripts/bench_vs_peers.sh [BUILD_DIR]   (default build-dev; needs python3 with PyTorch)
# Env:   NP (4), SEQS (32768,131072: total tokens), OUT (where logs go; default /tmp/ringattn_out),
#        BENCH_ARGS (extra bench flags), PEER_TIMEOUT / BENCH_TIMEOUT (seconds).
# Shape: bf16, batch 1, 32 heads (MHA, like the peer), head_dim 128, causal, zigzag (the peer's
# load balancer is the same head/tail split).
set -u
BUILD=${1:-build-dev}
NP=${NP:-4}
SEQS=${SEQS:-32768,131072}
OUT=${OUT:-/tmp/ringattn_out}
mkdir -p "$OUT"
# NVLink multicast stays off on the shared GPU machines (see .library/device/KINDS.md).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE
        -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS -np "$NP")
BIN="$BUILD/bin/ringattn"
OURS_JSON=/tmp/ringattn_vs_peers_ours.json
PEER_LOG="$OUT/peer.log"

IFS=, read -r -a sizes <<<"$SEQS"
lo=${sizes[0]}; hi=${sizes[${#sizes[@]}-1]}
factor=2
if [ "${#sizes[@]}" -gt 1 ]; then factor=$(( sizes[1] / sizes[0] )); fi

echo "### ringattn bench, $NP ranks: -b $lo -e $hi -f $factor"
timeout "${BENCH_TIMEOUT:-240}" "${MPIRUN[@]}" "$BIN" bench -b "$lo" -e "$hi" -f "$factor" --heads 32 --head-dim 128 \
  --causal --layout zigzag --dtype bf16 -n 20 -w 5 -c 1 -J "$OURS_JSON" ${BENCH_ARGS:-} 2>&1 | tee -a "$OUT/bench.log"
ours_rc=${PIPESTATUS[0]}
[ -f "$OURS_JSON" ] && { echo "== bench_vs_peers $SEQS"; cat "$OURS_JSON"; } >>"$OUT/bench_json.txt"

echo "### PyTorch context_parallel (peer), torchrun --nproc_per_node=$NP"
PYTHONUNBUFFERED=1 PEER_SEQS="$SEQS" PEER_CAUSAL=1 PEER_FWD_ONLY=1 timeout "${PEER_TIMEOUT:-200}" \
  torchrun --nproc_per_node="$NP" "$(dirname "$0")/peers/torch_context_parallel.py" >"$PEER_LOG" 2>&1
peer_rc=$?
grep '^{' "$PEER_LOG" || tail -20 "$PEER_LOG"

python3 - "$OURS_JSON" "$PEER_LOG" "$NP" <<'PY'
import json, sys
ours_path, peer_path, np_ = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    ours = json.load(open(ours_path))["results"]
except Exception as e:
    ours = []
    print(f"# (no ringattn results: {e})")
peer = {}
for line in open(peer_path, errors="replace"):
    if not line.startswith("{"):
        continue
    try:
        r = json.loads(line)
    except Exception:
        continue
    if "error" in r or not r.get("causal"):
        continue
    key = r["S"]
    best = peer.get(key)
    if best is None or r["fwd_tflops_per_gpu"] > best["fwd_tflops_per_gpu"]:
        peer[key] = r
print()
print(f"# side by side, {np_} GPUs, causal, bf16, 32 heads, head_dim 128, forward, TFLOP/s per GPU")
print(f"# {'tokens':>8} {'tok/GPU':>8} | {'ringattn':>9} {'ring eff':>8} {'exposed':>8} {'max err':>9} | "
      f"{'torch-cp best':>13} {'(backend/rotate)':>18} | {'ratio':>6}")
for r in ours:
    p = peer.get(r["tokens"])
    pt = p["fwd_tflops_per_gpu"] if p else float("nan")
    how = f"{p['backend']}/{p['rotate']}" if p else "n/a"
    err = r.get("check", {}).get("max_rel_err", float("nan"))
    print(f"  {r['tokens']:>8} {r['tokens_per_gpu']:>8} | {r['tflops_per_gpu']:>9.1f} {100*r['ring_efficiency']:>7.1f}% "
          f"{r['exposed_comm_pct']:>7.2f}% {err:>9.2e} | {pt:>13.1f} {how:>18} | {r['tflops_per_gpu']/pt if p else float('nan'):>6.2f}")
PY
echo "# bench exit $ours_rc, peer exit $peer_rc"
[ "$ours_rc" -eq 0 ]
