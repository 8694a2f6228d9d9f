// The scaling model: exact pair counts, the recorded H200 rows of docs/BENCHMARKS.md, strategies, p = 1024 speed, machine files.
#include <gtest/gtest.h>

#include <cmath>
#include <ctime>
#include <cstdio>
#include <fstream>
#include <string>

#include "machine_file.hpp"
#include "model/model.hpp"
#include "plan/plan.hpp"
#include "ringattn/error.hpp"

namespace ringattn {
namespace {

const std::string kMachines = std::string(RINGATTN_SOURCE_DIR) + "/configs/machines/";
// The tolerances: pass time within 10%, ring efficiency within 3 points.
constexpr double kTimeTolerance = 0.10;
constexpr double kEfficiencyPoints = 3.0;
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

AttentionSpec standard(int64_t seq_len, bool causal) {
  AttentionSpec s;
  s.seq_len = seq_len;
  s.heads = 32;
  s.kv_heads = 32;
  s.head_dim = 128;
  s.dtype = DType::kBF16;
  s.mask.causal = causal;
  s.layout = causal ? Layout::kZigzag : Layout::kContiguous;
  return s;
}

model::Prediction predict(const AttentionSpec& s, int np, const model::Machine& m, bool backward,
                          model::Strategy st = model::Strategy::kAuto) {
  model::Options o;
  o.backward = backward;
  o.strategy = st;
  return model::predict(s, np, m, o);
}

// ---- pair counts ---------------------------------------------------------------------------------

struct MaskCase {
  const char* name;
  MaskSpec mask;
  Layout layout;
};

std::vector<MaskCase> mask_cases() {
  std::vector<MaskCase> v;
  MaskSpec m;
  v.push_back({"dense contiguous", m, Layout::kContiguous});
  m.causal = true;
  v.push_back({"causal zigzag", m, Layout::kZigzag});
  v.push_back({"causal contiguous", m, Layout::kContiguous});
  MaskSpec w = m;
  w.has_window = true;
  w.window_left = 100;
  w.window_right = 0;
  v.push_back({"causal window 100", w, Layout::kContiguous});
  MaskSpec wg = w;
  wg.global_tokens = 7;
  v.push_back({"window + global", wg, Layout::kZigzag});
  MaskSpec d = m;
  d.doc_offsets = {0, 300, 310, 700, 1024};
  v.push_back({"documents", d, Layout::kBalanced});
  MaskSpec st = w;
  st.stride = 64;
  st.mask_heads = 2;
  v.push_back({"window + stride, 2 heads", st, Layout::kContiguous});
  return v;
}

TEST(ModelPairs, EveryStepSumsToTheRanksVisiblePairs) {
  for (const MaskCase& c : mask_cases()) {
    for (int p : {1, 2, 4}) {
      AttentionSpec s = standard(1024, false);
      s.heads = 4;
      s.kv_heads = 4;
      s.mask = c.mask;
      s.layout = c.layout;
      const RingPlan plan = plan_ring(s, p, false);
      const Mask m = s.mask.view();
      for (int r = 0; r < p; ++r) {
        double sum = 0.0;
        for (int src = 0; src < p; ++src) {
          sum += model::pairs_between(m, s, plan.ranks.segments[r], plan.ranks.segments[src]);
        }
        EXPECT_NEAR(sum, plan.visible_pairs[r], 1e-9 * plan.visible_pairs[r] + 0.5) << c.name << " p=" << p << " r=" << r;
      }
    }
  }
}

TEST(ModelPairs, StripedCausalSampledWithinOnePercent) {
  AttentionSpec s = standard(8192, true);
  s.heads = 2;
  s.kv_heads = 2;
  s.layout = Layout::kStriped;
  const int p = 8;
  const RingPlan plan = plan_ring(s, p, false);
  for (int r = 0; r < p; ++r) {
    double sum = 0.0;
    for (int src = 0; src < p; ++src) {
      sum += model::pairs_between(s.mask.view(), s, plan.ranks.segments[r], plan.ranks.segments[src]);
    }
    EXPECT_NEAR(sum, plan.visible_pairs[r], 0.01 * plan.visible_pairs[r]) << "rank " << r;
  }
}

// ---- the recorded rows of docs/BENCHMARKS.md -------------------------------------------------------

struct Row {
  const char* when;
  int64_t seq_len;
  int np;
  bool backward;
  double tflops;      // per GPU as bench counts them (dense-equivalent, x3.5 with backward)
  double efficiency;  // percent, 0: not recorded
};

// 2026-11-28 06:37 (p = 4, causal zigzag, fwd+bwd) and 06:55 (8k per GPU again; 1M forward and fwd+bwd).
const Row kH200Rows[] = {
    {"06:37 8k/GPU", 32768, 4, true, 479.4, 94.8},  {"06:37 16k/GPU", 65536, 4, true, 518.4, 99.3},
    {"06:37 32k/GPU", 131072, 4, true, 528.0, 98.0}, {"06:55 8k/GPU", 32768, 4, true, 472.4, 95.3},
    {"06:55 1M fwd", 1048576, 4, false, 567.7, 0.0}, {"06:55 1M fwd+bwd", 1048576, 4, true, 548.3, 0.0},
};

TEST(ModelValidation, H200FourGpuRowsWithinTenPercentAndThreePoints) {
  const model::Machine m = cli::read_machine_file(kMachines + "h200x8.toml");
  for (const Row& row : kH200Rows) {
    const AttentionSpec s = standard(row.seq_len, true);
    const model::Prediction p = predict(s, row.np, m, row.backward);
    const double flops = forward_flops(s) * (row.backward ? 3.5 : 1.0);
    const double measured_ms = flops / row.np / (row.tflops * 1e12) * 1e3;
    std::printf("[ model    ] %-18s predicted %10.2f ms (%.1f TFLOP/s, eff %.1f%%) measured %10.2f ms (%.1f TFLOP/s, eff %.1f%%)\n",
                row.when, p.total_ms, p.tflops_per_gpu, 100.0 * p.efficiency, measured_ms, row.tflops, row.efficiency);
    EXPECT_NEAR(p.total_ms / measured_ms, 1.0, kTimeTolerance) << row.when;
    if (row.efficiency > 0.0) EXPECT_NEAR(100.0 * p.efficiency, row.efficiency, kEfficiencyPoints) << row.when;
  }
}

TEST(ModelValidation, MemoryAtOneMillionMatchesBenchsFormula) {
  // BENCHMARKS 06:55: peak 73.24 GiB per GPU, bench's formula 72.16.
  const model::Machine m = cli::read_machine_file(kMachines + "h200x8.toml");
  const model::Prediction p = predict(standard(1048576, true), 4, m, true);
  EXPECT_NEAR(p.memory_bytes / kGiB, 72.16, 0.01);
  EXPECT_NEAR(p.memory_bytes / kGiB, 73.24, 0.05 * 73.24);
}

// ---- strategies and scale --------------------------------------------------------------------------

TEST(ModelStrategy, TwoLevelHidesWhereTheFlatRingCannotOnEightH100Hosts) {
  const model::Machine m = cli::read_machine_file(kMachines + "h100x8-ib.toml");
  const AttentionSpec s = standard(1048576, true);
  for (bool bwd : {false, true}) {
    const model::Prediction flat = predict(s, 64, m, bwd, model::Strategy::kFlat);
    const model::Prediction two = predict(s, 64, m, bwd, model::Strategy::kTwoLevel);
    model::Options o;
    o.backward = bwd;
    o.strategy = model::Strategy::kFlat;
    const int64_t flat_hide = model::hiding_tokens_per_gpu(s, 64, m, o);
    o.strategy = model::Strategy::kTwoLevel;
    const int64_t two_hide = model::hiding_tokens_per_gpu(s, 64, m, o);
    std::printf("[ model    ] 1M causal 8x8 H100 %s: flat %.1f%% (hides from %lld tokens/GPU), two-level %.1f%% (from %lld)\n",
                bwd ? "fwd+bwd" : "fwd", 100 * flat.efficiency, static_cast<long long>(flat_hide), 100 * two.efficiency,
                static_cast<long long>(two_hide));
    EXPECT_EQ(two.strategy, model::Strategy::kTwoLevel);
    EXPECT_LT(flat.efficiency, 0.8);  // 16k tokens per GPU over 45 GB/s: the IB hop is exposed
    EXPECT_GT(two.efficiency, 0.98);
    EXPECT_GT(flat_hide, 16384);
    EXPECT_LT(two_hide, 16384);
    EXPECT_EQ(predict(s, 64, m, bwd).strategy, model::Strategy::kTwoLevel);  // auto picks it
  }
}

TEST(ModelStrategy, OneHostTwoLevelIsFlat) {
  const model::Machine m = cli::read_machine_file(kMachines + "h200x8.toml");
  const model::Prediction p = predict(standard(65536, true), 8, m, false, model::Strategy::kTwoLevel);
  EXPECT_EQ(p.strategy, model::Strategy::kFlat);
  EXPECT_FALSE(p.notes.empty());
}

TEST(ModelStrategy, WindowTakesTheDirectRouteAndMovesOnlyTheHalo) {
  const model::Machine m = cli::read_machine_file(kMachines + "h200x8.toml");
  AttentionSpec s = standard(262144, true);
  s.layout = Layout::kAuto;
  s.mask.has_window = true;
  s.mask.window_left = 4095;
  s.mask.window_right = 0;
  const model::Prediction p = predict(s, 8, m, true);
  EXPECT_EQ(p.route, Route::kDirect);
  EXPECT_EQ(p.rows_sent, 7.0 * 4095);  // every rank but the first receives the 4095-key halo
}

TEST(ModelScale, AThousandRanksAnswerWithinASecond) {
  const model::Machine m = cli::read_machine_file(kMachines + "h100x8-ib.toml");
  for (bool causal : {false, true}) {
    const AttentionSpec s = standard(int64_t{16} << 20, causal);
    // Processor time: the 2 cores of the CI are shared with other jobs, whose load stretches wall time.
    const std::clock_t t0 = std::clock();
    model::Options o;
    o.backward = true;
    const model::Prediction p = model::predict(s, 1024, m, o);
    o.strategy = p.strategy;
    const int64_t hide = model::hiding_tokens_per_gpu(s, 1024, m, o);
    const double seconds = static_cast<double>(std::clock() - t0) / CLOCKS_PER_SEC;
    std::printf("[ model    ] p = 1024, 16M %s fwd+bwd: %.3f s (%s, eff %.1f%%, hides from %lld)\n", causal ? "causal" : "dense",
                seconds, model::strategy_name(p.strategy), 100 * p.efficiency, static_cast<long long>(hide));
    EXPECT_LT(seconds, 1.0);
  }
}

// ---- machine files ---------------------------------------------------------------------------------

TEST(MachineFile, EveryShippedFileReadsAndRoundTrips) {
  for (const char* name : {"h200x8", "h200x8-ib", "h100x8", "h100x8-ib", "h100pcie8", "cpu-2core"}) {
    const model::Machine m = cli::read_machine_file(kMachines + name + ".toml");
    EXPECT_EQ(m.name, name);
    EXPECT_FALSE(m.rates.empty());
    const std::string path = testing::TempDir() + "/roundtrip.toml";
    std::ofstream(path) << cli::machine_toml(m);
    const model::Machine back = cli::read_machine_file(path);
    EXPECT_EQ(back.rates.size(), m.rates.size()) << name;
    EXPECT_NEAR(back.intra.gbs, m.intra.gbs, 1e-5 * m.intra.gbs) << name;
    EXPECT_EQ(back.max_hosts, m.max_hosts) << name;
    for (std::size_t i = 0; i < m.rates.size(); ++i) EXPECT_EQ(back.rates[i].tokens, m.rates[i].tokens) << name;
  }
}

TEST(MachineFile, UnknownKeyNamesTheKeyAndTheExample) {
  const std::string path = testing::TempDir() + "/bad_machine.toml";
  std::ofstream(path) << "name = \"x\"\ngpus_per_hots = 8\n";
  try {
    cli::read_machine_file(path);
    FAIL() << "a misspelt key was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("gpus_per_hots"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("h200x8.toml"), std::string::npos) << e.what();
  }
}

TEST(MachineFile, TooFewHostsNamesNp) {
  const model::Machine m = cli::read_machine_file(kMachines + "h200x8.toml");
  try {
    predict(standard(65536, true), 16, m, false);
    FAIL() << "16 ranks on one host of 8 were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--np 16"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ringattn
