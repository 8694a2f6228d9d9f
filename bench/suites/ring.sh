# 4 GPUs of one host (~7 min): MPI+GPU tests (p = 4, 2), bench vs PyTorch context_parallel, 1M run, kill-a-rank tests.
# shellcheck shell=bash
#
# Usage: bench/run.sh ring [all|nccl-variants]     (was scripts/device_ring.sh)
#   all (default): the steps below.
#   nccl-variants: build, then time the ring at 8k and 32k tokens per GPU under NCCL channel/CTA
#   settings, pick the best, run the vs-peers comparison with it, and the Llama-3-8B 1M config.
# Env: NP (4), BUDGET_S (wall seconds for the whole suite, 450), VARIANT_SWEEP (the bench sizes of
# nccl-variants, default "-b 32K -e 128K -f 4"), VARIANTS_ONLY=1 (nccl-variants stops after the
# variants), RINGATTN_USE_WORKTREE=1 (build the copied working tree, not HEAD).
# Steps run in order of importance and are skipped once the budget is nearly spent; every step has
# its own timeout so a hang cannot eat the call.
NP=${NP:-4}
ra_budget 450
ra_use_commit
MODE=${1:-all}
ra_header
nvidia-smi topo -m 2>/dev/null | head -8 >>"$SUMMARY"

# ---- build ------------------------------------------------------------------------------------
ra_build ringattn_cli ringattn_mpi_gpu_tests
BIN="$BUILD/bin/ringattn"

if [ "$MODE" = nccl-variants ]; then
  best=""; best_score=0
  for v in "default:" "ctas4:RINGATTN_NCCL_MAX_CTAS=4" "p2pch2:NCCL_MAX_P2P_NCHANNELS=2" \
           "p2pch8:NCCL_MAX_P2P_NCHANNELS=8" "cememcpy:NCCL_P2P_USE_CUDA_MEMCPY=1"; do
    left 200 || break
    name=${v%%:*}; envs=${v#*:}
    echo "==== variant $name ($envs)" >>"$OUT/bench.log"
    rm -f "/tmp/ra_v_$name.json"
    rt 90 env $envs "${MPIRUN[@]}" -np "$NP" "$BIN" bench ${VARIANT_SWEEP:--b 32K -e 128K -f 4} --heads 32 --head-dim 128 \
      --causal --layout zigzag --dtype bf16 -n 10 -w 3 -c 1 -J "/tmp/ra_v_$name.json" >>"$OUT/bench.log" 2>&1
    [ -f "/tmp/ra_v_$name.json" ] && { echo "== variant $name ($envs)"; cat "/tmp/ra_v_$name.json"; } >>"$OUT/bench_json.txt"
    line=$(python3 - "/tmp/ra_v_$name.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))["results"]
    effs = [x["ring_efficiency"] for x in r]
    print(f"{100*min(effs):.1f} " + " ".join(f"{x['tokens_per_gpu']//1024}k/GPU: {x['tflops_per_gpu']:.1f} TF/GPU eff {100*x['ring_efficiency']:.1f}% exposed {x['exposed_comm_pct']:.2f}%" for x in r))
except Exception as e:
    print(f"0 failed ({e})")
PY
)
    note "# variant $name ($envs): min eff ${line}"
    score=${line%% *}
    if python3 -c "import sys; sys.exit(0 if float('$score') > float('$best_score') else 1)"; then best=$envs; best_score=$score; fi
  done
  note "# best variant: '${best:-default}' (min ring efficiency $best_score%)"
  [ "${VARIANTS_ONLY:-0}" = 1 ] && return 0
  if left 120; then
    # shellcheck disable=SC2163,SC2086  # best holds NAME=VALUE words
    ( [ -n "$best" ] && export $best; NP=$NP BENCH_TIMEOUT=90 PEER_TIMEOUT=150 SEQS=32768,131072 ra_vs_peers ) \
      2>&1 | tee "$OUT/vs_peers.txt" | tail -8
    tail -6 "$OUT/vs_peers.txt" >>"$SUMMARY"
  fi
  if left 60; then
    echo "==== llama3_8b_1m ($best)" >>"$OUT/bench.log"
    rt 120 env $best "${MPIRUN[@]}" -np "$NP" "$BIN" bench --config configs/llama3_8b_1m.toml -n 1 -w 1 \
      --no-baseline -J /tmp/ra_l1m.json 2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)" | tee -a "$SUMMARY"
    [ -f /tmp/ra_l1m.json ] && { echo "== llama3_8b_1m ($best)"; cat /tmp/ra_l1m.json; } >>"$OUT/bench_json.txt"
  fi
  return 0
fi

# ---- MPI + GPU tests at p = 4 -------------------------------------------------------------------
run_tests() {  # np timeout
  rt "$2" "${MPIRUN[@]}" -np "$1" "$BUILD/bin/ringattn_mpi_gpu_tests" >>"$OUT/tests.log" 2>&1
  local rc=$?
  ra_result "mpi_gpu tests np$1" "$rc" "$(ra_gtest_summary "$OUT/tests.log") (so far)"
  grep -E "^\[ (ring|check|hang) " "$OUT/tests.log" | grep "p=$1" | tail -30
  note "# mpi_gpu tests np=$1: exit $rc ($(grep -c '\[       OK \]' "$OUT/tests.log") OK lines so far, $(grep -c '\[  FAILED  \]' "$OUT/tests.log") FAILED lines) at $(elapsed) s"
}
echo "==== np 4" >>"$OUT/tests.log"
run_tests 4 150

# ---- our bench and the peer, side by side (8k and 32k tokens per GPU at p = 4) -----------------
if left 150; then
  NP=$NP BENCH_TIMEOUT=120 PEER_TIMEOUT=150 SEQS=32768,131072 ra_vs_peers \
    2>&1 | tee "$OUT/vs_peers.txt" | tail -8
  tail -6 "$OUT/vs_peers.txt" >>"$SUMMARY"
fi

# ---- 1M tokens, causal, 4 GPUs, with the distributed check and peak memory ---------------------
if left 90; then
  echo "==== standard_1m" >>"$OUT/bench.log"
  rt 150 "${MPIRUN[@]}" -np "$NP" "$BIN" bench --config configs/standard_1m.toml -n 2 -w 0 --no-baseline \
    -J /tmp/ra_1m.json 2>&1 | tee -a "$OUT/bench.log" | grep -vE "^#  rank" | tail -9
  rc1m=${PIPESTATUS[0]}
  ra_result "standard_1m np$NP" "$rc1m" "bench --config configs/standard_1m.toml"
  note "# 1M run exit $rc1m at $(elapsed) s"
  grep -E "^ +1048576 " "$OUT/bench.log" | tail -1 >>"$SUMMARY"
  [ -f /tmp/ra_1m.json ] && { echo "== standard_1m"; cat /tmp/ra_1m.json; } >>"$OUT/bench_json.txt"
fi

# ---- kill a rank of a running job ---------------------------------------------------------------
# SIGSTOP: rank 2 freezes mid-run; the survivors' watchdogs must time out (-T 8), abort NCCL, print
# the hop and the peer, and the job must end non-zero. SIGKILL: mpirun ends the job non-zero.
kill_test() {  # signal
  local sig=$1 log=/tmp/ra_kill_$1.log pid="" i
  dry && { echo "[dry-run] kill -$sig rank 2 of a running bench" >&2; return 0; }
  rm -f "$log"
  ( rt 80 "${MPIRUN[@]}" -np "$NP" "$BIN" bench -b 128K -e 128K --causal -n 100000 -w 0 -c 0 --no-baseline \
      -T 8 >"$log" 2>&1; echo "JOB EXIT CODE $?" >>"$log" ) &
  local job=$!
  for i in $(seq 1 60); do
    pid=$(grep -m1 -E "^#  rank 2 host" "$log" 2>/dev/null | sed -E 's/.* pid ([0-9]+).*/\1/')
    [ -n "$pid" ] && break
    sleep 1
  done
  sleep 4
  local t0; t0=$(date +%s)
  if [ -n "$pid" ]; then kill "-$sig" "$pid"; fi
  wait "$job"
  local took=$(( $(date +%s) - t0 ))
  [ -n "$pid" ] && kill -CONT "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  { echo "==== kill -$sig rank 2 (pid ${pid:-none}); job ended $took s later"; grep -vE "^#  rank|^#$" "$log" | tail -25; } \
    >>"$OUT/kill.log"
  note "# kill -$sig rank 2: $(grep -m1 'JOB EXIT CODE' "$log"), $took s after the signal; messages naming a hop: $(grep -c 'hop [0-9]' "$log")"
  grep -m3 -E "watchdog|timed out|error" "$log" | cut -c1-300 | tee -a "$SUMMARY"
  # The job must end, and end non-zero.
  if grep -q 'JOB EXIT CODE [1-9]' "$log"; then ra_result "kill -$sig rank 2" 0 "job ended non-zero $took s later"
  else ra_result "kill -$sig rank 2" 1 "$(grep -m1 'JOB EXIT CODE' "$log" || echo 'no exit code')"; fi
}
if left 60; then kill_test STOP; fi
if left 35; then kill_test KILL; fi

# ---- MPI + GPU tests at p = 2 -------------------------------------------------------------------
if left 60; then
  echo "==== np 2" >>"$OUT/tests.log"
  run_tests 2 90
fi

# ---- Llama-3-8B shape at 128k (GQA) --------------------------------------------------------------
if left 40; then
  echo "==== llama3_8b_128k" >>"$OUT/bench.log"
  rt 60 "${MPIRUN[@]}" -np "$NP" "$BIN" bench --config configs/llama3_8b_128k.toml -J /tmp/ra_llama128k.json \
    2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]" | tee -a "$SUMMARY"
  [ -f /tmp/ra_llama128k.json ] && { echo "== llama3_8b_128k"; cat /tmp/ra_llama128k.json; } >>"$OUT/bench_json.txt"
fi

