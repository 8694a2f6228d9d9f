// ringattn CLI entry point: dispatches to the run, bench, info and plan subcommands.
#include <cstdio>
#include <exception>
#include <new>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "ringattn/error.hpp"

int main(int argc, char** argv) {
  CLI::App app{"ringattn: exact ring attention across MPI ranks (CPU) or GPUs (CUDA + NCCL)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "ringattn 0.1.0");
  std::vector<ringattn::cli::Command> commands = {
      ringattn::cli::add_run_command(app),
      ringattn::cli::add_bench_command(app),
      ringattn::cli::add_info_command(app),
      ringattn::cli::add_plan_command(app),
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto& c : commands) {
      if (c.app->parsed()) return c.action();
    }
  } catch (const ringattn::Error& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc& e) {
    std::fprintf(stderr, "ringattn: error: %s\n", ringattn::cli::describe_exception(e).c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn: error: %s %s\n", ringattn::context_prefix().c_str(), e.what());
    return 1;
  }
  return 1;
}
