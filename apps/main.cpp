// ringattn CLI entry point: dispatches to the run, bench, info and plan subcommands.
#include <cstdio>
#include <exception>
#include <new>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "exit_codes.hpp"
#include "ringattn/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"ringattn: exact ring attention across MPI ranks (CPU) or GPUs (CUDA + NCCL)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ringattn 0.1.0");
  app.footer(ringattn::cli::kExitCodeTable);
  std::vector<ringattn::cli::Command> commands = {
      ringattn::cli::add_run_command(app),
      ringattn::cli::add_bench_command(app),
      ringattn::cli::add_info_command(app),
      ringattn::cli::add_plan_command(app),
  };
  for (auto& c : commands) c.app->footer(ringattn::cli::kExitCodeTable);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);  // prints the help, or the error with CLI11's own message
    return code == 0 ? ringattn::cli::kExitOk : ringattn::cli::kExitBadInput;
  }
  try {
    for (auto& c : commands) {
      if (c.app->parsed()) return c.action();
    }
  } catch (const ringattn::Error& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    return ringattn::cli::exit_code_for(e.kind());
  } catch (const std::bad_alloc& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", ringattn::cli::describe_exception(e).c_str());
    return ringattn::cli::kExitOutOfMemory;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn: error: %s internal error: %s (hint: please report it with the command line)\n",
                 ringattn::context_prefix().c_str(), e.what());
    return ringattn::cli::kExitInternal;
  }
  return ringattn::cli::kExitInternal;
}
