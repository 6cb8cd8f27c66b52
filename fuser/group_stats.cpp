#include "fuser/group_stats.h"

#include "fuser/group_code.h"

#include <mutex>
#include <unordered_map>


namespace kiln {
namespace {

std::mutex stats_mutex;
std::unordered_map<std::string, GroupCounters>& countersTable() {
  static auto* table = new std::unordered_map<std::string, GroupCounters>();
  return *table;
}

}  // namespace

std::string groupCode(const torch::jit::Node* group) {
  const torch::jit::Value* code = group->inputs().back();
  auto value = torch::jit::toIValue(code);
  TORCH_CHECK(value && value->isString(), "kiln: fusion group without a constant subgraph string");
  return value->toStringRef();
}

GroupShape groupShape(const std::string& code) {
  std::shared_ptr<torch::jit::Graph> graph = decodeGroupCode(code);
  GroupShape shape;
  for (const torch::jit::Node* node : graph->nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    shape.ops.push_back(node->kind().toQualString());
  }
  shape.num_inputs = graph->inputs().size();
  shape.num_outputs = graph->outputs().size();
  return shape;
}

GroupCounters& groupCounters(const std::string& code) {
  std::lock_guard<std::mutex> lock(stats_mutex);
  return countersTable()[code];  // nodes of an unordered_map never move
}

GroupStats groupStats(const std::string& code) {
  const GroupCounters& counters = groupCounters(code);
  GroupStats stats;
  stats.calls = counters.calls.load();
  stats.fallbacks = counters.fallbacks.load();
  stats.bytes_fused = counters.bytes_fused.load();
  stats.bytes_unfused = counters.bytes_unfused.load();
  stats.timed_calls = counters.timed_calls.load();
  stats.timed_ns = counters.timed_ns.load();
  if (const char* choice = counters.choice.load()) stats.choice = choice;
  return stats;
}

namespace {
std::string libraryKey(const c10::TensorImpl* weight) {
  return "library call with weight " + std::to_string(reinterpret_cast<uintptr_t>(weight));
}
}  // namespace

GroupCounters& libraryCounters(const c10::TensorImpl* weight) { return groupCounters(libraryKey(weight)); }

GroupStats libraryStats(const c10::TensorImpl* weight) { return groupStats(libraryKey(weight)); }

}  // namespace kiln
