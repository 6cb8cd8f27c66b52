// `kiln bench MODEL.pt`: a model under every route a TorchScript user can pick, side by side in
// one process, in interleaved rounds so that the machine's drift falls on all of them alike:
// TorchScript's default executor, freeze + optimize_for_inference, the oneDNN Graph fuser (CPU),
// kiln's executor pass and kiln::optimize. Median ms per call, speed-up over the default executor,
// the largest difference from its outputs, and the time of each kiln group.
#pragma once

#include <torch/script.h>

#include <string>
#include <vector>

namespace kiln::cli {

struct BenchSettings {
  int rounds = 5;            // interleaved rounds; each variant runs `calls` calls per round
  double round_seconds = 0.3;  // each variant's share of a round, from which calls are worked out
  bool json = false;
  bool progress = false;     // "round i of N: variant" on stderr (a terminal, without --json)
};

// The largest absolute difference between two outputs (every tensor in them, in order); infinity
// where their structure, shapes or NaNs differ.
double maxDifference(const c10::IValue& reference, const c10::IValue& output);

// Runs the benchmark on `inputs` and prints the table (or one JSON object). Returns the exit code.
int benchModel(const std::string& model_path, const torch::jit::Module& module,
               const std::vector<torch::jit::IValue>& inputs, const BenchSettings& settings);

}  // namespace kiln::cli
