// kiln::report: what the pass fused in a graph, and the memory traffic each group saves.
#include <torch/csrc/jit/ir/irparser.h>

#include <algorithm>
#include <sstream>

#include "codegen/json.h"
#include "fuser/fusion_pass.h"
#include "fuser/group_stats.h"
#include "fuser/library_calls.h"
#include "kiln/kiln.h"

namespace kiln {
namespace {

bool isAttentionOp(const torch::jit::Node* node) {
  const std::string kind = node->kind().toQualString();
  return kind == kAttentionOp || kind == kAttentionExplicitOp;
}

// An attention group: the ops it replaced are those of the fallback block.
GroupReport attentionGroup(const torch::jit::Node* if_node, size_t index) {
  GroupReport group;
  group.name = "attention_" + std::to_string(index);
  group.kind = "attention";
  for (const torch::jit::Node* node : if_node->blocks()[1]->nodes()) {
    if (node->kind() == torch::jit::prim::Constant || node->kind() == torch::jit::prim::profile) continue;
    group.ops.push_back(node->kind().toQualString());
  }
  for (const torch::jit::Node* node : if_node->blocks()[0]->nodes()) {
    if (!isAttentionOp(node)) continue;
    // q, k, v and whichever masks are present.
    for (size_t i = 0; i < std::min<size_t>(node->inputs().size(), 5); ++i)
      group.num_inputs += node->input(i)->type()->kind() == c10::TypeKind::TensorType;
  }
  group.num_outputs = 1;
  return group;
}

// A GEMM or convolution with its epilogue: the ops it replaced, read back from the epilogue.
GroupReport libraryGroup(const torch::jit::Node* node, size_t index) {
  GroupReport group;
  const bool linear = node->kind().toQualString() == std::string(kLinearOp);
  group.kind = linear ? "linear" : "conv2d";
  group.name = group.kind + "_" + std::to_string(index);
  group.ops.push_back(linear ? "aten::linear" : "aten::conv2d");
  std::optional<c10::IValue> text = torch::jit::toIValue(node->inputs().back());
  std::optional<Epilogue> epilogue = text && text->isString() ? Epilogue::parse(text->toStringRef()) : std::nullopt;
  if (epilogue && epilogue->add != Epilogue::Add::kNone)
    group.ops.push_back(epilogue->add == Epilogue::Add::kInPlace ? "aten::add_" : "aten::add");
  if (epilogue && epilogue->activation != Activation::kNone) {
    const std::string name = activationName(epilogue->activation);
    group.ops.push_back("aten::" + (name == "gelu_tanh" ? std::string("gelu") : name));
  }
  group.num_inputs = node->input(3)->mustBeNone() ? 1 : 2;
  group.num_outputs = 1;
  std::optional<c10::IValue> weight = torch::jit::toIValue(node->input(1));
  if (weight && weight->isTensor()) {
    GroupStats stats = libraryStats(weight->toTensor().unsafeGetTensorImpl());
    group.calls = stats.calls;
    group.choice = stats.choice;
    if (stats.timed_calls > 0) group.ns_per_call = static_cast<double>(stats.timed_ns) / static_cast<double>(stats.timed_calls);
  }
  return group;
}

// A convolution region: the ops of its graph (the op's last input), which ran as one.
GroupReport regionGroup(const torch::jit::Node* node, size_t index) {
  GroupReport group;
  group.name = "conv_region_" + std::to_string(index);
  group.kind = "conv_region";
  std::optional<c10::IValue> text = torch::jit::toIValue(node->inputs().back());
  if (!text || !text->isString()) return group;
  try {
    auto graph = std::make_shared<torch::jit::Graph>();
    torch::jit::parseIR(text->toStringRef(), graph.get());
    for (const torch::jit::Node* op : graph->nodes()) {
      if (op->kind() == torch::jit::prim::Constant || op->kind() == torch::jit::prim::ListConstruct) continue;
      group.ops.push_back(op->kind().toQualString());
    }
  } catch (const std::exception&) {
    // A graph this torch cannot read: the op fails the same way when it runs.
  }
  group.num_inputs = static_cast<int64_t>(node->input(0)->node()->inputs().size());
  group.num_outputs = 1;
  GroupStats stats = groupStats(text->toStringRef());
  group.calls = stats.calls;
  group.choice = stats.choice;
  if (stats.timed_calls > 0) group.ns_per_call = static_cast<double>(stats.timed_ns) / static_cast<double>(stats.timed_calls);
  return group;
}

void collect(torch::jit::Block* block, Report& report) {
  for (torch::jit::Node* node : block->nodes()) {
    const std::string kind = node->kind().toQualString();
    if (kind == kConvRegionOp) {
      GroupReport group = regionGroup(node, report.groups.size());
      report.nodes_fused += static_cast<int64_t>(group.ops.size());
      report.groups.push_back(std::move(group));
      continue;
    }
    if (kind == kLinearOp || kind == kConv2dOp || kind == kConv2dIntoOtherOp) {
      GroupReport group = libraryGroup(node, report.groups.size());
      report.nodes_fused += static_cast<int64_t>(group.ops.size());
      report.groups.push_back(std::move(group));
      continue;
    }
    if (node->kind().toQualString() == std::string(kFusionGroupOp)) {
      GroupReport group;
      group.name = "fusion_group_" + std::to_string(report.groups.size());
      group.kind = "elementwise";
      std::string code = groupCode(node);
      GroupShape shape;
      try {
        shape = groupShape(code);
      } catch (const c10::Error&) {
        // A code this kiln cannot read (an older kiln's): the group runs its original ops.
      }
      group.ops = std::move(shape.ops);
      group.num_outputs = static_cast<int64_t>(shape.num_outputs);
      group.num_inputs = static_cast<int64_t>(shape.num_inputs);
      GroupStats stats = groupStats(code);
      group.bytes_fused = stats.bytes_fused;
      group.bytes_unfused = stats.bytes_unfused;
      group.calls = stats.calls;
      group.fallbacks = stats.fallbacks;
      if (stats.timed_calls > 0) group.ns_per_call = static_cast<double>(stats.timed_ns) / static_cast<double>(stats.timed_calls);
      report.nodes_fused += static_cast<int64_t>(group.ops.size());
      report.groups.push_back(std::move(group));
      continue;  // the fallback block under the guard holds the same ops again
    }
    if (isKilnFallback(node)) {
      const auto& fused = node->blocks()[0]->nodes();
      if (std::any_of(fused.begin(), fused.end(), isAttentionOp)) {
        GroupReport group = attentionGroup(node, report.groups.size());
        report.nodes_fused += static_cast<int64_t>(group.ops.size());
        report.groups.push_back(std::move(group));
        continue;
      }
      // Count only the fused branch's group; skip the original ops kept for the fallback.
      collect(node->blocks()[0], report);
      continue;
    }
    if (node->kind() != torch::jit::prim::Constant && node->kind() != torch::jit::prim::ListConstruct &&
        node->kind() != torch::jit::prim::ListUnpack) {
      report.nodes_total++;
    }
    for (torch::jit::Block* inner : node->blocks()) collect(inner, report);
  }
}

}  // namespace

Report report(const std::shared_ptr<torch::jit::Graph>& graph) {
  Report result;
  collect(graph->block(), result);
  result.nodes_total += result.nodes_fused;
  return result;
}

std::string Report::toJson() const {
  std::ostringstream out;
  out << "{\"nodes_total\": " << nodes_total << ", \"nodes_fused\": " << nodes_fused
      << ", \"groups\": [";
  for (size_t i = 0; i < groups.size(); ++i) {
    const GroupReport& group = groups[i];
    out << (i ? ", " : "") << "{\"name\": " << jsonQuote(group.name) << ", \"kind\": " << jsonQuote(group.kind)
        << ", \"ops\": [";
    for (size_t j = 0; j < group.ops.size(); ++j) {
      out << (j ? ", " : "") << jsonQuote(group.ops[j]);
    }
    out << "], \"inputs\": " << group.num_inputs << ", \"outputs\": " << group.num_outputs
        << ", \"bytes_fused\": " << group.bytes_fused
        << ", \"bytes_unfused\": " << group.bytes_unfused << ", \"calls\": " << group.calls
        << ", \"fallbacks\": " << group.fallbacks << ", \"ns_per_call\": " << group.ns_per_call
        << ", \"choice\": " << jsonQuote(group.choice) << "}";
  }
  out << "]}";
  return out.str();
}

std::string Report::toText() const {
  std::ostringstream out;
  out << "kiln fused " << nodes_fused << " of " << nodes_total << " nodes into " << groups.size()
      << " group" << (groups.size() == 1 ? "" : "s") << "\n";
  for (const GroupReport& group : groups) {
    out << "  " << group.name << " (" << group.kind << ", " << group.num_inputs << " in, "
        << group.num_outputs << " out): ";
    for (size_t j = 0; j < group.ops.size(); ++j) out << (j ? " " : "") << group.ops[j];
    if (!group.choice.empty()) out << "  [" << group.choice << ", " << group.calls << " calls]";
    out << "\n";
    if (group.bytes_fused >= 0) {
      out << "      bytes moved: " << group.bytes_fused << " fused vs " << group.bytes_unfused
          << " unfused (" << (group.bytes_fused > 0 ? static_cast<double>(group.bytes_unfused) /
                                                          static_cast<double>(group.bytes_fused)
                                                    : 0.0)
          << "x), " << group.calls << " calls, " << group.fallbacks << " fallbacks\n";
    }
  }
  return out.str();
}

}  // namespace kiln
