// Lowering a fusion group's TorchScript subgraph to the kernel IR, for one run-time signature
// (the dtype and rank of each tensor input, the type of each scalar input).
//
// Note: dtypes are not guessed. The subgraph is first run once on one-element CPU tensors of the
// signature's dtypes, so every intermediate gets exactly the dtype eager gives it (type promotion,
// wrapped numbers, 0-dim tensors included); the IR then computes each op in its "opmath" type
// (float32 for half/bfloat16) and rounds to that dtype, as eager does between ops.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "codegen/kernel_ir.h"

namespace kiln {

// Which ops the fuser may put in a group: the op is supported and its non-operand arguments are
// constants. Independent of dtypes, which are checked at run time.
bool isFusibleNode(const torch::jit::Node* node);

// Whether the in-place op `node` (relu_, add_, …) has a functional form the fuser can take.
bool hasFusibleFunctionalForm(const torch::jit::Node* node);

struct InputSignature {
  bool is_tensor = true;
  at::ScalarType dtype = at::kFloat;  // tensors; scalars: kDouble, kLong or kBool
  int64_t dim = 0;
  // A 0-dim tensor that stands for a Python number (a traced `x * 0.5` freezes 0.5 as one): it
  // promotes as a number does (an int tensor times it gives the default float dtype, not its own).
  bool wrapped_number = false;
};

// A [C] tensor input read per channel (batch_norm's weight, bias, running statistics): the
// runtime views it as [C, 1, …, 1] with x_rank − 1 dims so that it broadcasts along dim 1 of the
// batch_norm input, after checking that this input has C channels as eager requires.
struct ChannelParam {
  int input = 0;                 // tensor input index
  int64_t x_rank = 0;            // rank of the normalized input
  std::vector<int> x_sources;    // tensor inputs whose broadcast shape is that input's shape
};

// Whether `use` is one of batch_norm's per-channel operands (weight, bias, running statistics),
// which reach a kernel only as group inputs viewed per channel.
bool isChannelOperandUse(const torch::jit::Use& use);

// Where a group output lives in a group with row reductions: every element of the iteration
// space, or one value per row (the innermost dimension kept as size 1, or dropped).
enum class OutputRows { kElements, kKeepDim, kDropDim };

// Whether `node` is prim::ListConstruct of one int whose every use is a normalization's
// normalized_shape ([self.hidden_size] in a scripted module): it joins the normalization's group,
// the int becoming a group input the runtime checks the row against.
bool isRowLengthList(const torch::jit::Node* node);

// Whether `node` is one of the row reductions or the ops built on them (sum, mean, softmax,
// layer_norm, …), fusible or not.
bool isRowReduction(const torch::jit::Node* node);

// Whether `node` is a reduction that drops the reduced dimension (keepdim=False): its result is
// only ever a group output.
bool dropsReducedDim(const torch::jit::Node* node);

struct LoweredGroup {
  ir::Kernel kernel;
  std::vector<at::ScalarType> output_dtypes;
  // For each output, the tensor inputs whose shapes broadcast to the iteration shape it comes
  // from (its own shape for outputs of kElements).
  std::vector<std::vector<int>> output_sources;
  std::vector<OutputRows> output_rows;  // per output
  // Row reductions. Each set of tensor inputs must broadcast to a shape whose innermost
  // dimension is the row (the iteration shape's): what a reduction reads, and any per-element
  // operand combined with a per-row value.
  std::vector<std::vector<int>> row_spans;
  int64_t row_length = -1;  // the row's required length (layer_norm's normalized_shape), or -1
  int row_length_scalar = -1;  // or the scalar input that holds it (a normalized_shape built at run time)
  std::vector<int> row_params;  // tensor inputs that must be 1-D of row_length (layer_norm's weight)
  // Bytes each element of the iteration space costs unfused: every op reads its tensor operands
  // and writes its result (used by kiln::report).
  int64_t unfused_bytes_per_element = 0;
  std::vector<ChannelParam> channel_params;
  // Per scalar input of the kernel, the group's scalar input it is (a scalar the kernel never
  // reads, such as normalized_shape's int, is not one of the kernel's).
  std::vector<int> scalar_sources;
};

// Lowers `subgraph` for `signature` (on a CUDA device when `cuda`); returns nullopt with *why set if kiln cannot compute it
// exactly as eager would (unsupported dtype or op variant).
std::optional<LoweredGroup> lowerGroup(const torch::jit::Graph& subgraph,
                                       const std::vector<InputSignature>& signature,
                                       std::string* why, bool cuda = false);

std::optional<ir::DType> irDType(at::ScalarType type);

}  // namespace kiln
