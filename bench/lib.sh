# bench/lib.sh: the shared prelude of every bench suite (sourced by bench/run.sh, not run alone).
# shellcheck shell=bash
#
# What a suite gets:
#   ra_init NAME       START, OUT (logs; default /tmp/ringattn_out), SUMMARY, COMMIT, the NVLink
#                      multicast defaults (NCCL_NVLS_ENABLE=0 ... unless the machine set them), MPIRUN
#   ra_header          device, driver, commit and date lines (into the summary)
#   ra_build T...      configure and build targets T in $BUILD (default build/release, the release
#                      preset's directory): CMake, Ninja when present, CUDA architectures 90a
#                      (CUDA_ARCHS overrides), tests on; log in $OUT/build.log; exits on failure
#   ra_build_tree SRC DIR LOG T...   the same for another source tree (BASE_TREE)
#   ra_budget S, elapsed, left N, tmo WANT [RESERVE], note TEXT...   budget (BUDGET_S seconds, a
#                      suite's default S) and summary lines
#   ra_result STEP RC DETAIL...      one row of the result table; ra_finish prints the table, an
#                      OK/FAILED footer, packs $OUT when it holds more than 8 files, and exits
#                      non-zero when a step failed
#   ra_peer_sdpa, ra_peer_cp NP, ra_peer_flex     the peer scripts (bench/peers/, ../shared/peers/)
#   ra_gtest_summary LOG             "N passed, M failed, K skipped" of a gtest log
# Dry run (RA_DRY_RUN=1, bench/run.sh --dry-run): device commands started through `rt` and the build
# are printed (to fd 3, run.sh's stderr), not run, so a suite's plan can be read without a GPU.

# ---- start, budget, summary ---------------------------------------------------------------------
ra_init() {  # NAME
  RA_SUITE=$1
  START=$(date +%s)
  OUT=${OUT:-/tmp/ringattn_out}
  mkdir -p "$OUT"
  export OUT
  SUMMARY="$OUT/summary.txt"
  : >"$SUMMARY"
  RA_RESULTS="$OUT/.results.tsv"
  : >"$RA_RESULTS"
  RA_BUDGET_SET=${BUDGET_S:-${BUDGET:-}}
  BUDGET_S=${RA_BUDGET_SET:-540}
  BUILD=${BUILD:-build/release}
  # NVLink multicast stays off on the shared GPU machines (see .library/device/KINDS.md); a value the
  # machine already set is kept.
  export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
  export TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
  export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
  MPIRUN=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE
          -x TORCH_SYMM_MEM_DISABLE_MULTICAST -x NVSHMEM_DISABLE_NVLS)
  COMMIT=${RINGATTN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo worktree)}
  RA_NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  RA_NGPU=${RA_NGPU:-0}
}
# ra_budget DEFAULT: the suite's own default budget unless BUDGET_S (or BUDGET) was set.
ra_budget() { BUDGET_S=${RA_BUDGET_SET:-$1}; }
elapsed() { echo $(( $(date +%s) - START )); }
# left N: true when at least N seconds of the budget remain.
left() { [ $(( BUDGET_S - $(elapsed) )) -ge "$1" ]; }
# tmo WANT [RESERVE]: a step timeout, min(WANT, seconds left - RESERVE), at least 1.
tmo() {
  local l=$(( BUDGET_S - $(elapsed) - ${2:-5} ))
  if [ "$l" -lt "$1" ]; then echo $(( l > 1 ? l : 1 )); else echo "$1"; fi
}
note() { echo "$*" | tee -a "$SUMMARY"; }
dry() { [ "${RA_DRY_RUN:-0}" = 1 ]; }
# rt SECONDS CMD...: a device command under its own timeout (printed instead under --dry-run).
rt() {
  local t=$1; shift
  if dry; then echo "[dry-run] timeout $t $*" >&3; return 0; fi
  timeout "$t" "$@"
}

ra_header() {
  note "# bench/run.sh $RA_SUITE ${RA_ARGS:-} $(date -u +%FT%TZ) commit $COMMIT, $RA_NGPU GPU(s)"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=index,name,pci.bus_id,clocks.sm,clocks.max.sm,memory.total,driver_version \
      --format=csv,noheader 2>&1 | tee -a "$SUMMARY"
  else
    note "# no nvidia-smi: no GPU here"
  fi
}

# Build the committed tree (HEAD) in a copy, so numbers belong to a commit and uncommitted work in the
# copied working tree cannot break the build; RINGATTN_USE_WORKTREE=1 (or no .git) builds the copy.
ra_use_commit() {
  if [ "${RINGATTN_USE_WORKTREE:-0}" != 1 ] && git rev-parse HEAD >/dev/null 2>&1 && ! dry; then
    local src=/tmp/ringattn_src
    rm -rf "$src" && mkdir -p "$src" && git archive HEAD | tar -x -C "$src" && cd "$src" || exit 1
  else
    COMMIT="$COMMIT+worktree"
  fi
}

# ---- build ----------------------------------------------------------------------------------------
ra_cmake_args() {  # the configure flags every suite shares
  local nvcc; nvcc=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  RA_CMAKE=(-DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_COMPILER="$nvcc"
            -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90a}" -DRINGATTN_BUILD_TESTS=ON)
  command -v ninja >/dev/null 2>&1 && [ ! -f "$2/CMakeCache.txt" ] && RA_CMAKE=(-G Ninja "${RA_CMAKE[@]}")
  [ -n "${CUDA_FLAGS:-}" ] && RA_CMAKE+=(-DCMAKE_CUDA_FLAGS="$CUDA_FLAGS")
  return 0
}
ra_build_tree() {  # SRC DIR LOG TARGET...
  local src=$1 dir=$2 log=$3 t0; shift 3
  t0=$(date +%s)
  ra_cmake_args "$src" "$dir"
  if dry; then echo "[dry-run] cmake -S $src -B $dir ${RA_CMAKE[*]} && cmake --build $dir --target $*" >&3; return 0; fi
  { cmake -S "$src" -B "$dir" "${RA_CMAKE[@]}" &&
    timeout "${BUILD_TIMEOUT:-330}" cmake --build "$dir" -j "$(nproc)" --target "$@"; } >"$log" 2>&1
  local rc=$?
  RA_BUILD_S=$(( $(date +%s) - t0 ))
  return $rc
}
ra_build() {  # TARGET...: build in $BUILD; on failure print the log's tail and stop the suite
  if ! ra_build_tree . "$BUILD" "$OUT/build.log" "$@"; then
    tail -40 "$OUT/build.log"
    ra_result build 1 "$*"
    note "# BUILD FAILED after $(elapsed) s"
    ra_finish
  fi
  dry && return 0
  grep -E "ringattn: CUDA=" "$OUT/build.log" | head -1 | tee -a "$SUMMARY"
  grep -E "spill|error|C75" "$OUT/build.log" | sort | uniq -c | head -20
  ra_result build 0 "$* in ${RA_BUILD_S} s"
  note "# built in $(elapsed) s"
}

# ---- results ----------------------------------------------------------------------------------------
ra_result() {  # STEP RC DETAIL...
  local step=$1 rc=$2; shift 2
  dry && rc=dry
  printf '%s\t%s\t%s\t%s\n' "$step" "$rc" "$(elapsed)" "$*" >>"$RA_RESULTS"
}
ra_gtest_summary() {  # LOG
  local ok fail skip
  ok=$(grep -c '^\[       OK \]' "$1" 2>/dev/null); fail=$(grep -c '^\[  FAILED  \] [A-Za-z]' "$1" 2>/dev/null)
  skip=$(grep -c '^\[  SKIPPED \] [A-Za-z]' "$1" 2>/dev/null)
  echo "${ok:-0} passed, ${fail:-0} failed, ${skip:-0} skipped"
}
# ra_gtest STEP TIMEOUT LOG [ENV=V...] -- ARGS...: the one-GPU test binary; one result row.
ra_gtest() {
  local step=$1 t=$2 log=$3; shift 3
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  rt "$t" env "${envs[@]}" "$BUILD/bin/ringattn_gpu_tests" "$@" >"$log" 2>&1
  local rc=$?
  ra_result "$step" "$rc" "$(ra_gtest_summary "$log")"
  grep -E "^\[  FAILED  \] [A-Za-z]|Failure" "$log" | sort -u | head -10
  return $rc
}
# The result table, the footer, the logs packed, and the exit code: 0 when every step passed.
ra_finish() {
  echo
  echo "================ bench/run.sh $RA_SUITE: results ($(elapsed) s) ================"
  printf '# %-28s %-7s %8s  %s\n' step status "at (s)" detail
  local failed=0 step rc at detail
  while IFS=$'\t' read -r step rc at detail; do
    if [ "$rc" = 0 ]; then st=OK; elif [ "$rc" = skip ]; then st=SKIPPED; elif [ "$rc" = dry ]; then st=DRY-RUN; else st="FAIL($rc)"; failed=$((failed + 1)); fi
    printf '  %-28s %-7s %8s  %s\n' "$step" "$st" "$at" "$detail"
  done <"$RA_RESULTS"
  if [ -s "$SUMMARY" ]; then echo "---------------- summary ----------------"; cat "$SUMMARY"; fi
  rm -f "$RA_RESULTS"
  ra_pack_logs
  if [ "$failed" -eq 0 ]; then echo "# OK"; exit 0; fi
  echo "# FAILED ($failed step(s))"
  exit 1
}
# Only 8 files come back from a device call: past that, pack all but the summary and table into logs.tgz.
ra_pack_logs() {
  dry && return 0
  [ "$(find "$OUT" -maxdepth 1 -type f | wc -l)" -le 8 ] && return 0
  tar czf /tmp/ringattn_logs.tgz -C "$OUT" --exclude=sass.txt --exclude=summary.txt --exclude=table.txt \
    --exclude=run.log --exclude=logs.tgz . 2>/dev/null
  find "$OUT" -maxdepth 1 -type f ! -name summary.txt ! -name table.txt ! -name run.log -delete
  mv /tmp/ringattn_logs.tgz "$OUT/logs.tgz"
}

# ---- peers (PyTorch on the same machine, in the same call) -----------------------------------------
RA_PEERS=bench/peers
# The workplace's peer scripts: the copy in bench/peers travels with the repository; ../shared/peers
# is used when a checkout has it beside it and bench/peers lacks the script.
RA_SHARED_PEERS=bench/peers
[ -f "$RA_SHARED_PEERS/flex_masks.py" ] || RA_SHARED_PEERS=../shared/peers
ra_have_torch() { python3 -c "import torch" >/dev/null 2>&1; }
# ra_peer_sdpa TIMEOUT [ENV=V...]: bench/peers/torch_sdpa.py (PEER_SEQS, PEER_FWD_ONLY) to stdout.
ra_peer_sdpa() {
  local t=$1; shift
  rt "$t" env PYTHONUNBUFFERED=1 "$@" python3 "$RA_PEERS/torch_sdpa.py"
}
# ra_peer_cp NP TIMEOUT [ENV=V...]: bench/peers/torch_context_parallel.py under torchrun.
ra_peer_cp() {
  local np=$1 t=$2; shift 2
  rt "$t" env PYTHONUNBUFFERED=1 "$@" torchrun --nproc_per_node="$np" "$RA_PEERS/torch_context_parallel.py"
}
# ra_peer_flex TIMEOUT [ENV=V...]: ../shared/peers/flex_masks.py (FlexAttention on the masks); skips
# visibly (return 77) when the shared folder is not beside the checkout.
ra_peer_flex() {
  local t=$1; shift
  if [ ! -f "$RA_SHARED_PEERS/flex_masks.py" ]; then
    echo "# SKIPPED: $RA_SHARED_PEERS/flex_masks.py is absent (the shared folder did not travel here)"
    return 77
  fi
  rt "$t" env PYTHONUNBUFFERED=1 "$@" python3 "$RA_SHARED_PEERS/flex_masks.py"
}

# ra_vs_peers: our `ringattn bench` and PyTorch context_parallel on the same GPUs, side by side.
# Env: NP (4), SEQS (32768,131072: total tokens), BENCH_ARGS (extra bench flags), BENCH_TIMEOUT (240),
# PEER_TIMEOUT (200). Shape: bf16, batch 1, 32 heads (MHA, like the peer), head_dim 128, causal,
# zigzag (the peer's load balancer is the same head/tail split). Returns the bench's exit code.
ra_vs_peers() {
  local np=${NP:-4} seqs=${SEQS:-32768,131072} ours_json=/tmp/ringattn_vs_peers_ours.json
  local peer_log="$OUT/peer.log" sizes lo hi factor=2 ours_rc peer_rc
  IFS=, read -r -a sizes <<<"$seqs"
  lo=${sizes[0]}; hi=${sizes[${#sizes[@]}-1]}
  if [ "${#sizes[@]}" -gt 1 ]; then factor=$(( sizes[1] / sizes[0] )); fi
  rm -f "$ours_json"
  echo "### ringattn bench, $np ranks: -b $lo -e $hi -f $factor"
  # shellcheck disable=SC2086
  rt "${BENCH_TIMEOUT:-240}" "${MPIRUN[@]}" -np "$np" "$BUILD/bin/ringattn" bench -b "$lo" -e "$hi" -f "$factor" \
    --heads 32 --head-dim 128 --causal --layout zigzag --dtype bf16 -n 20 -w 5 -c 1 -J "$ours_json" ${BENCH_ARGS:-} \
    2>&1 | tee -a "$OUT/bench.log"
  ours_rc=${PIPESTATUS[0]}
  [ -f "$ours_json" ] && { echo "== vs-peers $seqs"; cat "$ours_json"; } >>"$OUT/bench_json.txt"
  echo "### PyTorch context_parallel (peer), torchrun --nproc_per_node=$np"
  ra_peer_cp "$np" "${PEER_TIMEOUT:-200}" PEER_SEQS="$seqs" PEER_CAUSAL=1 PEER_FWD_ONLY=1 >"$peer_log" 2>&1
  peer_rc=$?
  grep '^{' "$peer_log" || tail -20 "$peer_log"
  ra_result "vs-peers ours np$np" "$ours_rc" "$seqs"
  ra_result "vs-peers torch-cp np$np" "$peer_rc" "$seqs"
  dry && return 0
  python3 - "$ours_json" "$peer_log" "$np" <<'PY'
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
  return "$ours_rc"
}
