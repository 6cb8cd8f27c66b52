// Convolution regions (kiln::optimize, float32): a run of convolutions and linears over constant
// weights with the relu, clamp, residual add, layer_norm and pooling between them becomes one
// kiln::conv_region op, which runs the region the fastest of three ways measured on its shapes
// (torch_ops/conv_region_op.cpp): ATen's ops, kiln's library calls, or oneDNN Graph (the build
// torch ships), whose compiled partitions keep oneDNN's blocked layouts from one convolution or
// GEMM to the next and cost a few microseconds a call where each ATen oneDNN call costs tens. A
// transformer's layers are regions too: what lies between two attentions (the output projection,
// residual, layer_norm, MLP and the next query/key/value projection), attention itself staying
// outside as kiln::attention.
//
//   %ys = kiln::conv_region(%activations, %weights, "graph(...)")
//   %y0, %y1 = prim::ListUnpack(%ys)
//
// The string is the region's subgraph in TorchScript IR, its inputs the activations then the
// weights and biases (graph constants, passed as inputs so that the op saves and loads as any
// other). A region:
// - lies in the graph's own block and holds at least two convolutions or linears; its outputs are
//   the values a node outside reads (or the graph returns), unpacked from the op's list;
// - holds conv2d / _convolution (2-D, not transposed, constant weight and bias, constant
//   arguments), linear over a constant weight, layer_norm, batch_norm, elementwise activations,
//   add, sub and mul of two tensors, pooling, mean, cat (with a constant expanded for it alone:
//   ViT's class token); an in-place form only on a value made inside the region that nothing
//   outside reads;
// - continues (never starts) with views of values it made that nothing else reads (view,
//   reshape, flatten, permute, transpose, chunk, slice, ...), and with the scalar shape
//   arithmetic their sizes come from (aten::size, floor_divide, int lists), which is computed
//   again outside where something outside reads it, so the op returns tensors only;
// - ends where a node outside it reads one of its values, or writes memory its inputs may share,
//   or holds blocks: the op runs where the region's last node was, so nothing in between may need
//   a region value or change an input.
#include <torch/csrc/jit/ir/alias_analysis.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>

#include <unordered_map>
#include <unordered_set>

#include "fuser/fusion_pass.h"

namespace kiln {
namespace {

using torch::jit::Node;
using torch::jit::Value;

bool isKind(const Node* node, const char* name) { return node->kind() == c10::Symbol::fromQualString(name); }

// A value the subgraph can hold as its own constant: a prim::Constant that is not a tensor, or a
// list of such constants.
bool isParameter(Value* value) {
  Node* node = value->node();
  if (node->kind() == torch::jit::prim::Constant) return !value->type()->isSubtypeOf(*c10::TensorType::get());
  if (node->kind() == torch::jit::prim::ListConstruct) {
    for (Value* item : node->inputs()) {
      if (item->node()->kind() != torch::jit::prim::Constant) return false;
    }
    return true;
  }
  return false;
}

// A weight, bias or norm parameter a region takes: a float32 CPU tensor. oneDNN Graph is what a
// region is for; on CUDA (or in another dtype) the region could only run ATen's ops, in place of
// kiln's own fusions and cuBLASLt's epilogues (an H200 ran BERT's fp16 layers as regions before).
bool isConstantTensor(Value* value, int64_t dim) {
  if (value->node()->kind() != torch::jit::prim::Constant) return false;
  std::optional<c10::IValue> known = torch::jit::toIValue(value);
  if (!known || !known->isTensor()) return false;
  const at::Tensor& tensor = known->toTensor();
  return tensor.dim() == dim && tensor.layout() == at::kStrided && tensor.is_cpu() &&
         tensor.scalar_type() == at::kFloat && !tensor.requires_grad();
}

bool allParameters(const Node* node, size_t from) {
  for (size_t i = from; i < node->inputs().size(); ++i) {
    if (!isParameter(node->input(i))) return false;
  }
  return true;
}

// kiln::conv2d's convolution (library_fusion.cpp) whose arguments after the bias are constants
// the region's graph can hold, over a floating weight and bias without autograd.
bool isConvolution(const Node* node) {
  if (!isLibraryConvolution(node) || !allParameters(node, 3)) return false;
  return isConstantTensor(node->input(1), 4) && (node->input(2)->mustBeNone() || isConstantTensor(node->input(2), 1));
}

// The ops a region holds besides convolutions; `in_place` is set for the forms that write their
// first input.
bool isRegionOp(const Node* node, bool* in_place) {
  *in_place = false;
  if (node->matches("aten::relu(Tensor self) -> Tensor")) return true;
  if (node->matches("aten::relu_(Tensor(a!) self) -> Tensor(a!)")) return *in_place = true;
  // Node::matches caches the parsed schema under the literal's address: literals only.
  if (node->matches("aten::sigmoid(Tensor self) -> Tensor") || node->matches("aten::silu(Tensor self) -> Tensor") ||
      node->matches("aten::hardswish(Tensor self) -> Tensor"))
    return true;
  if (node->matches("aten::sigmoid_(Tensor(a!) self) -> Tensor(a!)") ||
      node->matches("aten::silu_(Tensor(a!) self) -> Tensor(a!)") ||
      node->matches("aten::hardswish_(Tensor(a!) self) -> Tensor(a!)"))
    return *in_place = true;
  if (node->matches("aten::mul.Tensor(Tensor self, Tensor other) -> Tensor")) return true;
  if (node->matches("aten::mul_.Tensor(Tensor(a!) self, Tensor other) -> Tensor(a!)")) return *in_place = true;
  if (node->matches("aten::hardtanh(Tensor self, Scalar min_val=-1, Scalar max_val=1) -> Tensor"))
    return allParameters(node, 1);
  if (node->matches("aten::hardtanh_(Tensor(a!) self, Scalar min_val=-1, Scalar max_val=1) -> Tensor(a!)"))
    return allParameters(node, 1) && (*in_place = true);
  if (node->matches("aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor")) return isConstantOne(node->input(2));
  if (node->matches("aten::add_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)"))
    return isConstantOne(node->input(2)) && (*in_place = true);
  // FastViT's RepMixer: x + mixer(x) - norm(x)
  if (node->matches("aten::sub.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor")) return isConstantOne(node->input(2));
  if (node->matches("aten::sub_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)"))
    return isConstantOne(node->input(2)) && (*in_place = true);
  if (node->matches("aten::batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, "
                    "Tensor? running_var, bool training, float momentum, float eps, bool cudnn_enabled) -> Tensor")) {
    std::optional<c10::IValue> training = torch::jit::toIValue(node->input(5));
    return isConstantTensor(node->input(1), 1) && isConstantTensor(node->input(2), 1) &&
           isConstantTensor(node->input(3), 1) && isConstantTensor(node->input(4), 1) && training &&
           training->isBool() && !training->toBool() && allParameters(node, 5);
  }
  if (node->matches("aten::tanh(Tensor self) -> Tensor") || node->matches("aten::hardsigmoid(Tensor self) -> Tensor"))
    return true;
  if (node->matches("aten::tanh_(Tensor(a!) self) -> Tensor(a!)") ||
      node->matches("aten::hardsigmoid_(Tensor(a!) self) -> Tensor(a!)"))
    return *in_place = true;
  if (node->matches("aten::gelu(Tensor self, *, str approximate='none') -> Tensor")) return allParameters(node, 1);
  if (node->matches("aten::linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor"))
    return isConstantTensor(node->input(1), 2) && (node->input(2)->mustBeNone() || isConstantTensor(node->input(2), 1));
  if (node->matches("aten::layer_norm(Tensor input, int[] normalized_shape, Tensor? weight=None, Tensor? bias=None, "
                    "float eps=1e-05, bool cudnn_enable=True) -> Tensor")) {
    return isParameter(node->input(1)) && allParameters(node, 4) &&
           (node->input(2)->mustBeNone() || isConstantTensor(node->input(2), 1)) &&
           (node->input(3)->mustBeNone() || isConstantTensor(node->input(3), 1));
  }
  if (node->matches("aten::adaptive_avg_pool2d(Tensor self, SymInt[2] output_size) -> Tensor")) return allParameters(node, 1);
  if (node->matches("aten::mean.dim(Tensor self, int[1]? dim, bool keepdim=False, *, ScalarType? dtype=None) -> Tensor"))
    return allParameters(node, 1);
  if (node->matches("aten::max_pool2d(Tensor self, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
                    "int[2] dilation=1, bool ceil_mode=False) -> Tensor"))
    return allParameters(node, 1);
  if (node->matches("aten::avg_pool2d(Tensor self, int[2] kernel_size, int[2] stride=[], int[2] padding=0, "
                    "bool ceil_mode=False, bool count_include_pad=True, int? divisor_override=None) -> Tensor"))
    return allParameters(node, 1) && node->input(6)->mustBeNone();
  return false;
}

// Ops whose result may share its input's memory (views, and what returns its input as it is):
// they join only over a value the region made that nothing else reads but the region's
// aten::size, so that no value the region returns shares memory with its inputs or with another
// value it returns.
bool isViewOp(const Node* node) {
  if (node->kind() == torch::jit::prim::ConstantChunk) return true;
  // A chunk or split's list joins with the unpacking that alone reads it.
  if (node->kind() == torch::jit::prim::ListUnpack) return node->input()->type()->isSubtypeOf(*c10::ListType::ofTensors());
  if (node->matches("aten::chunk(Tensor(a -> *) self, int chunks, int dim=0) -> Tensor(a)[]") ||
      node->matches("aten::split.Tensor(Tensor(a -> *) self, SymInt split_size, int dim=0) -> Tensor(a)[]")) {
    const auto& uses = node->output()->uses();
    return allParameters(node, 1) && uses.size() == 1 && uses[0].user->kind() == torch::jit::prim::ListUnpack;
  }
  if (node->matches("aten::view(Tensor(a) self, SymInt[] size) -> Tensor(a)") ||
      node->matches("aten::reshape(Tensor(a) self, SymInt[] shape) -> Tensor(a)"))
    return true;  // the sizes may be computed in the region (shape ops)
  if (node->matches("aten::flatten.using_ints(Tensor(a) self, int start_dim=0, int end_dim=-1) -> Tensor(a)") ||
      node->matches("aten::permute(Tensor(a) self, int[] dims) -> Tensor(a)") ||
      node->matches("aten::transpose.int(Tensor(a) self, int dim0, int dim1) -> Tensor(a)") ||
      node->matches("aten::contiguous(Tensor(a) self, *, MemoryFormat memory_format=contiguous_format) -> Tensor(a)") ||
      node->matches("aten::unsqueeze(Tensor(a) self, int dim) -> Tensor(a)") ||
      node->matches("aten::squeeze.dim(Tensor(a) self, int dim) -> Tensor(a)") ||
      // GhostNet's `out[:, :self.out_chs]` after its concatenation
      node->matches("aten::slice.Tensor(Tensor(a) self, int dim=0, SymInt? start=None, SymInt? end=None, SymInt step=1) -> Tensor(a)"))
    return allParameters(node, 1);
  if (node->matches("aten::dropout(Tensor input, float p, bool train) -> Tensor")) {
    std::optional<c10::IValue> train = torch::jit::toIValue(node->input(2));
    return allParameters(node, 1) && train && train->isBool() && !train->toBool();
  }
  return false;
}

// A check that raises or does nothing and returns nothing: what TorchScript makes of an argument
// check (F.adaptive_avg_pool2d's `if len(input.size()) <= ...: raise`). It joins a region, but
// runs right after the region's op, from its results (materializeOutside): a node without outputs
// does not survive the region's IR text, and nothing in the region reads what a check decides.
bool isCheck(const Node* node) {
  if (node->kind() != torch::jit::prim::If || !node->outputs().empty()) return false;
  for (const torch::jit::Block* block : node->blocks()) {
    for (const Node* inner : block->nodes()) {
      if (inner->kind() != torch::jit::prim::RaiseException && inner->kind() != torch::jit::prim::Constant) return false;
      for (const Value* input : inner->inputs()) {
        if (input->node()->kind() != torch::jit::prim::Constant) return false;
      }
    }
  }
  return true;
}

// Scalar arithmetic on shapes (a channel shuffle's sizes: x.size(1) // groups) and the checks made
// of it: pure but for the checks' raising, cheap, and cloned out of the region again where
// something outside reads its result (materializeOutside).
bool isShapeOp(const Node* node) {
  if (node->kind() == torch::jit::prim::NumToTensor || isCheck(node)) return true;
  // `n, c, h, w = x.size()`
  if (node->kind() == torch::jit::prim::ListUnpack) return node->input()->type()->isSubtypeOf(*c10::ListType::ofInts());
  if (node->kind() == torch::jit::prim::ListConstruct) {
    return node->output()->type()->isSubtypeOf(*c10::ListType::ofInts());
  }
  return node->matches("aten::size.int(Tensor self, int dim) -> int") ||
         node->matches("aten::size(Tensor self) -> int[]") || node->matches("aten::Int.Tensor(Tensor a) -> int") ||
         node->matches("aten::floor_divide.Scalar(Tensor self, Scalar other) -> Tensor") ||
         node->matches("aten::floor_divide(Tensor self, Tensor other) -> Tensor") ||
         node->matches("aten::floordiv.int(int a, int b) -> int") || node->matches("aten::mul.int(int a, int b) -> int") ||
         node->matches("aten::add.int(int a, int b) -> int") || node->matches("aten::sub.int(int a, int b) -> int") ||
         node->matches("aten::len.t(t[] a) -> int") || node->matches("aten::gt.int(int a, int b) -> bool") ||
         node->matches("aten::lt.int(int a, int b) -> bool") || node->matches("aten::ge.int(int a, int b) -> bool") ||
         node->matches("aten::le.int(int a, int b) -> bool") || node->matches("aten::eq.int(int a, int b) -> bool") ||
         node->matches("aten::ne.int(int a, int b) -> bool") ||
         node->matches("aten::__getitem__.t(t[](a) list, int idx) -> t(*)");
}

struct Region {
  std::vector<Node*> nodes;
  std::unordered_set<const Node*> members;
  std::unordered_set<const Value*> inputs;  // activations read from outside
  int convolutions = 0;
  int linears = 0;

  bool empty() const { return nodes.empty(); }
  bool produces(const Value* value) const { return members.count(value->node()) > 0; }
  void add(Node* node) {
    nodes.push_back(node);
    members.insert(node);
    for (Value* input : node->inputs()) {
      if (!produces(input) && input->type()->isSubtypeOf(*c10::TensorType::get()) &&
          input->node()->kind() != torch::jit::prim::Constant)
        inputs.insert(input);
    }
  }
};

// aten::cat over a list built for it alone (prim::ListConstruct of tensors) along a constant dim:
// the list and the cat join a region together.
Node* catList(const Node* node) {
  if (!node->matches("aten::cat(Tensor[] tensors, int dim=0) -> Tensor") || !isParameter(node->input(1))) return nullptr;
  Node* list = node->input(0)->node();
  if (list->kind() != torch::jit::prim::ListConstruct || list->output()->uses().size() != 1) return nullptr;
  for (Value* item : list->inputs()) {
    if (!item->type()->isSubtypeOf(*c10::TensorType::get()) || item->node()->kind() == torch::jit::prim::Constant)
      return nullptr;
  }
  return list;
}

// A constant expanded to sizes the region computes, read only by the list a cat concatenates:
// ViT's and DeiT's class (and distillation) tokens, one per image, joined to the patches.
bool isTokenExpand(const Region& region, const Node* node) {
  if (region.empty() || !node->matches("aten::expand(Tensor(a) self, SymInt[] size, *, bool implicit=False) -> Tensor(a)"))
    return false;
  Value* token = node->input(0);
  if (token->node()->kind() != torch::jit::prim::Constant || !token->type()->isSubtypeOf(*c10::TensorType::get()))
    return false;
  if (!(isParameter(node->input(1)) || region.produces(node->input(1))) || !isParameter(node->input(2))) return false;
  const auto& uses = node->output()->uses();
  if (uses.size() != 1 || uses[0].user->kind() != torch::jit::prim::ListConstruct) return false;
  const Node* list = uses[0].user;
  return list->output()->uses().size() == 1 && catList(list->output()->uses()[0].user) == list;
}

// Whether `node` may join `region`: a convolution or region op whose tensors come from the region
// or from before it; an in-place op only on a value the region made and only the region reads.
bool mayJoin(const Region& region, Node* node) {
  // Shape ops and views continue a region; they never start one.
  if (isShapeOp(node)) {
    if (region.empty()) return false;
    // What a shape op reads: the region's values, constants (a traced `// groups` divides by a
    // constant tensor), or (aten::size) any tensor; never a scalar computed outside, which the
    // region's graph could not take as an input.
    const bool sizes_of = isKind(node, "aten::size");
    for (Value* input : node->inputs()) {
      if (region.produces(input) || isParameter(input) || input->node()->kind() == torch::jit::prim::Constant) continue;
      if (sizes_of && input->type()->isSubtypeOf(*c10::TensorType::get())) continue;
      return false;
    }
    return true;
  }
  if (isTokenExpand(region, node)) return true;
  if (isViewOp(node)) {
    // Besides the view, only the region's aten::size may read the base (for its sizes).
    Value* base = node->input(0);
    if (!region.produces(base)) return false;
    for (const torch::jit::Use& use : base->uses()) {
      if (use.user != node && !(isKind(use.user, "aten::size") && region.members.count(use.user))) return false;
    }
    // A view's sizes: constants, or shape ops' results in the region.
    for (size_t i = 1; i < node->inputs().size(); ++i) {
      if (!isParameter(node->input(i)) && !region.produces(node->input(i))) return false;
    }
    return true;
  }
  bool in_place = false;
  if (!isConvolution(node) && !isRegionOp(node, &in_place)) return false;
  if (!node->input(0)->type()->isSubtypeOf(*c10::TensorType::get())) return false;
  // An op over constants alone (Swin V2's position-bias MLP over its constant table of
  // coordinates) stays outside: torch's oneDNN Graph bridge crashes on a partition without
  // inputs (LlgaGraphHelper), and the oneDNN Graph fuser fails on such a model.
  bool reads_activation = false;
  for (Value* input : node->inputs()) {
    reads_activation = reads_activation || (input->type()->isSubtypeOf(*c10::TensorType::get()) &&
                                            input->node()->kind() != torch::jit::prim::Constant);
  }
  if (!reads_activation) return false;
  if (isKind(node, "aten::add") || isKind(node, "aten::add_") || isKind(node, "aten::sub") || isKind(node, "aten::sub_") ||
      isKind(node, "aten::mul") || isKind(node, "aten::mul_")) {
    if (!node->input(1)->type()->isSubtypeOf(*c10::TensorType::get())) return false;
  }
  if (in_place) {
    Value* written = node->input(0);
    if (!region.produces(written)) return false;
    for (const torch::jit::Use& use : written->uses()) {
      if (use.user != node && !region.members.count(use.user)) return false;
    }
  }
  return true;
}

// The values of `region` read outside it (or returned by the graph).
std::vector<Value*> regionOutputs(const Region& region) {
  std::vector<Value*> outputs;
  for (Node* node : region.nodes) {
    for (Value* output : node->outputs()) {
      for (const torch::jit::Use& use : output->uses()) {
        if (!region.members.count(use.user)) {
          outputs.push_back(output);
          break;
        }
      }
    }
  }
  return outputs;
}

// The region as a standalone graph: activations, then constant tensors, as inputs; non-tensor
// constants copied in.
std::shared_ptr<torch::jit::Graph> regionGraph(const Region& region, const std::vector<Value*>& outputs,
                                                std::vector<Value*>& activations,
                                                std::vector<Value*>& weights) {
  for (Node* node : region.nodes) {
    for (Value* input : node->inputs()) {
      if (region.produces(input) || isParameter(input) || input->mustBeNone()) continue;
      std::vector<Value*>& list = input->node()->kind() == torch::jit::prim::Constant ? weights : activations;
      if (std::find(list.begin(), list.end(), input) == list.end()) list.push_back(input);
    }
  }
  auto graph = std::make_shared<torch::jit::Graph>();
  std::unordered_map<Value*, Value*> env;
  for (Value* value : activations) env[value] = graph->addInput()->setType(c10::TensorType::get());
  for (Value* value : weights) env[value] = graph->addInput()->setType(c10::TensorType::get());
  std::function<Value*(Value*)> map = [&](Value* value) -> Value* {
    auto found = env.find(value);
    if (found != env.end()) return found->second;
    // A parameter: a constant or a list of constants, copied into the subgraph.
    Node* copy = graph->createClone(value->node(), map);
    graph->appendNode(copy);
    for (size_t i = 0; i < copy->outputs().size(); ++i) env[value->node()->output(i)] = copy->output(i);
    return env.at(value);
  };
  for (Node* node : region.nodes) {
    if (isCheck(node)) continue;  // run after the op (shapeOpsReadOutside)
    Node* copy = graph->createClone(node, map);
    graph->appendNode(copy);
    for (size_t i = 0; i < copy->outputs().size(); ++i) {
      Value* result = copy->output(i);
      if (result->type()->isSubtypeOf(*c10::TensorType::get())) result->setType(c10::TensorType::get());
      env[node->output(i)] = result;
    }
  }
  for (Value* output : outputs) graph->registerOutput(env.at(output));
  // A view reads its input's strides, which the ways change (kiln's and oneDNN Graph's results
  // are channels-last); a reshape gives the same values from any strides. Nothing else reads a
  // view's input (isViewOp), so whether the reshape copies is not seen.
  for (auto it = graph->nodes().begin(); it != graph->nodes().end();) {
    Node* node = *it++;
    if (node->kind() != c10::Symbol::fromQualString("aten::view")) continue;
    Node* reshape = graph->create(c10::Symbol::fromQualString("aten::reshape"), {node->input(0), node->input(1)}, 1);
    reshape->insertBefore(node);
    reshape->output()->setType(node->output()->type());
    node->output()->replaceAllUsesWith(reshape->output());
    node->destroy();
  }
  // What only the checks read (their sizes and comparisons) goes; the checks run outside.
  torch::jit::EliminateDeadCode(graph);
  // The text is parsed back at run time: no scopes (the IR parser does not read them).
  for (Node* node : graph->nodes()) node->setScope(c10::make_intrusive<torch::jit::Scope>());
  return graph;
}

// The values read outside `region` that its shape ops made (sizes, and what is computed from
// them), its checks, and the shape ops these need: after the region op they are computed again
// outside from its results (materializeOutside), so the op returns tensors only. Adds to
// `outputs` the tensors those shape ops read.
std::vector<Node*> shapeOpsReadOutside(const Region& region, std::vector<Value*>& outputs) {
  std::unordered_set<const Node*> needed;
  std::function<void(Value*)> need = [&](Value* value) {
    Node* node = value->node();
    if (!region.members.count(node)) return;  // from outside: read as it is
    if (!isShapeOp(node)) {
      if (std::find(outputs.begin(), outputs.end(), value) == outputs.end()) outputs.push_back(value);
      return;
    }
    if (!needed.insert(node).second) return;
    for (Value* input : node->inputs()) need(input);
  };
  std::vector<Value*> shape_values;
  for (Value* output : outputs) {
    if (isShapeOp(output->node())) shape_values.push_back(output);
  }
  outputs.erase(std::remove_if(outputs.begin(), outputs.end(), [](Value* value) { return isShapeOp(value->node()); }),
                outputs.end());
  for (Value* value : shape_values) need(value);
  for (Node* node : region.nodes) {
    if (isCheck(node) && needed.insert(node).second) {
      for (Value* input : node->inputs()) need(input);
    }
  }
  std::vector<Node*> ordered;
  for (Node* node : region.nodes) {
    if (needed.count(node)) ordered.push_back(node);
  }
  return ordered;
}

// Clones `shape_ops` (in order) at the insertion point, reading the region op's results where they
// read the region's tensors, and points the uses outside the region to the clones.
void materializeOutside(torch::jit::Graph& graph, const Region& region, const std::vector<Node*>& shape_ops,
                        const std::unordered_map<Value*, Value*>& unpacked) {
  std::unordered_map<Value*, Value*> env(unpacked);
  for (Node* node : shape_ops) {
    Node* copy = graph.createClone(node, [&](Value* value) {
      auto found = env.find(value);
      return found != env.end() ? found->second : value;
    });
    graph.insertNode(copy);
    for (size_t i = 0; i < node->outputs().size(); ++i) {
      Value* original = node->output(i);
      env[original] = copy->output(i);
      std::vector<torch::jit::Use> outside;
      for (const torch::jit::Use& use : original->uses()) {
        if (!region.members.count(use.user)) outside.push_back(use);
      }
      for (const torch::jit::Use& use : outside) use.user->replaceInput(use.offset, copy->output(i));
    }
  }
}

// Replaces `region` by one kiln::conv_region op and a prim::ListUnpack of its results; false
// where it does not qualify.
bool replaceRegion(torch::jit::Graph& graph, const Region& region) {
  if (region.convolutions + region.linears < 2) return false;
  std::vector<Value*> outputs = regionOutputs(region);
  const std::vector<Node*> shape_ops = shapeOpsReadOutside(region, outputs);
  if (outputs.empty()) return false;
  std::vector<Value*> activations, weights;
  std::shared_ptr<torch::jit::Graph> subgraph = regionGraph(region, outputs, activations, weights);
  if (activations.empty()) return false;
  Node* last = region.nodes.back();
  torch::jit::WithInsertPoint here(last->next());
  Value* activation_list = insertList(graph, c10::TensorType::get(), activations);
  Value* weight_list = insertList(graph, c10::TensorType::get(), weights);
  Value* text = graph.insertConstant(subgraph->toString(/*print_source_locations=*/false));
  Node* call = graph.create(c10::Symbol::fromQualString(kConvRegionOp), {activation_list, weight_list, text}, 1);
  graph.insertNode(call);
  call->output()->setType(c10::ListType::ofTensors());
  call->setScope(last->scope());
  if (last->callstack()) call->setCallStack(*last->callstack());
  Node* unpack = graph.createListUnpack(call->output(), outputs.size());
  graph.insertNode(unpack);
  std::unordered_map<Value*, Value*> unpacked;
  for (size_t i = 0; i < outputs.size(); ++i) {
    unpack->output(i)->setType(outputs[i]->type());
    unpacked[outputs[i]] = unpack->output(i);
  }
  materializeOutside(graph, region, shape_ops, unpacked);
  for (size_t i = 0; i < outputs.size(); ++i) outputs[i]->replaceAllUsesWith(unpack->output(i));
  for (auto it = region.nodes.rbegin(); it != region.nodes.rend(); ++it) (*it)->destroy();
  return true;
}

// `x.reshape_as(other)` as `x.reshape(other.size())`, the same op: the other tensor is then read
// for its sizes only, which lets a view of it join a region (timm's LeViT flattens each linear's
// result for its batch norm and reshapes the normalized rows back as the linear's result).
void reshapeAsAsReshape(torch::jit::Graph& graph) {
  for (auto it = graph.block()->nodes().begin(); it != graph.block()->nodes().end();) {
    Node* node = *it++;
    if (!node->matches("aten::reshape_as(Tensor(a) self, Tensor other) -> Tensor(a)")) continue;
    // The sizes are read right where `other` is made, so that a view of it made before the
    // reshape finds every other reader of it in the region already.
    Value* sizes = nullptr;
    {
      torch::jit::WithInsertPoint made(node->input(1)->node()->next());
      sizes = graph.insert(c10::Symbol::fromQualString("aten::size"), {node->input(1)});
    }
    torch::jit::WithInsertPoint here(node);
    Value* reshaped = graph.insert(c10::Symbol::fromQualString("aten::reshape"), {node->input(0), sizes});
    reshaped->setType(node->output()->type());
    reshaped->node()->copyMetadata(node);
    node->output()->replaceAllUsesWith(reshaped);
    node->destroy();
  }
}

}  // namespace

int extractConvolutionRegions(std::shared_ptr<torch::jit::Graph>& graph) {
  reshapeAsAsReshape(*graph);
  // Each cat's own list right before it, so that the two are met together (the list only gathers
  // values made before it; nothing else reads it).
  for (Node* node : graph->block()->nodes()) {
    if (Node* list = catList(node)) list->moveBefore(node);
  }
  std::vector<Region> found;
  {
    torch::jit::AliasDb alias_db(graph);
    Region current;
    auto close = [&] {
      if (!current.empty()) found.push_back(std::move(current));
      current = Region{};
    };
    for (Node* node : graph->block()->nodes()) {
      if (node->kind() == torch::jit::prim::Constant || (node->kind() == torch::jit::prim::ListConstruct &&
                                                          isParameter(node->output())))
        continue;
      // A cat's list is decided with the cat, which follows it.
      if (node->kind() == torch::jit::prim::ListConstruct && node->output()->uses().size() == 1 &&
          node->output()->uses()[0].user == node->next() && catList(node->next()) == node)
        continue;
      Node* list = catList(node);
      bool reads_region = false;
      for (Value* input : node->inputs()) reads_region = reads_region || current.produces(input);
      if (list != nullptr) {
        for (Value* input : list->inputs()) reads_region = reads_region || current.produces(input);
      }
      // Branches that do not read the region join it too (an Inception block's), so that their
      // concatenation can: the op runs where the region's last node was, after all their inputs.
      if (list != nullptr) {
        current.add(list);
        current.add(node);
        continue;
      }
      if (mayJoin(current, node)) {
        current.add(node);
        current.convolutions += isConvolution(node) ? 1 : 0;
        current.linears += isKind(node, "aten::linear") ? 1 : 0;
        continue;
      }
      if (current.empty()) continue;
      const bool writes_inputs = alias_db.writesToAlias(node, current.inputs);
      if (reads_region || writes_inputs || !node->blocks().empty() || node->hasSideEffects()) close();
    }
    close();
  }
  int replaced = 0;
  for (const Region& region : found) replaced += replaceRegion(*graph, region) ? 1 : 0;
  if (replaced > 0) torch::jit::EliminateDeadCode(graph);
  return replaced;
}

}  // namespace kiln
