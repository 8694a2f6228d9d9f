// The scaling model: a ring plan evaluated hop by hop on a described machine (kernel rates, links, memory).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "plan/plan.hpp"
#include "ringattn/spec.hpp"

namespace ringattn::model {

// The mask class a kernel rate was measured under: every pair visible, causal, or any other mask.
enum class MaskClass { kDense, kCausal, kMasked };
const char* mask_class_name(MaskClass c);
MaskClass mask_class_of(const MaskSpec& mask);

// Kernel TFLOP/s (on visible pairs: 4 d per pair forward, 3.5x that forward+backward) measured on
// one rank at `tokens` query rows against as many keys; interpolated in log(tokens), clamped.
struct RateTable {
  bool backward = false;  // false: forward alone; true: forward + backward of one pass
  int head_dim = 0;
  DType dtype = DType::kBF16;
  MaskClass mask = MaskClass::kDense;
  std::vector<int64_t> tokens;
  std::vector<double> tflops;
  std::string source;
  double at(int64_t rows) const;
};

// One kind of link: a transfer of b bytes takes latency + b / bandwidth (per direction).
struct Link {
  std::string name;
  double latency_us = 0.0;
  double gbs = 1.0;  // 1e9 bytes per second
  std::string source;
  double ms(double bytes) const { return bytes <= 0.0 ? 0.0 : latency_us * 1e-3 + bytes / (gbs * 1e9) * 1e3; }
};

struct Machine {
  std::string name;
  std::string description;
  int gpus_per_host = 1;    // ranks per host; rank r lives on host r / gpus_per_host
  int max_hosts = 1;        // 0: any number of hosts
  double compute_slots = 1.0;  // ranks of one host that compute at full rate at once (GPUs; CPU cores, measured)
  double memory_gib = 0.0;  // per rank (GPU); 0: unknown
  double step_overhead_us = 0.0;  // per computed step: launches, marks, the exchange's post and wait
  Link intra;  // between ranks of one host
  Link inter;  // between hosts (per rank: one NIC per GPU)
  std::vector<RateTable> rates;
  std::string source;  // where the machine's figures come from (file comment)

  // The rate table closest to the problem (same direction; then head_dim, dtype, mask class);
  // nullptr when the machine has none for that direction.
  const RateTable* rate_for(bool backward, int head_dim, DType dtype, MaskClass mask) const;
  int host_of(int rank) const { return rank / gpus_per_host; }
  const Link& link(int a, int b) const { return host_of(a) == host_of(b) ? intra : inter; }
};

// Flat: one ring over every rank. Two-level: an inner ring over the ranks of one host inside an
// outer ring over the hosts (LoongTrain's double ring). Auto: the faster of the two.
enum class Strategy { kFlat, kTwoLevel, kAuto };
Strategy parse_strategy(const std::string& name);  // throws naming --strategy
const char* strategy_name(Strategy s);

// One step of a pass, maxima over the ranks (as bench's per-hop summary).
struct StepPrediction {
  int step = 0;
  double compute_ms = 0.0;
  double transfer_ms = 0.0;
  double exposed_ms = 0.0;
  double bytes = 0.0;       // sent by the busiest rank in this step's exchange
  std::string link;         // the slowest link this step's exchange crosses ("" when none)
};

struct PassPrediction {
  double total_ms = 0.0;     // max over ranks
  double baseline_ms = 0.0;  // max over ranks of the compute alone (bench's one-GPU baseline)
  double exposed_ms = 0.0;   // max over ranks of the waits for an exchange
  std::vector<StepPrediction> steps;
};

struct Prediction {
  Strategy strategy = Strategy::kFlat;
  Route route = Route::kRing;
  Layout layout = Layout::kContiguous;
  int world = 1;
  int hosts = 1;
  int64_t tokens_per_gpu = 0;
  bool backward = false;
  PassPrediction forward;
  PassPrediction backward_pass;  // when `backward`
  double total_ms = 0.0;         // forward (+ backward)
  double baseline_ms = 0.0;
  double efficiency = 0.0;       // baseline_ms / total_ms
  double exposed_ms = 0.0;
  double tflops_per_gpu = 0.0;   // dense-equivalent FLOPs as bench counts them
  double visible_tflops_per_gpu = 0.0;  // on visible pairs only (bench's visible TFLOP/s)
  double memory_bytes = 0.0;     // per rank
  double rows_sent = 0.0;        // K+V rows moved by one forward pass, all ranks
  std::vector<std::string> notes;  // assumptions the numbers rest on (a missing rate table, ...)
};

struct Options {
  Strategy strategy = Strategy::kAuto;
  bool backward = false;
  // Evaluate at most this many ranks per step (the rest assumed alike): 0 evaluates every rank.
  int sample_ranks = 0;
  // Count the visible pairs of the whole problem for visible_tflops_per_gpu (O(tokens)).
  bool count_visible = true;
};

// Evaluates `spec` on `world` ranks of `machine` (throws naming --np when the machine is too small).
Prediction predict(const AttentionSpec& spec, int world, const Machine& machine, const Options& options);

// The smallest tokens per GPU (a multiple the layout accepts) at which the exchange hides: the
// waits, the unhidable last hop of a backward pass aside, are at most kHideFraction of the pass.
// 0 when it hides nowhere up to kMaxHideTokens, -1 when the mask does not scale (documents) or
// nothing travels (one rank).
inline constexpr double kHideFraction = 0.01;
inline constexpr int64_t kMaxHideTokens = int64_t{1} << 24;
int64_t hiding_tokens_per_gpu(const AttentionSpec& spec, int world, const Machine& machine, const Options& options);

// Bytes one rank holds for a pass: inputs, outputs and the scheduler's buffers (ring_attention.cpp).
double memory_per_rank(const AttentionSpec& spec, int world, bool backward, Route route, Strategy strategy,
                       const RingPlan* plan);

// Visible (query, key) pairs between query positions `q` and key positions `k`, over all heads and
// batch rows: exact where boxes are wholly visible or not, per query in the rest (sampled when a
// strided query run stays partial at every split).
double pairs_between(const Mask& m, const AttentionSpec& spec, const std::vector<Segment>& q,
                     const std::vector<Segment>& k);

}  // namespace ringattn::model
