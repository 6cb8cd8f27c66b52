// Reduced precision (docs/precision.md): a frozen float32 graph made to run in bfloat16 or float16.
//
// - Every float32 constant (weights, biases, norm parameters, buffers) is converted once; float
//   constants beyond the low dtype's range (finfo(float32).min as a mask's fill) become its
//   largest finite value.
// - Each floating input is cast on entry, and each tensor output (also inside a returned tuple) is
//   cast back to float32, by kiln::cast_floating(x, from, to), which converts only tensors of
//   dtype `from`: token ids, masks of bool and float64 tensors pass unchanged.
// - Every dtype argument naming float32 (factories, `to`, softmax's dtype) names the low dtype,
//   as if the model had been traced after `model.bfloat16()`.
// - The input and the residual of every GEMM / convolution library call are cast to the low
//   dtype (a no-op when they already are).
// - Everything else runs as eager runs it on these dtypes, as `model.bfloat16()` would: softmax,
//   layer_norm and kiln's row kernels accumulate in float32 internally.
#include <algorithm>
#include <cmath>
#include <limits>
#include <unordered_map>
#include <vector>

#include "fuser/fusion_pass.h"
#include "fuser/library_calls.h"

namespace kiln {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

Value* castFloating(Graph& graph, Value* value, at::ScalarType from, at::ScalarType to) {
  Value* cast = graph.insert(c10::Symbol::fromQualString(kCastFloatingOp),
                             {value, graph.insertConstant(static_cast<int64_t>(from)),
                              graph.insertConstant(static_cast<int64_t>(to))});
  cast->setType(c10::TensorType::get());
  return cast;
}

bool isTensor(const Value* value) { return value->type()->kind() == c10::TypeKind::TensorType; }

double largestFinite(at::ScalarType low) {
  return low == at::kBFloat16 ? static_cast<double>(std::numeric_limits<c10::BFloat16>::max())
                              : static_cast<double>(std::numeric_limits<c10::Half>::max());
}

// float32's extremes (finfo(float32).min/max, ~3.4e38, as a mask's fill) become the low dtype's
// largest finite value: what the model would have traced after model.bfloat16(); converted as
// they are they overflow (an error in masked_fill, -inf in a tensor). Other large values are left
// as they are (a divisor of 1e5 in float16 stays 1e5).
bool nearFloat32Extreme(double value) { return std::abs(value) >= 1e38; }

at::Tensor toLow(const at::Tensor& tensor, at::ScalarType low) {
  const double limit = largestFinite(low);
  const at::Tensor extreme = tensor.isfinite() & (tensor.abs() >= 1e38);
  return at::where(extreme, tensor.sign() * limit, tensor).to(low);
}

// Where the float32 part ends (Options::min_cosine, precision_search.cpp): the graph's top-level
// ops other than constants, numbered in order; those numbered below `cut` keep float32 (they are
// the model's own ops on its own float32 values), the rest run in the low dtype.
class Regions {
 public:
  Regions(const Graph& graph, int64_t cut) : top_(graph.block()), cut_(cut) {
    for (const Node* node : graph.nodes()) {
      if (node->kind() != torch::jit::prim::Constant) position_[node] = count_++;
    }
  }
  // True for a node whose top-level op runs in the low dtype (the return node is neither part).
  bool low(const Node* node) const { return position(node) >= cut_; }
  // The number of the top-level op that `node` is or is inside; -1 for constants, the return
  // node and nodes inserted since.
  int64_t position(const Node* node) const {
    while (node->owningBlock() != top_) node = node->owningBlock()->owningNode();
    auto found = position_.find(node);
    return found == position_.end() ? -1 : found->second;
  }
  bool anyLow(const Value* value) const {
    for (const torch::jit::Use& use : value->uses()) {
      if (low(use.user)) return true;
    }
    return false;
  }
  // Points the low part's uses of `value` at `replacement`.
  void replaceLowUses(Value* value, Value* replacement) const {
    const std::vector<torch::jit::Use> uses = value->uses();
    for (const torch::jit::Use& use : uses) {
      if (low(use.user) && use.user != replacement->node()) use.user->replaceInput(use.offset, replacement);
    }
  }
  // The first top-level op of the low part: where values of the float32 part are cast.
  Node* firstLow() const {
    for (const auto& [node, position] : position_) {
      if (position == cut_) return const_cast<Node*>(node);
    }
    return nullptr;
  }
  int64_t count() const { return count_; }

 private:
  const torch::jit::Block* top_;
  int64_t cut_;
  int64_t count_ = 0;
  std::unordered_map<const Node*, int64_t> position_;
};

void convertConstants(Graph& graph, torch::jit::Block* block, at::ScalarType low, const Regions& regions) {
  for (auto it = block->nodes().begin(); it != block->nodes().end(); ++it) {
    Node* node = *it;
    for (torch::jit::Block* inner : node->blocks()) convertConstants(graph, inner, low, regions);
    if (node->kind() != torch::jit::prim::Constant || !regions.anyLow(node->output())) continue;
    std::optional<c10::IValue> value = torch::jit::toIValue(node->output());
    if (value && value->isDouble() && std::isfinite(value->toDouble()) && nearFloat32Extreme(value->toDouble())) {
      torch::jit::WithInsertPoint here(node);
      regions.replaceLowUses(node->output(), graph.insertConstant(std::copysign(largestFinite(low), value->toDouble())));
      continue;
    }
    if (value && value->isTensorList()) {
      // An RNN's weights, frozen as one list (aten::lstm, aten::gru): each float32 one converted.
      c10::List<at::Tensor> converted;
      bool any = false;
      for (const at::Tensor& tensor : value->toTensorList().vec()) {
        const bool float32 = tensor.defined() && tensor.scalar_type() == at::kFloat;
        converted.push_back(float32 ? toLow(tensor, low) : tensor);
        any |= float32;
      }
      if (!any) continue;
      torch::jit::WithInsertPoint here(node);
      Value* list = graph.insertConstant(converted);
      list->copyMetadata(node->output());
      regions.replaceLowUses(node->output(), list);
      continue;
    }
    if (!isTensor(node->output()) || !value || !value->isTensor() || value->toTensor().scalar_type() != at::kFloat) continue;
    torch::jit::WithInsertPoint here(node);
    const at::Tensor low_value = toLow(value->toTensor(), low);
    Value* converted = graph.insertConstant(low_value);
    converted->copyMetadata(node->output());
    converted->setType(c10::TensorType::create(low_value));
    regions.replaceLowUses(node->output(), converted);
  }
}

// A dtype argument that names float32 (a factory's `dtype=`, `to(float32)`, softmax's upcast):
// the model's own float32, which `model.bfloat16()` would have traced as the low dtype. Made low,
// so that the tensors it makes meet the converted weights in one dtype (GPT-2's mask fill, T5's
// norm) rather than failing on a mixed-dtype matmul or layer_norm.
bool isDtypeArgument(const c10::Argument& argument) {
  c10::TypePtr type = argument.type();
  if (auto optional = type->cast<c10::OptionalType>()) type = optional->getElementType();
  return type->kind() == c10::TypeKind::ScalarTypeType ||
         (argument.name() == "dtype" && type->kind() == c10::TypeKind::IntType);
}

void convertDtypeArguments(Graph& graph, torch::jit::Block* block, at::ScalarType low, const Regions& regions) {
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) convertDtypeArguments(graph, inner, low, regions);
    const c10::FunctionSchema* schema = node->maybeSchema();
    if (schema == nullptr || !regions.low(node)) continue;
    for (size_t i = 0; i < node->inputs().size() && i < schema->arguments().size(); ++i) {
      if (!isDtypeArgument(schema->arguments()[i])) continue;
      std::optional<c10::IValue> value = torch::jit::toIValue(node->input(i));
      if (!value || !value->isInt() || value->toInt() != static_cast<int64_t>(at::kFloat)) continue;
      torch::jit::WithInsertPoint here(node);
      node->replaceInput(i, graph.insertConstant(static_cast<int64_t>(low)));
    }
  }
}

void castLibraryOperands(Graph& graph, torch::jit::Block* block, at::ScalarType low, const Regions& regions) {
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) castLibraryOperands(graph, inner, low, regions);
    const std::string kind = node->kind().toQualString();
    if (kind != kLinearOp && kind != kConv2dOp && kind != kConv2dIntoOtherOp) continue;
    if (!regions.low(node)) continue;
    torch::jit::WithInsertPoint here(node);
    node->replaceInput(0, castFloating(graph, node->input(0), at::kFloat, low));
    if (!node->input(3)->mustBeNone()) node->replaceInput(3, castFloating(graph, node->input(3), at::kFloat, low));
  }
}

bool holdsTensor(const c10::TypePtr& type) {
  if (type->kind() == c10::TypeKind::TensorType) return true;
  for (const c10::TypePtr& inner : type->containedTypes()) {
    if (holdsTensor(inner)) return true;
  }
  return false;
}

// The values the float32 part (or the caller) hands to the low part: module inputs and results of
// the first `cut` ops that an op at or after the cut reads.
std::vector<Value*> crossingValues(Graph& graph, const Regions& regions, int64_t cut) {
  std::vector<Value*> crossing;
  auto consider = [&](Value* value) {
    if (regions.anyLow(value)) crossing.push_back(value);
  };
  for (Value* input : graph.inputs()) consider(input);
  int64_t position = 0;
  for (Node* node : graph.nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    if (position++ >= cut) break;
    for (Value* output : node->outputs()) consider(output);
  }
  return crossing;
}

}  // namespace

std::vector<int64_t> precisionCuts(const Graph& graph) {
  // A tensor is cast where it crosses a cut; a module (`self`) or a plain value (int, float, bool,
  // string, None, device) crosses as it is; a list, tuple or optional holding tensors cannot, so
  // no cut falls between where such a value is made and where it is last read.
  const Regions regions(graph, 0);
  std::vector<bool> blocked(regions.count() + 1, false);
  auto block_span = [&](const Value* value, int64_t defined_at) {
    const c10::TypePtr& type = value->type();
    if (type->kind() == c10::TypeKind::TensorType || type->kind() == c10::TypeKind::ClassType || !holdsTensor(type)) return;
    int64_t last_read = -1;
    for (const torch::jit::Use& use : value->uses()) last_read = std::max(last_read, regions.position(use.user));
    for (int64_t cut = defined_at + 1; cut <= last_read; ++cut) blocked[cut] = true;
  };
  for (const Value* input : graph.inputs()) block_span(input, -1);
  for (const Node* node : graph.nodes()) {
    const int64_t at = regions.position(node);
    if (at < 0) continue;
    for (const Value* output : node->outputs()) block_span(output, at);
  }
  std::vector<int64_t> cuts;
  for (int64_t cut = 0; cut <= regions.count(); ++cut) {
    if (!blocked[cut]) cuts.push_back(cut);
  }
  return cuts;
}

int64_t precisionOpCount(const Graph& graph) { return Regions(graph, 0).count(); }

int convertPrecision(std::shared_ptr<Graph>& graph, Precision precision, int64_t float32_ops) {
  if (precision == Precision::kFloat32) return 0;
  const at::ScalarType low = precision == Precision::kBFloat16 ? at::kBFloat16 : at::kHalf;
  const Regions regions(*graph, float32_ops);
  Node* first_low = regions.firstLow();
  if (first_low == nullptr) return 0;  // every op keeps float32
  int casts = 0;
  // What crosses into the low part (the module's inputs, and the float32 part's results): cast
  // once, where the low part starts. Integer, bool and float64 tensors pass unchanged.
  for (Value* value : crossingValues(*graph, regions, float32_ops)) {
    if (!isTensor(value)) continue;
    torch::jit::WithInsertPoint start(first_low);
    Value* cast = castFloating(*graph, value, at::kFloat, low);
    regions.replaceLowUses(value, cast);
    casts++;
  }
  convertConstants(*graph, graph->block(), low, regions);
  convertDtypeArguments(*graph, graph->block(), low, regions);
  castLibraryOperands(*graph, graph->block(), low, regions);
  // Outputs, and the tensors of a returned tuple, back to float32 (those of the float32 part pass
  // unchanged).
  Node* ret = graph->return_node();
  for (size_t i = 0; i < ret->inputs().size(); ++i) {
    Value* output = ret->input(i);
    if (isTensor(output)) {
      torch::jit::WithInsertPoint end(ret);
      ret->replaceInput(i, castFloating(*graph, output, low, at::kFloat));
      casts++;
      continue;
    }
    Node* tuple = output->node();
    if (tuple->kind() != torch::jit::prim::TupleConstruct || output->uses().size() != 1) continue;
    torch::jit::WithInsertPoint before_tuple(tuple);
    for (size_t j = 0; j < tuple->inputs().size(); ++j) {
      if (!isTensor(tuple->input(j))) continue;
      tuple->replaceInput(j, castFloating(*graph, tuple->input(j), low, at::kFloat));
      casts++;
    }
  }
  return casts;
}

}  // namespace kiln
