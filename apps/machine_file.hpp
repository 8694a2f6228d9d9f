// Machine descriptions as TOML (configs/machines/): read for `ringattn plan`, written by `bench --calibrate`.
#pragma once

#include <string>

#include "model/model.hpp"

namespace ringattn::cli {

// Reads a machine file; throws naming the file, the key and the fix. Keys: name, description,
// source, gpus_per_host, max_hosts, compute_slots, memory_gib, step_overhead_us; [link.intra] and
// [link.inter] with name, latency_us, gbs, source; [rates.<fwd|fwd_bwd>.<dtype>.d<head_dim>.<mask>]
// with tokens = [...], tflops = [...], source.
model::Machine read_machine_file(const std::string& path);
// The TOML text of `m` (what read_machine_file reads back).
std::string machine_toml(const model::Machine& m);

}  // namespace ringattn::cli
