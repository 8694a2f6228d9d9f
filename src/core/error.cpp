// Process context (rank, host, device) and the Error type whose messages carry it.
#include "ringattn/error.hpp"

#include <unistd.h>

#include <mutex>

namespace ringattn {
namespace {

ProcessContext& mutable_context() {
  static ProcessContext ctx = [] {
    ProcessContext c;
    char host[256] = {0};
    if (gethostname(host, sizeof(host) - 1) == 0) c.host = host;
    return c;
  }();
  return ctx;
}

}  // namespace

const ProcessContext& process_context() { return mutable_context(); }

void set_process_context(const ProcessContext& ctx) { mutable_context() = ctx; }

std::string context_prefix() {
  const ProcessContext& c = process_context();
  std::string s = "[rank " + std::to_string(c.rank) + "/" + std::to_string(c.world) + " host " + c.host;
  if (c.device >= 0) s += " device " + std::to_string(c.device);
  return s + "]";
}

Error::Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}

void fail(ErrorKind kind, const std::string& message, const std::string& hint) {
  std::string text = context_prefix() + " " + message;
  if (!hint.empty()) text += " (hint: " + hint + ")";
  throw Error(kind, text);
}

}  // namespace ringattn
