// The shape of a kiln fusion group in the graph, and run-time statistics per group.
//
// Note: a group is stored in the graph as ordinary, serializable TorchScript:
//   %ok = kiln::fusion_guard(%tensors, %floats, %ints, %code)
//   %outs = prim::If(%ok)
//     block0: kiln::fusion_group(%tensors, %floats, %ints, %code) + prim::ListUnpack
//     block1: the original ops (the fallback)
// where %code is a string constant holding the group's subgraph as group code (group_code.h).
// The code is the group's identity: statistics and compiled kernels are keyed by it.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include <atomic>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

struct GroupStats {
  int64_t calls = 0;
  int64_t fallbacks = 0;
  int64_t bytes_fused = -1;    // of the last fused call
  int64_t bytes_unfused = -1;  // of the last fused call
  int64_t timed_calls = 0;     // fused calls on the CPU, each timed whole (outputs made, kernel run)
  int64_t timed_ns = 0;        // their time in all
  std::string choice;          // library calls: how the last call ran ("onednn", "aten", ...)
};

// Live counters of one group, updated by the runtime without locks. One object per group code
// for the life of the process, so the runtime looks it up once per program, not once per call.
struct GroupCounters {
  std::atomic<int64_t> calls{0};
  std::atomic<int64_t> fallbacks{0};
  std::atomic<int64_t> bytes_fused{-1};
  std::atomic<int64_t> bytes_unfused{-1};
  std::atomic<int64_t> timed_calls{0};
  std::atomic<int64_t> timed_ns{0};
  std::atomic<const char*> choice{nullptr};  // a string literal, or none
};

// What a group code holds: its ops (constants left out) and its arity.
struct GroupShape {
  std::vector<std::string> ops;
  size_t num_inputs = 0;
  size_t num_outputs = 0;
};

// The group code of a kiln::fusion_group node (its last input, a string constant).
std::string groupCode(const torch::jit::Node* group);
GroupShape groupShape(const std::string& code);

GroupCounters& groupCounters(const std::string& code);
// A library call (kiln::linear, kiln::conv2d) is counted under its weight, a graph constant.
GroupCounters& libraryCounters(const c10::TensorImpl* weight);
GroupStats libraryStats(const c10::TensorImpl* weight);
GroupStats groupStats(const std::string& code);

}  // namespace kiln
