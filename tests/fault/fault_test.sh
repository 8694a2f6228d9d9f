#!/usr/bin/env bash
# One fault-injection case under mpiexec: fault_test.sh CASE CLI WORKDIR NP MPIEXEC... -n
# A rank stopped (SIGSTOP) or killed mid-run, a tiny --timeout, flags that differ on one rank:
# the job must end (every rank within the timeout + 10 s), exit non-zero with the documented
# code, and say what happened (the stalled rank, the hop, the flag). Exit 0 pass, 1 fail.
set -uo pipefail
case_name=$1 cli=$2 work=$3 np=$4
shift 4
prefix=("$@")      # the mpiexec prefix, ending with its -n flag
mpi=("$@" "$np")
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rm -rf "$work" && mkdir -p "$work"
out=$work/output.txt
die() { echo "FAIL: $*" >&2; echo "---- output" >&2; cut -c1-600 "$out" >&2; exit 1; }

# launch LIMIT_S ARGS...: runs the job in the background (stdout+stderr in $out); sets $job.
launch() {
  local limit=$1
  shift
  echo "+ ${mpi[*]} $cli $*" >&2
  timeout -k 5 "$limit" "${mpi[@]}" "$cli" "$@" >"$out" 2>&1 &
  job=$!
}
# finish MAX_S: waits for the job; sets $rc and $took (seconds since launch_time).
finish() {
  wait "$job"
  rc=$?
  took=$(($(date +%s) - launch_time))
  echo "exit $rc after ${took} s" >&2
  [ "$took" -ge "$1" ] && die "the job hung (killed by timeout after $1 s)"
  return 0
}
# A crash of ours: mpiexec passes a rank's signal on as 128 + signal (SIGSEGV 139, SIGABRT 134).
no_crash() { [ "$rc" -lt 128 ] || die "the job crashed (exit $rc)"; }
expect_in_output() { grep -Eq -- "$1" "$out" || die "expected /$1/ in the output"; }

timeout_s=3
# A job long enough that the fault lands inside the ring's passes (about 10+ s without a fault).
run_args=(run --backend cpu --seq-len 4K --heads 4 --head-dim 32 --iters 50 --timeout $timeout_s)
bench_args=(bench --backend cpu --heads 4 --head-dim 32 -b 4K -e 4K -n 50 -w 0 -c 0 --timeout $timeout_s)

# fault_case SIGNAL RANK ARGS...: sends SIGNAL to RANK 2 s after it starts; the job must end within
# the timeout + 10 s of the signal, exit 3 (communication failure), and name the stalled rank.
fault_case() {
  local sig=$1 rank=$2
  shift 2
  launch_time=$(date +%s)
  launch 120 "$@"
  bash "$here/stop_rank.sh" "$job" "$rank" "$sig" 2 || die "could not signal rank $rank"
  local signalled=$(($(date +%s) - launch_time))
  finish 120
  [ $((took - signalled)) -le $((timeout_s + 10)) ] ||
    die "the job ended $((took - signalled)) s after SIG$sig, more than --timeout $timeout_s + 10 s"
  if [ "$sig" = STOP ]; then
    no_crash
    [ "$rc" -eq 3 ] || die "exit $rc after a stalled rank, expected 3 (communication failure)"
    # The stalled rank is named either by the check-in (when the ranks that timed out in a hop are
    # still there to answer it) or by the hop's own timeout on its neighbours: which one reports
    # first depends on timing.
    expect_in_output "rank $rank does not answer a point-to-point check-in|ranks ([0-9]+, )*$rank(, [0-9]+)* do not answer|waiting for rank $rank "
    expect_in_output "hop [0-9]+|pass [0-9]+"  # where it stalled: inside a hop, or at a pass's barrier
  else
    [ "$rc" -ne 0 ] || die "exit 0 after a killed rank"
    expect_in_output "rank $rank|process rank $rank"
  fi
}

case $case_name in
  run_stopped_rank) fault_case STOP 2 "${run_args[@]}" ;;
  bench_stopped_rank) fault_case STOP 1 "${bench_args[@]}" ;;
  run_killed_rank) fault_case KILL 1 "${run_args[@]}" ;;
  bench_killed_rank) fault_case KILL 2 "${bench_args[@]}" ;;
  tiny_timeout)
    # The issue's reproduction: every exchange times out at once; no crash, exit 3, the hop named.
    for _ in 1 2 3; do
      launch_time=$(date +%s)
      launch 60 run --backend cpu --seq-len 4K --heads 8 --head-dim 64 --timeout 0.001
      finish 60
      no_crash
      [ "$rc" -eq 3 ] || die "exit $rc with --timeout 0.001, expected 3"
      expect_in_output "timed out after 0.001 s|did not complete within"
    done ;;
  mismatched_flags)
    # The last rank gets one flag more: every rank stops at start-up (exit 1) naming the flag and
    # the ranks, instead of hanging in a barrier or silently computing another problem.
    base=(run --backend cpu --seq-len 240 --heads 2 --head-dim 8 --timeout 20)
    last=$((np - 1))
    for extra in "--iters 3" "--warmup 2" "--backward" "--seed 5" "--check" "--save $work/save" \
        "--json $work/run.json" "--check-rows 7" "--causal" "--window 8,0" "--scale 0.5"; do
      flag=${extra%% *}
      launch_time=$(date +%s)
      echo "+ mismatch: rank $last adds $extra" >&2
      # shellcheck disable=SC2086
      timeout -k 5 60 "${prefix[@]}" $last "$cli" "${base[@]}" : -n 1 "$cli" "${base[@]}" $extra >"$out" 2>&1 &
      job=$!
      finish 60
      no_crash
      [ "$rc" -eq 1 ] || die "exit $rc with $extra on rank $last only, expected 1 (bad input)"
      n=$(grep -cE -- "ranks were launched with different ($flag|the problem).*rank $last has" "$out")
      [ "$n" -ge "$np" ] || die "expected every rank to name $flag and rank $last ($n of $np did)"
    done
    launch_time=$(date +%s)
    bench_base=(bench --backend cpu --heads 2 --head-dim 8 -b 240 -e 240 -w 0 -c 0 --timeout 20)
    timeout -k 5 60 "${prefix[@]}" $last "$cli" "${bench_base[@]}" -n 2 : -n 1 "$cli" "${bench_base[@]}" -n 3 \
      >"$out" 2>&1 &
    job=$!
    finish 60
    [ "$rc" -eq 1 ] || die "bench: exit $rc with -n 3 on rank $last only, expected 1"
    expect_in_output "ranks were launched with different -n/--iters: rank 0 has 2, rank $last has 3" ;;
  *) die "unknown case $case_name" ;;
esac
echo "PASS: $case_name"
