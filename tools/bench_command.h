// `kiln bench MODEL.pt`: a model under every route a TorchScript user can pick, side by side in
// one process, in interleaved rounds so that the machine's drift falls on all of them alike:
// TorchScript's default executor, freeze + optimize_for_inference, the oneDNN Graph fuser (CPU),
// kiln's executor pass and kiln::optimize. Median ms per call, speed-up over the default executor,
// the largest difference from its outputs, and the time of each kiln group.
#pragma once

#include <torch/script.h>

#include "kiln/options.h"

#include <string>
#include <vector>

namespace kiln::cli {

struct BenchSettings {
  int rounds = 5;            // interleaved rounds; each variant runs `calls` calls per round
  double round_seconds = 0.3;  // each variant's share of a round, from which calls are worked out
  bool json = false;
  bool progress = false;     // "round i of N: variant" on stderr (a terminal, without --json)
  // Not fp32: kiln::optimize runs in this precision, and one more route runs TorchScript's
  // default executor on the module with its weights and inputs converted (module.to(dtype)).
  Precision precision = Precision::kFloat32;
  double min_cosine = 0;     // with a reduced precision: kiln::optimize's Options::min_cosine
};

// How far one output of a reduced-precision module is from the float32 module's.
struct OutputAccuracy {
  std::string name;        // "output 0", "output 1.2" (inside tuples and lists)
  double max_abs = 0;      // largest absolute difference
  double max_rel = 0;      // max_abs / the largest magnitude of the float32 output
  double cosine = 1;       // of the two outputs flattened
};
std::vector<OutputAccuracy> outputAccuracy(const c10::IValue& expected, const c10::IValue& actual);

// The largest absolute difference between two outputs (every tensor in them, in order); infinity
// where their structure, shapes or NaNs differ.
double maxDifference(const c10::IValue& reference, const c10::IValue& output);

// Runs the benchmark on `inputs` and prints the table (or one JSON object). Returns the exit code.
int benchModel(const std::string& model_path, const torch::jit::Module& module,
               const std::vector<torch::jit::IValue>& inputs, const BenchSettings& settings);

}  // namespace kiln::cli
