// kiln::conv_region (fuser/conv_regions.cpp): a run of convolutions with the ops between them, run
// the fastest of three ways, measured on the first call of each shape (measured_choice.h):
//   aten          the region's ops as written, by TorchScript's interpreter (the reference and
//                 the fallback);
//   kiln          kiln's library calls (kiln::conv2d with its epilogues, library_ops.cpp);
//   onednn_graph  torch's oneDNN Graph bridge (the build of oneDNN torch ships) over the region:
//                 compiled partitions that pass oneDNN's blocked layouts from one to the next and
//                 keep the weights reordered in oneDNN's constant cache; channels-last tensors
//                 between partitions;
//   onednn_graph_as_given  the same with the strides eager gives between partitions, as torch's
//                 own fuser has them (better where views and reshapes sit between partitions).
// The others are built once per input signature from the region's graph with its weights as
// constants and every value's type recorded from one run of the aten way (what the profiling
// executor would have recorded). A build goes when its weights are freed or written to.
#include <torch/csrc/jit/codegen/onednn/interface.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/irparser.h>
#include <torch/csrc/jit/runtime/interpreter.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <iterator>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "fuser/fusion_pass.h"
#include "fuser/group_stats.h"
#include "kiln/options.h"
#include "torch_ops/measured_choice.h"

namespace kiln {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

constexpr const char* kAten = "aten";
constexpr const char* kKiln = "kiln";
constexpr const char* kOnednnGraph = "onednn_graph";
constexpr const char* kOnednnGraphAsGiven = "onednn_graph_as_given";

// The ways a build makes, in RegionBuild::codes' order.
constexpr const char* kBuiltWays[] = {kKiln, kOnednnGraph, kOnednnGraphAsGiven};

// One region at one input signature: the ways built for it (null where one could not be).
struct RegionBuild {
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> weights;  // the op's, watched
  std::vector<int64_t> versions;                                  // their versions when built
  // The ways besides aten, in kBuiltWays' order; a slot read and dropped atomically (null: not
  // built, or measured slower and dropped).
  std::shared_ptr<torch::jit::Code> codes[std::size(kBuiltWays)];
  // The strides ATen's ops give each output at this signature, which the other ways' results
  // are given too: the op returns what eager would, strides included.
  std::vector<std::vector<int64_t>> aten_strides;

  bool stale() const {
    for (size_t i = 0; i < weights.size(); ++i) {
      c10::intrusive_ptr<c10::TensorImpl> weight = weights[i].lock();
      if (!weight || static_cast<int64_t>(weight->version_counter().current_version()) != versions[i]) return true;
    }
    return false;
  }
};

// What a call checks before anything else: the activations' dtypes, sizes and strides and the
// build (its weights alive and unwritten) of the last measured signature, and the code its
// choice runs.
struct FastPath {
  std::vector<int64_t> shape;
  std::shared_ptr<const RegionBuild> build;
  std::shared_ptr<torch::jit::Code> code;  // none: the aten way
  const char* choice = nullptr;
};

struct RegionProgram {
  std::string text;
  size_t hash = 0;
  std::shared_ptr<torch::jit::Code> aten;
  GroupCounters* counters = nullptr;
  std::mutex mutex;
  std::unordered_map<std::string, std::shared_ptr<RegionBuild>> builds;
  int onednn_builds = 0;  // the input signatures oneDNN Graph was built for
  std::shared_ptr<const FastPath> fast;  // read and replaced atomically
};

// The input signatures of one region that oneDNN Graph is built and measured for. Its partitions
// are compiled for exact shapes, so a transformer called with many sequence lengths would compile
// and measure them once per length (a BERT-base layer stack: 1.6 s for each new length against
// 0.5 s without regions) and keep every build; past these, a new signature builds only kiln's
// way (its library calls measure once per power-of-two class of rows) and ATen's.
constexpr int kOnednnSignatures = 8;

// Drops the builds whose weights were freed or written to; the caller holds program.mutex.
void dropStaleBuilds(RegionProgram& program) {
  for (auto it = program.builds.begin(); it != program.builds.end();) {
    it = it->second->stale() ? program.builds.erase(it) : std::next(it);
  }
}

std::shared_ptr<Graph> parseRegion(const std::string& text) {
  auto graph = std::make_shared<Graph>();
  torch::jit::parseIR(text, graph.get());
  return graph;
}

// A region's program, by its text. A graph passes the same string constant on every call: that
// object (kept alive here, so its address is never another's) finds the program without hashing
// the text, which for a whole backbone is tens of kilobytes.
std::shared_ptr<RegionProgram> programFor(const c10::intrusive_ptr<c10::ivalue::ConstantString>& text) {
  static std::mutex mutex;
  static auto* by_object = new std::unordered_map<const c10::ivalue::ConstantString*,
                                                  std::pair<c10::intrusive_ptr<c10::ivalue::ConstantString>,
                                                            std::shared_ptr<RegionProgram>>>();
  static auto* by_text = new std::unordered_map<std::string, std::shared_ptr<RegionProgram>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto known = by_object->find(text.get());
  if (known != by_object->end()) return known->second.second;
  // A graph not seen before (a module loaded or optimized): what modules freed since left goes
  // now, their strings, their programs and the builds that hold their weights.
  for (auto it = by_object->begin(); it != by_object->end();) {
    it = it->second.first.use_count() == 1 ? by_object->erase(it) : std::next(it);
  }
  for (auto it = by_text->begin(); it != by_text->end();) {
    RegionProgram& old = *it->second;
    {
      std::lock_guard<std::mutex> program_lock(old.mutex);
      dropStaleBuilds(old);
    }
    std::shared_ptr<const FastPath> fast = std::atomic_load(&old.fast);
    if (fast && fast->build->stale()) std::atomic_store(&old.fast, std::shared_ptr<const FastPath>());
    it = it->second.use_count() == 1 ? by_text->erase(it) : std::next(it);
  }
  std::shared_ptr<RegionProgram>& program = (*by_text)[text->string()];
  if (!program) {
    auto made = std::make_shared<RegionProgram>();
    made->text = text->string();
    made->hash = std::hash<std::string>{}(made->text);
    made->aten = std::make_shared<torch::jit::Code>(parseRegion(made->text), "kiln_conv_region_aten");
    made->counters = &groupCounters(made->text);
    program = made;
  }
  by_object->emplace(text.get(), std::make_pair(text, program));
  return program;
}

std::vector<at::Tensor> runCode(torch::jit::Code& code, const std::vector<at::Tensor>& first,
                                const std::vector<at::Tensor>& second = {}) {
  torch::jit::Stack stack;
  stack.reserve(first.size() + second.size());
  for (const at::Tensor& tensor : first) stack.emplace_back(tensor);
  for (const at::Tensor& tensor : second) stack.emplace_back(tensor);
  torch::jit::InterpreterState(code).run(stack);
  std::vector<at::Tensor> outputs;
  outputs.reserve(stack.size());
  for (const c10::IValue& value : stack) outputs.push_back(value.toTensor());
  return outputs;
}

// A traced `x * 1.7` holds 1.7 as a 0-dim float64 constant tensor, which torch's oneDNN Graph
// bridge mishandles: it converts x to float64 (a convolution after it then fails: timm's NFNets),
// and a 0-dim tensor of x's dtype makes a partition oneDNN cannot compile. As a number, the
// bridge gives it x's dtype itself. ATen computes the same either way (a 0-dim operand does not
// change a floating tensor's dtype). `x`'s type is the probe's.
void scalarConstantsAsNumbers(torch::jit::Block* block) {
  static const c10::Symbol arithmetic[] = {torch::jit::aten::add, torch::jit::aten::sub, torch::jit::aten::mul,
                                           torch::jit::aten::div};
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) scalarConstantsAsNumbers(inner);
    if (std::find(std::begin(arithmetic), std::end(arithmetic), node->kind()) == std::end(arithmetic)) continue;
    if (node->inputs().size() < 2 || node->inputs().size() > 3) continue;
    Value* constant = node->input(1);
    auto operand = node->input(0)->type()->cast<c10::TensorType>();
    if (constant->node()->kind() != torch::jit::prim::Constant || !operand || !operand->scalarType() ||
        !operand->dim() || *operand->dim() == 0 || !at::isFloatingType(*operand->scalarType()))
      continue;
    std::optional<c10::IValue> value = torch::jit::toIValue(constant);
    if (!value || !value->isTensor()) continue;
    const at::Tensor tensor = value->toTensor();
    if (tensor.dim() != 0 || !at::isFloatingType(tensor.scalar_type()) || tensor.requires_grad()) continue;
    torch::jit::WithInsertPoint here(node);
    node->replaceInput(1, node->owningGraph()->insertConstant(tensor.item<double>()));
  }
}

// The region's graph over these inputs: weights (aliases, so that the build does not keep the
// caller's tensors alive) as constants, and every tensor value typed as one run records it.
std::shared_ptr<Graph> specializedGraph(const std::string& text, const std::vector<at::Tensor>& activations,
                                        const std::vector<at::Tensor>& weights, bool channels_last,
                                        std::vector<std::vector<int64_t>>* output_strides = nullptr) {
  std::shared_ptr<Graph> graph = parseRegion(text);
  const size_t count = activations.size();
  TORCH_CHECK(graph->inputs().size() == count + weights.size(), "kiln::conv_region: the graph takes ",
              graph->inputs().size(), " inputs, the op was given ", count + weights.size());
  {
    torch::jit::WithInsertPoint start(graph->block()->nodes().front());
    for (size_t i = 0; i < weights.size(); ++i)
      graph->inputs()[count + i]->replaceAllUsesWith(graph->insertConstant(weights[i].alias()));
  }
  for (size_t i = graph->inputs().size(); i > count; --i) graph->eraseInput(i - 1);
  for (size_t i = 0; i < count; ++i) graph->inputs()[i]->setType(c10::TensorType::create(activations[i]));
  // Channels-last: 4-D inputs are made channels-last first, inside the graph, so that what runs
  // is what the probe below records (a partition's guard sees the strides it was compiled for).
  if (channels_last) {
    torch::jit::WithInsertPoint start(graph->block()->nodes().front());
    for (size_t i = 0; i < count; ++i) {
      Value* input = graph->inputs()[i];
      if (activations[i].dim() != 4) continue;
      Value* converted = graph->insert(c10::Symbol::fromQualString("aten::contiguous"),
                                       {input}, {torch::jit::NamedValue("memory_format", c10::MemoryFormat::ChannelsLast)});
      input->replaceAllUsesAfterNodeWith(converted->node(), converted);
    }
  }
  // One run with every tensor value returned gives each its type.
  std::shared_ptr<Graph> probe = graph->copy();
  std::vector<Value*> values, probed;
  auto collect = [](Graph& g, std::vector<Value*>& out) {
    for (Node* node : g.nodes()) {
      if (node->kind() == torch::jit::prim::Constant) continue;
      for (Value* output : node->outputs()) {
        if (output->type()->cast<c10::TensorType>()) out.push_back(output);
      }
    }
  };
  collect(*graph, values);
  collect(*probe, probed);
  for (Value* value : probed) probe->registerOutput(value);
  torch::jit::Code code(probe, "kiln_conv_region_probe");
  // Channels-last: ATen's ops then give channels-last results, the layout oneDNN's convolutions
  // read and write best, so oneDNN Graph's partitions exchange channels-last tensors where they
  // exchange strided ones. As given: the strides eager gives, as torch's own fuser records them
  // (views between partitions stay views), and the region's outputs as ATen's ops make them.
  torch::jit::Stack stack(activations.begin(), activations.end());
  torch::jit::InterpreterState(code).run(stack);
  const size_t results = graph->outputs().size();
  TORCH_CHECK(stack.size() == results + values.size(), "kiln::conv_region: the probe returned ", stack.size(), " values");
  for (size_t i = 0; i < values.size(); ++i) values[i]->setType(c10::TensorType::create(stack[results + i].toTensor()));
  if (output_strides) {
    for (size_t i = 0; i < results; ++i) output_strides->push_back(stack[i].toTensor().strides().vec());
  }
  scalarConstantsAsNumbers(graph->block());
  return graph;
}

void logBuildFailure(const RegionProgram& program, const char* way, const std::exception& error) {
  log(LogLevel::kInfo, std::string("conv_region ") + std::to_string(program.hash) + ": the " + way +
                           " way could not be built, not measured: " + error.what());
}

// Gives each output ATen's strides, copying where a way's differ. Strides that overlap (an
// expanded result) are left as they came.
void restoreAtenStrides(const RegionBuild& build, std::vector<at::Tensor>& results) {
  for (size_t i = 0; i < results.size() && i < build.aten_strides.size(); ++i) {
    const std::vector<int64_t>& strides = build.aten_strides[i];
    if (results[i].strides() == c10::IntArrayRef(strides) || results[i].sizes().size() != strides.size()) continue;
    at::Tensor restrided = at::empty_strided(results[i].sizes(), strides, results[i].options());
    if (!restrided.is_non_overlapping_and_dense()) continue;
    results[i] = restrided.copy_(results[i]);
  }
}

// The bridge guards each partition by its inputs' recorded types; where they do not match, a
// prim::FallbackGraph runs its ops unfused. The profiling executor makes each such graph a
// function first; here its ops go in place, so a way whose guard fails somewhere still runs
// (slower, which measuring sees) instead of throwing.
void inlineFallbackGraphs(torch::jit::Block* block) {
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    Node* node = *it++;
    for (torch::jit::Block* inner : node->blocks()) inlineFallbackGraphs(inner);
    if (node->kind() != torch::jit::prim::FallbackGraph) continue;
    torch::jit::WithInsertPoint here(node);
    std::vector<Value*> outputs = torch::jit::insertGraph(*node->owningGraph(), *node->g(torch::jit::attr::Subgraph),
                                                          node->inputs());
    for (size_t i = 0; i < outputs.size(); ++i) node->output(i)->replaceAllUsesWith(outputs[i]);
    node->destroy();
  }
}

// Whether a oneDNN Graph partition reads one of its inputs in two ops (a convolution's input that
// is also added to its result). torch's bridge lists such an input once per reading op, finds the
// input oneDNN offers to compute in place in that list, and then takes the tensor at that
// position from the node's inputs (LlgaKernel::prepareRunArgs): past the end of them (a crash:
// timm's RepViT, two `conv(x) + conv1(x) + x` blocks in a row) or the wrong tensor.
bool readsAnInputTwice(Node* group) {
  for (Value* input : group->g(torch::jit::attr::Subgraph)->inputs()) {
    if (input->uses().size() > 1) return true;
  }
  return false;
}

// Whether a partition returns an add of a layer_norm's result (Swin V2's post-norm residual,
// x + norm(mlp(x))). oneDNN offers to compute the add in place of its other operand, and torch's
// bridge takes the wrong tensor for that operand: a wrong result (x + norm(a) off by the size of
// its values), or with a norm without weight and bias an index past the node's inputs. The oneDNN
// Graph fuser gives such models wrong results; followed by any other op in its partition, the add
// is computed right.
bool returnsAnAddOfALayerNorm(Node* group) {
  for (Value* output : group->g(torch::jit::attr::Subgraph)->outputs()) {
    const Node* node = output->node();
    if (node->kind() != torch::jit::aten::add) continue;
    for (const Value* operand : node->inputs()) {
      if (operand->node()->kind() == torch::jit::aten::layer_norm) return true;
    }
  }
  return false;
}

// Makes the partition that produces `value` (through a guard and the If that runs the partition)
// write it in eager's strides, not oneDNN's own layout: what reads it now includes ATen's ops.
void producePlain(Value* value) {
  if (value->node()->kind() == torch::jit::prim::oneDNNFusionGuard) value = value->node()->input(value->offset());
  Node* branch = value->node();
  if (branch->kind() != torch::jit::prim::If) return;
  Value* made = branch->blocks()[0]->outputs()[value->offset()];
  Node* group = made->node();
  const c10::Symbol layouts = c10::Symbol::attr("output_layouts");
  if (group->kind() != torch::jit::prim::oneDNNFusionGroup || !group->hasAttribute(layouts)) return;
  std::vector<int64_t> kept = group->is(layouts);
  if (made->offset() < kept.size()) kept[made->offset()] = 0;
  group->is_(layouts, kept);
}

// The partitions torch's bridge mishandles (readsAnInputTwice, returnsAnAddOfALayerNorm) run their
// unfused ops instead: the branch that runs the partition is never taken, and the partitions that
// feed it write eager's layout. Returns how many.
int avoidMishandledPartitions(torch::jit::Block* block) {
  int avoided = 0;
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) avoided += avoidMishandledPartitions(inner);
    if (node->kind() != torch::jit::prim::If) continue;
    Node* hazard = nullptr;
    for (Node* inner : node->blocks()[0]->nodes()) {
      if (inner->kind() == torch::jit::prim::oneDNNFusionGroup &&
          (readsAnInputTwice(inner) || returnsAnAddOfALayerNorm(inner)))
        hazard = inner;
    }
    if (hazard == nullptr) continue;
    for (Value* input : hazard->inputs()) producePlain(input);
    torch::jit::WithInsertPoint here(node);
    node->replaceInput(0, node->owningGraph()->insertConstant(false));
    ++avoided;
  }
  return avoided;
}

// torch's oneDNN Graph bridge over a specialized graph: null where it makes no partition.
std::shared_ptr<torch::jit::Code> onednnCode(const RegionProgram& program, const char* way,
                                             const std::shared_ptr<Graph>& specialized) {
  try {
    std::shared_ptr<Graph> graph = specialized->copy();
    torch::jit::fuser::onednn::fuseGraph(graph);
    inlineFallbackGraphs(graph->block());
    const int avoided = avoidMishandledPartitions(graph->block());
    if (avoided > 0)
      log(LogLevel::kDebug, std::string("conv_region ") + std::to_string(program.hash) + ": the " + way + " way runs " +
                                std::to_string(avoided) + " partitions as ATen ops (torch's bridge mishandles them)");
    bool partitioned = false;
    for (Node* node : graph->nodes()) {
      if (node->kind() == torch::jit::prim::If && node->input(0)->node()->kind() == torch::jit::prim::Constant) continue;
      for (torch::jit::Block* block : node->blocks()) {
        for (Node* inner : block->nodes()) partitioned = partitioned || inner->kind() == torch::jit::prim::oneDNNFusionGroup;
      }
      partitioned = partitioned || node->kind() == torch::jit::prim::oneDNNFusionGroup;
    }
    if (Options::global().log_level >= LogLevel::kDebug)
      log(LogLevel::kDebug, std::string("conv_region ") + std::to_string(program.hash) + ": the " + way + " way:\n" +
                                graph->toString());
    if (partitioned) return std::make_shared<torch::jit::Code>(graph, std::string("kiln_conv_region_") + way);
  } catch (const std::exception& error) {
    logBuildFailure(program, way, error);
  }
  return nullptr;
}

// The ways for one signature; oneDNN Graph's only where `onednn` (kOnednnSignatures).
std::shared_ptr<RegionBuild> build(RegionProgram& program, const std::vector<at::Tensor>& activations,
                                   const std::vector<at::Tensor>& weights, bool onednn) {
  auto made = std::make_shared<RegionBuild>();
  for (const at::Tensor& weight : weights) {
    made->weights.emplace_back(c10::weak_intrusive_ptr<c10::TensorImpl>(weight.getIntrusivePtr()));
    made->versions.push_back(static_cast<int64_t>(weight._version()));
  }
  // The graph as given first: its probe is ATen's run, whose outputs' strides every way's
  // results are given (no other way is built without them).
  std::shared_ptr<Graph> given;
  try {
    given = specializedGraph(program.text, activations, weights, /*channels_last=*/false, &made->aten_strides);
  } catch (const std::exception& error) {
    logBuildFailure(program, "kiln, onednn_graph and onednn_graph_as_given", error);
    return made;
  }
  if (onednn) made->codes[2] = onednnCode(program, kOnednnGraphAsGiven, given);
  // Channels-last changes only 4-D inputs: without them that graph is the one above.
  const bool four_dim = std::any_of(activations.begin(), activations.end(), [](const at::Tensor& t) { return t.dim() == 4; });
  std::shared_ptr<Graph> graph = given;
  if (four_dim) {
    try {
      graph = specializedGraph(program.text, activations, weights, /*channels_last=*/true);
    } catch (const std::exception& error) {
      logBuildFailure(program, "kiln and onednn_graph", error);
      return made;
    }
  }
  try {
    std::shared_ptr<Graph> kiln_graph = graph->copy();
    Options options = Options::global();
    fuseLibraryCalls(kiln_graph, options, /*outputs_take_any_layout=*/true);
    fuse(kiln_graph, options);  // what the library calls leave: elementwise groups
    made->codes[0] = std::make_shared<torch::jit::Code>(kiln_graph, "kiln_conv_region_kiln");
  } catch (const std::exception& error) {
    logBuildFailure(program, kKiln, error);
  }
  if (onednn && four_dim) made->codes[1] = onednnCode(program, kOnednnGraph, graph);
  return made;
}

// Shapes, strides and dtypes of the activations: what a build and a measured choice depend on.
std::string signature(const std::vector<at::Tensor>& activations) {
  std::ostringstream out;
  for (const at::Tensor& tensor : activations) {
    out << c10::toString(tensor.scalar_type()) << tensor.sizes() << tensor.strides() << ";";
  }
  return out.str();
}

std::shared_ptr<RegionBuild> buildFor(RegionProgram& program, const std::string& key,
                                      const std::vector<at::Tensor>& activations, const std::vector<at::Tensor>& weights) {
  std::ostringstream identity;
  identity << key;
  for (const at::Tensor& weight : weights) identity << "|" << weight.unsafeGetTensorImpl();
  std::lock_guard<std::mutex> lock(program.mutex);
  dropStaleBuilds(program);
  std::shared_ptr<RegionBuild>& found = program.builds[identity.str()];
  if (!found) {
    const bool onednn = program.onednn_builds < kOnednnSignatures;
    if (onednn) {
      ++program.onednn_builds;
    } else if (program.onednn_builds == kOnednnSignatures) {
      ++program.onednn_builds;  // logged once
      log(LogLevel::kInfo, "conv_region " + std::to_string(program.hash) + ": " + std::to_string(kOnednnSignatures) +
                               " input signatures built with oneDNN Graph; further ones run kiln's or ATen's way");
    }
    found = build(program, activations, weights, onednn);
  }
  return found;
}

// The activations' dtypes, devices, sizes and strides, flattened.
std::vector<int64_t> shapeOf(const std::vector<at::Tensor>& activations) {
  std::vector<int64_t> shape;
  for (const at::Tensor& tensor : activations) {
    shape.push_back(static_cast<int64_t>(tensor.scalar_type()));
    shape.push_back(static_cast<int64_t>(tensor.device().type()) * 1024 + tensor.device().index());
    shape.push_back(tensor.dim());
    for (int64_t size : tensor.sizes()) shape.push_back(size);
    for (int64_t stride : tensor.strides()) shape.push_back(stride);
  }
  return shape;
}

// Whether `weights` are the build's own, alive and as they were when it was built.
bool sameWeights(const RegionBuild& build, const std::vector<at::Tensor>& weights) {
  if (build.weights.size() != weights.size()) return false;
  for (size_t i = 0; i < weights.size(); ++i) {
    const c10::TensorImpl* impl = weights[i].unsafeGetTensorImpl();
    if (build.weights[i]._unsafe_get_target() != impl || build.weights[i].expired() ||
        static_cast<int64_t>(impl->version_counter().current_version()) != build.versions[i])
      return false;
  }
  return true;
}

std::vector<at::Tensor> convRegion(RegionProgram& program, const std::vector<at::Tensor>& activations,
                                   const std::vector<at::Tensor>& weights) {
  GroupCounters& counters = *program.counters;
  bool measurable = !activations.empty();
  for (const at::Tensor& tensor : activations) {
    measurable = measurable && tensor.device().is_cpu() && tensor.layout() == at::kStrided &&
                 (tensor.scalar_type() == at::kFloat || tensor.scalar_type() == at::kBFloat16);
  }
  // oneDNN Graph's partitions and the measuring have no autograd.
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor& tensor : activations) measurable = measurable && !tensor.requires_grad();
    for (const at::Tensor& tensor : weights) measurable = measurable && !tensor.requires_grad();
  }
  const bool forced = choiceForced();
  std::vector<int64_t> shape = measurable ? shapeOf(activations) : std::vector<int64_t>();
  // The fast path: the signature measured last, its choice run directly.
  if (measurable && !forced) {
    std::shared_ptr<const FastPath> fast = std::atomic_load(&program.fast);
    if (fast && fast->shape == shape && sameWeights(*fast->build, weights)) {
      const auto start = std::chrono::steady_clock::now();
      std::vector<at::Tensor> results = fast->code ? runCode(*fast->code, activations) : runCode(*program.aten, activations, weights);
      if (fast->code) restoreAtenStrides(*fast->build, results);
      counters.calls++;
      counters.timed_calls++;
      counters.timed_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
      counters.choice = fast->choice;
      return results;
    }
  }
  std::vector<MeasuredWayOfMany> ways;
  ways.push_back({kAten, [&](const std::optional<at::Tensor>&) { return runCode(*program.aten, activations, weights); }});
  if (!measurable) return runFastest("", ways, counters);
  const std::string key = "conv_region " + std::to_string(program.hash) + " " + signature(activations);
  std::shared_ptr<RegionBuild> built = buildFor(program, key, activations, weights);
  // The ways read their code atomically: once measured, the slower ways' code is dropped.
  auto codeOf = [](const std::shared_ptr<torch::jit::Code>& slot) {
    std::shared_ptr<torch::jit::Code> code = std::atomic_load(&slot);
    TORCH_CHECK(code, "kiln::conv_region: this way was measured slower and dropped");
    return code;
  };
  for (size_t i = 0; i < std::size(kBuiltWays); ++i) {
    if (!std::atomic_load(&built->codes[i])) continue;
    // oneDNN cannot compile some partitions (strided slices of channels-last tensors, some
    // fusions): such a way is logged as info, not a warning, and not used.
    const LogLevel failure = kBuiltWays[i] == kKiln ? LogLevel::kWarning : LogLevel::kInfo;
    ways.push_back({kBuiltWays[i], [&, i](const std::optional<at::Tensor>&) {
      return runCode(*codeOf(built->codes[i]), activations);
    }, nullptr, failure});
  }
  std::vector<at::Tensor> results = runFastest(key, ways, counters);
  restoreAtenStrides(*built, results);
  // What the slower ways keep (kiln's prepacked weights, oneDNN Graph's compiled partitions) goes
  // once the measured choice is known, and the next call with this signature takes the fast
  // path; a choice forced for testing keeps everything.
  if (!forced) {
    if (std::optional<std::string> chosen = rememberedChoice(key)) {
      auto fast = std::make_shared<FastPath>();
      fast->shape = std::move(shape);
      fast->build = built;
      fast->choice = kAten;
      for (size_t i = 0; i < std::size(kBuiltWays); ++i) {
        if (*chosen == kBuiltWays[i]) {
          fast->code = std::atomic_load(&built->codes[i]);
          fast->choice = kBuiltWays[i];
        } else if (std::atomic_load(&built->codes[i])) {
          std::atomic_store(&built->codes[i], {});
        }
      }
      // A remembered way that could not be built here runs as aten does.
      if (fast->choice != kAten && !fast->code) fast->choice = kAten;
      std::atomic_store(&program.fast, std::shared_ptr<const FastPath>(std::move(fast)));
    }
  }
  return results;
}

// kiln::conv_region(Tensor[] activations, Tensor[] weights, str graph) -> Tensor[], boxed: the
// graph string arrives as the graph's own constant object (programFor).
void convRegionBoxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  c10::intrusive_ptr<c10::ivalue::ConstantString> text = stack->back().toString();
  std::vector<at::Tensor> weights = (*stack)[stack->size() - 2].toTensorVector();
  std::vector<at::Tensor> activations = (*stack)[stack->size() - 3].toTensorVector();
  torch::jit::drop(*stack, 3);
  std::shared_ptr<RegionProgram> program = programFor(text);
  torch::jit::push(*stack, c10::List<at::Tensor>(convRegion(*program, activations, weights)));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("conv_region(Tensor[] activations, Tensor[] weights, str graph) -> Tensor[]",
        torch::CppFunction::makeFromBoxedFunction<&convRegionBoxed>());
}

}  // namespace kiln
