#include "fuser/group_stats.h"

#include <torch/csrc/jit/ir/irparser.h>

#include <mutex>
#include <unordered_map>

#include "fuser/fusion_pass.h"

namespace kiln {
namespace {

std::mutex stats_mutex;
std::unordered_map<std::string, GroupStats>& statsTable() {
  static auto* table = new std::unordered_map<std::string, GroupStats>();
  return *table;
}

std::shared_ptr<torch::jit::Graph> parse(const std::string& text) {
  auto graph = std::make_shared<torch::jit::Graph>();
  torch::jit::parseIR(text, graph.get());
  return graph;
}

}  // namespace

std::string groupSubgraphText(const torch::jit::Node* group) {
  const torch::jit::Value* code = group->inputs().back();
  auto value = torch::jit::toIValue(code);
  TORCH_CHECK(value && value->isString(), "kiln: fusion group without a constant subgraph string");
  return value->toStringRef();
}

std::vector<std::string> groupOps(const std::string& subgraph_text) {
  std::vector<std::string> ops;
  std::shared_ptr<torch::jit::Graph> graph = parse(subgraph_text);
  for (const torch::jit::Node* node : graph->nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    ops.push_back(node->kind().toQualString());
  }
  return ops;
}

size_t groupNumInputs(const std::string& subgraph_text) {
  return parse(subgraph_text)->inputs().size();
}

size_t groupNumOutputs(const std::string& subgraph_text) {
  return parse(subgraph_text)->outputs().size();
}

bool isFusionFallback(const torch::jit::Node* if_node) {
  if (if_node->kind() != torch::jit::prim::If || if_node->blocks().size() != 2) return false;
  for (const torch::jit::Node* node : if_node->blocks()[0]->nodes()) {
    if (node->kind().toQualString() == std::string(kFusionGroupOp)) return true;
  }
  return false;
}

GroupStats groupStats(const std::string& subgraph_text) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  auto found = statsTable().find(subgraph_text);
  return found == statsTable().end() ? GroupStats{} : found->second;
}

void recordGroupCall(const std::string& subgraph_text, int64_t bytes_fused, int64_t bytes_unfused) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  GroupStats& stats = statsTable()[subgraph_text];
  stats.calls++;
  stats.bytes_fused = bytes_fused;
  stats.bytes_unfused = bytes_unfused;
}

void recordGroupFallback(const std::string& subgraph_text) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  statsTable()[subgraph_text].fallbacks++;
}

}  // namespace kiln
