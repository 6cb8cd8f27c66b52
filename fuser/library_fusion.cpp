// The GEMM / convolution pattern (see library_calls.h): in a frozen graph, each aten::linear (and
// each addmm / mm / matmul by a constant matrix, made a linear first) and each 2-D convolution
// over a constant weight, with the epilogue that follows it, becomes one kiln
// op that runs it as one library call (oneDNN with fused post-ops on CPUs, chosen by measuring).
//
//   linear(x, W, b) | conv2d(x, W, b, ...) | _convolution(x, W, b, ..., transposed=False, ...)
//   [dropout(·, p, train=False)]...        identity in eval mode
//   [add(·, other) | add(other, ·) | add_(·, other)]     alpha 1, other a tensor, not feeding a
//                                                        row op (layer_norm, softmax, ...)
//   [relu | gelu | tanh | sigmoid | silu | hardswish] (or their in-place forms)
//
// Each value in the chain has one use, so no one else sees a value the kiln op no longer makes.
//
// oneDNN's convolutions write channels-last tensors. Eager ops that follow a layout (relu, add,
// pooling, ...) carry it along; any other consumer of such a value (a view, a graph output, an
// unknown op, control flow) gets aten::contiguous in front of it, so strides it could observe are
// as before the rewrite.
#include <torch/csrc/jit/ir/alias_analysis.h>

#include <c10/util/StringUtil.h>

#include <algorithm>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include "fuser/fusion_pass.h"
#include "fuser/library_calls.h"

namespace kiln {
namespace {

using torch::jit::Node;
using torch::jit::Value;

struct ActivationName {
  Activation activation;
  const char* name;
};

constexpr ActivationName kActivations[] = {
    {Activation::kRelu, "relu"},       {Activation::kGelu, "gelu"},   {Activation::kGeluTanh, "gelu_tanh"},
    {Activation::kTanh, "tanh"},       {Activation::kSigmoid, "sigmoid"}, {Activation::kSilu, "silu"},
    {Activation::kHardswish, "hardswish"},
};

bool isKind(const Node* node, const char* name) { return node->kind() == c10::Symbol::fromQualString(name); }

std::optional<c10::IValue> constant(Value* value) { return torch::jit::toIValue(value); }

bool isConstantTensor(Value* value, int64_t dim) {
  std::optional<c10::IValue> known = constant(value);
  return known && known->isTensor() && known->toTensor().dim() == dim && known->toTensor().layout() == at::kStrided;
}

bool isNoneOrConstantTensor(Value* value, int64_t dim) { return value->mustBeNone() || isConstantTensor(value, dim); }

bool isIntList(Value* value, size_t size) {
  std::optional<c10::IValue> known = constant(value);
  return known && known->isIntList() && known->toIntList().size() == size;
}

bool isInt(Value* value) {
  std::optional<c10::IValue> known = constant(value);
  return known && known->isInt();
}

bool isBool(Value* value, bool expected) {
  std::optional<c10::IValue> known = constant(value);
  return known && known->isBool() && known->toBool() == expected;
}

// The activation `node` applies to its first input, if it is one the library can fuse.
std::optional<Activation> activationOf(const Node* node) {
  const std::string kind = node->kind().toQualString();
  std::string base = kind.rfind("aten::", 0) == 0 ? kind.substr(6) : "";
  if (!base.empty() && base.back() == '_') base.pop_back();
  if (base == "gelu") {
    if (node->inputs().size() != 2) return std::nullopt;
    std::optional<c10::IValue> approximate = constant(node->input(1));
    if (!approximate || !approximate->isString()) return std::nullopt;
    if (approximate->toStringRef() == "none") return Activation::kGelu;
    if (approximate->toStringRef() == "tanh") return Activation::kGeluTanh;
    return std::nullopt;
  }
  if (node->inputs().size() != 1) return std::nullopt;
  for (const ActivationName& entry : kActivations) {
    if (entry.activation != Activation::kGelu && entry.activation != Activation::kGeluTanh && base == entry.name)
      return entry.activation;
  }
  return std::nullopt;
}

bool isTensorAdd(const Node* node) {
  return node->matches("aten::add.Tensor(Tensor self, Tensor other, *, Scalar alpha=1) -> Tensor") ||
         node->matches("aten::add_.Tensor(Tensor(a!) self, Tensor other, *, Scalar alpha=1) -> Tensor(a!)");
}

bool isRowOp(const Node* node) {
  return isKind(node, "aten::layer_norm") || isKind(node, "aten::softmax") || isKind(node, "aten::log_softmax") ||
         isKind(node, "aten::rms_norm");
}

// The single node that uses `value`, or nullptr.
Node* onlyUser(Value* value) { return value->uses().size() == 1 ? value->uses()[0].user : nullptr; }

// A GEMM or convolution the library can run: its weight and bias are constants.
bool isLibraryRoot(const Node* node) {
  if (node->matches("aten::linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor"))
    return isConstantTensor(node->input(1), 2) && isNoneOrConstantTensor(node->input(2), 1);
  return isLibraryConvolution(node);
}

struct Chain {
  Node* root = nullptr;
  std::vector<Node*> nodes;  // after the root, in order
  Value* other = nullptr;
  Epilogue epilogue;
  Value* result() const { return nodes.empty() ? root->output() : nodes.back()->output(); }
};

Chain chainFrom(Node* root) {
  Chain chain;
  chain.root = root;
  Value* current = root->output();
  while (Node* user = onlyUser(current)) {
    if (user->owningBlock() != root->owningBlock()) break;
    if (isKind(user, "aten::dropout") && user->inputs().size() == 3 && user->input(0) == current &&
        isBool(user->input(2), false)) {
      chain.nodes.push_back(user);
      current = user->output();
      continue;
    }
    if (chain.epilogue.add == Epilogue::Add::kNone && chain.epilogue.activation == Activation::kNone &&
        isTensorAdd(user) && isConstantOne(user->input(2)) && user->input(0) != user->input(1)) {
      // A residual add that feeds a row op (BERT's add + layer_norm) stays for the elementwise
      // pass, which fuses it into the row kernel: the same bytes, and no row op on its own.
      const auto& add_uses = user->output()->uses();
      if (std::any_of(add_uses.begin(), add_uses.end(), [](const torch::jit::Use& use) { return isRowOp(use.user); })) break;
      const bool in_place = user->kind().toQualString() == std::string("aten::add_");
      if (in_place && user->input(0) != current) break;  // would write into `other`
      chain.other = user->input(0) == current ? user->input(1) : user->input(0);
      chain.epilogue.add = in_place ? Epilogue::Add::kInPlace : Epilogue::Add::kOutOfPlace;
      chain.nodes.push_back(user);
      current = user->output();
      continue;
    }
    if (chain.epilogue.activation == Activation::kNone && user->input(0) == current) {
      if (std::optional<Activation> activation = activationOf(user)) {
        chain.epilogue.activation = *activation;
        chain.nodes.push_back(user);
        current = user->output();
      }
    }
    break;
  }
  // Dropouts after the epilogue stay where they are.
  while (!chain.nodes.empty() && isKind(chain.nodes.back(), "aten::dropout")) chain.nodes.pop_back();
  return chain;
}

// True when the convolution may write its result into `other`'s memory: `other` is made in the same
// block by an op that returns fresh memory or a view of it, nothing that may alias it is a graph
// input or read after `last` (the end of the chain), and the input does not alias it either.
// Ops whose output is memory of their own (never a view of an operand or of a constant);
// kiln::conv2d_into_other returns its residual's memory, itself fresh by this rule.
bool makesFreshTensor(const Node* node) {
  static const std::unordered_set<std::string> kinds = {
      kConv2dOp, kConv2dIntoOtherOp, kLinearOp, "aten::conv2d", "aten::_convolution", "aten::linear", "aten::relu", "aten::add", "aten::sub", "aten::mul", "aten::max_pool2d",
      "aten::avg_pool2d", "aten::adaptive_avg_pool2d", "aten::sigmoid", "aten::hardswish", "aten::silu",
      "aten::gelu", "aten::batch_norm"};
  return kinds.count(node->kind().toQualString()) != 0;
}

bool otherIsDeadAfter(torch::jit::AliasDb& alias_db, const Chain& chain, Node* last) {
  Value* other = chain.other;
  if (other == nullptr) return false;
  // Made by an op of fresh memory, in the graph's own block (not a loop's or a branch's, whose
  // values may be carried or read outside).
  torch::jit::Block* top = last->owningGraph()->block();
  if (!makesFreshTensor(other->node()) || other->node()->owningBlock() != top || last->owningBlock() != top)
    return false;
  if (other->type()->kind() != c10::TypeKind::TensorType) return false;
  torch::jit::Graph& graph = *last->owningGraph();
  std::vector<Value*> inputs(graph.inputs().begin(), graph.inputs().end());
  if (alias_db.mayContainAlias(other, inputs)) return false;
  if (alias_db.mayAlias(other, chain.root->input(0))) return false;
  // Everything after the chain in this block (nested blocks included) and the block's outputs.
  std::vector<Node*> pending;
  for (Node* node = last->next(); node != last->owningBlock()->return_node(); node = node->next()) pending.push_back(node);
  pending.push_back(last->owningBlock()->return_node());
  while (!pending.empty()) {
    Node* node = pending.back();
    pending.pop_back();
    for (Value* input : node->inputs()) {
      if (alias_db.mayAlias(input, other)) return false;
    }
    for (torch::jit::Block* block : node->blocks()) {
      for (Node* inner : block->nodes()) pending.push_back(inner);
      pending.push_back(block->return_node());
    }
  }
  return true;
}

// True when the call may run where the chain ends instead of where the GEMM / convolution was: no
// node in between writes memory its operands may share (an in-place op on the input, another
// call accumulating into the residual).
bool safeToMoveToEnd(torch::jit::AliasDb& alias_db, const Chain& chain) {
  if (chain.nodes.empty()) return true;
  std::vector<Value*> operands = {chain.root->input(0)};
  if (chain.other != nullptr) operands.push_back(chain.other);
  torch::jit::ValueSet read(operands.begin(), operands.end());
  std::unordered_set<const Node*> in_chain(chain.nodes.begin(), chain.nodes.end());
  for (Node* node = chain.root->next(); node != chain.nodes.back(); node = node->next()) {
    if (in_chain.count(node) == 0 && alias_db.writesToAlias(node, read)) return false;
  }
  return true;
}

Node* replaceChain(torch::jit::Graph& graph, const Chain& chain) {
  Node* root = chain.root;
  Node* last = chain.nodes.empty() ? root : chain.nodes.back();
  torch::jit::WithInsertPoint here(last);
  Value* other = chain.other != nullptr ? chain.other : graph.insertConstant(c10::IValue());
  Value* epilogue = graph.insertConstant(chain.epilogue.text());
  Node* call = nullptr;
  if (isKind(root, "aten::linear")) {
    call = graph.create(c10::Symbol::fromQualString(kLinearOp),
                        {root->input(0), root->input(1), root->input(2), other, epilogue});
  } else {
    const size_t groups = isKind(root, "aten::_convolution") ? 8 : 6;
    // Writing into `other` is declared (Tensor(a!)) so that later passes see the write.
    call = graph.create(c10::Symbol::fromQualString(chain.epilogue.into_other ? kConv2dIntoOtherOp : kConv2dOp),
                        {root->input(0), root->input(1), root->input(2), other, root->input(3), root->input(4),
                         root->input(5), root->input(groups), epilogue});
  }
  graph.insertNode(call);
  call->output()->setType(chain.result()->type());
  call->setSourceRange(root->sourceRange());
  if (root->scope()) call->setScope(root->scope());
  chain.result()->replaceAllUsesWith(call->output());
  for (auto it = chain.nodes.rbegin(); it != chain.nodes.rend(); ++it) (*it)->destroy();
  root->destroy();
  return call;
}

void collectRoots(torch::jit::Block* block, std::vector<Node*>& roots) {
  for (Node* node : block->nodes()) {
    if (isLibraryRoot(node)) roots.push_back(node);
    for (torch::jit::Block* inner : node->blocks()) collectRoots(inner, roots);
  }
}

// Ops whose output takes its input's memory format (so a channels-last input gives a
// channels-last output) and that accept any strides.
bool followsLayout(const Node* node) {
  static const std::unordered_set<std::string> kinds = {
      "aten::relu", "aten::relu_", "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_",
      "aten::div", "aten::sigmoid", "aten::sigmoid_", "aten::hardswish", "aten::hardswish_",
      "aten::hardtanh", "aten::hardtanh_", "aten::clamp", "aten::clamp_", "aten::silu", "aten::silu_",
      "aten::gelu", "aten::tanh", "aten::dropout", "aten::max_pool2d", "aten::avg_pool2d",
      "aten::adaptive_avg_pool2d", "aten::adaptive_max_pool2d", "aten::batch_norm", "aten::flatten", "aten::cat",
      "aten::reshape", "aten::detach"};
  return kinds.count(node->kind().toQualString()) != 0;
}

// Ops that read any strides and whose outputs carry no layout from this input.
bool ignoresLayout(const Node* node, size_t input_index) {
  const std::string kind = node->kind().toQualString();
  if (kind == kConv2dOp || kind == kConv2dIntoOtherOp || kind == kLinearOp) return true;
  if (kind == "aten::size" || kind == "aten::dim" || kind == "aten::contiguous" || kind == "aten::numel")
    return true;
  return false;
}

// Puts kiln::eager_layout in front of every consumer that could see the channels-last strides of
// a kiln::conv2d result (directly or through layout-following ops): the result as eager would have
// laid it out, like the first input up its chain of convolutions that no kiln::conv2d made
// (`channels_last` pairs each result with its convolution's input).
void containChannelsLast(torch::jit::Graph& graph, const std::vector<std::pair<Value*, Value*>>& channels_last,
                         bool outputs_take_any_layout) {
  std::unordered_map<Value*, Value*> input_of;  // a convolution's result -> its input
  std::unordered_map<Value*, Value*> origin;    // a value -> the convolution result it follows
  std::vector<std::pair<Value*, Value*>> pending;
  for (const auto& [result, input] : channels_last) {
    input_of[result] = input;
    pending.emplace_back(result, result);
  }
  std::vector<std::pair<Value*, Node*>> guarded_uses;
  while (!pending.empty()) {
    auto [value, root] = pending.back();
    pending.pop_back();
    if (!origin.emplace(value, root).second) continue;
    for (const torch::jit::Use& use : value->uses()) {
      Node* user = use.user;
      if (ignoresLayout(user, use.offset)) continue;
      if (outputs_take_any_layout && user == graph.return_node()) continue;
      // A list gathered for one cat: the cat takes any strides, its result follows them.
      if (user->kind() == torch::jit::prim::ListConstruct && user->output()->uses().size() == 1 &&
          isKind(user->output()->uses()[0].user, "aten::cat")) {
        pending.emplace_back(user->output()->uses()[0].user->output(), root);
        continue;
      }
      // Any operand of a layout-following op: a broadcast first operand ([N, C, 1, 1] times a
      // convolution's result) leaves the layout to the others.
      if (followsLayout(user)) {
        for (Value* output : user->outputs()) {
          if (output->type()->kind() == c10::TypeKind::TensorType) pending.emplace_back(output, root);
        }
        continue;
      }
      guarded_uses.emplace_back(value, user);
    }
  }
  // The layout eager gives a value: that of the input of the first convolution up its chain whose
  // input is not itself a kiln::conv2d result's follower.
  auto eagerLike = [&](Value* value) {
    Value* like = input_of.at(origin.at(value));
    for (size_t steps = 0; origin.count(like) && steps < input_of.size(); ++steps) like = input_of.at(origin.at(like));
    return like;
  };
  // A value something writes in place (div_, a write through a view) is laid out once where it
  // is produced, so every reader and writer shares one tensor; the others get a copy at the
  // consumer that needs it.
  torch::jit::AliasDb alias_db(graph.shared_from_this());
  std::unordered_set<Value*> at_producer;
  auto eagerLayout = [&](Value* value) {
    Value* laid_out = graph.insert(c10::Symbol::fromQualString(kEagerLayoutOp), {value, eagerLike(value)});
    laid_out->setType(value->type());
    return laid_out;
  };
  for (const auto& [value, user] : guarded_uses) {
    if (at_producer.count(value)) continue;
    if (alias_db.hasWriters(value)) {
      at_producer.insert(value);
      torch::jit::WithInsertPoint after(value->node()->next());
      Value* laid_out = eagerLayout(value);
      value->replaceAllUsesAfterNodeWith(laid_out->node(), laid_out);
      continue;
    }
    torch::jit::WithInsertPoint here(user);
    user->replaceInputWith(value, eagerLayout(value));
  }
}

}  // namespace

const char* activationName(Activation activation) {
  for (const ActivationName& entry : kActivations) {
    if (entry.activation == activation) return entry.name;
  }
  return "";
}

std::string Epilogue::text() const {
  std::string text = add == Add::kOutOfPlace ? "add" : add == Add::kInPlace ? "add_" : "";
  if (add != Add::kNone && into_other) text += "@other";
  if (activation != Activation::kNone) text += (text.empty() ? "" : "+") + std::string(activationName(activation));
  if (!pieces.empty()) text += ";pieces=" + c10::Join(",", pieces);
  return text;
}

std::optional<Epilogue> Epilogue::parse(const std::string& text) {
  Epilogue epilogue;
  std::string rest = text;
  const size_t semicolon = rest.find(';');
  if (semicolon != std::string::npos) {
    const std::string prefix = "pieces=";
    const std::string list = rest.substr(semicolon + 1);
    if (list.rfind(prefix, 0) != 0) return std::nullopt;
    std::stringstream widths(list.substr(prefix.size()));
    std::string width;
    while (std::getline(widths, width, ',')) {
      if (width.empty() || width.find_first_not_of("0123456789") != std::string::npos || width.size() > 12) return std::nullopt;
      epilogue.pieces.push_back(std::stoll(width));
    }
    if (epilogue.pieces.size() < 2) return std::nullopt;
    rest.resize(semicolon);
  }
  const size_t plus = rest.find('+');
  std::string first = rest.substr(0, plus);
  const std::string suffix = "@other";
  if (first.size() > suffix.size() && first.compare(first.size() - suffix.size(), suffix.size(), suffix) == 0) {
    epilogue.into_other = true;
    first.resize(first.size() - suffix.size());
    if (first != "add" && first != "add_") return std::nullopt;
  }
  if (first == "add" || first == "add_") {
    epilogue.add = first == "add" ? Add::kOutOfPlace : Add::kInPlace;
    rest = plus == std::string::npos ? "" : rest.substr(plus + 1);
  } else if (plus != std::string::npos) {
    return std::nullopt;
  }
  if (rest.empty()) return epilogue;
  for (const ActivationName& entry : kActivations) {
    if (rest == entry.name) {
      epilogue.activation = entry.activation;
      return epilogue;
    }
  }
  return std::nullopt;
}

// addmm(b, x, W) (beta and alpha 1), mm(x, W) and matmul(x, W) over a constant 2-D floating W are
// linear(x, Wᵀ, b): GPT-2's Conv1D, a hand-written x @ W. Rewritten to aten::linear, W transposed
// once (its constant goes when nothing else reads it), so that the pattern below takes them and
// measuring can still pick addmm over the original [K, N] layout ("aten_transposed"). An input of
// a rank addmm or mm would reject runs as linear runs it.
void linearsFromMatrixProducts(torch::jit::Graph& graph, torch::jit::Block* block) {
  std::vector<Node*> products;
  for (Node* node : block->nodes()) {
    for (torch::jit::Block* inner : node->blocks()) linearsFromMatrixProducts(graph, inner);
    const bool addmm = node->matches("aten::addmm(Tensor self, Tensor mat1, Tensor mat2, *, Scalar beta=1, Scalar alpha=1) -> Tensor");
    const bool product = node->matches("aten::mm(Tensor self, Tensor mat2) -> Tensor") ||
                         node->matches("aten::matmul(Tensor self, Tensor other) -> Tensor");
    if (!addmm && !product) continue;
    Value* weight = node->input(addmm ? 2 : 1);
    if (!isConstantTensor(weight, 2)) continue;
    const at::Tensor w = torch::jit::toIValue(weight)->toTensor();
    if (!at::isFloatingType(w.scalar_type()) || w.layout() != at::kStrided) continue;
    if (addmm) {
      std::optional<c10::IValue> bias = constant(node->input(0));
      if (!bias || !bias->isTensor() || !isConstantOne(node->input(3)) || !isConstantOne(node->input(4))) continue;
      const at::Tensor b = bias->toTensor();
      if (b.scalar_type() != w.scalar_type() || b.device() != w.device() || b.numel() != w.size(1) ||
          !(b.dim() == 1 || (b.dim() == 2 && b.size(0) == 1)))
        continue;
    }
    products.push_back(node);
  }
  for (Node* node : products) {
    const bool addmm = isKind(node, "aten::addmm");
    torch::jit::WithInsertPoint here(node);
    const at::Tensor w = torch::jit::toIValue(node->input(addmm ? 2 : 1))->toTensor();
    Value* weight = graph.insertConstant(w.t().contiguous());
    Value* bias = addmm ? graph.insertConstant(torch::jit::toIValue(node->input(0))->toTensor().reshape({w.size(1)}))
                        : graph.insertConstant(c10::IValue());
    Value* linear = graph.insert(torch::jit::aten::linear, {node->input(addmm ? 1 : 0), weight, bias});
    linear->setType(node->output()->type());
    node->output()->replaceAllUsesWith(linear);
    node->destroy();
  }
}

// A 2-D convolution the library can run (fusion_pass.h).
bool isLibraryConvolution(const Node* node) {
  if (node->matches("aten::conv2d(Tensor input, Tensor weight, Tensor? bias=None, SymInt[2] stride=1, "
                    "SymInt[2] padding=0, SymInt[2] dilation=1, SymInt groups=1) -> Tensor")) {
    return isConstantTensor(node->input(1), 4) && isNoneOrConstantTensor(node->input(2), 1) &&
           isIntList(node->input(3), 2) && isIntList(node->input(4), 2) && isIntList(node->input(5), 2) &&
           isInt(node->input(6));
  }
  if (isKind(node, "aten::_convolution") && node->inputs().size() == 13) {
    return isConstantTensor(node->input(1), 4) && isNoneOrConstantTensor(node->input(2), 1) &&
           isIntList(node->input(3), 2) && isIntList(node->input(4), 2) && isIntList(node->input(5), 2) &&
           isBool(node->input(6), false) && isInt(node->input(8));
  }
  return false;
}

bool isConstantOne(Value* value) {
  std::optional<c10::IValue> known = constant(value);
  return known && ((known->isInt() && known->toInt() == 1) || (known->isDouble() && known->toDouble() == 1.0));
}

int fuseLibraryCalls(std::shared_ptr<torch::jit::Graph>& graph, const Options& options, bool outputs_take_any_layout) {
  if (options.disabled) return 0;
  std::vector<Node*> roots;
  linearsFromMatrixProducts(*graph, graph->block());
  collectRoots(graph->block(), roots);
  // Results that may be channels-last: oneDNN's convolutions'. (A convolution region returns
  // what ATen's ops would, strides included.)
  std::vector<std::pair<Value*, Value*>> channels_last;  // a convolution's result, its input
  for (Node* root : roots) {
    Chain chain = chainFrom(root);
    // Only a chain with an epilogue needs alias analysis; its AliasDb is made for it alone (the
    // graph changed with the last chain).
    if (!chain.nodes.empty()) {
      torch::jit::AliasDb alias_db(graph);
      if (!safeToMoveToEnd(alias_db, chain)) chain = Chain{root, {}, nullptr, Epilogue{}};
      // A residual add whose other operand dies here is accumulated into that operand (oneDNN's
      // sum post-op): no output to allocate, no copy of `other`.
      if (chain.epilogue.add != Epilogue::Add::kNone && !isKind(root, "aten::linear") &&
          otherIsDeadAfter(alias_db, chain, chain.nodes.back())) {
        chain.epilogue.into_other = true;
      }
    }
    Node* call = replaceChain(*graph, chain);
    if (!isKind(call, kLinearOp)) channels_last.emplace_back(call->output(), call->input(0));
  }
  containChannelsLast(*graph, channels_last, outputs_take_any_layout);
  joinSiblingLinears(graph);
  return static_cast<int>(roots.size());
}

}  // namespace kiln
