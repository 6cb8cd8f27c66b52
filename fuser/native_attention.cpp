// nn.MultiheadAttention's fast path, aten::_native_multi_head_attention, as the ops it stands for
// (kiln::optimize, frozen graphs), and nn.TransformerEncoderLayer's, which holds it (below):
// torchvision's ViT and every eval-mode self-attention through nn.MultiheadAttention reach it,
// and neither torch's fusers nor kiln's passes see inside it. As ops, its two projections become
// library calls (kiln::linear: oneDNN's prepacked weights or ATen's, measured) and its attention
// kiln's (attention_fusion.cpp), which stores the result heads-last so that the merge of the heads
// copies nothing:
//
//   %out, %weights = aten::_native_multi_head_attention(%x, %x, %x, E, H, %w_qkv, %b_qkv, %w_o, %b_o,
//                                                       None, need_weights, average, None)
// becomes
//   %b, %s, %e = prim::ListUnpack(aten::size(%x))            (a query not 3-D raises here)
//   %qkv = aten::linear(%x, %w_qkv, %b_qkv)                  [B, S, 3E]
//   %q = aten::slice(%qkv, -1, 0, E) ... %k, %v              [B, S, E] each
//   %q4 = aten::transpose(aten::view(%q, [%b, %s, H, E/H]), 1, 2) ...
//   %y = aten::scaled_dot_product_attention(%q4, %k4, %v4, None, 0., False, None, False)
//   %out = aten::linear(aten::reshape(aten::transpose(%y, 1, 2), [%b, %s, E]), %w_o, %b_o)
//
// the sequence ATen's own CUDA path and SDPA-based implementations follow (its CPU path prescales
// the queries before one bmm; float32 results agree to rounding). Only self-attention (one value
// for query, key and value) without a mask, with the attention weights unread, over constant
// weights of the shapes E and H imply; anything else is left as it is.
#include <torch/csrc/jit/ir/ir.h>

#include "fuser/fusion_pass.h"

namespace kiln {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

c10::Symbol op(const char* name) { return c10::Symbol::fromQualString(name); }

std::optional<at::Tensor> constantTensor(Value* value) {
  if (value->node()->kind() != torch::jit::prim::Constant) return std::nullopt;
  std::optional<c10::IValue> known = torch::jit::toIValue(value);
  if (!known || !known->isTensor()) return std::nullopt;
  return known->toTensor();
}

std::optional<int64_t> constantInt(Value* value) {
  std::optional<c10::IValue> known = torch::jit::toIValue(value);
  if (!known || !known->isInt()) return std::nullopt;
  return known->toInt();
}

// The embedding width and head count (inputs `embed_at` and `embed_at` + 1, constants that divide)
// when the attention's weights (the four inputs from `weights_at`: qkv weight and bias, projection
// weight and bias) are constants of the shapes they imply.
std::optional<std::pair<int64_t, int64_t>> attentionShape(const Node* node, size_t embed_at, size_t weights_at) {
  std::optional<int64_t> embed = constantInt(node->input(embed_at)), heads = constantInt(node->input(embed_at + 1));
  if (!embed || !heads || *embed <= 0 || *heads <= 0 || *embed % *heads != 0) return std::nullopt;
  const int64_t e = *embed;
  const std::vector<std::vector<int64_t>> expected = {{3 * e, e}, {3 * e}, {e, e}, {e}};
  for (size_t i = 0; i < expected.size(); ++i) {
    std::optional<at::Tensor> weight = constantTensor(node->input(weights_at + i));
    if (!weight || weight->sizes() != at::IntArrayRef(expected[i])) return std::nullopt;
  }
  return std::make_pair(e, *heads);
}

// The embedding width and head count when `node` is a call this pass replaces.
std::optional<std::pair<int64_t, int64_t>> replaceable(const Node* node) {
  if (!node->matches("aten::_native_multi_head_attention(Tensor query, Tensor key, Tensor value, int embed_dim, "
                     "int num_head, Tensor qkv_weight, Tensor qkv_bias, Tensor proj_weight, Tensor proj_bias, "
                     "Tensor? mask=None, bool need_weights=True, bool average_attn_weights=True, "
                     "int? mask_type=None) -> (Tensor, Tensor)"))
    return std::nullopt;
  if (node->input(0) != node->input(1) || node->input(1) != node->input(2)) return std::nullopt;
  if (!node->input(9)->mustBeNone() || node->output(1)->hasUses()) return std::nullopt;
  return attentionShape(node, 3, 5);
}

// Emits the self-attention of `x` (before the insertion point) and returns its result.
Value* selfAttention(Graph& graph, Value* x, int64_t embed, int64_t heads, Value* qkv_weight, Value* qkv_bias,
                     Value* proj_weight, Value* proj_bias) {
  auto constant = [&](const c10::IValue& value) { return graph.insertConstant(value); };
  Value* sizes = graph.insert(op("aten::size"), {x});
  Node* unpack = graph.insertNode(graph.createListUnpack(sizes, 3));
  Value* batch = unpack->output(0);
  Value* sequence = unpack->output(1);
  Value* qkv = graph.insert(op("aten::linear"), {x, qkv_weight, qkv_bias});
  const int64_t head_dim = embed / heads;
  Value* head_sizes = graph.insertNode(graph.createList(c10::IntType::get(), {batch, sequence, constant(heads),
                                                                             constant(head_dim)}))
                          ->output();
  std::vector<Value*> parts;
  for (int64_t i = 0; i < 3; ++i) {
    Value* part = graph.insert(op("aten::slice"), {qkv, constant(int64_t{-1}), constant(i * embed),
                                                   constant((i + 1) * embed), constant(int64_t{1})});
    Value* split = graph.insert(op("aten::view"), {part, head_sizes});
    parts.push_back(graph.insert(op("aten::transpose"), {split, constant(int64_t{1}), constant(int64_t{2})}));
  }
  Value* none = graph.insertNode(graph.createNone())->output();
  // As TorchScript records the call: every argument positional (scale and enable_gqa are
  // keyword-only in the schema, which Graph::insert would insist on).
  Node* sdpa = graph.create(op("aten::scaled_dot_product_attention"),
                            {parts[0], parts[1], parts[2], none, constant(0.0), constant(false), none, constant(false)});
  graph.insertNode(sdpa)->output()->setType(c10::TensorType::get());
  Value* merged_sizes =
      graph.insertNode(graph.createList(c10::IntType::get(), {batch, sequence, constant(embed)}))->output();
  Value* merged = graph.insert(op("aten::reshape"),
                               {graph.insert(op("aten::transpose"), {sdpa->output(), constant(int64_t{1}), constant(int64_t{2})}),
                                merged_sizes});
  return graph.insert(op("aten::linear"), {merged, proj_weight, proj_bias});
}

// What the replaced node's source location, scope and call stack were, on every node made for it.
void replaceWith(Node* node, Value* result, Node* first) {
  for (Node* made = first; made != node; made = made->next()) made->copyMetadata(node);
  node->output(0)->replaceAllUsesWith(result);
  node->destroy();
}

void replace(Graph& graph, Node* node, int64_t embed, int64_t heads) {
  torch::jit::WithInsertPoint here(node);
  Node* first = node->prev();
  Value* out = selfAttention(graph, node->input(0), embed, heads, node->input(5), node->input(6), node->input(7),
                             node->input(8));
  replaceWith(node, out, first->next());
}

// nn.TransformerEncoderLayer's fast path, aten::_transformer_encoder_layer_fwd: with norm_first,
//   x = src + attention(norm1(src));  x = x + ffn(norm2(x))
// else
//   x = norm1(src + attention(src));  x = norm2(x + ffn(x))
// ffn(y) = linear2(activation(linear1(y))), gelu or relu; no mask. Its width and head count from
// its weights, as for the attention alone.
std::optional<std::pair<int64_t, int64_t>> replaceableLayer(const Node* node) {
  if (!node->matches("aten::_transformer_encoder_layer_fwd(Tensor src, int embed_dim, int num_heads, "
                     "Tensor qkv_weight, Tensor qkv_bias, Tensor proj_weight, Tensor proj_bias, bool use_gelu, "
                     "bool norm_first, float eps, Tensor norm_weight_1, Tensor norm_bias_1, Tensor norm_weight_2, "
                     "Tensor norm_bias_2, Tensor ffn_weight_1, Tensor ffn_bias_1, Tensor ffn_weight_2, "
                     "Tensor ffn_bias_2, Tensor? mask=None, int? mask_type=None) -> Tensor"))
    return std::nullopt;
  if (!node->input(18)->mustBeNone()) return std::nullopt;
  std::optional<std::pair<int64_t, int64_t>> shape = attentionShape(node, 1, 3);
  if (!shape) return std::nullopt;
  for (int i : {7, 8, 9}) {
    if (!torch::jit::toIValue(node->input(i))) return std::nullopt;
  }
  // Inputs 10-17: the norms' weights and biases, the feed-forward's.
  const int64_t e = shape->first;
  std::optional<at::Tensor> ffn_weight_1 = constantTensor(node->input(14));
  if (!ffn_weight_1 || ffn_weight_1->dim() != 2 || ffn_weight_1->size(1) != e) return std::nullopt;
  const int64_t hidden = ffn_weight_1->size(0);
  const std::vector<std::vector<int64_t>> expected = {{e}, {e}, {e}, {e}, {hidden, e}, {hidden}, {e, hidden}, {e}};
  for (size_t i = 0; i < expected.size(); ++i) {
    std::optional<at::Tensor> weight = constantTensor(node->input(10 + i));
    if (!weight || weight->sizes() != at::IntArrayRef(expected[i])) return std::nullopt;
  }
  return shape;
}

void replaceLayer(Graph& graph, Node* node, int64_t embed, int64_t heads) {
  torch::jit::WithInsertPoint here(node);
  Node* first = node->prev();
  auto constant = [&](const c10::IValue& value) { return graph.insertConstant(value); };
  const bool gelu = torch::jit::toIValue(node->input(7))->toBool();
  const bool norm_first = torch::jit::toIValue(node->input(8))->toBool();
  Value* eps = node->input(9);
  Value* shape = graph.insertNode(graph.createList(c10::IntType::get(), {constant(embed)}))->output();
  auto norm = [&](Value* x, int which) {
    return graph.insert(op("aten::layer_norm"),
                        {x, shape, node->input(which == 1 ? 10 : 12), node->input(which == 1 ? 11 : 13), eps, constant(true)});
  };
  // Created as TorchScript records them, every argument positional (alpha and approximate are
  // keyword-only, and Graph::insert would pick aten::add.Scalar for two tensors).
  auto positional = [&](const char* name, std::vector<Value*> inputs) {
    Node* made = graph.insertNode(graph.create(op(name), inputs));
    made->output()->setType(c10::TensorType::get());
    return made->output();
  };
  auto add = [&](Value* a, Value* b) { return positional("aten::add", {a, b, constant(int64_t{1})}); };
  auto ffn = [&](Value* x) {
    Value* hidden = graph.insert(op("aten::linear"), {x, node->input(14), node->input(15)});
    hidden = gelu ? positional("aten::gelu", {hidden, constant(std::string("none"))}) : positional("aten::relu", {hidden});
    return graph.insert(op("aten::linear"), {hidden, node->input(16), node->input(17)});
  };
  auto attention = [&](Value* x) {
    return selfAttention(graph, x, embed, heads, node->input(3), node->input(4), node->input(5), node->input(6));
  };
  Value* src = node->input(0);
  Value* x = nullptr;
  if (norm_first) {
    x = add(src, attention(norm(src, 1)));
    x = add(x, ffn(norm(x, 2)));
  } else {
    x = norm(add(src, attention(src)), 1);
    x = norm(add(x, ffn(x)), 2);
  }
  replaceWith(node, x, first->next());
}

void decomposeIn(Graph& graph, torch::jit::Block* block, int& count) {
  for (auto it = block->nodes().begin(); it != block->nodes().end();) {
    Node* node = *it++;
    for (torch::jit::Block* inner : node->blocks()) decomposeIn(graph, inner, count);
    if (std::optional<std::pair<int64_t, int64_t>> shape = replaceable(node)) {
      replace(graph, node, shape->first, shape->second);
      ++count;
    } else if (std::optional<std::pair<int64_t, int64_t>> layer = replaceableLayer(node)) {
      replaceLayer(graph, node, layer->first, layer->second);
      ++count;
    }
  }
}

}  // namespace

int decomposeNativeAttention(std::shared_ptr<torch::jit::Graph>& graph) {
  int count = 0;
  decomposeIn(*graph, graph->block(), count);
  return count;
}

}  // namespace kiln
