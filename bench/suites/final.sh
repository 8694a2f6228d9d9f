#!/usr/bin/env bash
# One device call on a 2-GPU machine: build, GPU + MPI/GPU tests, run --backward --check over NCCL,
# bench forward and forward+backward at p = 1 and 2 beside PyTorch SDPA and context_parallel.
# Usage (device machine, repository root): scripts/device_final.sh [all|ring]   (env: OUT, BUDGET_S, default 480)
#   ring: only the 2-GPU part: MPI/GPU tests, run --backward --check, and the p = 2 forward bench
#         under NCCL variants (default, copy-engine P2P, 4 CTAs), plus forward+backward.
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/ringattn_out}
BUDGET_S=${BUDGET_S:-480}
BUILD=build-final
MODE=${1:-all}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE
        -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS)
SUMMARY="$OUT/summary.txt"
elapsed() { echo $(( $(date +%s) - START )); }
left() { [ $(( BUDGET_S - $(elapsed) )) -ge "$1" ]; }
note() { echo "$*" | tee -a "$SUMMARY"; }
COMMIT=${RINGATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo worktree)}
note "# device_final.sh $(date -u +%FT%TZ) commit $COMMIT"
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee -a "$SUMMARY"
NGPU=$(nvidia-smi -L | wc -l)

gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
if ! { cmake -S . -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DRINGATTN_BUILD_TESTS=ON &&
       timeout 300 cmake --build "$BUILD" -j "$(nproc)" --target ringattn_cli ringattn_mpi_gpu_tests \
         $([ "$MODE" = ring ] || echo ringattn_gpu_tests); } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; note "# BUILD FAILED after $(elapsed) s"; exit 1
fi
note "# built in $(elapsed) s"
BIN="$BUILD/bin/ringattn"

# ---- correctness on the device -----------------------------------------------------------------
if [ "$MODE" != ring ]; then
  timeout 150 "$BUILD/bin/ringattn_gpu_tests" --gtest_brief=1 >"$OUT/tests.log" 2>&1
  note "# gpu tests: rc=$? $(grep -E '^\[  (PASSED|FAILED)  \]' "$OUT/tests.log" | tr '\n' ' ')"
fi
if [ "$NGPU" -ge 2 ]; then
  timeout 120 "${MPIRUN[@]}" -np 2 "$BUILD/bin/ringattn_mpi_gpu_tests" --gtest_brief=1 >>"$OUT/tests.log" 2>&1
  note "# mpi_gpu tests np2: rc=$?"
  timeout 90 "${MPIRUN[@]}" -np 2 "$BIN" run --dtype bf16 --seq-len 8K --heads 8 --kv-heads 2 --head-dim 128 \
    --causal --layout zigzag --backward --check >"$OUT/run_bwd.log" 2>&1
  note "# run --backward --check np2 bf16 zigzag GQA: rc=$? $(grep -E 'rel_err|^PASS|^FAIL' "$OUT/run_bwd.log" | tr '\n' ' ')"
fi
cat "$OUT/tests.log" | grep -E "FAILED|Failure" | head -20

# ---- speed: ours, then the peers, same machine ---------------------------------------------------
bench() {  # bench NP ARGS...
  local np=$1; shift
  timeout 150 "${MPIRUN[@]}" -np "$np" "$BIN" bench --dtype bf16 --heads 32 --head-dim 128 -n 5 -w 2 "$@" \
    2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)"
}
if [ "$MODE" = ring ]; then
  for v in ${RING_VARIANTS:-default: cememcpy:NCCL_P2P_USE_CUDA_MEMCPY=1 ctas4:RINGATTN_NCCL_MAX_CTAS=4}; do
    left 60 || break
    note "# ---- p=2 causal zigzag forward, NCCL variant ${v%%:*} (${v#*:})"
    env ${v#*:} timeout 150 "${MPIRUN[@]}" -np 2 "$BIN" bench \
      --dtype bf16 --heads 32 --head-dim 128 -n 10 -w 3 -b 16K -e 64K -f 2 --causal --layout zigzag -c 1 \
      2>&1 | tee -a "$OUT/bench.log" | grep -E "^ +[0-9]|^# (OK|FAILED)" | tee -a "$SUMMARY"
  done
  note "# ---- p=2 causal zigzag forward+backward (default NCCL)"
  left 30 && bench 2 -b 16K -e 64K -f 2 --causal --layout zigzag -c 1 --backward | tee -a "$SUMMARY"
  note "# done in $(elapsed) s"
  exit 0
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
left 110 && PEER_SEQS=16384,65536 timeout 100 python3 tests/bench/peers/torch_sdpa.py 2>/dev/null \
  | grep -v efficient | tee -a "$OUT/peers.log" | tee -a "$SUMMARY"
if [ "$NGPU" -ge 2 ]; then
  note "# ---- torch context_parallel, p=2 causal, allgather (same machine)"
  left 60 && PEER_SEQS=32768,131072 PEER_CAUSAL=1 PEER_METHODS=allgather timeout 150 \
    torchrun --nproc_per_node=2 scripts/peers/torch_context_parallel.py 2>/dev/null | tee -a "$OUT/peers.log" \
    | tee -a "$SUMMARY"
fi
note "# done in $(elapsed) s"
