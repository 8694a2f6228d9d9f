// The exit codes of every ringattn subcommand (README "Exit codes" and `ringattn --help`).
#pragma once

#include "ringattn/error.hpp"

namespace ringattn::cli {

constexpr int kExitOk = 0;            // success
constexpr int kExitBadInput = 1;      // a bad flag, input file or configuration (ranks disagreeing included)
constexpr int kExitCheckFailed = 2;   // the results were computed, and --check / -c 1 found them wrong
constexpr int kExitCommFailure = 3;   // communication failure or timeout (a peer stalled or died)
constexpr int kExitOutOfMemory = 4;   // out of host or device memory
constexpr int kExitInternal = 5;      // an internal error (a bug, or a CUDA failure that is not out of memory)

// The table as `ringattn --help` prints it.
constexpr const char* kExitCodeTable =
    "Exit codes (every subcommand): 0 success, 1 bad input, 2 a check failed, 3 communication failure or "
    "timeout, 4 out of memory, 5 internal error";

inline int exit_code_for(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument:
    case ErrorKind::kIo:
    case ErrorKind::kMismatch: return kExitBadInput;
    case ErrorKind::kComm: return kExitCommFailure;
    case ErrorKind::kOutOfMemory: return kExitOutOfMemory;
    case ErrorKind::kCuda:
    case ErrorKind::kInternal: return kExitInternal;
  }
  return kExitInternal;
}

}  // namespace ringattn::cli
