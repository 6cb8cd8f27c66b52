// The shape of a kiln fusion group in the graph, and run-time statistics per group.
//
// Note: a group is stored in the graph as ordinary, serializable TorchScript:
//   %ok = kiln::fusion_guard(%tensors, %floats, %ints, %code)
//   %outs = prim::If(%ok)
//     block0: kiln::fusion_group(%tensors, %floats, %ints, %code) + prim::ListUnpack
//     block1: the original ops (the fallback)
// where %code is a string constant holding the group's subgraph as TorchScript IR text. The
// subgraph text is the group's identity: statistics and compiled kernels are keyed by it.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct GroupStats {
  int64_t calls = 0;
  int64_t fallbacks = 0;
  int64_t bytes_fused = -1;    // of the last fused call
  int64_t bytes_unfused = -1;  // of the last fused call
};

// The subgraph text of a kiln::fusion_group node (its last input, a string constant).
std::string groupSubgraphText(const torch::jit::Node* group);
// The aten ops in a subgraph text, in order (views and constants included as they appear).
std::vector<std::string> groupOps(const std::string& subgraph_text);
size_t groupNumInputs(const std::string& subgraph_text);
size_t groupNumOutputs(const std::string& subgraph_text);
// True for the prim::If the pass builds around a group.
bool isFusionFallback(const torch::jit::Node* if_node);

GroupStats groupStats(const std::string& subgraph_text);
void recordGroupCall(const std::string& subgraph_text, int64_t bytes_fused, int64_t bytes_unfused);
void recordGroupFallback(const std::string& subgraph_text);

}  // namespace kiln
