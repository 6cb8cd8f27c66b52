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
#include <cmath>
#include <limits>

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

void convertConstants(Graph& graph, torch::jit::Block* block, at::ScalarType low) {
  for (auto it = block->nodes().begin(); it != block->nodes().end(); ++it) {
    Node* node = *it;
    for (torch::jit::Block* inner : node->blocks()) convertConstants(graph, inner, low);
    if (node->kind() != torch::jit::prim::Constant) continue;
    std::optional<c10::IValue> value = torch::jit::toIValue(node->output());
    if (value && value->isDouble() && std::isfinite(value->toDouble()) && nearFloat32Extreme(value->toDouble())) {
      torch::jit::WithInsertPoint here(node);
      node->output()->replaceAllUsesWith(graph.insertConstant(std::copysign(largestFinite(low), value->toDouble())));
      continue;
    }
    if (!isTensor(node->output()) || !value || !value->isTensor() || value->toTensor().scalar_type() != at::kFloat) continue;
    torch::jit::WithInsertPoint here(node);
    const at::Tensor low_value = toLow(value->toTensor(), low);
    Value* converted = graph.insertConstant(low_value);
    converted->copyMetadata(node->output());
    converted->setType(c10::TensorType::create(low_value));
    node->output()->replaceAllUsesWith(converted);
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

void convertDtypeArguments(Graph& graph, torch::jit::Block* block, at::ScalarType low) {
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) convertDtypeArguments(graph, inner, low);
    const c10::FunctionSchema* schema = node->maybeSchema();
    if (schema == nullptr) continue;
    for (size_t i = 0; i < node->inputs().size() && i < schema->arguments().size(); ++i) {
      if (!isDtypeArgument(schema->arguments()[i])) continue;
      std::optional<c10::IValue> value = torch::jit::toIValue(node->input(i));
      if (!value || !value->isInt() || value->toInt() != static_cast<int64_t>(at::kFloat)) continue;
      torch::jit::WithInsertPoint here(node);
      node->replaceInput(i, graph.insertConstant(static_cast<int64_t>(low)));
    }
  }
}

void castLibraryOperands(Graph& graph, torch::jit::Block* block, at::ScalarType low) {
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) castLibraryOperands(graph, inner, low);
    const std::string kind = node->kind().toQualString();
    if (kind != kLinearOp && kind != kConv2dOp && kind != kConv2dIntoOtherOp) continue;
    torch::jit::WithInsertPoint here(node);
    node->replaceInput(0, castFloating(graph, node->input(0), at::kFloat, low));
    if (!node->input(3)->mustBeNone()) node->replaceInput(3, castFloating(graph, node->input(3), at::kFloat, low));
  }
}

}  // namespace

int convertPrecision(std::shared_ptr<Graph>& graph, Precision precision) {
  if (precision == Precision::kFloat32) return 0;
  const at::ScalarType low = precision == Precision::kBFloat16 ? at::kBFloat16 : at::kHalf;
  convertConstants(*graph, graph->block(), low);
  convertDtypeArguments(*graph, graph->block(), low);
  castLibraryOperands(*graph, graph->block(), low);
  int casts = 0;
  // Inputs: cast once, where the graph starts.
  {
    torch::jit::WithInsertPoint start(graph->block()->param_node()->next());
    for (Value* input : graph->inputs()) {
      if (!isTensor(input) || input->uses().empty()) continue;
      Value* cast = castFloating(*graph, input, at::kFloat, low);
      input->replaceAllUsesAfterNodeWith(cast->node(), cast);
      casts++;
    }
  }
  // Outputs, and the tensors of a returned tuple, back to float32.
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
