# 4 GPUs of one host (~5-9 min): MPI+GPU tests, fwd and fwd+bwd ring efficiency, context_parallel at 128k, 1M tokens with --check.
# shellcheck shell=bash
#
# Usage: bench/run.sh p4 [all|variants]     (was scripts/device_p4.sh)
#   variants: time the forward (with VARIANT_FLAGS=--backward: forward+backward) at VARIANT_SIZES
#   (default 8k tokens per GPU) under each entry of
#   VARIANTS ("name:ENV=V,ENV2=W ..." words), then forward and forward+backward at 8k and 32k tokens per GPU
#   with the best, then `run --backward --check` at 1M tokens (the rest of the budget).
# Env: NP (4), BUDGET_S (wall seconds, default 560),
#      RINGATTN_COMMIT (the commit the copied tree is; the device copy has no .git),
#      SKIP_TESTS=1, SKIP_FWD=1, SKIP_PEER=1, SKIP_1M=1 (leave out a part), SIZES (the ring sweep's
#      total tokens, "-b 32K -e 128K -f 2": 8k to 32k tokens per GPU at NP=4), BASE_TREE (the source
#      tree of an earlier commit, carried: built beside ours, its forward+backward timed right after
#      ours at the same sizes), GPU_TESTS (a gtest filter of the one-GPU suite to run first),
#      NCCL_TESTS (a gtest filter of the MPI+GPU suite to run again with RINGATTN_COPY_ENGINE=0),
#      KERNEL_AB ("name:ENV=V ..." words: one-GPU fwd+bwd at 16K and 64K under each, torch SDPA beside;
#      the best becomes RUN_ENV of the ring benches), RUN_ENV (environment of every bench).
# Steps run in order of importance, each under its own timeout, and are skipped once the budget is
# nearly spent. The summary ($OUT/summary.txt) is printed last.
NP=${NP:-4}
ra_budget 560
MODE=${1:-all}
MPIRUN+=(-np "$NP")
ra_header
if [ -n "${BASE_TREE:-}" ]; then
  ra_build_tree "$BASE_TREE" build-p4-base "$OUT/build_base.log" ringattn_cli &
  BASE_PID=$!
fi
ra_build ringattn_cli ringattn_mpi_gpu_tests ${GPU_TESTS:+ringattn_gpu_tests}
BIN="$BUILD/bin/ringattn"
bench() {  # bench TIMEOUT ARGS...
  local t=$1; shift
  rt "$t" env ${RUN_ENV:-} "${MPIRUN[@]}" "$BIN" bench --dtype bf16 --heads 32 --head-dim 128 --causal --layout zigzag "$@" \
    2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)" | tee -a "$SUMMARY"
}

if [ "$MODE" = variants ]; then
  best=""; best_eff=0
  for v in ${VARIANTS:-default: default2: postearly:RINGATTN_RING_POST=early ctas8:RINGATTN_NCCL_MAX_CTAS=8 ctas16:RINGATTN_NCCL_MAX_CTAS=16 chunk2m:NCCL_P2P_NVL_CHUNKSIZE=2097152 p2pnccl:NCCL_MIN_P2P_NCHANNELS=1}; do
    left 200 || break
    name=${v%%:*}; envs=${v#*:}; envs=${envs//,/ }  # "name:A=1,B=2"
    dbg=(); [ "$name" = default ] && dbg=(NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT,P2P)
    rm -f "/tmp/ra_v.json"
    echo "==== variant $name ($envs)" >>"$OUT/bench.log"
    rt 60 env "${dbg[@]}" $envs "${MPIRUN[@]}" "$BIN" bench --dtype bf16 --heads 32 \
      --head-dim 128 --causal --layout zigzag ${VARIANT_SIZES:--b 32K -e 32K} ${VARIANT_FLAGS:-} -n 20 -w 5 -c 0 -J /tmp/ra_v.json \
      >"/tmp/ra_v.log" 2>&1
    rc=$?
    grep -vE "^NCCL INFO|NCCL INFO" /tmp/ra_v.log | grep -E "^ +[0-9]|per-hop|FAILED|rror" >>"$OUT/bench.log"
    [ "$name" = default ] && grep -E "NCCL INFO" /tmp/ra_v.log | grep -iE "channel|p2p|version|cumem|proxy" | head -60 >"$OUT/nccl_info.log"
    eff=$(python3 -c "import json; r=json.load(open('/tmp/ra_v.json'))['results']; print(min(100*x['ring_efficiency'] for x in r))" 2>/dev/null || echo 0)
    note "# variant $name ($envs): exit $rc, min eff $eff% $(grep -E '^ +[0-9]' /tmp/ra_v.log | tr -s ' ' | tr '\n' '|')"
    if python3 -c "import sys; sys.exit(0 if float('$eff') > float('$best_eff') else 1)"; then best=$envs; best_eff=$eff; fi
  done
  note "# best variant: '${best:-default}' ($best_eff%)"
  note "# forward, best variant"
  RUN_ENV=$best
  left 100 && bench 60 -b 32K -e 128K -f 4 -n 20 -w 5 -c 1 -J "$OUT/p4_fwd.json"
  note "# forward+backward, best variant"
  left 100 && bench 90 -b 32K -e 128K -f 4 -n 5 -w 2 -c 1 --backward -J "$OUT/p4_fwdbwd.json"
  if left 150; then
    note "# run --backward --check at 1M, best variant (sampled dQ rows and dK/dV rows vs fp64, streamed)"
    rt $(( BUDGET_S - $(elapsed) )) env $best "${MPIRUN[@]}" "$BIN" run --dtype bf16 --seq-len 1M --heads 32 \
      --head-dim 128 --causal --layout zigzag --backward --check --check-rows 4 --timeout 600 >"$OUT/run_1m_bwd.log" 2>&1
    rc=$?; ra_result "run 1M --backward --check" "$rc"
    note "# run 1M --backward --check: exit $rc at $(elapsed) s"
    grep -E "^#|PASS|FAIL" "$OUT/run_1m_bwd.log" | grep -vE "^#  rank" | tail -12 | tee -a "$SUMMARY"
  fi
  return 0
fi

if [ -n "${GPU_TESTS:-}" ]; then
  ra_gtest gpu-tests 150 "$OUT/gpu_tests.log" -- --gtest_filter="$GPU_TESTS"
  note "# one-GPU tests '$GPU_TESTS': exit $? ($(grep -c '\[       OK \]' "$OUT/gpu_tests.log") OK, $(grep -c '\[  FAILED  \]' "$OUT/gpu_tests.log") FAILED lines)"
fi

# ---- one GPU: the backward kernel's variants A/B (fwd+bwd, 16K and 64K, causal and not) beside torch SDPA ----
if [ -n "${KERNEL_AB:-}" ]; then
  note "# ---- one GPU fwd+bwd TFLOP/s (bf16, 32 heads, d 128): variant | 16K | 64K | 16K causal | 64K causal | geomean"
  best_k=""; best_g=0
  for v in $KERNEL_AB; do  # "name:A=1,B=2" words
    name=${v%%:*}; envs=${v#*:}; envs=${envs//,/ }
    row=()
    for c in "" --causal; do
      rm -f /tmp/ra_k.json
      rt 60 env $envs mpirun --allow-run-as-root -np 1 "$BIN" bench -b 16K -e 64K -f 4 --layout contiguous -c 0 \
        --dtype bf16 --heads 32 --head-dim 128 -n 3 -w 1 --backward $c -J /tmp/ra_k.json >>"$OUT/kernel_ab.log" 2>&1
      row+=($(python3 -c "import json; print(' '.join('%.1f' % x['tflops_per_gpu'] for x in json.load(open('/tmp/ra_k.json'))['results']))" 2>/dev/null || echo "- -"))
    done
    g=$(python3 -c "import math,sys; v=[float(x) for x in sys.argv[1:] if x != '-']; print('%.1f' % (math.exp(sum(map(math.log, v))/len(v)) if len(v) == 4 else 0))" "${row[@]}")
    note "# kernel $name ($envs) | ${row[*]} | $g"
    if python3 -c "import sys; sys.exit(0 if float('$g') > float('$best_g') else 1)"; then best_k=$envs; best_g=$g; fi
  done
  note "# best kernel variant: '${best_k}' ($best_g); the ring benches below run under it"
  RUN_ENV=${RUN_ENV:-$best_k}
  ra_peer_sdpa 90 PEER_SEQS=16384,65536 2>&1 | grep -v efficient >"$OUT/torch_sdpa.txt"
  python3 - "$OUT/torch_sdpa.txt" <<'PY' | tee -a "$SUMMARY"
import json, sys
rows = {}
for line in open(sys.argv[1], errors="replace"):
    try: r = json.loads(line)
    except Exception: continue
    if "fwdbwd_tflops" in r and "gqa" not in r:
        rows.setdefault(r["backend"], {})[(r["S"], r["causal"])] = r["fwdbwd_tflops"]
for b, d in rows.items():
    print(f"# torch {b} | " + " ".join(f"{d.get((S, c), 0):.1f}" for c in (False, True) for S in (16384, 65536)))
PY
fi

# ---- MPI + GPU tests at p = NP (ring vs one-GPU kernel, layouts, check, hang safety, embedding) ----
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  rt 240 "${MPIRUN[@]}" "$BUILD/bin/ringattn_mpi_gpu_tests" >"$OUT/tests.log" 2>&1
  rc=$?; ra_result "mpi_gpu tests np$NP" "$rc" "$(ra_gtest_summary "$OUT/tests.log")"
  note "# mpi_gpu tests np=$NP: exit $rc ($(grep -c '\[       OK \]' "$OUT/tests.log") OK lines, $(grep -c '\[  FAILED  \]' "$OUT/tests.log") FAILED lines, $(grep -c '\[  SKIPPED \]' "$OUT/tests.log") SKIPPED lines) at $(elapsed) s"
  grep -E "^\[  FAILED  \]|Failure" "$OUT/tests.log" | sort -u | head -10 | tee -a "$SUMMARY"
  grep -E -A3 "Failure" "$OUT/tests.log" | head -24 | tee -a "$SUMMARY"
  grep -E "^\[ hang|^\[ ring bwd" "$OUT/tests.log" | tee -a "$SUMMARY"
fi
if [ -n "${NCCL_TESTS:-}" ]; then  # the same suite over NCCL's kernels (the copy-engine exchange off)
  rt 200 env RINGATTN_COPY_ENGINE=0 "${MPIRUN[@]}" -x RINGATTN_COPY_ENGINE "$BUILD/bin/ringattn_mpi_gpu_tests" \
    --gtest_filter="$NCCL_TESTS" >"$OUT/tests_nccl.log" 2>&1
  rc=$?; ra_result "mpi_gpu tests np$NP nccl" "$rc" "$(ra_gtest_summary "$OUT/tests_nccl.log")"
  note "# mpi_gpu tests np=$NP over NCCL ('$NCCL_TESTS'): exit $rc ($(grep -c '\[       OK \]' "$OUT/tests_nccl.log") OK, $(grep -c '\[  FAILED  \]' "$OUT/tests_nccl.log") FAILED lines)"
  grep -E "^\[ hang|^\[  FAILED" "$OUT/tests_nccl.log" | tee -a "$SUMMARY"
fi

note "# ---- ours p=$NP causal zigzag: tokens | per GPU | ms | TFLOP/s/GPU | 1-GPU | eff | exposed | mem | model | err | check"
if [ "${SKIP_FWD:-0}" != 1 ]; then
  note "# forward"
  left 120 && bench 120 ${SIZES:--b 32K -e 128K -f 2} -n 10 -w 3 -c 1 -J "$OUT/p4_fwd.json"
fi
note "# forward+backward"
left 120 && bench 120 ${SIZES:--b 32K -e 128K -f 2} -n 5 -w 2 -c 1 --backward -J "$OUT/p4_fwdbwd.json"
if [ -n "${BASE_TREE:-}" ]; then
  wait "$BASE_PID"
  if [ -x build-p4-base/bin/ringattn ]; then
    note "# forward+backward, base tree $BASE_TREE (same sizes)"
    BIN=build-p4-base/bin/ringattn
    left 120 && bench 120 ${SIZES:--b 32K -e 128K -f 2} -n 5 -w 2 -c 1 --backward -J "$OUT/p4_fwdbwd_base.json"
    BIN="$BUILD/bin/ringattn"
  else
    note "# base tree build failed: $(tail -3 "$OUT/build_base.log" | tr '\n' ' ')"
  fi
fi

if [ "${SKIP_PEER:-0}" != 1 ] && left 150; then
  note "# ---- torch context_parallel p=$NP, causal, 128k total (forward, forward+backward)"
  ra_peer_cp "$NP" 160 PEER_SEQS=131072 PEER_CAUSAL=1 >"$OUT/peer.log" 2>&1
  rc=$?; ra_result "torch-cp np$NP" "$rc" "128k causal"
  note "# peer exit $rc at $(elapsed) s"
  grep '^{' "$OUT/peer.log" | tee -a "$SUMMARY"
fi

if [ "${SKIP_1M:-0}" != 1 ]; then
  note "# ---- 1M tokens, causal zigzag, p=$NP: forward (check), forward+backward"
  left 70 && bench 120 -b 1M -e 1M -n 2 -w 0 -c 1 --no-baseline -T 600 -J "$OUT/p4_1m_fwd.json"
  left 80 && bench 240 -b 1M -e 1M -n 1 -w 0 -c 1 --no-baseline --backward -T 600 -J "$OUT/p4_1m_fwdbwd.json"
  if left 100; then
    note "# run --backward --check at 1M (sampled dQ rows and dK/dV rows vs fp64, streamed)"
    rt $(( BUDGET_S - $(elapsed) )) "${MPIRUN[@]}" "$BIN" run --dtype bf16 --seq-len 1M --heads 32 --head-dim 128 \
      --causal --layout zigzag --backward --check --check-rows 8 --timeout 600 >"$OUT/run_1m_bwd.log" 2>&1
    rc=$?; ra_result "run 1M --backward --check" "$rc"
    note "# run 1M --backward --check: exit $rc at $(elapsed) s"
    grep -E "^#|PASS|FAIL" "$OUT/run_1m_bwd.log" | grep -vE "^#  rank" | tail -12 | tee -a "$SUMMARY"
  fi
fi
