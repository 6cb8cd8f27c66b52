// Reduced precision (docs/precision.md): a frozen float32 graph made to run in bfloat16 or float16.
//
// - Every float32 constant (weights, biases, norm parameters, buffers) is converted once.
// - Each floating input is cast on entry, and each tensor output (also inside a returned tuple) is
//   cast back to float32, by kiln::cast_floating(x, from, to), which converts only tensors of
//   dtype `from`: token ids, masks of bool and float64 tensors pass unchanged.
// - The input and the residual of every GEMM / convolution library call are cast to the low
//   dtype (a no-op when they already are): an op the model wrote in float32 on purpose (an
//   explicit upcast, say T5's norm) stays float32 until the next GEMM, whose weight is low.
// - Everything else runs as eager runs it on these dtypes, as `model.bfloat16()` would: softmax,
//   layer_norm and kiln's row kernels accumulate in float32 internally.
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

void convertConstants(Graph& graph, torch::jit::Block* block, at::ScalarType low) {
  for (auto it = block->nodes().begin(); it != block->nodes().end(); ++it) {
    Node* node = *it;
    for (torch::jit::Block* inner : node->blocks()) convertConstants(graph, inner, low);
    if (node->kind() != torch::jit::prim::Constant || !isTensor(node->output())) continue;
    std::optional<c10::IValue> value = torch::jit::toIValue(node->output());
    if (!value || !value->isTensor() || value->toTensor().scalar_type() != at::kFloat) continue;
    torch::jit::WithInsertPoint here(node);
    Value* converted = graph.insertConstant(value->toTensor().to(low));
    converted->copyMetadata(node->output());
    converted->setType(c10::TensorType::create(value->toTensor().to(low)));
    node->output()->replaceAllUsesWith(converted);
  }
}

void castLibraryOperands(Graph& graph, torch::jit::Block* block, at::ScalarType low) {
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) castLibraryOperands(graph, inner, low);
    const std::string kind = node->kind().toQualString();
    if (kind != kLinearOp && kind != kConv2dOp) continue;
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
