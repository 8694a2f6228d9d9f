# 2 GPUs (or 1) (~4-8 min): GPU + MPI/GPU tests, run --backward --check over NCCL, bench at p = 1 and 2 beside SDPA and context_parallel.
# shellcheck shell=bash
#
# Usage: bench/run.sh final [all|ring]     (was scripts/device_final.sh; env: BUDGET_S, default 480)
#   all (default): build, GPU + MPI/GPU tests, run --backward --check over NCCL, bench forward and
#         forward+backward at p = 1 and 2 beside PyTorch SDPA and context_parallel.
#   ring: only the 2-GPU part: MPI/GPU tests, run --backward --check, and the p = 2 forward bench
#         under NCCL variants (RING_VARIANTS; default, copy-engine P2P, 4 CTAs), plus forward+backward.
ra_budget 480
MODE=${1:-all}
NGPU=$RA_NGPU
ra_header
ra_build ringattn_cli ringattn_mpi_gpu_tests $([ "$MODE" = ring ] || echo ringattn_gpu_tests)
BIN="$BUILD/bin/ringattn"

# ---- correctness on the device -----------------------------------------------------------------
if [ "$MODE" != ring ]; then
  ra_gtest gpu-tests 150 "$OUT/tests.log" -- --gtest_brief=1
  note "# gpu tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/tests.log" | tr '\n' ' ')"
fi
if [ "$NGPU" -ge 2 ]; then
  rt 120 "${MPIRUN[@]}" -np 2 "$BUILD/bin/ringattn_mpi_gpu_tests" --gtest_brief=1 >>"$OUT/tests.log" 2>&1
  rc=$?; ra_result "mpi_gpu tests np2" "$rc"
  note "# mpi_gpu tests np2: rc=$rc"
  rt 90 "${MPIRUN[@]}" -np 2 "$BIN" run --dtype bf16 --seq-len 8K --heads 8 --kv-heads 2 --head-dim 128 \
    --causal --layout zigzag --backward --check >"$OUT/run_bwd.log" 2>&1
  rc=$?; ra_result "run --backward --check np2" "$rc"
  note "# run --backward --check np2 bf16 zigzag GQA: rc=$rc $(grep -E 'rel_err|^PASS|^FAIL' "$OUT/run_bwd.log" | tr '\n' ' ')"
fi
cat "$OUT/tests.log" | grep -E "FAILED|Failure" | head -20

# ---- speed: ours, then the peers, same machine ---------------------------------------------------
bench() {  # bench NP ARGS...
  local np=$1; shift
  rt 150 "${MPIRUN[@]}" -np "$np" "$BIN" bench --dtype bf16 --heads 32 --head-dim 128 -n 5 -w 2 "$@" \
    2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)"
}
if [ "$MODE" = ring ]; then
  for v in ${RING_VARIANTS:-default: cememcpy:NCCL_P2P_USE_CUDA_MEMCPY=1 ctas4:RINGATTN_NCCL_MAX_CTAS=4}; do
    left 60 || break
    note "# ---- p=2 causal zigzag forward, NCCL variant ${v%%:*} (${v#*:})"
    rt 150 env ${v#*:} "${MPIRUN[@]}" -np 2 "$BIN" bench \
      --dtype bf16 --heads 32 --head-dim 128 -n 10 -w 3 -b 16K -e 64K -f 2 --causal --layout zigzag -c 1 \
      2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)" | tee -a "$SUMMARY"
  done
  note "# ---- p=2 causal zigzag forward+backward (default NCCL)"
  left 30 && bench 2 -b 16K -e 64K -f 2 --causal --layout zigzag -c 1 --backward | tee -a "$SUMMARY"
  note "# done in $(elapsed) s"
  return 0
fi
note "# ---- ours, p=1: forward (then forward+backward), tokens | per GPU | ms | TFLOP/s | 1-GPU | eff | exposed | mem | model | err | check"
left 200 && bench 1 -b 16K -e 64K -f 4 --layout contiguous -c 0 | tee -a "$SUMMARY"
left 200 && bench 1 -b 16K -e 64K -f 4 --layout contiguous -c 0 --causal | tee -a "$SUMMARY"
left 180 && bench 1 -b 16K -e 64K -f 4 --layout contiguous -c 0 --backward | tee -a "$SUMMARY"
left 170 && bench 1 -b 16K -e 64K -f 4 --layout contiguous -c 0 --causal --backward | tee -a "$SUMMARY"
if [ "$NGPU" -ge 2 ]; then
  note "# ---- ours, p=2 causal zigzag: forward, then forward+backward"
  left 150 && bench 2 -b 16K -e 128K -f 2 --causal --layout zigzag -c 1 | tee -a "$SUMMARY"
  left 130 && bench 2 -b 16K -e 128K -f 2 --causal --layout zigzag -c 1 --backward | tee -a "$SUMMARY"
fi
note "# ---- torch SDPA (one GPU, same machine)"
left 110 && ra_peer_sdpa 100 PEER_SEQS=16384,65536 2>/dev/null \
  | grep -v efficient | tee -a "$OUT/peers.log" | tee -a "$SUMMARY"
if [ "$NGPU" -ge 2 ]; then
  note "# ---- torch context_parallel, p=2 causal, allgather (same machine)"
  left 60 && ra_peer_cp 2 150 PEER_SEQS=32768,131072 PEER_CAUSAL=1 PEER_METHODS=allgather 2>/dev/null | tee -a "$OUT/peers.log" \
    | tee -a "$SUMMARY"
fi
note "# done in $(elapsed) s"
