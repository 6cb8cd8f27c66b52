// kiln's public C++ API. A libtorch application calls kiln::enable() once and then runs its
// TorchScript modules as before; or fuses ahead of time with kiln::optimize() and saves the result.
// Loading libkiln.so registers the torch.ops.kiln.* operators and (unless KILN_DISABLE=1) the pass.
#pragma once

#include <torch/script.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kiln/options.h"

namespace kiln {

// Registers kiln's fusion pass with the TorchScript executor (idempotent). Graphs the executor
// optimizes from now on are fused; graphs it already optimized are not re-optimized.
void enable();
// Unregisters the pass (idempotent). Already-fused graphs keep running fused.
void disable();
bool enabled();

// Runs the fusion pass on a graph in place.
void fuse(std::shared_ptr<torch::jit::Graph>& graph, const Options& options = Options::global());

// Freezes an eval-mode copy of `module`, fuses its forward, and returns it. The result can be
// saved with save() and loaded in any process where libkiln.so is loaded. Options::min_cosine
// needs the overload below (example inputs); here it is refused (std::invalid_argument).
torch::jit::Module optimize(const torch::jit::Module& module,
                            const Options& options = Options::global());

// What a reduced precision kept in float32 to meet Options::min_cosine (docs/precision.md).
struct PrecisionPlan {
  std::string precision;              // "bf16" or "fp16"
  double min_cosine = 0;              // the bound asked for
  // The worst floating output's cosine similarity to the float32 module on the example inputs:
  // with every op in the low dtype, and with the plan's float32 part (-1: an output not finite,
  // or the converted graph failed to run).
  double cosine_all_low = 1;
  double cosine = 1;
  int64_t ops_total = 0;              // top-level ops of the frozen graph, constants not counted
  int64_t ops_float32 = 0;            // the leading ones kept float32 (0: none)
  int64_t library_calls_total = 0;    // GEMMs and convolutions (kiln::linear, kiln::conv2d)
  int64_t library_calls_float32 = 0;  // of those, kept float32
  std::string last_float32_op;        // the last op kept, and where the model's code made it
  int trials = 0;                     // converted graphs run to find the plan
  std::string toText() const;         // one line
  std::string toJson() const;
};

// kiln::optimize with example inputs (the module's forward arguments). With a reduced
// Options::precision and Options::min_cosine > 0 it keeps the fewest leading ops in float32 for
// every floating output on these inputs to reach that cosine similarity to the float32 module's
// outputs, and writes what it kept to *plan (when given); otherwise the same as optimize() above.
torch::jit::Module optimize(const torch::jit::Module& module, const Options& options,
                            const std::vector<c10::IValue>& example_inputs, PrecisionPlan* plan = nullptr);

// One fused group: the ops it replaced and the memory traffic it saves.
struct GroupReport {
  std::string name;               // e.g. "fusion_group_0"
  std::string kind;               // "elementwise", "attention", "linear" or "conv2d"
  std::vector<std::string> ops;   // the aten ops inside, in graph order
  // Attention groups run hand-written kernels: their byte counts and call counts stay -1 and 0.
  int64_t num_inputs = 0;
  int64_t num_outputs = 0;
  // Measured on the last run with concrete shapes; -1 when the group has not run yet.
  int64_t bytes_fused = -1;       // read inputs once + write outputs once
  int64_t bytes_unfused = -1;     // every op reads its operands and writes its result
  // Mean wall time of a fused call on the CPU (outputs made and kernel run), over every timed
  // call so far; -1 when none was timed (CUDA launches are asynchronous and are not timed).
  double ns_per_call = -1;
  int64_t calls = 0;              // times the fused kernel ran
  int64_t fallbacks = 0;          // times the guard sent it to the original ops
  // Linear and conv2d groups: how the last call ran ("onednn", "aten_transposed", "aten", ...),
  // chosen by measurement; "" before the first call.
  std::string choice;
};

struct Report {
  std::vector<GroupReport> groups;
  int64_t nodes_total = 0;        // nodes in the graph before fusion
  int64_t nodes_fused = 0;        // of those, now inside a kiln group
  std::string toJson() const;
  std::string toText() const;
};

// What kiln fused in a graph (one already fused by kiln::fuse or by the executor).
Report report(const std::shared_ptr<torch::jit::Graph>& graph);

// kiln's version string.
std::string version();

}  // namespace kiln
