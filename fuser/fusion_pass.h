// kiln's passes over a TorchScript graph. The elementwise pass finds maximal groups of fusible ops
// and replaces each with a guarded kiln::fusion_group node that keeps the original ops as fallback;
// the attention pass does the same for attention subgraphs.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include <memory>
#include <vector>

#include "kiln/options.h"

namespace kiln {

// Node kinds the pass inserts; fuser/ and torch_ops/ agree on these names.
constexpr const char* kFusionGroupOp = "kiln::fusion_group";
constexpr const char* kFusionGuardOp = "kiln::fusion_guard";
constexpr const char* kAttentionOp = "kiln::attention";
constexpr const char* kAttentionExplicitOp = "kiln::attention_explicit";
constexpr const char* kAttentionGuardOp = "kiln::attention_guard";

// Returns the number of groups created.
int fuseElementwise(std::shared_ptr<torch::jit::Graph>& graph, const Options& options);

// The attention pattern (attention_fusion.cpp): replaces each scaled_dot_product_attention and
// each explicit matmul/softmax attention with a guarded kiln attention op. Runs before
// fuseElementwise, which would otherwise take the scaling and masking ops. Returns the count.
int fuseAttention(std::shared_ptr<torch::jit::Graph>& graph, const Options& options);

// The GEMM / convolution pattern (library_fusion.cpp): in a frozen graph, replaces each linear and
// 2-D convolution over constant weights, with its epilogue, by kiln::linear / kiln::conv2d
// (library_calls.h). Runs before the other two passes. Returns the count.
int fuseLibraryCalls(std::shared_ptr<torch::jit::Graph>& graph, const Options& options);

// Sibling linears (linear_siblings.cpp): kiln::linear calls reading one input with one epilogue
// become one call over their stacked weights, each result a slice of its result. Run by
// fuseLibraryCalls. Returns the number of linears joined.
int joinSiblingLinears(std::shared_ptr<torch::jit::Graph>& graph);

// Reduced precision (precision.cpp): converts a frozen graph's float32 constants to bfloat16 or
// float16 and casts its floating inputs, its library calls' operands and its outputs. Run after
// fuseLibraryCalls. Returns the number of boundary casts inserted.
int convertPrecision(std::shared_ptr<torch::jit::Graph>& graph, Precision precision);

// True for the prim::If either pass builds: block0 runs kiln, block1 keeps the original ops.
bool isKilnFallback(const torch::jit::Node* node);

// Inserts prim::ListConstruct of `items` at the graph's insertion point; both passes build their
// guards' list arguments with it.
torch::jit::Value* insertList(torch::jit::Graph& graph, const c10::TypePtr& element,
                              const std::vector<torch::jit::Value*>& items);

}  // namespace kiln
