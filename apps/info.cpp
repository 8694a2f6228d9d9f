// `ringattn info`: build options, library versions, visible devices and the ranks of this launch.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <spdlog/version.h>

#ifdef RINGATTN_HAVE_MPI
#include <mpi.h>
#endif
#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef RINGATTN_HAVE_NCCL
#include <nccl.h>
#endif

#include "cli_common.hpp"
#include "commands.hpp"
#include "core/logging.hpp"
#include "ringattn/error.hpp"
#include "ringattn/session.hpp"

namespace ringattn::cli {
namespace {

struct InfoFlags {
  std::string log_level;
};

const char* on_off(bool b) { return b ? "ON" : "OFF"; }

std::vector<std::string> build_lines() {
  std::vector<std::string> lines;
#ifdef RINGATTN_HAVE_CUDA
  constexpr bool kCuda = true;
#else
  constexpr bool kCuda = false;
#endif
#ifdef RINGATTN_HAVE_MPI
  constexpr bool kMpi = true;
#else
  constexpr bool kMpi = false;
#endif
#ifdef RINGATTN_HAVE_NCCL
  constexpr bool kNccl = true;
#else
  constexpr bool kNccl = false;
#endif
  lines.push_back("ringattn 0.1.0");
  lines.push_back(std::string("build: CUDA ") + on_off(kCuda) + ", MPI " + on_off(kMpi) + ", NCCL " + on_off(kNccl) +
                  ", compiler " + __VERSION__);
  lines.push_back("spdlog " + std::to_string(SPDLOG_VER_MAJOR) + "." + std::to_string(SPDLOG_VER_MINOR) + "." +
                  std::to_string(SPDLOG_VER_PATCH));
#ifdef RINGATTN_HAVE_MPI
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(mpi_version, &len);
  std::string v(mpi_version, static_cast<std::size_t>(len));
  if (const auto nl = v.find('\n'); nl != std::string::npos) v.resize(nl);
  while (!v.empty() && (v.back() == ',' || v.back() == ' ')) v.pop_back();
  lines.push_back("MPI: " + v);
#endif
#ifdef RINGATTN_HAVE_CUDA
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);
  auto ver = [](int x) { return std::to_string(x / 1000) + "." + std::to_string((x % 1000) / 10); };
  lines.push_back("CUDA runtime " + ver(runtime) + ", driver " + (driver ? ver(driver) : std::string("none")));
#endif
#ifdef RINGATTN_HAVE_NCCL
  int nccl = 0;
  ncclGetVersion(&nccl);
  lines.push_back("NCCL " + std::to_string(nccl / 10000) + "." + std::to_string((nccl % 10000) / 100) + "." +
                  std::to_string(nccl % 100));
#endif
  return lines;
}

// The CUDA devices this process sees, one line each (empty without CUDA or devices).
std::string device_summary() {
#ifdef RINGATTN_HAVE_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return "0 CUDA devices";
  }
  std::string s = std::to_string(count) + " CUDA device" + (count == 1 ? "" : "s");
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    char bus[32] = {0};
    cudaDeviceGetPCIBusId(bus, sizeof(bus), d);
    char buf[256];
    std::snprintf(buf, sizeof(buf), "; %d: %s sm_%d%d %.1f GiB [%s]", d, prop.name, prop.major, prop.minor,
                  static_cast<double>(prop.totalGlobalMem) / (1u << 30), bus);
    s += buf;
  }
  return s;
#else
  return "no CUDA in this build";
#endif
}

int info_main(const InfoFlags& f) {
  guess_process_context_from_launcher();
  init_logging(f.log_level);
  SessionOptions options;
  options.backend = "cpu";  // info never claims a GPU, so it runs with any number of ranks
  std::unique_ptr<Session> session = Session::create(nullptr, nullptr, options);
  const std::vector<std::string> ranks =
      session->gather_strings(session->describe_rank() + " local_rank " + std::to_string(session->local_rank()) +
                              ": " + device_summary());
  if (session->rank() == 0) {
    for (const std::string& line : build_lines()) std::printf("# %s\n", line.c_str());
    std::printf("# ranks: %d\n", session->world());
    for (const std::string& line : ranks) std::printf("#   %s\n", line.c_str());
    std::fflush(stdout);
  }
  return 0;
}

}  // namespace

Command add_info_command(CLI::App& root) {
  auto flags = std::make_shared<InfoFlags>();
  CLI::App* app = root.add_subcommand("info", "Build options, versions, visible devices and ranks");
  app->add_option("--log-level", flags->log_level, "trace | debug | info | warn | error | critical | off");
  return {app, [flags] { return info_main(*flags); }};
}

}  // namespace ringattn::cli
