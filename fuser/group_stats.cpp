#include "fuser/group_stats.h"

#include <torch/csrc/jit/ir/irparser.h>

#include <mutex>
#include <unordered_map>


namespace kiln {
namespace {

std::mutex stats_mutex;
std::unordered_map<std::string, GroupCounters>& countersTable() {
  static auto* table = new std::unordered_map<std::string, GroupCounters>();
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

GroupShape groupShape(const std::string& subgraph_text) {
  std::shared_ptr<torch::jit::Graph> graph = parse(subgraph_text);
  GroupShape shape;
  for (const torch::jit::Node* node : graph->nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    shape.ops.push_back(node->kind().toQualString());
  }
  shape.num_inputs = graph->inputs().size();
  shape.num_outputs = graph->outputs().size();
  return shape;
}

GroupCounters& groupCounters(const std::string& subgraph_text) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  return countersTable()[subgraph_text];  // nodes of an unordered_map never move
}

GroupStats groupStats(const std::string& subgraph_text) {
  const GroupCounters& counters = groupCounters(subgraph_text);
  GroupStats stats;
  stats.calls = counters.calls.load();
  stats.fallbacks = counters.fallbacks.load();
  stats.bytes_fused = counters.bytes_fused.load();
  stats.bytes_unfused = counters.bytes_unfused.load();
  return stats;
}

}  // namespace kiln
