// The elementwise fusion pass (see fusion_pass.h and group_stats.h for what it builds).
//
// Groups grow from each fusible node towards its producers, as in torch's TensorExpr fuser: a
// producer joins when AliasDb proves it can move down to its consumer without crossing a write
// (moveBeforeTopologicallyValid). Every block, including prim::If and prim::Loop bodies, is
// fused on its own. Groups are then given a guard and their original ops as the fallback.
#include <torch/csrc/jit/ir/alias_analysis.h>
#include <torch/csrc/jit/passes/remove_mutation.h>
#include <torch/csrc/jit/passes/utils/subgraph_utils.h>

#include <algorithm>
#include <unordered_set>

#include "fuser/fusion_pass.h"
#include "fuser/group_code.h"
#include "fuser/lowering.h"

namespace kiln {
namespace {

using torch::jit::AliasDb;
using torch::jit::Block;
using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;
namespace SubgraphUtils = torch::jit::SubgraphUtils;

// Groups under construction use the legacy fuser's node kind, which AliasDb already knows how to
// analyse; only nodes this pass created (building_) are treated as kiln's.
const c10::Symbol kBuildingGroup = torch::jit::prim::FusionGroup;

bool isAliasingOp(const Node* node) {
  static const std::vector<c10::Symbol> kinds = {c10::Symbol::fromQualString("aten::to"),
                                                 c10::Symbol::fromQualString("aten::type_as"),
                                                 c10::Symbol::fromQualString("aten::dropout")};
  return std::find(kinds.begin(), kinds.end(), node->kind()) != kinds.end();
}

class GroupBuilder {
 public:
  GroupBuilder(std::shared_ptr<Graph> graph) : graph_(std::move(graph)), alias_db_(graph_) {}

  std::vector<Node*> build() {
    buildInBlock(graph_->block());
    return groups_;
  }

 private:
  bool canFuse(Node* node) {
    if (node->kind() == kBuildingGroup) return building_.count(node) > 0;
    if (!isFusibleNode(node)) return false;
    // An op whose result may alias its input (to, type_as, eval dropout) is fused only when no
    // one writes to either: then a fresh tensor and an alias cannot be told apart.
    if (isAliasingOp(node) && (alias_db_.hasWriters(node->input(0)) || alias_db_.hasWriters(node->output()))) {
      return false;
    }
    return true;
  }

  void buildInBlock(Block* block) {
    for (Node* node : block->nodes()) {
      // A kiln fallback keeps the original ops on purpose; only the kiln branch is looked at.
      if (isKilnFallback(node)) continue;
      for (Block* inner : node->blocks()) buildInBlock(inner);
    }
    bool changed = true;
    while (changed) {
      changed = false;
      for (auto it = block->nodes().rbegin(); it != block->nodes().rend();) {
        Node* node = *it;
        if (!canFuse(node)) {
          ++it;
          continue;
        }
        auto [next, merged] = growGroup(node);
        it = next;
        changed |= merged;
      }
    }
    for (Node* node : block->nodes()) {
      if (node->kind() == kBuildingGroup && building_.count(node)) groups_.push_back(node);
    }
  }

  std::pair<torch::jit::graph_node_list_iterator, bool> growGroup(Node* node) {
    Node* group = node;
    if (node->kind() != kBuildingGroup) {
      group = SubgraphUtils::createSingletonSubgraphAndUpdateAliasing(node, kBuildingGroup, alias_db_);
      building_.insert(group);
    }
    // Try producers latest first so each merge keeps the topological order valid.
    std::vector<Value*> inputs(group->inputs().begin(), group->inputs().end());
    std::sort(inputs.begin(), inputs.end(), [](Value* a, Value* b) {
      return a->node()->isAfter(b->node());
    });
    for (Value* input : inputs) {
      Node* producer = input->node();
      if (producer->owningBlock() != group->owningBlock() || producer->kind() == torch::jit::prim::Param) continue;
      if (!canFuse(producer)) continue;
      if (feedsChannelParam(group, input)) continue;
      // A reduction that drops its dim is a group's last op: its result only leaves the group.
      if (isDroppedRow(input)) continue;
      if (!alias_db_.moveBeforeTopologicallyValid(producer, group)) continue;
      SubgraphUtils::mergeNodeIntoSubgraphAndUpdateAliasing(producer, group, alias_db_);
      building_.erase(producer);
      return {group->reverseIterator(), true};
    }
    return {++group->reverseIterator(), false};
  }

  // Whether `value` is made by a reduction that drops its dim (directly, or as an output of a
  // group under construction).
  static bool isDroppedRow(Value* value) {
    Node* producer = value->node();
    if (producer->kind() != kBuildingGroup) return dropsReducedDim(producer);
    const auto& outputs = producer->outputs();
    const size_t index = static_cast<size_t>(std::find(outputs.begin(), outputs.end(), value) - outputs.begin());
    return dropsReducedDim(producer->g(torch::jit::attr::Subgraph)->outputs()[index]->node());
  }

  // batch_norm's per-channel operands are read through a [C, 1, …] view that the runtime makes of
  // a group input, so what computes them stays outside the group.
  static bool feedsChannelParam(Node* group, Value* input) {
    const auto& outer = group->inputs();
    auto position = std::find(outer.begin(), outer.end(), input);
    if (position == outer.end()) return false;
    Value* inner = group->g(torch::jit::attr::Subgraph)->inputs()[static_cast<size_t>(position - outer.begin())];
    const auto& uses = inner->uses();
    return std::any_of(uses.begin(), uses.end(), isChannelOperandUse);
  }

  std::shared_ptr<Graph> graph_;
  AliasDb alias_db_;
  std::vector<Node*> groups_;
  std::unordered_set<Node*> building_;
};

// prim::profile nodes (the profiling executor's records) between two fusible ops would split
// a group; they are dropped there and kept everywhere else.
void dropProfilesBetweenFusibleOps(Block* block) {
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    Node* node = *it++;
    for (Block* inner : node->blocks()) dropProfilesBetweenFusibleOps(inner);
    if (node->kind() != torch::jit::prim::profile || node->outputs().size() != 1) continue;
    Node* producer = node->input(0)->node();
    if (!isFusibleNode(producer)) continue;
    bool feeds_fusible_only = true;
    // An in-place op that may become functional counts as fusible: a profile between it and
    // its producer would make its input look aliased and keep it in place.
    for (const torch::jit::Use& use : node->output()->uses()) {
      feeds_fusible_only &= isFusibleNode(use.user) || hasFusibleFunctionalForm(use.user);
    }
    if (!feeds_fusible_only) continue;
    node->output()->replaceAllUsesWith(node->input(0));
    node->destroy();
  }
}

// A reduction's dims and layer_norm's normalized_shape are often built in the graph from
// constants (prim::ListConstruct of ints, as scripting writes `[768]`): they become one constant
// list, so the op can join a group (whose code holds constants, never lists built at run time).
void foldConstantIntLists(Block* block) {
  for (Node* node : block->nodes()) {
    for (Block* inner : node->blocks()) foldConstantIntLists(inner);
    if (!isRowReduction(node)) continue;
    for (size_t i = 0; i < node->inputs().size(); ++i) {
      Node* list = node->input(i)->node();
      if (list->kind() != torch::jit::prim::ListConstruct) continue;
      std::vector<int64_t> items;
      for (Value* item : list->inputs()) {
        auto constant = torch::jit::toIValue(item);
        if (!constant || !constant->isInt()) break;
        items.push_back(constant->toInt());
      }
      if (items.size() != list->inputs().size()) continue;
      torch::jit::WithInsertPoint insert_point(node);
      node->replaceInput(i, block->owningGraph()->insertConstant(items));
    }
  }
}

int countOps(const Graph& subgraph) {
  int count = 0;
  for (const Node* node : subgraph.nodes()) count += node->kind() != torch::jit::prim::Constant;
  return count;
}

// Replaces a built group by guard + If(fused, fallback); false (the group left as it is) when
// its subgraph has no group code.
bool materialize(Graph& graph, Node* group, const KernelOptions& options) {
  std::shared_ptr<Graph> subgraph = group->g(torch::jit::attr::Subgraph);
  torch::jit::WithInsertPoint insert_point(group);
  // Tensor constants (a frozen module's weights) are not part of the group's code: lift them out
  // as inputs.
  for (auto it = subgraph->nodes().begin(); it != subgraph->nodes().end();) {
    Node* node = *it++;
    if (node->kind() != torch::jit::prim::Constant || node->output()->type()->kind() != c10::TypeKind::TensorType) continue;
    group->addInput(graph.insertConstant(*torch::jit::toIValue(node->output())));
    Value* inner = subgraph->addInput()->setType(c10::TensorType::get());
    node->output()->replaceAllUsesWith(inner);
    node->destroy();
  }
  std::string why;
  std::optional<std::string> text = encodeGroupCode(*subgraph, options, &why);
  if (!text) {
    log(LogLevel::kInfo, "a fusible group is left unfused: " + why);
    return false;
  }
  std::vector<Value*> outer_inputs(group->inputs().begin(), group->inputs().end());
  std::vector<Value*> tensors, floats, ints;
  for (Value* input : outer_inputs) {
    switch (input->type()->kind()) {
      case c10::TypeKind::TensorType: tensors.push_back(input); break;
      case c10::TypeKind::FloatType: floats.push_back(input); break;
      case c10::TypeKind::IntType: ints.push_back(input); break;
      case c10::TypeKind::BoolType:
        ints.push_back(graph.insert(c10::Symbol::fromQualString("aten::Int"), {input}));
        break;
      default: throw std::logic_error("kiln: fusion group input of unexpected type");
    }
  }
  Value* tensor_list = insertList(graph, c10::TensorType::get(), tensors);
  Value* float_list = insertList(graph, c10::FloatType::get(), floats);
  Value* int_list = insertList(graph, c10::IntType::get(), ints);
  Value* code = graph.insertConstant(*text);
  Value* ok = graph.insert(c10::Symbol::fromQualString(kFusionGuardOp), {tensor_list, float_list, int_list, code});
  Node* branch = graph.insertNode(graph.create(torch::jit::prim::If, {ok}, 0));
  Block* fused = branch->addBlock();
  Block* fallback = branch->addBlock();
  {
    torch::jit::WithInsertPoint in_fused(fused);
    Value* results = graph.insert(c10::Symbol::fromQualString(kFusionGroupOp), {tensor_list, float_list, int_list, code});
    Node* unpack = graph.insertNode(graph.createListUnpack(results, group->outputs().size()));
    for (Value* output : unpack->outputs()) fused->registerOutput(output);
  }
  {
    torch::jit::WithInsertPoint in_fallback(fallback);
    for (Value* output : torch::jit::insertGraph(graph, *subgraph, outer_inputs)) fallback->registerOutput(output);
  }
  for (size_t i = 0; i < group->outputs().size(); ++i) {
    Value* output = branch->addOutput()->setType(group->output(i)->type());
    group->output(i)->replaceAllUsesWith(output);
  }
  group->destroy();
  return true;
}

}  // namespace

Value* insertList(Graph& graph, const c10::TypePtr& element, const std::vector<Value*>& items) {
  return graph.insertNode(graph.createList(element, items))->output();
}

int fuseElementwise(std::shared_ptr<Graph>& graph, const Options& options) {
  // In-place ops (a ResNet's relu_ and residual add_) become functional where AliasDb proves no
  // one can observe the difference, so they can join groups.
  dropProfilesBetweenFusibleOps(graph->block());
  foldConstantIntLists(graph->block());
  torch::jit::RemoveTensorMutation(graph, [](Node* node) { return hasFusibleFunctionalForm(node); });
  std::vector<Node*> groups = GroupBuilder(graph).build();
  int created = 0;
  for (Node* group : groups) {
    if (countOps(*group->g(torch::jit::attr::Subgraph)) < options.min_group_size) {
      SubgraphUtils::unmergeSubgraph(group);
      continue;
    }
    if (!materialize(*graph, group, KernelOptions::from(options))) {
      SubgraphUtils::unmergeSubgraph(group);
      continue;
    }
    created++;
  }
  return created;
}

}  // namespace kiln
