#!/usr/bin/env bash
# One device call of benchmarks and device tests: bench/run.sh <suite> [args]; logs in $OUT.
#
# Usage: bench/run.sh [--dry-run] <suite> [args]     run a suite from the repository root's copy
#        bench/run.sh --list                          the suites, one line each, with their durations
#        bench/run.sh --help [suite]                  this text, or a suite's own header
# Every suite builds what it needs (bench/lib.sh: CMake + nvcc for sm_90a in build/release, BUILD
# overrides), runs each step under its own timeout, prints a result table with an OK/FAILED footer
# and exits non-zero when a step failed. The device allows 10 minutes a command: every suite stays
# under about 9 (BUDGET_S shortens one). --dry-run prints the device commands instead of running them.
# Common env: OUT (logs; default /tmp/ringattn_out), BUDGET_S, BUILD, CUDA_ARCHS (default 90a),
# RINGATTN_COMMIT (the label of the copied tree; the device copy has no .git).
set -u -o pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/.." || exit 1

suite_header() { sed -n '1,/^[^#]/p' "$1" | grep '^#' | grep -v 'shellcheck shell' | sed -E 's/^# ?//'; }
list_suites() {
  local f
  for f in "$HERE"/suites/*.sh; do
    printf '  %-12s %s\n' "$(basename "$f" .sh)" "$(sed -n '1s/^# *//p' "$f")"
  done
}
usage() { sed -n '2,12p' "$HERE/run.sh" | sed -E 's/^# ?//'; echo; echo "Suites:"; list_suites; }

RA_DRY_RUN=${RA_DRY_RUN:-0}
case "${1:-}" in
  ""|-h|--help)
    if [ -n "${2:-}" ] && [ -f "$HERE/suites/$2.sh" ]; then suite_header "$HERE/suites/$2.sh"; else usage; fi
    exit 0 ;;
  --list) list_suites; exit 0 ;;
  --dry-run) RA_DRY_RUN=1; shift ;;
esac
export RA_DRY_RUN
exec 3>&2  # bench/lib.sh prints --dry-run's commands here, past the suites' redirections
suite=${1:-}
[ -n "$suite" ] || { usage >&2; exit 2; }
shift
if [ ! -f "$HERE/suites/$suite.sh" ]; then
  echo "bench/run.sh: no suite '$suite'; the suites are:" >&2
  list_suites >&2
  exit 2
fi
case "${1:-}" in -h|--help) suite_header "$HERE/suites/$suite.sh"; exit 0 ;; esac
RA_ARGS="$*"
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"
ra_init "$suite"
# shellcheck disable=SC1090
source "$HERE/suites/$suite.sh"
ra_finish
