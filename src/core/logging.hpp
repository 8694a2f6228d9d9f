// Logging: one spdlog logger for the whole process whose lines carry rank, host and device.
#pragma once

#include <string>
#include <string_view>

#include <spdlog/spdlog.h>

namespace ringattn {

inline constexpr const char* kLogLevelEnv = "RINGATTN_LOG_LEVEL";
inline constexpr const char* kDefaultLogLevel = "warn";

// Parses trace|debug|info|warn|error|critical|off (also "warning", "err");
// throws ringattn::Error naming `flag` and the accepted names.
spdlog::level::level_enum parse_log_level(std::string_view name, std::string_view flag = "--log-level");

// (Re)configures the logger: `level` when non-empty (the --log-level flag), else the
// RINGATTN_LOG_LEVEL environment variable, else "warn". Lines go to stderr as
// "[12:00:00.123] [info] [rank 1/4 host gpu7 device 1] message"; the rank prefix is read at
// every line, so lines logged after the session knows its rank carry it.
void init_logging(const std::string& level = "");

// The process-wide logger (created with the defaults on first use).
spdlog::logger& log();

}  // namespace ringattn
