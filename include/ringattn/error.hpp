// The one exception type of ringattn and the context (rank, host, device) every message carries.
#pragma once

#include <stdexcept>
#include <string>

namespace ringattn {

// Where this process sits in the job; filled in by the runtime once known.
struct ProcessContext {
  int rank = 0;
  int world = 1;
  int device = -1;  // CUDA device ordinal, -1 for CPU-only
  std::string host;
};

const ProcessContext& process_context();
void set_process_context(const ProcessContext& ctx);
// "[rank 1/4 host gpu7 device 1]" for messages and logs.
std::string context_prefix();

enum class ErrorKind {
  kInvalidArgument,  // a bad flag, shape or file: the user can fix it
  kIo,               // a file could not be read or written
  kMismatch,         // ranks disagree on the configuration
  kComm,             // MPI / NCCL failure, timeout or abort
  kCuda,             // CUDA runtime failure
  kOutOfMemory,      // host or device memory exhausted
  kInternal,         // a bug in ringattn
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message);
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Throws Error(kind, context_prefix() + " " + message + " (hint: " + hint + ")") when hint is set.
[[noreturn]] void fail(ErrorKind kind, const std::string& message, const std::string& hint = "");

}  // namespace ringattn

#define RINGATTN_CHECK(cond, kind, msg, hint)                     \
  do {                                                            \
    if (!(cond)) ::ringattn::fail((kind), (msg), (hint));         \
  } while (0)
