// spdlog set-up: stderr sink, level from flag or environment, a %R flag that prints the rank context.
#include "core/logging.hpp"

#include <cctype>
#include <cstdlib>
#include <memory>
#include <mutex>

#include <spdlog/pattern_formatter.h>
#include <spdlog/sinks/stdout_color_sinks.h>

#include "ringattn/error.hpp"

namespace ringattn {
namespace {

// Expands %R to context_prefix(), evaluated per line (the rank is known only after bootstrap).
class ContextFlag : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg&, const std::tm&, spdlog::memory_buf_t& dest) override {
    const std::string prefix = context_prefix();
    dest.append(prefix.data(), prefix.data() + prefix.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override { return std::make_unique<ContextFlag>(); }
};

std::mutex g_mutex;
std::shared_ptr<spdlog::logger> g_logger;

std::shared_ptr<spdlog::logger> make_logger() {
  auto sink = std::make_shared<spdlog::sinks::stderr_color_sink_mt>();
  auto logger = std::make_shared<spdlog::logger>("ringattn", sink);
  auto formatter = std::make_unique<spdlog::pattern_formatter>();
  formatter->add_flag<ContextFlag>('R').set_pattern("[%H:%M:%S.%e] [%^%l%$] %R %v");
  logger->set_formatter(std::move(formatter));
  logger->flush_on(spdlog::level::warn);
  return logger;
}

}  // namespace

spdlog::level::level_enum parse_log_level(std::string_view name, std::string_view flag) {
  std::string s(name);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s == "trace") return spdlog::level::trace;
  if (s == "debug") return spdlog::level::debug;
  if (s == "info") return spdlog::level::info;
  if (s == "warn" || s == "warning") return spdlog::level::warn;
  if (s == "error" || s == "err") return spdlog::level::err;
  if (s == "critical") return spdlog::level::critical;
  if (s == "off") return spdlog::level::off;
  fail(ErrorKind::kInvalidArgument, "unknown log level '" + std::string(name) + "' for " + std::string(flag),
       "use one of trace, debug, info, warn, error, critical, off");
}

void init_logging(const std::string& level) {
  spdlog::level::level_enum lvl;
  if (!level.empty()) {
    lvl = parse_log_level(level, "--log-level");
  } else if (const char* env = std::getenv(kLogLevelEnv); env != nullptr && *env != '\0') {
    lvl = parse_log_level(env, kLogLevelEnv);
  } else {
    lvl = parse_log_level(kDefaultLogLevel);
  }
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_logger) g_logger = make_logger();
  g_logger->set_level(lvl);
}

spdlog::logger& log() {
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_logger) return *g_logger;
  }
  try {
    init_logging();
  } catch (const Error&) {  // a bad RINGATTN_LOG_LEVEL must not make logging itself throw
    init_logging(kDefaultLogLevel);
  }
  return *g_logger;
}

}  // namespace ringattn
