// kiln::enable/disable/fuse/optimize: how the pass meets TorchScript's executor and modules.
//
// Note: kiln registers as a *pre*-fusion pass of the profiling executor, so it runs before torch's
// own TensorExpr fuser. It looks through prim::profile nodes and consumes those inside the groups it
// builds; nodes it leaves alone keep their profiles, so TensorExpr (on by default for CUDA only)
// can still fuse them afterwards. The two never claim the same node.
#include <torch/csrc/jit/passes/canonicalize_graph_fuser_ops.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/freeze_module.h>
#include <torch/csrc/jit/passes/frozen_graph_optimizations.h>
#include <torch/csrc/jit/passes/frozen_linear_transpose.h>
#include <torch/csrc/jit/passes/pass_manager.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <functional>
#include <optional>
#include <stdexcept>
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

namespace {

// CanonicalizeOps makes a chunk whose chunk count and dim are constants a prim::ConstantChunk,
// which a module cannot be saved with (its code prints without the two, and loading it fails).
// Those that kiln's groups did not take go back to aten::chunk and a list unpack.
void restoreChunks(torch::jit::Block* block) {
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    torch::jit::Node* node = *it++;
    for (torch::jit::Block* inner : node->blocks()) restoreChunks(inner);
    if (node->kind() != torch::jit::prim::ConstantChunk) continue;
    torch::jit::Graph& graph = *node->owningGraph();
    torch::jit::WithInsertPoint here(node);
    torch::jit::Value* chunks = graph.insertConstant(node->i(torch::jit::attr::chunks));
    torch::jit::Value* dim = graph.insertConstant(node->i(torch::jit::attr::dim));
    torch::jit::Node* chunk = graph.insertNode(graph.create(torch::jit::aten::chunk, {node->input(), chunks, dim}));
    chunk->output()->setType(c10::ListType::ofTensors());
    chunk->copyMetadata(node);
    torch::jit::Node* unpack = graph.insertNode(graph.createListUnpack(chunk->output(), node->outputs().size()));
    unpack->copyMetadata(node);
    for (size_t i = 0; i < node->outputs().size(); ++i) {
      unpack->output(i)->setType(node->output(i)->type());
      node->output(i)->replaceAllUsesWith(unpack->output(i));
    }
    node->destroy();
  }
}

// kiln::optimize's work; `plan_precision` says how many leading ops of the prepared graph keep
// float32 (none without it).
using PlanPrecision = std::function<int64_t(const std::shared_ptr<torch::jit::Graph>&, const torch::jit::Module&)>;

torch::jit::Module optimizeWith(const torch::jit::Module& module, const Options& options,
                                const PlanPrecision& plan_precision) {
  torch::jit::Module copy = module.clone();
  copy.eval();
  torch::jit::Module frozen = torch::jit::freeze_module(copy);
  for (torch::jit::Method method : frozen.get_methods()) {
    std::shared_ptr<torch::jit::Graph> graph = method.graph();
    // What torch.jit.freeze does after freezing: dropout removed, linears on one input
    // concatenated, batch_norm and constant add/mul folded into convolutions and linears.
    torch::jit::OptimizeFrozenGraph(graph, /*optimize_numerics=*/true);
    // nn.MultiheadAttention's fast path as its linears and attention, which the passes below take.
    if (!options.disabled) decomposeNativeAttention(graph);
    // Runs of convolutions (float32): one op each, run the fastest of ATen, kiln's library calls
    // and oneDNN Graph, measured on their shapes (conv_regions.cpp).
    if (!options.disabled && options.conv_regions && options.precision == Precision::kFloat32)
      extractConvolutionRegions(graph);
    // GEMMs and convolutions over constant weights, with their epilogues: one library call each,
    // the fastest way measured per shape class (library_calls.h).
    if (!options.disabled) fuseLibraryCalls(graph, options);
    // Reduced precision, when asked for: float32 weights converted once, casts at the boundary
    // and before each library call (docs/precision.md); a leading part kept float32 when the
    // accuracy bound needs it.
    const int64_t float32_ops = plan_precision && method.name() == "forward" ? plan_precision(graph, frozen) : 0;
    convertPrecision(graph, options.precision, float32_ops);
    // Any linear left (a weight computed at run time) runs over its weight transposed once, as
    // optimize_for_inference does.
    torch::jit::FrozenLinearTranspose(graph);
    // What the executor does before its fusers: arithmetic on a 0-dim constant tensor reads it as
    // a number (a traced `a * 0.5` loaded from a file holds 0.5 as a double tensor that no longer
    // says it stands for a number; as a tensor, an int tensor times it would be float64).
    torch::jit::CanonicalizeOps(graph);
    fuse(graph, options);
    // The rewrites leave the constants they replaced (weights transposed, stacked with their
    // siblings', converted to the low dtype); a dead constant still holds its tensor.
    torch::jit::EliminateDeadCode(graph);
    restoreChunks(graph->block());
  }
  return frozen;
}

bool holdsRegions(torch::jit::Module& module) {
  for (const torch::jit::Method& method : module.get_methods()) {
    for (const torch::jit::Node* node : method.graph()->nodes()) {
      if (node->kind() == c10::Symbol::fromQualString("kiln::conv_region")) return true;
    }
  }
  return false;
}

// A graph with convolution regions against the same without, on the example inputs. A region runs
// the fastest of its ways, but none of them is "no region": in a small transformer (DistilBERT
// 64 wide, 2 x 16 tokens) the regions' own cost made the model 5-15% slower than its library calls
// and fusions run one by one, while ViT-S/16's layers gained 2-11% as regions. So the whole model
// decides, the way TensorRT's builder times a whole engine's tactics.
torch::jit::Module withOrWithoutRegions(const torch::jit::Module& module, const Options& options,
                                        const std::vector<c10::IValue>& example_inputs) {
  torch::jit::Module with = optimizeWith(module, options, nullptr);
  if (!holdsRegions(with)) return with;
  Options off = options;
  off.conv_regions = false;
  torch::jit::Module without = optimizeWith(module, off, nullptr);
  double with_ms = 0, without_ms = 0;
  bool regions = true;
  try {
    regions = firstRunsFaster(with, without, example_inputs, 5, 2.0, &with_ms, &without_ms);
  } catch (const std::exception& error) {
    // Neither ran the inputs: the model's own error, which the caller meets on its first call too.
    log(LogLevel::kInfo, std::string("kiln::optimize: the example inputs fail either way: ") + errorLine(error.what()));
    return with;
  }
  char text[160];
  std::snprintf(text, sizeof text, "kiln::optimize: %.3f ms with convolution regions, %.3f ms without on the example inputs: %s",
                with_ms, without_ms, regions ? "regions kept" : "no regions");
  log(LogLevel::kInfo, text);
  return regions ? with : without;
}

}  // namespace

bool firstRunsFaster(torch::jit::Module& a, torch::jit::Module& b, const std::vector<c10::IValue>& inputs,
                     int min_rounds, double budget_seconds, double* a_ms, double* b_ms) {
  using Clock = std::chrono::steady_clock;
  at::NoGradGuard no_grad;
  torch::jit::Module* modules[2] = {&a, &b};
  bool fails[2] = {false, false};
  std::string failure;
  for (int i = 0; i < 2; ++i) {
    try {
      for (int call = 0; call < 3; ++call) modules[i]->forward(copyArguments(inputs));
    } catch (const std::exception& error) {
      fails[i] = true;
      failure = error.what();
    }
  }
  if (fails[0] && fails[1]) throw std::runtime_error(failure);
  if (fails[0] || fails[1]) {
    if (a_ms) *a_ms = fails[0] ? -1 : 0;
    if (b_ms) *b_ms = fails[1] ? -1 : 0;
    return !fails[0];
  }
  std::vector<double> times[2];
  const auto start = Clock::now();
  for (int round = 0; round < 30; ++round) {
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (round >= min_rounds && elapsed > budget_seconds) break;
    // Alternating which goes first: the one after another may find the caches warmer or colder.
    for (int j = 0; j < 2; ++j) {
      const int i = (round + j) % 2;
      std::vector<c10::IValue> arguments = copyArguments(inputs);
      const auto begin = Clock::now();
      modules[i]->forward(std::move(arguments));
      times[i].push_back(std::chrono::duration<double, std::milli>(Clock::now() - begin).count());
    }
  }
  double medians[2];
  for (int i = 0; i < 2; ++i) {
    std::sort(times[i].begin(), times[i].end());
    medians[i] = times[i][times[i].size() / 2];
  }
  if (a_ms) *a_ms = medians[0];
  if (b_ms) *b_ms = medians[1];
  return medians[0] <= medians[1];
}

torch::jit::Module optimize(const torch::jit::Module& module, const Options& options) {
  if (options.min_cosine > 0 && options.precision != Precision::kFloat32)
    throw std::invalid_argument("kiln::optimize: a min_cosine needs example inputs (optimize's second form)");
  return optimizeWith(module, options, nullptr);
}

torch::jit::Module optimize(const torch::jit::Module& module, const Options& options,
                            const std::vector<c10::IValue>& example_inputs, PrecisionPlan* plan) {
  // Below 1: a fused module's outputs are not bit-identical to the model's even in float32.
  if (!(options.min_cosine >= 0 && options.min_cosine < 1))
    throw std::invalid_argument("kiln::optimize: min_cosine must be at least 0 and below 1, got " +
                                std::to_string(options.min_cosine));
  if (options.precision == Precision::kFloat32 && options.conv_regions && !options.disabled && !example_inputs.empty())
    return withOrWithoutRegions(module, options, example_inputs);
  if (options.min_cosine == 0 || options.precision == Precision::kFloat32 || options.disabled)
    return optimizeWith(module, options, nullptr);
  // The float32 module's outputs: the reference every trial is measured against.
  c10::IValue expected;
  {
    at::NoGradGuard no_grad;
    torch::jit::Module reference = module.clone();
    reference.eval();
    expected = reference.forward(copyArguments(example_inputs));
  }
  PrecisionPlan found;
  std::shared_ptr<torch::jit::Graph> prepared;  // the graph before conversion, for describePlan
  std::vector<int64_t> cuts;
  torch::jit::Module result = optimizeWith(module, options, [&](const std::shared_ptr<torch::jit::Graph>& graph,
                                                                const torch::jit::Module& frozen) {
    found = planPrecision(graph, frozen._ivalue(), example_inputs, expected, options.precision, options.min_cosine);
    prepared = graph->copy();
    cuts = precisionCuts(*graph);
    return found.ops_float32;
  });
  // The trials ran the converted graph unfused; the fused module (kiln's kernels and attention)
  // rounds a little differently, and it is what must meet the bound: where it does not, more of
  // the graph keeps float32, bisecting over the cuts above the plan's with the fused module.
  auto fusedCosine = [&](torch::jit::Module& candidate) {
    at::NoGradGuard no_grad;
    try {
      return worstOutputCosine(expected, candidate.forward(copyArguments(example_inputs)));
    } catch (const std::exception& error) {
      log(LogLevel::kInfo, std::string("precision: the fused module failed on the example inputs: ") + error.what());
      return -1.0;
    }
  };
  double cosine = fusedCosine(result);
  if (prepared && cosine < options.min_cosine && !cuts.empty() && found.ops_float32 < cuts.back()) {
    int64_t lo = -1;  // cuts[lo] misses the bound in the fused module (or lies below cuts[0])
    for (size_t i = 0; i < cuts.size(); ++i) {
      if (cuts[i] <= found.ops_float32) lo = static_cast<int64_t>(i);
    }
    int64_t hi = static_cast<int64_t>(cuts.size()) - 1;
    std::optional<torch::jit::Module> at_hi;
    double cosine_at_hi = 0;
    auto keep = [&](int64_t float32_ops) {
      found.trials++;
      return optimizeWith(module, options, [float32_ops](const std::shared_ptr<torch::jit::Graph>&,
                                                         const torch::jit::Module&) { return float32_ops; });
    };
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      torch::jit::Module candidate = keep(cuts[static_cast<size_t>(mid)]);
      const double candidate_cosine = fusedCosine(candidate);
      if (candidate_cosine >= options.min_cosine) {
        hi = mid;
        at_hi = candidate;
        cosine_at_hi = candidate_cosine;
      } else {
        lo = mid;
      }
    }
    if (!at_hi) {
      at_hi = keep(cuts[static_cast<size_t>(hi)]);
      cosine_at_hi = fusedCosine(*at_hi);
    }
    result = *at_hi;
    cosine = cosine_at_hi;
    describePlan(*prepared, cuts[static_cast<size_t>(hi)], found);
  }
  found.cosine = cosine;
  log(LogLevel::kInfo, "precision: " + found.toText());
  if (plan != nullptr) *plan = found;
  return result;
}

std::string version() { return kilnVersion(); }

}  // namespace kiln
