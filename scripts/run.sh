#!/usr/bin/env bash
# Builds ringattn (same set-up as scripts/test.sh) and runs the main job: `mpirun -np 4` of
# `ringattn run --check` on a default problem, on the GPUs when there are any, else on the CPU.
# Prints the check result (PASS/FAIL) and exits non-zero on FAIL.
#
# Environment: RINGATTN_NP (ranks; default 4, or the GPU count when fewer than 4 GPUs),
# RINGATTN_BACKEND (auto|cpu|cuda, default auto), RINGATTN_RUN_ARGS (replaces the problem flags),
# RINGATTN_BUILD_DIR (default build), RINGATTN_SKIP_BUILD=1 (use the existing binary).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${RINGATTN_BUILD_DIR:-$ROOT/build}
export RINGATTN_BUILD_DIR=$BUILD_DIR
if [ "${RINGATTN_SKIP_BUILD:-0}" != 1 ]; then
  "$ROOT/scripts/test.sh" --build-only
fi
CLI=$BUILD_DIR/bin/ringattn
[ -x "$CLI" ] || { echo "ringattn: $CLI is missing; run scripts/test.sh --build-only" >&2; exit 1; }

mpi_flags=(--oversubscribe)
[ "$(id -u)" = 0 ] && mpi_flags+=(--allow-run-as-root)
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}

# GPUs: only when this build has CUDA and the driver sees devices.
gpus=0
if "$CLI" info 2>/dev/null | grep -q "CUDA ON" && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
backend=${RINGATTN_BACKEND:-auto}
np=${RINGATTN_NP:-4}
if [ "$backend" != cpu ] && [ "$gpus" -gt 0 ]; then
  [ -z "${RINGATTN_NP:-}" ] && [ "$gpus" -lt 4 ] && np=$gpus  # one rank per GPU
  problem=(--batch 1 --seq-len 32K --heads 16 --kv-heads 4 --head-dim 128 --causal --layout zigzag --dtype bf16)
  where="$np GPU rank(s)"
else
  [ "$backend" = auto ] && backend=cpu
  # Small enough for a 2-core machine (4 ranks, oversubscribed) in well under 30 s, check included.
  problem=(--batch 1 --seq-len 2K --heads 8 --head-dim 64 --causal --layout zigzag --dtype fp32)
  where="$np CPU ranks"
fi
if [ -n "${RINGATTN_RUN_ARGS:-}" ]; then
  read -r -a problem <<<"$RINGATTN_RUN_ARGS"
fi

echo "[ringattn] running on $where: mpirun -np $np $CLI run --backend $backend ${problem[*]} --check"
exec mpirun "${mpi_flags[@]}" -np "$np" "$CLI" run --backend "$backend" "${problem[@]}" --check
