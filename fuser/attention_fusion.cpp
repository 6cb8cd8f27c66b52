// The attention pattern (see fusion_pass.h): finds scaled dot-product attention in a TorchScript
// graph, as aten::scaled_dot_product_attention or written out with matmul and softmax, and puts a
// guarded kiln attention op in its place, with the original ops kept as the fallback:
//
//   %ok = kiln::attention_guard(%q, %k, %v, %mask, %keep, %fill, %dim, %dtype, %p, %train, %sdpa)
//   %out = prim::If(%ok)
//     block0: kiln::attention(...) or kiln::attention_explicit(...)
//     block1: the original ops
//
// The explicit form is a chain on the scores, each value used once:
//
//   matmul(Q, X)              X is Kᵀ however it was made; kiln reads K as X.transpose(-1, -2)
//   [* c | / c]...            c a number or a 0-dim tensor (a constant, full([], c), scalar_tensor)
//   [+ mask]                  at most one additive mask, before any later scaling
//   [masked_fill(m, f) | where(m, ·, f)]  at most one; f as c above
//   [to(dtype) | type_as]...
//   softmax(·, dim[, dtype])
//   [to | type_as | dropout]...
//   matmul(·, V)
//
// Whatever the pass cannot prove equal is left to the guard, which checks at run time what only
// the tensors can tell: dtypes, ranks and batch dims, mask shapes, the softmax dim, that every
// dropout is off, that the fill fits the dtype, and that nothing needs autograd.
#include <torch/csrc/jit/ir/alias_analysis.h>

#include <algorithm>
#include <optional>
#include <unordered_set>

#include "fuser/fusion_pass.h"

namespace kiln {
namespace {

using torch::jit::AliasDb;
using torch::jit::Block;
using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Use;
using torch::jit::Value;
namespace prim = torch::jit::prim;

c10::Symbol op(const char* name) { return c10::Symbol::fromQualString(name); }

bool isOp(const Node* node, const char* name) { return node->kind() == op(name); }

bool isNone(const Value* value) { return value->mustBeNone(); }

// A scalar operand of the scores: known now, or a number the graph computes at run time.
struct Scalar {
  std::optional<double> constant;
  Value* value = nullptr;
};

// A multiplier of the scores; a divisor has `invert`.
struct Factor {
  Scalar scalar;
  bool invert = false;
};


bool isNumberType(const c10::TypePtr& type) {
  return type->kind() == c10::TypeKind::FloatType || type->kind() == c10::TypeKind::IntType ||
         type->kind() == c10::TypeKind::NumberType;
}

Value* throughProfiles(Value* value) {
  while (value->node()->kind() == prim::profile) value = value->node()->input(0);
  return value;
}

bool isEmptyList(Value* value) {
  if (value->node()->kind() == prim::ListConstruct) return value->node()->inputs().empty();
  std::optional<c10::IValue> constant = torch::jit::toIValue(value);
  return constant && constant->isIntList() && constant->toIntList().empty();
}

// Dropout that runs whatever the inputs: a probability and a train flag known to be on.
bool alwaysDrops(Value* p, Value* train) {
  std::optional<c10::IValue> probability = torch::jit::toIValue(p);
  std::optional<c10::IValue> training =
      train != nullptr ? torch::jit::toIValue(train) : std::optional<c10::IValue>(true);
  return probability && probability->isDouble() && probability->toDouble() != 0.0 && training &&
         training->isBool() && training->toBool();
}

// K from K^T when K^T is transpose(K, -1, -2): the fused op then reads K itself.
Value* untransposed(Value* key_transposed) {
  Node* node = throughProfiles(key_transposed)->node();
  if (!isOp(node, "aten::transpose") || node->inputs().size() != 3) return nullptr;
  std::optional<c10::IValue> a = torch::jit::toIValue(node->input(1));
  std::optional<c10::IValue> b = torch::jit::toIValue(node->input(2));
  if (!a || !b || !a->isInt() || !b->isInt()) return nullptr;
  const int64_t low = std::min(a->toInt(), b->toInt()), high = std::max(a->toInt(), b->toInt());
  return low == -2 && high == -1 ? node->input(0) : nullptr;
}

// The value of a number or of a tensor that is provably 0-dim (so it cannot promote the scores'
// dtype or change their shape).
std::optional<Scalar> scalarOperand(Value* value) {
  value = throughProfiles(value);
  if (isNumberType(value->type())) {
    Scalar scalar;
    if (std::optional<c10::IValue> constant = torch::jit::toIValue(value)) {
      if (!constant->isDouble() && !constant->isInt()) return std::nullopt;
      scalar.constant = constant->isDouble() ? constant->toDouble()
                                             : static_cast<double>(constant->toInt());
    } else {
      scalar.value = value;
    }
    return scalar;
  }
  if (value->type()->kind() != c10::TypeKind::TensorType) return std::nullopt;
  Node* producer = value->node();
  if (producer->kind() == prim::Constant) {
    std::optional<c10::IValue> constant = torch::jit::toIValue(value);
    if (!constant || !constant->isTensor()) return std::nullopt;
    const at::Tensor& tensor = constant->toTensor();
    if (tensor.dim() != 0 || !(at::isFloatingType(tensor.scalar_type()) ||
                               at::isIntegralType(tensor.scalar_type(), /*includeBool=*/false)))
      return std::nullopt;
    return Scalar{tensor.item<double>(), nullptr};
  }
  if (isOp(producer, "aten::full") && producer->inputs().size() >= 2 && isEmptyList(producer->input(0)))
    return scalarOperand(producer->input(1));
  if (isOp(producer, "aten::scalar_tensor")) return scalarOperand(producer->input(0));
  return std::nullopt;
}


bool isOverload(const Node* node, const char* name, const char* overload) {
  if (!isOp(node, name)) return false;
  const c10::FunctionSchema* schema = node->maybeSchema();
  return schema != nullptr && schema->overload_name() == overload;
}

struct Match {
  std::vector<Node*> nodes;  // the original ops in graph order, moved into the fallback
  Node* last = nullptr;      // the node whose output the attention is
  Value* query = nullptr;
  Value* key_transposed = nullptr;  // explicit form: X of matmul(Q, X)
  Value* key = nullptr;             // sdpa form
  Value* value = nullptr;
  Value* mask = nullptr;  // additive (explicit) or either kind (sdpa)
  Value* keep = nullptr;  // explicit: where this is false (true if keep_inverted) the fill goes
  bool keep_inverted = false;
  std::optional<Scalar> fill;
  bool fill_adds_mask = false;
  std::vector<Factor> factors;             // all multipliers of the scores
  std::vector<Factor> factors_after_fill;  // those the fill value goes through too
  Value* softmax_dim = nullptr;
  Value* probs_dtype = nullptr;       // an int (ScalarType) the probabilities were cast to
  Value* probs_dtype_like = nullptr;  // or a tensor whose dtype they took (type_as)
  std::vector<std::pair<Value*, Value*>> dropouts;  // (p, train)
  std::vector<Use> metadata_uses;  // prim::dtype / prim::device of the scores: read from Q
  std::vector<Node*> metadata_profiles;  // profile nodes that fed only those; dropped
  // sdpa form
  Node* sdpa = nullptr;
};

class AttentionMatcher {
 public:
  explicit AttentionMatcher(std::shared_ptr<Graph> graph)
      : graph_(std::move(graph)), alias_db_(graph_) {}

  std::vector<Match> find() {
    findInBlock(graph_->block());
    return std::move(matches_);
  }

 private:
  void findInBlock(Block* block) {
    for (Node* node : block->nodes()) {
      // A kiln fallback already holds original ops on purpose.
      if (isKilnFallback(node)) continue;
      for (Block* inner : node->blocks()) findInBlock(inner);
      if (claimed_.count(node)) continue;
      std::optional<Match> match = isOp(node, "aten::scaled_dot_product_attention")
                                       ? matchSdpa(node)
                                       : matchExplicit(node);
      if (!match || !inputsUnwritten(*match)) continue;
      for (Node* claimed : match->nodes) claimed_.insert(claimed);
      matches_.push_back(std::move(*match));
    }
  }

  static std::optional<Match> matchSdpa(Node* node) {
    // (q, k, v, attn_mask, dropout_p, is_causal, scale[, enable_gqa])
    if (node->inputs().size() < 7 || node->outputs().size() != 1) return std::nullopt;
    if (node->inputs().size() >= 8) {
      std::optional<c10::IValue> gqa = torch::jit::toIValue(node->input(7));
      if (!gqa || !gqa->isBool() || gqa->toBool()) return std::nullopt;
    }
    Match match;
    match.sdpa = node;
    match.last = node;
    match.query = throughCopy(node->input(0), match);
    match.key = throughCopy(node->input(1), match);
    match.value = throughCopy(node->input(2), match);
    match.nodes.push_back(node);
    if (!isNone(node->input(3))) match.mask = node->input(3);
    if (alwaysDrops(node->input(4), nullptr)) return std::nullopt;
    match.dropouts.emplace_back(node->input(4), nullptr);
    return match;
  }

  // What the fused op reads for an input of scaled_dot_product_attention: a contiguous copy made
  // for it alone (`x.contiguous()`, as Hugging Face's SDPA integration makes of each of Q, K and V)
  // is not needed, since kiln::attention reads any strides; the copy joins the match and runs
  // only in the fallback, and the op reads the copy's source.
  static Value* throughCopy(Value* input, Match& match) {
    Node* producer = input->node();
    if (!isOp(producer, "aten::contiguous") || producer->inputs().size() != 2 || input->uses().size() != 1)
      return input;
    std::optional<c10::IValue> format = torch::jit::toIValue(producer->input(1));
    if (!format || !format->isInt() || format->toInt() != static_cast<int64_t>(c10::MemoryFormat::Contiguous))
      return input;
    match.nodes.push_back(producer);
    return producer->input(0);
  }

  // The one node that consumes `value`, looking through prim::profile nodes (which join the
  // match; `value` becomes the last profile's output, the one the consumer reads). prim::dtype and
  // prim::device reads, directly or through their own profile node, are allowed: they are
  // answered from Q, whose dtype and device the scores share whenever matmul succeeds. After an
  // add (a mask may promote) or a cast, the dtype is no longer Q's; every other step keeps
  // floating-point scores' dtype.
  static Node* soleConsumer(Value*& value, Match& match, bool dtype_changed) {
    const auto isMetadata = [&](const Node* user) {
      return user->kind() == prim::device || (user->kind() == prim::dtype && !dtype_changed);
    };
    while (true) {
      Node* consumer = nullptr;
      for (const Use& use : value->uses()) {
        if (isMetadata(use.user)) {
          match.metadata_uses.push_back(use);
          continue;
        }
        if (use.user->kind() == prim::profile) {
          const auto& reads = use.user->output()->uses();
          if (!reads.empty() && std::all_of(reads.begin(), reads.end(),
                                            [&](const Use& read) { return isMetadata(read.user); })) {
            match.metadata_uses.insert(match.metadata_uses.end(), reads.begin(), reads.end());
            match.metadata_profiles.push_back(use.user);
            continue;
          }
        }
        if (consumer != nullptr) return nullptr;
        consumer = use.user;
      }
      if (consumer == nullptr || consumer->kind() != prim::profile) return consumer;
      match.nodes.push_back(consumer);
      value = consumer->output();
    }
  }

  static std::optional<Match> matchExplicit(Node* first) {
    if (!isOp(first, "aten::matmul") && !isOp(first, "aten::bmm")) return std::nullopt;
    Match match;
    match.nodes.push_back(first);
    match.query = first->input(0);
    match.key_transposed = first->input(1);
    Block* block = first->owningBlock();
    Value* scores = first->output();
    bool dtype_changed = false;
    bool after_softmax = false;
    while (true) {
      Node* node = soleConsumer(scores, match, dtype_changed);
      if (node == nullptr || node->owningBlock() != block || node->outputs().size() != 1)
        return std::nullopt;
      // The scores' position among the node's inputs (they must appear exactly once).
      int position = -1;
      for (size_t i = 0; i < node->inputs().size(); ++i) {
        if (node->input(i) != scores) continue;
        if (position >= 0) return std::nullopt;
        position = static_cast<int>(i);
      }
      if (!recordStep(node, position, after_softmax, dtype_changed, match)) return std::nullopt;
      match.nodes.push_back(node);
      if (match.last != nullptr) return match;
      scores = node->output();
    }
  }

  // Adds one op of the chain to the match; false when it is not one the pattern allows there.
  static bool recordStep(Node* node, int position, bool& after_softmax, bool& dtype_changed,
                         Match& match) {
    if (isCast(node, position, match)) {
      dtype_changed = true;
      return true;
    }
    if (after_softmax) {
      if (isOp(node, "aten::dropout") && position == 0 && !alwaysDrops(node->input(1), node->input(2))) {
        match.dropouts.emplace_back(node->input(1), node->input(2));
        return true;
      }
      if ((isOp(node, "aten::matmul") || isOp(node, "aten::bmm")) && position == 0) {
        match.value = node->input(1);
        match.last = node;
        return true;
      }
      return false;
    }
    const bool scaled_after_fill = match.fill.has_value();
    if ((isOp(node, "aten::mul") && node->inputs().size() == 2) ||
        (isOp(node, "aten::div") && node->inputs().size() == 2 && position == 0)) {
      if (match.mask != nullptr) return false;  // the mask would be scaled too
      std::optional<Scalar> scalar = scalarOperand(node->input(1 - position));
      if (!scalar) return false;
      Factor factor{*scalar, isOp(node, "aten::div")};
      match.factors.push_back(factor);
      if (scaled_after_fill) match.factors_after_fill.push_back(factor);
      return true;
    }
    if (isOp(node, "aten::add") && node->inputs().size() == 3 && position < 2) {
      Value* mask = node->input(1 - position);
      if (match.mask != nullptr || mask->type()->kind() != c10::TypeKind::TensorType ||
          !isConstantOne(node->input(2)))
        return false;
      match.mask = mask;
      match.fill_adds_mask = match.fill.has_value();
      dtype_changed = true;
      return true;
    }
    if (isOp(node, "aten::masked_fill") && position == 0) {
      if (match.fill) return false;
      match.fill = scalarOperand(node->input(2));
      match.keep = node->input(1);
      match.keep_inverted = true;
      return match.fill.has_value();
    }
    if (isOp(node, "aten::where") && node->inputs().size() == 3 && position >= 1) {
      if (match.fill) return false;
      match.fill = scalarOperand(node->input(position == 1 ? 2 : 1));
      match.keep = node->input(0);
      match.keep_inverted = position == 2;
      return match.fill.has_value();
    }
    if (isOp(node, "aten::softmax") && node->inputs().size() == 3 && position == 0 &&
        node->input(1)->type()->kind() == c10::TypeKind::IntType) {
      match.softmax_dim = node->input(1);
      if (!isNone(node->input(2))) {
        match.probs_dtype = node->input(2);
        match.probs_dtype_like = nullptr;
        dtype_changed = true;
      }
      after_softmax = true;
      return true;
    }
    return false;
  }

  // to(dtype) and type_as change only the dtype, which the guard checks in the end.
  static bool isCast(Node* node, int position, Match& match) {
    if (position != 0) return false;
    if (isOverload(node, "aten::to", "dtype")) {
      match.probs_dtype = node->input(1);
      match.probs_dtype_like = nullptr;
      return true;
    }
    if (isOp(node, "aten::type_as")) {
      match.probs_dtype = nullptr;
      match.probs_dtype_like = node->input(1);
      return true;
    }
    return false;
  }

  // The fused op reads the pattern's inputs where the pattern ends, the pattern's ops read them
  // where they stand: nothing may write to them in between. A write before the pattern's first op
  // (a mask built in place, as Hugging Face's OPT and BART build theirs) is seen alike by both.
  // Where the pattern's ops are not all in the last one's block, any writer anywhere refuses.
  bool inputsUnwritten(const Match& match) {
    std::unordered_set<const Node*> inside(match.nodes.begin(), match.nodes.end());
    std::vector<const Value*> inputs;
    for (const Node* node : match.nodes) {
      for (const Value* input : node->inputs()) {
        if (inside.count(input->node()) == 0 && alias_db_.hasWriters(input)) inputs.push_back(input);
      }
    }
    if (inputs.empty()) return true;
    // The ops between the pattern's first and its last, walking back from the last.
    size_t seen = 0;
    std::vector<Node*> between;
    for (Node* node = match.last; seen < inside.size(); node = node->prev()) {
      if (node == match.last->owningBlock()->param_node()) return false;  // an op in another block
      if (inside.count(node)) {
        seen++;
      } else {
        between.push_back(node);
      }
    }
    const torch::jit::ValueSet read(inputs.begin(), inputs.end());
    for (Node* node : between) {
      if (alias_db_.writesToAlias(node, read)) return false;
    }
    return true;
  }

  std::shared_ptr<Graph> graph_;
  AliasDb alias_db_;
  std::unordered_set<Node*> claimed_;
  std::vector<Match> matches_;
};

Value* constant(Graph& graph, const c10::IValue& value) { return graph.insertConstant(value); }

Value* asFloat(Graph& graph, Value* number) {
  if (number->type()->kind() == c10::TypeKind::FloatType) return number;
  return graph.insert(op("aten::Float"), {number});
}

// start × the factors, folded at pass time where they are constants.
Value* product(Graph& graph, Scalar start, const std::vector<Factor>& factors) {
  double folded = start.constant.value_or(1.0);
  Value* runtime = start.value != nullptr ? asFloat(graph, start.value) : nullptr;
  for (const Factor& factor : factors) {
    if (factor.scalar.constant) {
      folded = factor.invert ? folded / *factor.scalar.constant : folded * *factor.scalar.constant;
      continue;
    }
    Value* value = asFloat(graph, factor.scalar.value);
    if (runtime == nullptr) {
      runtime = factor.invert ? graph.insert(op("aten::div"), {constant(graph, 1.0), value}) : value;
    } else {
      runtime = graph.insert(op(factor.invert ? "aten::div" : "aten::mul"), {runtime, value});
    }
  }
  if (runtime == nullptr) return constant(graph, folded);
  if (folded != 1.0) runtime = graph.insert(op("aten::mul"), {runtime, constant(graph, folded)});
  return runtime;
}

Value* optional(Graph& graph, Value* value) {
  return value != nullptr ? value : graph.insertNode(graph.createNone())->output();
}

// True when `value`'s only use swaps dims 1 and 2 of a 4-D tensor (transpose(1, 2), or
// permute([0, 2, 1, 3])): attention may then store its [B, H, S, D] result heads-last, as
// [B, S, H, D], and the transpose's result is contiguous (the reshape after it copies nothing).
bool onlyUseSwapsHeadsAndSequence(Value* value) {
  if (value->uses().size() != 1) return false;
  Node* user = value->uses()[0].user;
  if (isOp(user, "aten::transpose") && user->inputs().size() == 3) {
    std::optional<c10::IValue> a = torch::jit::toIValue(user->input(1));
    std::optional<c10::IValue> b = torch::jit::toIValue(user->input(2));
    if (!a || !b || !a->isInt() || !b->isInt()) return false;
    const int64_t low = std::min(a->toInt(), b->toInt()), high = std::max(a->toInt(), b->toInt());
    return (low == 1 && high == 2) || (low == -3 && high == -2);
  }
  if (isOp(user, "aten::permute") && user->inputs().size() == 2) {
    std::optional<c10::IValue> dims = torch::jit::toIValue(user->input(1));
    return dims && dims->isIntList() && dims->toIntVector() == std::vector<int64_t>{0, 2, 1, 3};
  }
  return false;
}

// Builds guard + If(fused, fallback) before match.last and moves the original ops into the
// fallback.
void replace(Graph& graph, const Match& match) {
  Node* last = match.last;
  const bool heads_last = onlyUseSwapsHeadsAndSequence(last->output());
  torch::jit::WithInsertPoint insert_point(last);
  const bool sdpa = match.sdpa != nullptr;
  Value* key = sdpa ? match.key : untransposed(match.key_transposed);
  if (key == nullptr)
    key = graph.insert(op("aten::transpose"), {match.key_transposed, constant(graph, -1), constant(graph, -2)});
  Value* probs_dtype = match.probs_dtype;
  if (match.probs_dtype_like != nullptr)
    probs_dtype = graph.insertNode(graph.create(prim::dtype, {match.probs_dtype_like}))
                      ->output()
                      ->setType(c10::IntType::get());
  std::vector<Value*> dropout_p, dropout_train;
  for (const auto& [p, train] : match.dropouts) {
    dropout_p.push_back(asFloat(graph, p));
    dropout_train.push_back(train != nullptr ? train : constant(graph, true));
  }
  Value* fill = match.fill ? product(graph, *match.fill, match.factors_after_fill)
                           : constant(graph, 0.0);
  Value* softmax_dim = match.softmax_dim != nullptr ? match.softmax_dim : constant(graph, -1);
  Value* mask = optional(graph, match.mask);
  Value* keep_given = optional(graph, match.keep);
  Value* ok = graph.insert(
      op(kAttentionGuardOp),
      {match.query, key, match.value, mask, keep_given, fill, softmax_dim, optional(graph, probs_dtype),
       insertList(graph, c10::FloatType::get(), dropout_p), insertList(graph, c10::BoolType::get(), dropout_train),
       constant(graph, sdpa)});

  Node* branch = graph.insertNode(graph.create(prim::If, {ok}, 0));
  Block* fused = branch->addBlock();
  Block* fallback = branch->addBlock();
  {
    torch::jit::WithInsertPoint in_fused(fused);
    Value* result = nullptr;
    if (sdpa) {
      Node* node = match.sdpa;
      result = graph.insert(op(kAttentionOp),
                            {match.query, match.key, match.value, mask, node->input(6), node->input(5),
                             constant(graph, heads_last)});
    } else {
      Value* keep = keep_given;
      if (match.keep != nullptr && match.keep_inverted)
        keep = graph.insert(op("aten::logical_not"), {match.keep});
      Value* scale = product(graph, Scalar{1.0, nullptr}, match.factors);
      result = graph.insert(op(kAttentionExplicitOp), {match.query, key, match.value, mask, keep, scale, fill,
                                                        constant(graph, match.fill_adds_mask),
                                                        constant(graph, heads_last)});
    }
    fused->registerOutput(result);
  }
  Value* output = branch->addOutput()->setType(last->output()->type());
  last->output()->replaceAllUsesWith(output);
  for (Node* node : match.nodes) node->moveBefore(fallback->return_node());
  fallback->registerOutput(last->output());
}

}  // namespace

bool isKilnFallback(const Node* node) {
  if (node->kind() != prim::If || node->blocks().size() != 2) return false;
  for (const Node* inner : node->blocks()[0]->nodes()) {
    const std::string kind = inner->kind().toQualString();
    if (kind == kFusionGroupOp || kind == kAttentionOp || kind == kAttentionExplicitOp) return true;
  }
  return false;
}

int fuseAttention(std::shared_ptr<Graph>& graph, const Options& /*options*/) {
  std::vector<Match> matches = AttentionMatcher(graph).find();
  for (const Match& match : matches) {
    for (const Use& use : match.metadata_uses) use.user->replaceInput(use.offset, match.query);
    for (Node* profile : match.metadata_profiles) profile->destroy();
    replace(*graph, match);
  }
  return static_cast<int>(matches.size());
}

}  // namespace kiln
