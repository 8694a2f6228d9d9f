// `ringattn plan`: the scaling model's prediction for a problem on N ranks of a described machine (no GPU, no MPI).
#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli_common.hpp"
#include "commands.hpp"
#include "machine_file.hpp"
#include "model/model.hpp"
#include "ringattn/error.hpp"

namespace ringattn::cli {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
// Per-step rows are printed up to this many steps (--steps prints them always).
constexpr std::size_t kMaxPrintedSteps = 16;

struct PlanFlags {
  ProblemFlags problem;
  std::string machine_path;
  std::string np = "8";  // one count or a comma list
  std::string strategy = "auto";
  std::string json_path;
  bool backward = false;
  bool steps = false;
};

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  for (char ch : text) {
    if (ch == ',') {
      out.push_back(cur);
      cur.clear();
    } else if (ch != ' ') {
      cur += ch;
    }
  }
  out.push_back(cur);
  return out;
}

// TFLOP/s with three significant digits below 10 (CPU machines), one decimal above (as bench prints).
std::string tflops_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), v >= 10.0 ? "%.1f" : "%.3g", v);
  return buf;
}

std::string tokens_text(int64_t n) {
  if (n <= 0) return n == 0 ? "never" : "n/a";
  if (n % (1 << 20) == 0) return std::to_string(n >> 20) + "M";
  if (n % 1024 == 0) return std::to_string(n >> 10) + "K";
  return std::to_string(n);
}

struct Row {
  AttentionSpec spec;
  model::Prediction pred;
  int64_t hide = 0;
  double seconds = 0.0;  // time the model took
};

void steps_json(JsonWriter& j, const char* key, const model::PassPrediction& p) {
  j.begin_object(key).field("total_ms", p.total_ms).field("baseline_ms", p.baseline_ms).field("exposed_ms", p.exposed_ms);
  j.begin_array("steps");
  for (const model::StepPrediction& s : p.steps) {
    j.begin_object()
        .field("step", s.step)
        .field("compute_ms", s.compute_ms)
        .field("transfer_ms", s.transfer_ms)
        .field("exposed_ms", s.exposed_ms)
        .field("bytes", s.bytes)
        .field("link", s.link)
        .end_object();
  }
  j.end_array().end_object();
}

void print_steps(const char* pass, const model::PassPrediction& p) {
  std::printf("#   %-8s %5s %12s %12s %12s %12s  %s\n", "pass", "step", "compute ms", "transfer ms", "exposed ms",
              "bytes", "link");
  for (const model::StepPrediction& s : p.steps) {
    std::printf("    %-8s %5d %12.4f %12.4f %12.4f %12.4g  %s\n", pass, s.step, s.compute_ms, s.transfer_ms, s.exposed_ms,
                s.bytes, s.link.empty() ? "-" : s.link.c_str());
  }
}

int run_plan(const PlanFlags& f) {
  const model::Machine machine = read_machine_file(f.machine_path);
  model::Options opt;
  opt.strategy = model::parse_strategy(f.strategy);
  opt.backward = f.backward;
  std::vector<int> nps;
  for (const std::string& s : split_list(f.np)) {
    nps.push_back(static_cast<int>(parse_int_flag(s, "--np", "pass a rank count or a comma list, e.g. --np 8 or --np 4,8,64")));
  }
  std::vector<Row> rows;
  for (const std::string& len : split_list(f.problem.seq_len)) {
    ProblemFlags pf = f.problem;
    pf.seq_len = len;
    for (int np : nps) {
      Row row;
      row.spec = spec_from_flags(pf);
      apply_doc_lens(pf, row.spec);
      const auto t0 = std::chrono::steady_clock::now();
      row.pred = model::predict(row.spec, np, machine, opt);
      model::Options hide_opt = opt;
      hide_opt.strategy = row.pred.strategy;
      row.hide = model::hiding_tokens_per_gpu(row.spec, np, machine, hide_opt);
      row.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      rows.push_back(std::move(row));
    }
  }

  std::printf("# ringattn plan: machine %s (%s)\n", machine.name.c_str(), f.machine_path.c_str());
  std::printf("# %d ranks per host, links: intra %s %.4g GB/s + %.4g us", machine.gpus_per_host, machine.intra.name.c_str(),
              machine.intra.gbs, machine.intra.latency_us);
  if (machine.max_hosts != 1) {
    std::printf(", inter %s %.4g GB/s + %.4g us", machine.inter.name.c_str(), machine.inter.gbs, machine.inter.latency_us);
  }
  std::printf("\n# %s %s, %d heads (%d kv), head_dim %d, batch %lld, mask %s, %s\n", dtype_name(rows[0].spec.dtype),
              f.backward ? "forward+backward" : "forward", rows[0].spec.heads, rows[0].spec.effective_kv_heads(),
              rows[0].spec.head_dim, static_cast<long long>(rows[0].spec.batch), rows[0].spec.mask.describe().c_str(),
              f.backward ? "TFLOP/s count 3.5x the forward FLOPs" : "TFLOP/s dense-equivalent as bench counts them");
  std::printf("# time = sum over steps of max(compute, latency + bytes / bandwidth of the slowest link crossed);"
              " efficiency = compute alone / time\n");
  std::printf("%10s %6s %5s %10s %9s %6s %10s %10s %8s %9s %7s %9s %9s %9s\n", "tokens", "ranks", "hosts", "tokens/GPU",
              "strategy", "route", "time ms", "TFLOP/s", "visible", "ring eff", "exposed", "mem GiB", "hides at", "model s");
  for (const Row& r : rows) {
    const model::Prediction& p = r.pred;
    std::printf("%10lld %6d %5d %10lld %9s %6s %10.3f %10s %8s %8.1f%% %6.2f%% %9.2f %9s %9.3f\n",
                static_cast<long long>(r.spec.seq_len), p.world, p.hosts, static_cast<long long>(p.tokens_per_gpu),
                model::strategy_name(p.strategy), route_name(p.route), p.total_ms, tflops_text(p.tflops_per_gpu).c_str(),
                tflops_text(p.visible_tflops_per_gpu).c_str(), 100.0 * p.efficiency,
                p.total_ms > 0 ? 100.0 * p.exposed_ms / p.total_ms : 0.0, p.memory_bytes / kGiB, tokens_text(r.hide).c_str(),
                r.seconds);
  }
  for (const Row& r : rows) {
    for (const std::string& n : r.pred.notes) std::printf("# note (np %d): %s\n", r.pred.world, n.c_str());
  }
  if (rows.size() == 1 && (f.steps || rows[0].pred.forward.steps.size() <= kMaxPrintedSteps)) {
    print_steps("forward", rows[0].pred.forward);
    if (f.backward) print_steps("backward", rows[0].pred.backward_pass);
  }
  std::printf("# OK\n");

  if (!f.json_path.empty()) {
    JsonWriter j;
    j.begin_object().field("kind", "ringattn.plan").field("machine", machine.name).field("machine_file", f.machine_path);
    j.field("backward", f.backward).field("strategy_flag", f.strategy);
    j.begin_array("predictions");
    for (const Row& r : rows) {
      const model::Prediction& p = r.pred;
      j.begin_object()
          .field("tokens", r.spec.seq_len)
          .field("ranks", p.world)
          .field("hosts", p.hosts)
          .field("tokens_per_gpu", p.tokens_per_gpu)
          .field("heads", r.spec.heads)
          .field("kv_heads", r.spec.effective_kv_heads())
          .field("head_dim", r.spec.head_dim)
          .field("dtype", dtype_name(r.spec.dtype))
          .field("mask", r.spec.mask.describe())
          .field("layout", layout_name(p.layout))
          .field("strategy", model::strategy_name(p.strategy))
          .field("route", route_name(p.route))
          .field("time_ms", p.total_ms)
          .field("baseline_ms", p.baseline_ms)
          .field("exposed_ms", p.exposed_ms)
          .field("ring_efficiency", p.efficiency)
          .field("tflops_per_gpu", p.tflops_per_gpu)
          .field("visible_tflops_per_gpu", p.visible_tflops_per_gpu)
          .field("memory_bytes", p.memory_bytes)
          .field("hides_at_tokens_per_gpu", r.hide)
          .field("model_seconds", r.seconds);
      steps_json(j, "forward", p.forward);
      if (f.backward) steps_json(j, "backward", p.backward_pass);
      j.begin_array("notes");
      for (const std::string& n : p.notes) j.value(n);
      j.end_array().end_object();
    }
    j.end_array().end_object();
    if (f.json_path == "-") {
      std::printf("%s\n", j.str().c_str());
    } else {
      write_text_file(f.json_path, j.str() + "\n");
    }
  }
  return 0;
}

}  // namespace

Command add_plan_command(CLI::App& root) {
  auto flags = std::make_shared<PlanFlags>();
  PlanFlags& f = *flags;
  // Defaults: the standard shape of bench (32 heads, head_dim 128, bf16), layout auto.
  f.problem.heads = 32;
  f.problem.head_dim = 128;
  f.problem.dtype = "bf16";
  f.problem.seq_len = "32K";
  CLI::App* app = root.add_subcommand(
      "plan", "Predict pass time, ring efficiency, exposed communication and memory on N ranks of a machine file");
  app->add_option("--machine", f.machine_path, "Machine file, e.g. configs/machines/h200x8.toml")->required();
  app->add_option("--np", f.np, "Ranks (GPUs), or a comma list for a sweep")->capture_default_str();
  app->add_option("--strategy", f.strategy, "flat | two-level (inner ring per host, outer ring over hosts) | auto")
      ->capture_default_str();
  app->add_flag("--backward", f.backward, "Forward + backward per pass (3.5x the forward FLOPs)");
  app->add_flag("--steps", f.steps, "Print every step of the pass (default: up to 16 steps, one row of output)");
  app->add_option("--json", f.json_path, "Write the predictions with their steps as JSON to this file ('-': stdout)");
  add_problem_flags(*app, f.problem, /*with_seq_len=*/true);
  return {app, [flags] { return run_plan(*flags); }};
}

}  // namespace ringattn::cli
