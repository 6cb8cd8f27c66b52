// kiln::enable/disable/fuse/optimize: how the pass meets TorchScript's executor and modules.
//
// Note: kiln registers as a *pre*-fusion pass of the profiling executor, so it runs before torch's
// own TensorExpr fuser. It looks through prim::profile nodes and consumes those inside the groups it
// builds; nodes it leaves alone keep their profiles, so TensorExpr (on by default for CUDA only)
// can still fuse them afterwards. The two never claim the same node.
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/freeze_module.h>
#include <torch/csrc/jit/passes/frozen_graph_optimizations.h>
#include <torch/csrc/jit/passes/frozen_linear_transpose.h>
#include <torch/csrc/jit/passes/pass_manager.h>

#include <atomic>
#include <mutex>

#include "codegen/versions.h"
#include "fuser/fusion_pass.h"
#include "kiln/kiln.h"

namespace kiln {
namespace {

std::mutex registration_mutex;
std::optional<torch::jit::GraphPassNameType> registered_pass;

void executorPass(std::shared_ptr<torch::jit::Graph>& graph) {
  const Options& options = Options::global();
  if (options.disabled) return;
  try {
    fuse(graph, options);
  } catch (const std::exception& error) {
    // The pass must never break a model: an internal failure leaves the graph as the executor
    // gave it (fuse() only commits a group once it is fully built).
    log(LogLevel::kWarning, std::string("fusion pass failed, graph left unfused: ") + error.what());
  }
}

}  // namespace

void enable() {
  std::lock_guard<std::mutex> lock(registration_mutex);
  if (registered_pass) return;
  registered_pass = torch::jit::registerPrePass(executorPass);
}

void disable() {
  std::lock_guard<std::mutex> lock(registration_mutex);
  if (!registered_pass) return;
  torch::jit::clearPrePass(*registered_pass);
  registered_pass.reset();
}

bool enabled() {
  std::lock_guard<std::mutex> lock(registration_mutex);
  return registered_pass.has_value();
}

void fuse(std::shared_ptr<torch::jit::Graph>& graph, const Options& options) {
  if (options.disabled) return;
  // The graph is printed only when it will be logged: toString walks the whole graph.
  const bool debug = Options::global().log_level >= LogLevel::kDebug;
  if (debug) log(LogLevel::kDebug, "before fusion:\n" + graph->toString());
  int groups = fuseAttention(graph, options);
  groups += fuseElementwise(graph, options);
  if (groups > 0) torch::jit::EliminateDeadCode(graph);
  if (debug) log(LogLevel::kDebug, "after fusion:\n" + graph->toString());
}

torch::jit::Module optimize(const torch::jit::Module& module, const Options& options) {
  torch::jit::Module copy = module.clone();
  copy.eval();
  torch::jit::Module frozen = torch::jit::freeze_module(copy);
  for (torch::jit::Method method : frozen.get_methods()) {
    std::shared_ptr<torch::jit::Graph> graph = method.graph();
    // What torch.jit.freeze does after freezing: dropout removed, linears on one input
    // concatenated, batch_norm and constant add/mul folded into convolutions and linears.
    torch::jit::OptimizeFrozenGraph(graph, /*optimize_numerics=*/true);
    // GEMMs and convolutions over constant weights, with their epilogues: one library call each,
    // the fastest way measured per shape class (library_calls.h).
    if (!options.disabled) fuseLibraryCalls(graph, options);
    // Reduced precision, when asked for: float32 weights converted once, casts at the boundary
    // and before each library call (docs/precision.md).
    convertPrecision(graph, options.precision);
    // Any linear left (a weight computed at run time) runs over its weight transposed once, as
    // optimize_for_inference does.
    torch::jit::FrozenLinearTranspose(graph);
    fuse(graph, options);
    // The rewrites leave the constants they replaced (weights transposed, stacked with their
    // siblings', converted to the low dtype); a dead constant still holds its tensor.
    torch::jit::EliminateDeadCode(graph);
  }
  return frozen;
}

std::string version() { return kilnVersion(); }

}  // namespace kiln
