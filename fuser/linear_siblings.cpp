// Sibling linears (TensorRT's horizontal fusion): kiln::linear calls in one block that read the
// same input with the same epilogue and no residual (a transformer's query, key and value
// projections) become one call over their weights stacked by rows; each takes its columns of the
// result as a slice, a view. One GEMM of 3N columns instead of three of N: in bf16 on AMX 1.1-1.2x
// faster at BERT's shapes (docs/library-calls.md). The call keeps the widths ("pieces") so that its
// "aten_pieces" way can still run separate GEMMs into the columns, and measuring keeps the faster.
//
// A slice is not contiguous: its rows are the whole result's apart. A linear joins only if every
// reader of its result takes any strides: ops that compute from it, `view`/`reshape` that only
// split its last dimension into constant sizes (BERT's heads), then permute/transpose/contiguous.
// A view that merges the last dimension with another, an op that writes into it, a graph output or
// control flow keeps that linear as it was. The joined call runs where the first sibling was, so
// siblings are joined only where nothing between them may write their input (AliasDb).
#include <torch/csrc/jit/ir/alias_analysis.h>

#include <map>
#include <tuple>

#include "fuser/fusion_pass.h"
#include "fuser/library_calls.h"

namespace kiln {
namespace {

using torch::jit::Node;
using torch::jit::Value;

bool isKind(const Node* node, const char* name) {
  return node->kind() == c10::Symbol::fromQualString(name);
}

// Whether an op only computes from its input `index`: it neither returns a view of it nor writes
// into it (so the input's strides are its own business).
bool onlyReads(const Node* user, size_t index) {
  const c10::FunctionSchema* schema = user->maybeSchema();
  if (schema == nullptr || index >= schema->arguments().size()) return false;
  for (const c10::Argument& result : schema->returns()) {
    if (result.alias_info() != nullptr) return false;
  }
  const c10::AliasInfo* argument = schema->arguments()[index].alias_info();
  return argument == nullptr || !argument->isWrite();
}

// A view's size list whose trailing constant sizes multiply to exactly `width`: it splits (or
// keeps) the last dimension and only regroups the ones before it, which a column slice allows.
bool splitsLastDimOnly(const Value* sizes, int64_t width) {
  std::vector<std::optional<int64_t>> entries;
  if (std::optional<c10::IValue> constant = torch::jit::toIValue(sizes)) {
    if (!constant->isIntList()) return false;
    for (int64_t size : constant->toIntVector()) entries.emplace_back(size);
  } else if (sizes->node()->kind() == torch::jit::prim::ListConstruct) {
    for (const Value* item : sizes->node()->inputs()) {
      std::optional<c10::IValue> size = torch::jit::toIValue(item);
      entries.push_back(size && size->isInt() ? std::optional<int64_t>(size->toInt())
                                              : std::nullopt);
    }
  } else {
    return false;
  }
  int64_t product = 1;
  for (auto it = entries.rbegin(); it != entries.rend() && product < width; ++it) {
    if (!*it || **it <= 0) return false;
    product *= **it;
  }
  return product == width;
}

// Whether every reader of `value` (a slice `width` columns wide, or a view of it; `split`: its
// last dimension was already split by a view) takes it with any strides.
bool readersTakeAnyStrides(const Value* value, int64_t width, bool split) {
  for (const torch::jit::Use& use : value->uses()) {
    const Node* user = use.user;
    if (user->owningBlock() != value->node()->owningBlock()) return false;
    if ((isKind(user, "aten::view") || isKind(user, "aten::reshape")) && use.offset == 0) {
      if (split || !splitsLastDimOnly(user->input(1), width) ||
          !readersTakeAnyStrides(user->output(), width, true))
        return false;
      continue;
    }
    if ((isKind(user, "aten::permute") || isKind(user, "aten::transpose")) && use.offset == 0) {
      if (!readersTakeAnyStrides(user->output(), width, split)) return false;
      continue;
    }
    if (isKind(user, "aten::contiguous") && use.offset == 0) continue;
    if (!onlyReads(user, use.offset)) return false;
  }
  return true;
}

std::optional<at::Tensor> constantTensor(const Value* value) {
  std::optional<c10::IValue> constant = torch::jit::toIValue(value);
  if (!constant || !constant->isTensor()) return std::nullopt;
  return constant->toTensor();
}

// A linear that may join its siblings: weight and bias constants, no residual, an epilogue of an
// activation only, every reader fine with a slice.
bool mayJoin(const Node* node) {
  if (!isKind(node, kLinearOp) || !node->input(3)->mustBeNone()) return false;
  std::optional<at::Tensor> weight = constantTensor(node->input(1));
  if (!weight || weight->dim() != 2 || weight->layout() != at::kStrided) return false;
  if (!node->input(2)->mustBeNone()) {
    std::optional<at::Tensor> bias = constantTensor(node->input(2));
    if (!bias || bias->dim() != 1 || bias->size(0) != weight->size(0) ||
        bias->scalar_type() != weight->scalar_type() || bias->device() != weight->device())
      return false;
  }
  std::optional<c10::IValue> text = torch::jit::toIValue(node->input(4));
  if (!text || !text->isString()) return false;
  std::optional<Epilogue> epilogue = Epilogue::parse(text->toStringRef());
  if (!epilogue || epilogue->add != Epilogue::Add::kNone || !epilogue->pieces.empty()) return false;
  return readersTakeAnyStrides(node->output(), weight->size(0), false);
}

// What siblings must share besides their input: the epilogue and the weight's K, dtype, device.
using SiblingKey = std::tuple<const Value*, std::string, int64_t, int, std::string>;

SiblingKey siblingKey(const Node* node) {
  const at::Tensor weight = *constantTensor(node->input(1));
  return {node->input(0), torch::jit::toIValue(node->input(4))->toStringRef(), weight.size(1),
          static_cast<int>(weight.scalar_type()), weight.device().str()};
}

void joinSiblings(torch::jit::Graph& graph, const std::vector<Node*>& siblings) {
  std::vector<at::Tensor> weights, biases;
  Epilogue epilogue = *Epilogue::parse(torch::jit::toIValue(siblings[0]->input(4))->toStringRef());
  bool any_bias = false;
  for (Node* node : siblings) any_bias = any_bias || !node->input(2)->mustBeNone();
  for (Node* node : siblings) {
    const at::Tensor weight = *constantTensor(node->input(1));
    weights.push_back(weight);
    epilogue.pieces.push_back(weight.size(0));
    if (any_bias) {
      biases.push_back(node->input(2)->mustBeNone() ? at::zeros({weight.size(0)}, weight.options())
                                                    : *constantTensor(node->input(2)));
    }
  }
  Node* first = siblings.front();
  torch::jit::WithInsertPoint before_first(first);
  Value* weight = graph.insertConstant(at::cat(weights, 0));
  Value* bias =
      any_bias ? graph.insertConstant(at::cat(biases, 0)) : graph.insertConstant(c10::IValue());
  Node* call = graph.create(c10::Symbol::fromQualString(kLinearOp),
                            {first->input(0), weight, bias, graph.insertConstant(c10::IValue()),
                             graph.insertConstant(epilogue.text())});
  call->output()->setType(c10::TensorType::get());
  call->insertBefore(first);
  int64_t start = 0;
  for (size_t i = 0; i < siblings.size(); ++i) {
    const int64_t width = epilogue.pieces[i];
    torch::jit::WithInsertPoint before_node(siblings[i]);
    Value* slice =
        graph.insert(torch::jit::aten::slice, {call->output(), -1, start, start + width, 1});
    // Not the linear's contiguous strides: the result's rows apart.
    slice->setType(c10::TensorType::get());
    siblings[i]->output()->replaceAllUsesWith(slice);
    start += width;
  }
  for (Node* node : siblings) node->destroy();
}

// The sibling groups of a block and the blocks inside it, in block order. A group is split where
// a node between two of its linears may write the input they share: the joined call runs where
// the first one was, so each must see the input as the first does.
void collectGroups(torch::jit::AliasDb& alias_db, torch::jit::Block* block,
                   std::vector<std::vector<Node*>>& runs) {
  std::map<SiblingKey, std::vector<Node*>> groups;
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) collectGroups(alias_db, inner, runs);
    if (mayJoin(node)) groups[siblingKey(node)].push_back(node);
  }
  for (auto& [key, siblings] : groups) {
    std::vector<Node*> run = {siblings[0]};
    const torch::jit::ValueSet input = {siblings[0]->input(0)};
    for (size_t i = 1; i < siblings.size(); ++i) {
      bool written = false;
      for (Node* between = siblings[i - 1]->next(); between != siblings[i] && !written;
           between = between->next())
        written = alias_db.writesToAlias(between, input);
      if (written) {
        if (run.size() > 1) runs.push_back(run);
        run.clear();
      }
      run.push_back(siblings[i]);
    }
    if (run.size() > 1) runs.push_back(run);
  }
}

}  // namespace

int joinSiblingLinears(std::shared_ptr<torch::jit::Graph>& graph) {
  std::vector<std::vector<Node*>> runs;
  {
    torch::jit::AliasDb alias_db(graph);
    collectGroups(alias_db, graph->block(), runs);
  }
  int joined = 0;
  for (const std::vector<Node*>& siblings : runs) {
    joinSiblings(*graph, siblings);
    joined += static_cast<int>(siblings.size());
  }
  // The siblings' own weight constants are dead now; kiln::optimize removes dead constants last.
  return joined;
}

}  // namespace kiln
