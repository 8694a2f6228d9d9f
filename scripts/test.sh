#!/usr/bin/env bash
# Installs what is missing (Debian packages as root; numpy, pytest, scikit-build-core, jax via pip), configures and builds ringattn
# in build/, and runs the whole test suite with ctest. Exits non-zero on any failure.
#
#   scripts/test.sh               set up, build, run every test
#   scripts/test.sh --build-only  set up and build (scripts/run.sh uses this)
#   scripts/test.sh --sanitize    the sanitizer job: the CPU build of the `sanitize` preset
#                                 (-fsanitize=address,undefined) in RINGATTN_SANITIZE_DIR (default
#                                 build/sanitize), then the unit, MPI, CLI and fault tests under it,
#                                 leaks checked (scripts/lsan_openmpi.supp: Open MPI's own only)
#
# Environment: RINGATTN_TEST_CUDA=0 builds without CUDA even when nvcc exists (default: CUDA when
# nvcc is on PATH or in /usr/local/cuda/bin; GPU tests then skip visibly without a GPU).
# RINGATTN_TEST_PYTHON=1 also installs torch for tests/python (0: installs nothing for them).
# RINGATTN_BUILD_DIR (default build), RINGATTN_JOBS (default nproc), CTEST_ARGS (extra ctest flags).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${RINGATTN_BUILD_DIR:-$ROOT/build}
JOBS=${RINGATTN_JOBS:-$(nproc 2>/dev/null || echo 2)}
BUILD_ONLY=0
SANITIZE=0
for arg in "$@"; do
  case $arg in
    --build-only) BUILD_ONLY=1 ;;
    --sanitize) SANITIZE=1 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "test.sh: unknown argument '$arg' (use --build-only or --sanitize)" >&2; exit 2 ;;
  esac
done

log() { echo "[ringattn] $*"; }

# ---- dependencies -------------------------------------------------------------------------------
# "package:probe" pairs; a probe is a command name or an absolute path that the package provides.
DEPS=(
  "cmake:cmake" "g++:g++" "make:make"
  "openmpi-bin:mpirun" "libopenmpi-dev:mpicxx"
  "libspdlog-dev:/usr/include/spdlog/spdlog.h"
  "libcli11-dev:/usr/include/CLI/CLI.hpp"
  "libgtest-dev:/usr/include/gtest/gtest.h"
)
missing=()
for dep in "${DEPS[@]}"; do
  pkg=${dep%%:*} probe=${dep#*:}
  if [[ $probe == /* ]]; then
    [ -e "$probe" ] || missing+=("$pkg")
  else
    command -v "$probe" >/dev/null 2>&1 || missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing missing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "ringattn: missing packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# numpy is only needed by the CLI end-to-end tests (they skip visibly without it).
PYTHON=$(command -v python3 || true)
if [ -n "$PYTHON" ] && ! "$PYTHON" -c "import numpy" >/dev/null 2>&1; then
  log "installing numpy for the numpy end-to-end tests"
  "$PYTHON" -m pip install --quiet numpy >/dev/null 2>&1 ||
    "$PYTHON" -m pip install --quiet --break-system-packages numpy >/dev/null 2>&1 ||
    { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-numpy >/dev/null 2>&1; } ||
    log "could not install numpy: the numpy end-to-end tests will be skipped"
fi
# matplotlib only for the scaling plot's test (model.plot_scaling skips visibly without it).
if [ -n "$PYTHON" ] && ! "$PYTHON" -c "import matplotlib" >/dev/null 2>&1; then
  log "installing matplotlib for the scaling plot test"
  "$PYTHON" -m pip install --quiet matplotlib >/dev/null 2>&1 ||
    "$PYTHON" -m pip install --quiet --break-system-packages matplotlib >/dev/null 2>&1 ||
    log "could not install matplotlib: the scaling plot test will be skipped"
fi

# ---- the Python package (pyproject.toml, python/ringattn/, tests/python/) ---------------------------
# RINGATTN_TEST_PYTHON: unset: scikit-build-core and pytest (small) and jax (about 400 MB, 1.5 min)
# are installed when missing, torch only when it is already there; 1: torch too (PyPI's default
# wheel pulls its CUDA libraries: about 4 GB and 6 minutes here, too heavy for every CI run; the
# CPU wheel of download.pytorch.org is tried first); 0: nothing is installed. The torch and jax
# tests skip visibly (ctest "Skipped") when their framework is not importable.
pip_install() {  # pip_install WHAT PIP-ARGS...: quiet, and tolerant of an externally managed Python
  local what=$1; shift
  "$PYTHON" -m pip install --quiet "$@" >/dev/null 2>&1 ||
    "$PYTHON" -m pip install --quiet --break-system-packages "$@" >/dev/null 2>&1 ||
    { log "could not install $what: its Python tests will be skipped"; return 1; }
}
py_has() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }
if [ -n "$PYTHON" ] && [ "${RINGATTN_TEST_PYTHON:-}" != 0 ]; then
  py_has scikit_build_core || { log "installing scikit-build-core (pip install --no-build-isolation .)"; pip_install scikit-build-core scikit-build-core || true; }
  py_has pytest || { log "installing pytest for tests/python"; pip_install pytest pytest || true; }
  py_has jax || { log "installing jax for the JAX op tests"; pip_install jax jax || true; }
  if ! py_has torch; then
    if [ "${RINGATTN_TEST_PYTHON:-}" = 1 ]; then
      log "installing torch (CPU wheel, else PyPI's default wheel) for the PyTorch op tests"
      "$PYTHON" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu >/dev/null 2>&1 ||
        pip_install torch torch || true
    else
      log "torch is not installed: the PyTorch op tests (ctest python.torch) will be SKIPPED" \
          "(RINGATTN_TEST_PYTHON=1 installs it: about 4 GB from PyPI)"
    fi
  fi
elif [ "${RINGATTN_TEST_PYTHON:-}" = 0 ]; then
  log "RINGATTN_TEST_PYTHON=0: nothing installed for the Python tests (they run or skip with what is there)"
fi

# ---- MPI as root and with more ranks than cores ---------------------------------------------------
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
export OMPI_MCA_rmaps_base_oversubscribe=${OMPI_MCA_rmaps_base_oversubscribe:-1}
# Containers often forbid the cross-memory attach that Open MPI's shared-memory transport tries first.
export OMPI_MCA_btl_vader_single_copy_mechanism=${OMPI_MCA_btl_vader_single_copy_mechanism:-none}

# ---- the sanitizer job ----------------------------------------------------------------------------
if [ "$SANITIZE" = 1 ]; then
  SAN_DIR=${RINGATTN_SANITIZE_DIR:-$ROOT/build/sanitize}
  log "sanitizer job: configuring $SAN_DIR (preset sanitize: ASan + UBSan, CPU only)"
  (cd "$ROOT" && cmake --preset sanitize -B "$SAN_DIR")
  log "building with $JOBS jobs"
  cmake --build "$SAN_DIR" -j "$JOBS"
  # Leaks are checked at every process's exit; Open MPI's own are suppressed (the file says which).
  # Full unwinding (Open MPI is built without frame pointers) and components kept loaded, so that
  # every leak's stack names its library and the suppressions can match Open MPI's alone.
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:fast_unwind_on_malloc=0${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
  export OMPI_MCA_mca_base_component_disable_dlclose=1
  export LSAN_OPTIONS="suppressions=$ROOT/scripts/lsan_openmpi.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
  log "running the unit, MPI, CLI and fault tests under the sanitizers"
  cd "$SAN_DIR"
  # shellcheck disable=SC2086
  # Speed tests measure time, which the sanitizers multiply: they run in the main suite only.
  SAN_TIMING_TESTS='unit\.ModelScale\.AThousandRanksAnswerWithinASecond|c_abi\.overhead|model\.cpu_live'
  log "left out under the sanitizers (timing tests, run by the main suite): $SAN_TIMING_TESTS"
  ctest --output-on-failure -j "$JOBS" -L "unit|mpi|cli|fault" -E "$SAN_TIMING_TESTS" ${CTEST_ARGS:-}
  exit $?
fi

# ---- configure and build ------------------------------------------------------------------------
cmake_args=(-S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release)
NVCC=$(command -v nvcc || true)
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ "${RINGATTN_TEST_CUDA:-1}" = 0 ]; then
  log "CUDA off (RINGATTN_TEST_CUDA=0)"
  cmake_args+=(-DRINGATTN_WITH_CUDA=OFF -DRINGATTN_WITH_NCCL=OFF)
elif [ -n "$NVCC" ]; then
  log "CUDA on ($NVCC)"
  cmake_args+=(-DRINGATTN_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC")
else
  log "CUDA off (no nvcc found)"
  cmake_args+=(-DRINGATTN_WITH_CUDA=OFF -DRINGATTN_WITH_NCCL=OFF)
fi
log "configuring $BUILD_DIR"
cmake "${cmake_args[@]}"
log "building with $JOBS jobs"
cmake --build "$BUILD_DIR" -j "$JOBS"
log "built $BUILD_DIR/bin/ringattn"
[ "$BUILD_ONLY" = 1 ] && exit 0

# ---- tests --------------------------------------------------------------------------------------
log "running the test suite"
cd "$BUILD_DIR"
# shellcheck disable=SC2086
ctest --output-on-failure -j "$JOBS" ${CTEST_ARGS:-}
