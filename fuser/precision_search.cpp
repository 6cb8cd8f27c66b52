// The float32 part of a reduced precision (Options::min_cosine, docs/precision.md): TensorRT keeps
// a layer in float32 when the user's accuracy needs it; kiln finds, on the example inputs, how many
// of the graph's leading ops must keep float32 for every floating output to reach the bound.
//
// Why a leading part: rounding an activation early perturbs everything after it, and each layer
// can amplify it; rounding late perturbs little. (EfficientNet-B0 with random weights, eager, 4
// inputs: its first feature stage alone in bf16 costs 0.0005 of cosine, its last four stages
// together 0.0007; all in bf16 0.996, the first four of nine stages kept float32 0.9993.) The
// cosine grows with the part kept, close to monotonically, so a bisection over the cuts finds the
// shortest part in about log2(ops) trials; each trial runs the converted graph as it is (library
// calls, no elementwise fusion, which changes no dtype) on the example inputs.
#include <torch/csrc/jit/runtime/interpreter.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <sstream>

#include "codegen/json.h"
#include "fuser/fusion_pass.h"
#include "fuser/library_calls.h"

namespace kiln {
namespace {

c10::IValue copyValue(const c10::IValue& value) {
  if (value.isTensor()) return value.toTensor().clone();
  if (value.isTuple()) {
    std::vector<c10::IValue> items;
    for (const c10::IValue& item : value.toTupleRef().elements()) items.push_back(copyValue(item));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  if (value.isList()) {
    c10::impl::GenericList list(value.toList().elementType());
    for (const c10::IValue& item : value.toListRef()) list.push_back(copyValue(item));
    return list;
  }
  if (value.isGenericDict()) {
    c10::impl::GenericDict dict(value.toGenericDict().keyType(), value.toGenericDict().valueType());
    for (const auto& entry : value.toGenericDict()) dict.insert(entry.key(), copyValue(entry.value()));
    return dict;
  }
  return value;
}

c10::IValue runGraph(const std::shared_ptr<torch::jit::Graph>& graph, const c10::IValue& self,
                     const std::vector<c10::IValue>& inputs) {
  torch::jit::Code code(graph, "kiln_precision_trial");
  torch::jit::InterpreterState state(code);
  torch::jit::Stack stack;
  stack.push_back(self);
  for (const c10::IValue& input : copyArguments(inputs)) stack.push_back(input);
  state.run(stack);
  if (stack.size() == 1) return stack.front();
  return c10::ivalue::Tuple::create(std::move(stack));
}

bool isLibraryCall(const torch::jit::Node* node) {
  const std::string kind = node->kind().toQualString();
  return kind == kLinearOp || kind == kConv2dOp || kind == kConv2dIntoOtherOp;
}

// The top-level op numbered `position` (constants not counted), or null.
const torch::jit::Node* opAt(const torch::jit::Graph& graph, int64_t position) {
  int64_t at = 0;
  for (const torch::jit::Node* node : graph.nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    if (at++ == position) return node;
  }
  return nullptr;
}

// "kiln::conv2d in features.3.0.block.1": the op, and the submodule whose code made it where the
// graph keeps that (models saved by torch.jit.save, scripted and traced, do), else the line.
std::string describe(const torch::jit::Node* node) {
  std::string text = node->kind().toQualString();
  std::string path;
  if (std::optional<torch::jit::InlinedCallStackPtr> stack = node->callstack()) {
    for (const torch::jit::InlinedCallStackEntry& entry : (*stack)->vec()) {
      const std::optional<torch::jit::ModuleInstanceInfo>& module = std::get<2>(entry);
      if (module && !module->instance_name().empty()) path += (path.empty() ? "" : ".") + module->instance_name();
    }
  }
  const torch::jit::ScopePtr scope = const_cast<torch::jit::Node*>(node)->scope();
  if (path.empty() && scope && !scope->isBlank()) {
    // A graph traced in this process names its modules by scope: "__module.features/__module.features.3".
    path = scope->namesFromRoot();
    const size_t last = path.rfind("__module.");
    if (last != std::string::npos) path = path.substr(last + 9);
  }
  if (!path.empty()) return text + " in " + path;
  if (auto where = node->sourceRange().file_line_col()) {
    text += " (" + std::get<0>(*where) + ":" + std::to_string(std::get<1>(*where)) + ")";
  }
  return text;
}

void countLibraryCalls(const torch::jit::Block* block, int64_t position, int64_t cut, PrecisionPlan& plan) {
  for (const torch::jit::Node* node : block->nodes()) {
    for (const torch::jit::Block* inner : node->blocks()) countLibraryCalls(inner, position, cut, plan);
    if (!isLibraryCall(node)) continue;
    plan.library_calls_total++;
    if (position < cut) plan.library_calls_float32++;
  }
}

std::string cosineText(double cosine) {
  if (cosine < 0) return "failed (an output not finite, or the converted graph did not run)";
  std::ostringstream text;
  text.precision(6);
  text << std::fixed << cosine;
  return text.str();
}

}  // namespace

std::vector<c10::IValue> copyArguments(const std::vector<c10::IValue>& arguments) {
  std::vector<c10::IValue> copies;
  for (const c10::IValue& argument : arguments) copies.push_back(copyValue(argument));
  return copies;
}

PrecisionPlan planPrecision(const std::shared_ptr<torch::jit::Graph>& graph, const c10::IValue& self,
                            const std::vector<c10::IValue>& inputs, const c10::IValue& expected,
                            Precision precision, double min_cosine) {
  PrecisionPlan plan;
  plan.precision = precisionName(precision);
  plan.min_cosine = min_cosine;
  plan.ops_total = precisionOpCount(*graph);
  at::NoGradGuard no_grad;
  auto trial = [&](int64_t float32_ops) {
    std::shared_ptr<torch::jit::Graph> candidate = graph->copy();
    convertPrecision(candidate, precision, float32_ops);
    plan.trials++;
    try {
      return worstOutputCosine(expected, runGraph(candidate, self, inputs));
    } catch (const std::exception& error) {
      log(LogLevel::kInfo, "precision: with the first " + std::to_string(float32_ops) +
                               " ops in float32 the converted graph failed: " + error.what());
      return -1.0;
    }
  };
  plan.cosine_all_low = plan.cosine = trial(0);
  if (plan.cosine_all_low < min_cosine) {
    // cuts[lo] misses the bound; cuts[hi] meets it, or is every op (float32 throughout).
    const std::vector<int64_t> cuts = precisionCuts(*graph);
    size_t lo = 0, hi = cuts.size() - 1;
    std::optional<double> at_hi;
    while (hi - lo > 1) {
      const size_t mid = lo + (hi - lo) / 2;
      const double cosine = trial(cuts[mid]);
      if (cosine >= min_cosine) {
        hi = mid;
        at_hi = cosine;
      } else {
        lo = mid;
      }
    }
    plan.ops_float32 = cuts[hi];
    plan.cosine = at_hi ? *at_hi : trial(cuts[hi]);
  }
  describePlan(*graph, plan.ops_float32, plan);
  return plan;
}

void describePlan(const torch::jit::Graph& graph, int64_t float32_ops, PrecisionPlan& plan) {
  plan.ops_float32 = float32_ops;
  plan.library_calls_total = plan.library_calls_float32 = 0;
  int64_t position = 0;
  for (const torch::jit::Node* node : graph.nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    for (const torch::jit::Block* inner : node->blocks()) countLibraryCalls(inner, position, float32_ops, plan);
    if (isLibraryCall(node)) {
      plan.library_calls_total++;
      if (position < float32_ops) plan.library_calls_float32++;
    }
    position++;
  }
  plan.last_float32_op = float32_ops > 0 ? describe(opAt(graph, float32_ops - 1)) : "";
}

void appendTensors(const c10::IValue& value, std::vector<at::Tensor>& out) {
  if (value.isTensor()) {
    out.push_back(value.toTensor());
  } else if (value.isTuple()) {
    for (const c10::IValue& item : value.toTupleRef().elements()) appendTensors(item, out);
  } else if (value.isList()) {
    for (const c10::IValue& item : value.toListRef()) appendTensors(item, out);
  } else if (value.isGenericDict()) {
    for (const auto& entry : value.toGenericDict()) appendTensors(entry.value(), out);
  }
}

double worstOutputCosine(const c10::IValue& expected, const c10::IValue& actual) {
  std::vector<at::Tensor> want, got;
  appendTensors(expected, want);
  appendTensors(actual, got);
  if (want.size() != got.size()) return -1;
  double worst = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!want[i].is_floating_point()) continue;
    if (want[i].sizes() != got[i].sizes()) return -1;
    const at::Tensor e = want[i].detach().to(at::kCPU, at::kDouble).flatten();
    const at::Tensor a = got[i].detach().to(at::kCPU, at::kDouble).flatten();
    const at::Tensor finite = e.isfinite();
    if (!a.isfinite().logical_or(finite.logical_not()).all().item<bool>()) return -1;
    const at::Tensor x = at::where(finite, e, 0.0), y = at::where(finite, a, 0.0);
    const double norms = (x.norm() * y.norm()).item<double>();
    const double cosine = norms > 0 ? (x.dot(y)).item<double>() / norms : (at::equal(x, y) ? 1.0 : 0.0);
    worst = std::min(worst, cosine);
  }
  return worst;
}


std::string PrecisionPlan::toText() const {
  std::ostringstream text;
  text << precision << " with min cosine " << min_cosine << ": ";
  if (ops_float32 == 0) {
    text << "every op in " << precision << " (worst output cosine to float32 " << cosineText(cosine_all_low) << ")";
    return text.str();
  }
  text << "the first " << ops_float32 << " of " << ops_total << " ops kept float32 (" << library_calls_float32
       << " of " << library_calls_total << " GEMMs and convolutions), through " << last_float32_op
       << ", because with every op in " << precision << " the worst output's cosine to float32 was "
       << cosineText(cosine_all_low) << "; with them kept it is " << cosineText(cosine) << " (" << trials
       << " trial conversions)";
  return text.str();
}

std::string PrecisionPlan::toJson() const {
  std::ostringstream json;
  auto number = [](double value) {
    if (value < 0 || !std::isfinite(value)) return std::string("null");
    char text[32];
    std::snprintf(text, sizeof text, "%.9g", value);
    return std::string(text);
  };
  json << "{\"precision\": " << jsonQuote(precision) << ", \"min_cosine\": " << number(min_cosine)
       << ", \"cosine_all_low\": " << number(cosine_all_low) << ", \"cosine\": " << number(cosine)
       << ", \"ops_total\": " << ops_total << ", \"ops_float32\": " << ops_float32
       << ", \"library_calls_total\": " << library_calls_total << ", \"library_calls_float32\": " << library_calls_float32
       << ", \"last_float32_op\": " << jsonQuote(last_float32_op) << ", \"trials\": " << trials << "}";
  return json.str();
}

}  // namespace kiln
