// kiln's passes over a TorchScript graph. The elementwise pass finds maximal groups of fusible ops
// and replaces each with a guarded kiln::fusion_group node that keeps the original ops as fallback;
// the attention pass does the same for attention subgraphs.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include <memory>
#include <vector>

#include "kiln/kiln.h"
#include "kiln/options.h"

namespace kiln {

// Node kinds the pass inserts; fuser/ and torch_ops/ agree on these names.
constexpr const char* kFusionGroupOp = "kiln::fusion_group";
constexpr const char* kFusionGuardOp = "kiln::fusion_guard";
constexpr const char* kAttentionOp = "kiln::attention";
constexpr const char* kAttentionExplicitOp = "kiln::attention_explicit";
constexpr const char* kAttentionGuardOp = "kiln::attention_guard";
constexpr const char* kConvRegionOp = "kiln::conv_region";

// Returns the number of groups created.
int fuseElementwise(std::shared_ptr<torch::jit::Graph>& graph, const Options& options);

// The attention pattern (attention_fusion.cpp): replaces each scaled_dot_product_attention and
// each explicit matmul/softmax attention with a guarded kiln attention op. Runs before
// fuseElementwise, which would otherwise take the scaling and masking ops. Returns the count.
int fuseAttention(std::shared_ptr<torch::jit::Graph>& graph, const Options& options);

// The GEMM / convolution pattern (library_fusion.cpp): in a frozen graph, replaces each linear and
// 2-D convolution over constant weights, with its epilogue, by kiln::linear / kiln::conv2d
// (library_calls.h). Runs before the other two passes. Returns the count. The calls' channels-last
// results (and kiln::conv_region's) reach only ops that take any strides; the graph's outputs
// too, unless `outputs_take_any_layout` (a conv_region's own graph: the op's consumers are
// guarded where the op is).
int fuseLibraryCalls(std::shared_ptr<torch::jit::Graph>& graph, const Options& options,
                     bool outputs_take_any_layout = false);

// A 2-D convolution kiln::conv2d can run (library_fusion.cpp): aten::conv2d, or aten::_convolution
// not transposed, over a constant 4-D weight and a constant bias or none, with constant stride,
// padding, dilation and groups.
bool isLibraryConvolution(const torch::jit::Node* node);
// A constant scalar equal to 1 (int or float): an add's alpha, addmm's beta and alpha as models
// leave them.
bool isConstantOne(torch::jit::Value* value);

// Convolution regions (conv_regions.cpp): in a frozen float32 graph, each run of two or more
// convolutions over constant weights, with the activations, residual adds, norms, linears,
// pooling, concatenations and views between them, becomes one kiln::conv_region op that runs it
// the fastest way measured (ATen, kiln's library calls or oneDNN Graph). Runs before
// fuseLibraryCalls. Returns the count.
int extractConvolutionRegions(std::shared_ptr<torch::jit::Graph>& graph);

// nn.MultiheadAttention's and nn.TransformerEncoderLayer's fast paths (native_attention.cpp): in a
// frozen graph, each aten::_native_multi_head_attention of self-attention without a mask, its
// weights unread, and each aten::_transformer_encoder_layer_fwd without a mask, over constant
// weights, becomes the linears, scaled_dot_product_attention, norms and adds it stands for, so
// that the library-call and attention passes take them. Runs before fuseLibraryCalls. Returns the
// count.
int decomposeNativeAttention(std::shared_ptr<torch::jit::Graph>& graph);

// Sibling linears (linear_siblings.cpp): kiln::linear calls reading one input with one epilogue
// become one call over their stacked weights, each result a slice of its result. Run by
// fuseLibraryCalls. Returns the number of linears joined.
int joinSiblingLinears(std::shared_ptr<torch::jit::Graph>& graph);

// Reduced precision (precision.cpp): converts a frozen graph's float32 constants to bfloat16 or
// float16 and casts its floating inputs, its library calls' operands and its outputs. Run after
// fuseLibraryCalls. The first `float32_ops` top-level ops (constants not counted) keep float32:
// what they hand to the rest is cast where the rest begins. Returns the number of casts inserted
// at the boundaries.
int convertPrecision(std::shared_ptr<torch::jit::Graph>& graph, Precision precision, int64_t float32_ops = 0);
// The graph's top-level ops, constants not counted: the largest float32_ops.
int64_t precisionOpCount(const torch::jit::Graph& graph);
// The values of float32_ops convertPrecision accepts, ascending (0 and precisionOpCount among
// them): those where no list, tuple or optional of tensors is made before and read after.
std::vector<int64_t> precisionCuts(const torch::jit::Graph& graph);

// A forward's arguments with every tensor in them (in tuples, lists and dicts) cloned: each run on
// example inputs gets its own, since a module may change its inputs in place.
std::vector<c10::IValue> copyArguments(const std::vector<c10::IValue>& arguments);

// Appends the tensors of `value` (in tuples, lists and dict values, in order) to `out`: a module's
// outputs flattened for comparison.
void appendTensors(const c10::IValue& value, std::vector<at::Tensor>& out);

// The float32 part a reduced precision keeps to meet Options::min_cosine on example inputs
// (precision_search.cpp): the fewest leading ops, among precisionCuts, whose float32 brings every
// floating output's cosine to the float32 module's outputs up to the bound, found by bisection on
// the converted graph run as it is (library calls, no fusion). `self` is the frozen module.
PrecisionPlan planPrecision(const std::shared_ptr<torch::jit::Graph>& graph, const c10::IValue& self,
                            const std::vector<c10::IValue>& inputs, const c10::IValue& expected,
                            Precision precision, double min_cosine);
// Sets what `plan` says of the float32 part: `float32_ops` kept of `graph` (the prepared graph,
// before conversion), the GEMMs and convolutions among them, the last op kept.
void describePlan(const torch::jit::Graph& graph, int64_t float32_ops, PrecisionPlan& plan);
// The least cosine similarity to `expected` of a floating output in `actual` (tensors in tuples,
// lists and dicts, in order); -1 where an output is not finite where expected's is, or they differ
// in number or shape.
double worstOutputCosine(const c10::IValue& expected, const c10::IValue& actual);

// Which of two modules runs `inputs` faster on this machine (kiln::optimize's choice between a
// graph with convolution regions and one without, pass_registration.cpp): each is called three
// times to warm up (the first call of a library call or region measures its ways), then in
// interleaved rounds, at least `min_rounds`, more until `budget_seconds` have passed (at most
// 30); the medians decide, ties going to `a`. A module that throws on the inputs loses (both
// throwing: std::runtime_error). Writes the medians in milliseconds when asked.
bool firstRunsFaster(torch::jit::Module& a, torch::jit::Module& b, const std::vector<c10::IValue>& inputs,
                     int min_rounds = 5, double budget_seconds = 2.0, double* a_ms = nullptr, double* b_ms = nullptr);

// True for the prim::If either pass builds: block0 runs kiln, block1 keeps the original ops.
bool isKilnFallback(const torch::jit::Node* node);

// Inserts prim::ListConstruct of `items` at the graph's insertion point; both passes build their
// guards' list arguments with it.
torch::jit::Value* insertList(torch::jit::Graph& graph, const c10::TypePtr& element,
                              const std::vector<torch::jit::Value*>& items);

}  // namespace kiln
