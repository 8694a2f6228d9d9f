// Machine files: the TOML reader of `bench --config` (CLI11's) applied to kernel rates and links.
#include "machine_file.hpp"

#include <CLI/CLI.hpp>

#include <cstdio>
#include <sstream>

#include "ringattn/error.hpp"

namespace ringattn::cli {
namespace {

constexpr const char* kMachineHint = "see configs/machines/h200x8.toml for every key";

double to_number(const std::string& path, const CLI::ConfigItem& item, const std::string& text) {
  try {
    std::size_t used = 0;
    const double v = std::stod(text, &used);
    if (used == text.size()) return v;
  } catch (const std::exception&) {
  }
  fail(ErrorKind::kInvalidArgument, path + ": '" + item.fullname() + "' = '" + text + "' is not a number", kMachineHint);
}

double one_number(const std::string& path, const CLI::ConfigItem& item) {
  RINGATTN_CHECK(item.inputs.size() == 1, ErrorKind::kInvalidArgument,
                 path + ": '" + item.fullname() + "' must be one number", kMachineHint);
  return to_number(path, item, item.inputs[0]);
}

std::string joined(const CLI::ConfigItem& item) {
  std::string s;
  for (std::size_t i = 0; i < item.inputs.size(); ++i) s += (i ? "," : "") + item.inputs[i];
  return s;
}

model::MaskClass parse_mask_class(const std::string& path, const std::string& name) {
  if (name == "dense") return model::MaskClass::kDense;
  if (name == "causal") return model::MaskClass::kCausal;
  if (name == "masked") return model::MaskClass::kMasked;
  fail(ErrorKind::kInvalidArgument, path + ": rate class '" + name + "' is not dense, causal or masked", kMachineHint);
}

model::RateTable& table_for(model::Machine& m, const std::string& path, const std::vector<std::string>& parents) {
  RINGATTN_CHECK(parents.size() == 5 && (parents[1] == "fwd" || parents[1] == "fwd_bwd") && parents[3].size() > 1 &&
                     parents[3][0] == 'd',
                 ErrorKind::kInvalidArgument, path + ": a rate table must be [rates.<fwd|fwd_bwd>.<dtype>.d<head_dim>.<mask>]",
                 "e.g. [rates.fwd.bf16.d128.causal]");
  model::RateTable t;
  t.backward = parents[1] == "fwd_bwd";
  t.dtype = parse_dtype(parents[2]);
  t.head_dim = std::atoi(parents[3].c_str() + 1);
  t.mask = parse_mask_class(path, parents[4]);
  for (model::RateTable& have : m.rates) {
    if (have.backward == t.backward && have.dtype == t.dtype && have.head_dim == t.head_dim && have.mask == t.mask) return have;
  }
  m.rates.push_back(t);
  return m.rates.back();
}

void check_link(const std::string& path, const model::Link& l, const char* which) {
  RINGATTN_CHECK(l.gbs > 0.0 && l.latency_us >= 0.0, ErrorKind::kInvalidArgument,
                 path + ": [link." + which + "] needs gbs > 0 and latency_us >= 0", kMachineHint);
}

std::string quoted(const std::string& s) {
  std::string out = "\"";
  for (char ch : s) out += ch == '"' ? std::string("\\\"") : std::string(1, ch);
  return out + "\"";
}

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}

}  // namespace

model::Machine read_machine_file(const std::string& path) {
  CLI::ConfigTOML format;
  std::vector<CLI::ConfigItem> items;
  try {
    items = format.from_file(path);
  } catch (const CLI::Error& e) {
    fail(ErrorKind::kIo, "cannot read --machine " + path + ": " + e.what(),
         "pass an existing TOML file, e.g. configs/machines/h200x8.toml");
  }
  model::Machine m;
  for (const CLI::ConfigItem& item : items) {
    if (item.name == "++" || item.name == "--") continue;  // section markers
    const auto& p = item.parents;
    const std::string& k = item.name;
    if (p.empty()) {
      if (k == "name") m.name = joined(item);
      else if (k == "description") m.description = joined(item);
      else if (k == "source") m.source = joined(item);
      else if (k == "gpus_per_host") m.gpus_per_host = static_cast<int>(one_number(path, item));
      else if (k == "max_hosts") m.max_hosts = static_cast<int>(one_number(path, item));
      else if (k == "compute_slots") m.compute_slots = one_number(path, item);
      else if (k == "memory_gib") m.memory_gib = one_number(path, item);
      else if (k == "step_overhead_us") m.step_overhead_us = one_number(path, item);
      else fail(ErrorKind::kInvalidArgument, path + ": unknown key '" + k + "'", kMachineHint);
    } else if (p.size() == 2 && p[0] == "link" && (p[1] == "intra" || p[1] == "inter")) {
      model::Link& l = p[1] == "intra" ? m.intra : m.inter;
      if (k == "name") l.name = joined(item);
      else if (k == "latency_us") l.latency_us = one_number(path, item);
      else if (k == "gbs") l.gbs = one_number(path, item);
      else if (k == "source") l.source = joined(item);
      else fail(ErrorKind::kInvalidArgument, path + ": unknown key '" + item.fullname() + "'", kMachineHint);
    } else if (!p.empty() && p[0] == "rates") {
      model::RateTable& t = table_for(m, path, p);
      if (k == "tokens") {
        t.tokens.clear();
        for (const std::string& v : item.inputs) t.tokens.push_back(static_cast<int64_t>(to_number(path, item, v)));
      } else if (k == "tflops") {
        t.tflops.clear();
        for (const std::string& v : item.inputs) t.tflops.push_back(to_number(path, item, v));
      } else if (k == "source") {
        t.source = joined(item);
      } else {
        fail(ErrorKind::kInvalidArgument, path + ": unknown key '" + item.fullname() + "'", kMachineHint);
      }
    } else {
      fail(ErrorKind::kInvalidArgument, path + ": unknown section of key '" + item.fullname() + "'", kMachineHint);
    }
  }
  RINGATTN_CHECK(m.gpus_per_host >= 1 && m.compute_slots > 0.0, ErrorKind::kInvalidArgument,
                 path + ": gpus_per_host must be at least 1 and compute_slots positive", kMachineHint);
  check_link(path, m.intra, "intra");
  if (m.max_hosts != 1) check_link(path, m.inter, "inter");
  RINGATTN_CHECK(!m.rates.empty(), ErrorKind::kInvalidArgument, path + ": no [rates...] tables",
                 "measure them with `ringattn bench --calibrate FILE` or copy them from configs/machines/");
  for (const model::RateTable& t : m.rates) {
    bool ok = !t.tokens.empty() && t.tokens.size() == t.tflops.size();
    for (std::size_t i = 0; ok && i < t.tokens.size(); ++i) {
      ok = t.tflops[i] > 0.0 && t.tokens[i] > 0 && (i == 0 || t.tokens[i] > t.tokens[i - 1]);
    }
    RINGATTN_CHECK(ok, ErrorKind::kInvalidArgument,
                   path + ": a rate table (" + (t.backward ? "fwd_bwd " : "fwd ") + model::mask_class_name(t.mask) +
                       " d" + std::to_string(t.head_dim) + ") needs as many positive tflops as increasing tokens",
                   "e.g. tokens = [8192, 16384], tflops = [556.7, 620.9]");
  }
  if (m.name.empty()) m.name = path;
  return m;
}

std::string machine_toml(const model::Machine& m) {
  std::ostringstream o;
  o << "# " << (m.description.empty() ? m.name : m.description) << "\n";
  o << "name = " << quoted(m.name) << "\n";
  if (!m.description.empty()) o << "description = " << quoted(m.description) << "\n";
  if (!m.source.empty()) o << "source = " << quoted(m.source) << "\n";
  o << "gpus_per_host = " << m.gpus_per_host << "\nmax_hosts = " << m.max_hosts << "\ncompute_slots = " << num(m.compute_slots)
    << "\nmemory_gib = " << num(m.memory_gib) << "\nstep_overhead_us = " << num(m.step_overhead_us) << "\n";
  auto link = [&](const char* which, const model::Link& l) {
    o << "\n[link." << which << "]\nname = " << quoted(l.name) << "\nlatency_us = " << num(l.latency_us)
      << "\ngbs = " << num(l.gbs) << "\n";
    if (!l.source.empty()) o << "source = " << quoted(l.source) << "\n";
  };
  link("intra", m.intra);
  if (m.max_hosts != 1) link("inter", m.inter);
  for (const model::RateTable& t : m.rates) {
    o << "\n[rates." << (t.backward ? "fwd_bwd" : "fwd") << "." << dtype_name(t.dtype) << ".d" << t.head_dim << "."
      << model::mask_class_name(t.mask) << "]\ntokens = [";
    for (std::size_t i = 0; i < t.tokens.size(); ++i) o << (i ? ", " : "") << t.tokens[i];
    o << "]\ntflops = [";
    for (std::size_t i = 0; i < t.tflops.size(); ++i) o << (i ? ", " : "") << num(t.tflops[i]);
    o << "]\n";
    if (!t.source.empty()) o << "source = " << quoted(t.source) << "\n";
  }
  return o.str();
}

}  // namespace ringattn::cli
