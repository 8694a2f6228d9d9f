// The CLI's subcommands: each file registers one on the CLI11 app and returns the action to run.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace ringattn::cli {

struct Command {
  CLI::App* app = nullptr;
  std::function<int()> action;  // returns the process exit code
};

Command add_run_command(CLI::App& root);    // apps/run.cpp: one forward (+backward) pass, --check
Command add_bench_command(CLI::App& root);  // apps/bench.cpp: nccl-tests style sweep
Command add_info_command(CLI::App& root);   // apps/info.cpp: build options, devices, ranks
Command add_plan_command(CLI::App& root);   // apps/plan.cpp: the scaling model (no GPU, no MPI)

}  // namespace ringattn::cli
