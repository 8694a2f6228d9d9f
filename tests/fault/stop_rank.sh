#!/usr/bin/env bash
# Sends SIGNAL to the process of MPI rank RANK among the descendants of PID (mpirun, or a timeout
# that runs it) once it is up, after DELAY_S more seconds:
#   stop_rank.sh PID RANK SIGNAL DELAY_S
# (the rank is read from OMPI_COMM_WORLD_RANK in each process's environment). Exits 1 when no
# such process appears within 30 s.
set -u
mpirun_pid=$1 rank=$2 sig=$3 delay=$4
descendants() {
  local c
  for c in $(pgrep -P "$1"); do
    echo "$c"
    descendants "$c"
  done
}
for _ in $(seq 300); do
  for child in $(descendants "$mpirun_pid"); do
    if tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null | grep -qx "OMPI_COMM_WORLD_RANK=$rank"; then
      sleep "$delay"
      kill -s "$sig" "$child" && echo "stop_rank.sh: sent SIG$sig to rank $rank (pid $child)" >&2
      exit 0
    fi
  done
  sleep 0.1
done
echo "stop_rank.sh: rank $rank under pid $mpirun_pid never appeared" >&2
exit 1
