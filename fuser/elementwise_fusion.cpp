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
#include <unordered_map>
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
        // A normalized_shape list joins its normalization's group; it never starts one.
        if (!canFuse(node) || isRowLengthList(node)) {
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
      if (!rowSpacesAgree(group, producer)) continue;
      if (!alias_db_.moveBeforeTopologicallyValid(producer, group)) continue;
      SubgraphUtils::mergeNodeIntoSubgraphAndUpdateAliasing(producer, group, alias_db_);
      building_.erase(producer);
      return {group->reverseIterator(), true};
    }
    return {++group->reverseIterator(), false};
  }

  // A group's kernel has one row: its iteration space's innermost dimension. Every row op in it
  // (reductions, softmax, layer_norm, …) must reduce a value computed from some of the same
  // inputs, and a per-row value may meet only per-element values computed from the inputs its
  // rows came from: `norm(h) + x.sum(-1, keepdim=True)` with h [8, 64] and x [8, 32] would make
  // a group whose sum never spans the kernel's row (the runtime would send it to its fallback on
  // every call). Checked before `producer` joins `group`, on the values of both, in terms of the
  // outer graph's values each depends on.
  static bool rowSpacesAgree(Node* group, Node* producer) {
    RowSpaces spaces;
    std::unordered_map<const Value*, const Value*> outer_of;  // a subgraph input → its outer value
    if (producer->kind() == kBuildingGroup) {
      spaces.walk(*producer->g(torch::jit::attr::Subgraph), producer->inputs());
      const auto& inner_outputs = producer->g(torch::jit::attr::Subgraph)->outputs();
      for (size_t i = 0; i < producer->outputs().size(); ++i) spaces.alias(producer->output(i), inner_outputs[i]);
    } else {
      spaces.visit(producer);
    }
    spaces.walk(*group->g(torch::jit::attr::Subgraph), group->inputs());
    return spaces.agree;
  }

  struct RowSpaces {
    using Deps = std::unordered_set<const Value*>;
    std::unordered_map<const Value*, Deps> deps;      // the outer values a value is computed from
    std::unordered_map<const Value*, Deps> row_deps;  // for a per-row value: what its rows reduced
    std::vector<Deps> reduced;                        // per row op: what it reduces
    bool agree = true;

    static bool meet(const Deps& a, const Deps& b) {
      for (const Value* v : a) {
        if (b.count(v)) return true;
      }
      return false;
    }
    const Deps& of(const Value* value) {
      auto found = deps.find(value);
      if (found == deps.end()) found = deps.emplace(value, Deps{value}).first;  // an outer value
      return found->second;
    }
    void alias(const Value* to, const Value* from) {
      deps[to] = of(from);
      if (row_deps.count(from)) row_deps[to] = row_deps[from];
    }
    // Walks `graph` with its inputs standing for `outer`.
    void walk(const Graph& graph, at::ArrayRef<Value*> outer) {
      for (size_t i = 0; i < outer.size(); ++i) alias(graph.inputs()[i], outer[i]);
      for (const Node* node : graph.nodes()) visit(node);
    }
    void visit(const Node* node) {
      if (node->kind() == torch::jit::prim::Constant) {
        deps[node->output()] = {};
        return;
      }
      Deps all, rows;
      bool element = false, per_row = false;
      std::vector<const Deps*> element_deps;
      for (const Value* input : node->inputs()) {
        const Deps& d = of(input);
        all.insert(d.begin(), d.end());
        if (input->type()->kind() != c10::TypeKind::TensorType || d.empty() || isZeroDim(input)) continue;
        if (auto found = row_deps.find(input); found != row_deps.end()) {
          per_row = true;
          rows.insert(found->second.begin(), found->second.end());
        } else {
          element = true;
          element_deps.push_back(&d);
        }
      }
      for (const Value* output : node->outputs()) deps[output] = all;
      if (isRowReduction(node)) {
        const Deps& operand = of(node->input(0));
        for (const Deps& other : reduced) agree = agree && meet(operand, other);
        reduced.push_back(operand);
        if (keepsRow(node)) row_deps[node->output()] = operand;
        return;
      }
      if (per_row && element) {
        for (const Deps* d : element_deps) agree = agree && meet(*d, rows);
      } else if (per_row) {
        for (const Value* output : node->outputs()) row_deps[output] = rows;
      }
    }
    // A tensor the profile says is 0-dim broadcasts to any shape and changes none.
    static bool isZeroDim(const Value* value) {
      std::optional<size_t> rank = value->type()->expect<c10::TensorType>()->dim();
      return rank && *rank == 0;
    }
    // A reduction's result is per row (sum, mean, …); softmax's and layer_norm's are per element.
    static bool keepsRow(const Node* node) {
      const std::string name = node->kind().toQualString();
      return name != "aten::softmax" && name != "aten::log_softmax" && name != "aten::layer_norm" &&
             name != "aten::rms_norm";
    }
  };

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
    // The record stays on the value: a pass after kiln's (the oneDNN Graph fuser reads every
    // binary op's dtype) finds it there where the ops stay unfused, as it would have found it on
    // the profile (the executor moves each profile's type to its value before its fusers).
    if (node->hasAttribute(torch::jit::attr::profiled_type)) {
      const c10::TypePtr profiled = node->ty(torch::jit::attr::profiled_type);
      const auto current = node->input(0)->type()->cast<c10::TensorType>();
      if (current && profiled->cast<c10::TensorType>() && !current->scalarType()) node->input(0)->setType(profiled);
    }
    node->output()->replaceAllUsesWith(node->input(0));
    node->destroy();
  }
}

// A reduction's dims and layer_norm's normalized_shape are often built in the graph
// (prim::ListConstruct of ints, as scripting writes `[768]` or `[self.hidden_size]`). Built from
// constants, the list becomes one constant, so the op can join a group (whose code holds
// constants, never lists built at run time); built from an int, each op gets a list of its own,
// which can join that op's group (one list shared by two layer_norms would otherwise leave
// one group as an output and enter the other as an input, and no group takes lists).
void prepareRowLists(Block* block) {
  for (Node* node : block->nodes()) {
    for (Block* inner : node->blocks()) prepareRowLists(inner);
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
      torch::jit::WithInsertPoint insert_point(node);
      if (items.size() == list->inputs().size()) {
        node->replaceInput(i, block->owningGraph()->insertConstant(items));
      } else if (list->output()->uses().size() > 1) {
        Node* copy = block->owningGraph()->insertNode(block->owningGraph()->createClone(list, [](Value* v) { return v; }));
        node->replaceInput(i, copy->output());
      }
    }
  }
}

int countOps(const Graph& subgraph) {
  int count = 0;
  for (const Node* node : subgraph.nodes()) {
    count += node->kind() != torch::jit::prim::Constant && node->kind() != torch::jit::prim::ListConstruct;
  }
  return count;
}

// Orders a group's inputs by their first use in its subgraph: a module's weights then take the
// same places whether they come as attributes (a scripted module run as it is) or as constants
// lifted out of the group (a frozen one), and both get the same kernel.
void putInputsInOrderOfUse(Graph& subgraph, Node* group) {
  std::vector<std::pair<std::pair<size_t, size_t>, size_t>> first_use;  // ((node, offset), input)
  std::unordered_map<const Node*, size_t> position;
  for (Node* node : subgraph.nodes()) position.emplace(node, position.size());
  for (size_t i = 0; i < subgraph.inputs().size(); ++i) {
    std::pair<size_t, size_t> earliest{position.size(), 0};
    for (const torch::jit::Use& use : subgraph.inputs()[i]->uses()) {
      auto found = position.find(use.user);
      const size_t at = found == position.end() ? position.size() : found->second;  // the return node
      earliest = std::min(earliest, std::pair<size_t, size_t>{at, use.offset});
    }
    first_use.push_back({earliest, i});
  }
  std::stable_sort(first_use.begin(), first_use.end());
  std::vector<size_t> order;
  for (const auto& entry : first_use) order.push_back(entry.second);
  subgraph.block()->permuteInputs(order);
  group->permuteInputs(order);
}

// Replaces a built group by guard + If(fused, fallback); false (the group left as it is) when
// its subgraph has no group code.
bool materialize(Graph& graph, Node* group, const KernelOptions& options) {
  std::shared_ptr<Graph> subgraph = group->g(torch::jit::attr::Subgraph);
  torch::jit::WithInsertPoint insert_point(group);
  // Tensor constants (a frozen module's weights) are not part of the group's code: lift them out
  // as inputs. One that stands for a Python number (a traced `x * 0.5`) is marked as such in the
  // code, which keeps the mark through torch.jit.save (the tensor's own is lost).
  std::unordered_set<const Value*> numbers;
  for (auto it = subgraph->nodes().begin(); it != subgraph->nodes().end();) {
    Node* node = *it++;
    if (node->kind() != torch::jit::prim::Constant || node->output()->type()->kind() != c10::TypeKind::TensorType) continue;
    const c10::IValue constant = *torch::jit::toIValue(node->output());
    group->addInput(graph.insertConstant(constant));
    Value* inner = subgraph->addInput()->setType(c10::TensorType::get());
    if (constant.toTensor().unsafeGetTensorImpl()->is_wrapped_number()) numbers.insert(inner);
    node->output()->replaceAllUsesWith(inner);
    node->destroy();
  }
  putInputsInOrderOfUse(*subgraph, group);
  std::vector<bool> number_inputs;
  for (const Value* input : subgraph->inputs()) number_inputs.push_back(numbers.count(input) > 0);
  std::string why;
  std::optional<std::string> text = encodeGroupCode(*subgraph, options, &why, number_inputs);
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
  prepareRowLists(graph->block());
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
