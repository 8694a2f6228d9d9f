// The ringattn binary on bad flags: non-zero exit and a message naming the flag (one process, no mpirun).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

namespace {

struct Result {
  int code = -1;
  std::string output;  // stdout and stderr together
};

Result run_cli(const std::string& args) {
  const std::string cmd = std::string(RINGATTN_CLI_PATH) + " " + args + " 2>&1";
  Result r;
  FILE* p = popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = fread(buf, 1, sizeof(buf), p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return r;
}

struct BadCase {
  const char* args;
  const char* must_mention;
};

class CliRejects : public ::testing::TestWithParam<BadCase> {};

TEST_P(CliRejects, NonZeroExitNamingTheFlag) {
  const BadCase c = GetParam();
  const Result r = run_cli(std::string("run --backend cpu ") + c.args);
  EXPECT_EQ(r.code, 1) << "bad input exits 1 (README, Exit codes):\n" << r.output;
  EXPECT_NE(r.output.find(c.must_mention), std::string::npos)
      << "expected '" << c.must_mention << "' in:\n" << r.output;
}

INSTANTIATE_TEST_SUITE_P(
    BadFlags, CliRejects,
    ::testing::Values(BadCase{"--seq-len 4Q", "--seq-len"}, BadCase{"--seq-len 0", "--seq-len"},
                      BadCase{"--seq-len 3 --layout zigzag", "--seq-len 3 is not divisible by 2"},
                      BadCase{"--layout diagonal", "--layout"}, BadCase{"--dtype fp8", "--dtype"},
                      BadCase{"--backend tpu", "--backend"}, BadCase{"--heads 8 --kv-heads 3", "--kv-heads 3"},
                      BadCase{"--batch 0", "--batch"}, BadCase{"--head-dim 0", "--head-dim"},
                      BadCase{"--timeout 0", "--timeout"}, BadCase{"--log-level loud", "--log-level"},
                      BadCase{"--load /nonexistent/ringattn", "/nonexistent/ringattn/q.npy"},
                      BadCase{"--heads two", "--heads"}, BadCase{"--no-such-flag", "--no-such-flag"},
                      // Sizes whose products overflow (a segfault, a silent wrap to 1073741824).
                      BadCase{"--batch 4611686018427387904 --seq-len 64", "the problem is too large"},
                      BadCase{"--seq-len 17179869185G", "above the limit of 2^40"},
                      BadCase{"--seq-len 1024G --heads 64 --head-dim 128", "the problem is too large"},
                      BadCase{"--head-dim 1000000", "--head-dim 1000000 is above the limit of 1024"},
                      // Values out of range, refused before any computation (256K tokens would take minutes).
                      BadCase{"--seq-len 256K --warmup -7", "--warmup -7 is below -1"},
                      BadCase{"--seq-len 256K --check-rows -5", "--check-rows -5 is below -1"},
                      BadCase{"--seq-len 256K --save ''", "--save was given an empty path"},
                      BadCase{"--seq-len 256K --json ''", "--json was given an empty path"},
                      BadCase{"--seq-len 256K --load ''", "--load was given an empty path"},
                      BadCase{"--seq-len 256K --json /tmp", "--json '/tmp' is a directory"}));

TEST(Cli, UnwritableSaveDirectoryIsRejectedUpFront) {
  namespace fs = std::filesystem;
  const fs::path file = fs::temp_directory_path() / ("ringattn_cli_validation_" + std::to_string(getpid()));
  std::ofstream(file) << "not a directory";
  const Result r = run_cli("run --backend cpu --seq-len 64 --heads 1 --head-dim 8 --save " + file.string() + "/out");
  fs::remove(file);
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--save"), std::string::npos) << r.output;
}

// --scale beyond what the compute type handles is refused up front naming --scale and the bound
// (it gave all-NaN output and exit 0); a large scale inside the bound is computed correctly.
TEST(Cli, ScaleBeyondTheBoundIsRefusedAndInsideItComputedCorrectly) {
  for (const char* cmd : {"run --backend cpu --seq-len 64 --heads 2 --head-dim 8 --scale 1e300",
                          "run --backend cpu --seq-len 64 --heads 2 --head-dim 8 --scale 1e30 --dtype bf16",
                          "bench --backend cpu --heads 2 --head-dim 8 -b 64 -e 64 --scale 1e30 -n 1 -w 0"}) {
    const Result r = run_cli(cmd);
    EXPECT_EQ(r.code, 1) << cmd << "\n" << r.output;
    EXPECT_NE(r.output.find("is too large for these inputs"), std::string::npos) << cmd << "\n" << r.output;
    EXPECT_NE(r.output.find("above the 1e+04"), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("pass --scale at most"), std::string::npos) << r.output;
  }
  const Result r = run_cli("run --backend cpu --seq-len 256 --heads 2 --head-dim 8 --scale 400 --check");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("\nPASS\n"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("non-finite outputs: none"), std::string::npos) << r.output;
}

TEST(Cli, SmallCheckedRunPasses) {
  const Result r = run_cli("run --backend cpu --seq-len 64 --heads 2 --kv-heads 1 --head-dim 8 --causal --check");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("\nPASS\n"), std::string::npos) << r.output;
}

TEST(Cli, InfoAndHelpWork) {
  Result r = run_cli("info");
  EXPECT_EQ(r.code, 0) << r.output;
  EXPECT_NE(r.output.find("build: CUDA"), std::string::npos) << r.output;
  r = run_cli("run --help");
  EXPECT_EQ(r.code, 0);
  for (const char* flag : {"--seq-len", "--kv-heads", "--layout", "--backend", "--dtype", "--check", "--load", "--save",
                           "--json", "--log-level", "--timeout"}) {
    EXPECT_NE(r.output.find(flag), std::string::npos) << flag;
  }
  r = run_cli("");
  EXPECT_EQ(r.code, 1);  // a subcommand is required: bad input
}

TEST(Cli, HelpOfEverySubcommandPrintsTheExitCodeTable) {
  for (const char* cmd : {"--help", "run --help", "bench --help", "info --help", "plan --help"}) {
    const Result r = run_cli(cmd);
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_NE(r.output.find("0 success, 1 bad input, 2 a check failed, 3 communication failure or timeout, 4 out of "
                            "memory, 5 internal error"),
              std::string::npos)
        << cmd << ":\n" << r.output;
  }
}

}  // namespace
