// The lowering's shared vocabulary (internal to fuser/): an operand as the lowering sees it, the
// builder op formulas write IR with, and an op's rule (which inputs are operands, its formula,
// and what a row reduction needs). fuser/lowering.cpp holds the elementwise formulas and the
// walk over a group; fuser/activation_lowering.cpp the activations; fuser/row_lowering.cpp the
// row reductions.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>

#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "fuser/lowering.h"

namespace kiln::lowering {

using ir::Op;
using torch::jit::Node;
using torch::jit::Value;

struct Operand {
  int value = -1;           // IR value, in `dtype`
  at::ScalarType dtype = at::kFloat;
  bool is_tensor = false;
  c10::IValue sample;       // a one-element stand-in used to ask ATen for dtypes
  OutputRows rows = OutputRows::kElements;  // per element, or per row (after a reduction)
  int input = -1;           // the group input it is, if it is one: its index among tensors or scalars
};

struct Lowerer;
using LowerFn = int (*)(Lowerer&, const Node*, const std::vector<Operand>&, at::ScalarType out,
                        at::ScalarType compute);

struct OpRule {
  std::vector<int> operands;  // inputs that are tensors or numbers; every other input is a constant
  LowerFn lower;
  bool compare = false;       // compute in the operands' promoted type, result bool
  int dtype_only = -1;        // an input read only for its dtype (type_as): no shape, no loads
  bool channel_params = false;  // batch_norm: operands 1-4 are optional per-channel [C] tensors
  // Row reductions and the ops built on them, over the innermost dimension:
  int dim_arg = -1;             // the reduced dim (int or int[1]): must be the last
  int keepdim_arg = -1;         // a reduction's keepdim; -1 for ops whose result is per element
  int dtype_arg = -1;           // a reduction's dtype: must be None
  int normalized_shape_arg = -1;  // layer_norm / rms_norm: int[1], the row's length
  bool optional_tensors = false;  // operands after the first may be None (weight, bias)

  bool isRowOp() const { return dim_arg >= 0 || normalized_shape_arg >= 0; }
};

inline OpRule reduction(LowerFn lower, int keepdim_arg, int dtype_arg = -1) {
  OpRule rule{{0}, lower};
  rule.dim_arg = 1;
  rule.keepdim_arg = keepdim_arg;
  rule.dtype_arg = dtype_arg;
  return rule;
}

inline OpRule rowOp(LowerFn lower) {
  OpRule rule{{0}, lower};
  rule.dim_arg = 1;
  return rule;
}

inline OpRule normalization(std::vector<int> operands, LowerFn lower) {
  OpRule rule{std::move(operands), lower};
  rule.normalized_shape_arg = 1;
  rule.optional_tensors = true;
  return rule;
}

// The dim a reduction's argument names (an int, or an int list of one), if it names one.
inline std::optional<int64_t> reducedDim(const Node* node, size_t index) {
  auto value = torch::jit::toIValue(node->input(index));
  if (!value) return std::nullopt;
  if (value->isInt()) return value->toInt();
  if (value->isIntList() && value->toIntVector().size() == 1) return value->toIntVector()[0];
  return std::nullopt;
}

// layer_norm's normalized_shape when it is one dimension (the row).
inline std::optional<int64_t> normalizedLength(const Node* node, size_t index) {
  auto value = torch::jit::toIValue(node->input(index));
  if (!value || !value->isIntList() || value->toIntVector().size() != 1) return std::nullopt;
  return value->toIntVector()[0];
}

inline at::ScalarType opmath(at::ScalarType type) {
  return (type == at::kHalf || type == at::kBFloat16) ? at::kFloat : type;
}

struct Lowerer {
  ir::Kernel& kernel;
  bool cuda = false;  // the kernel runs on a CUDA device (eager's CUDA kernels differ here and there)
  const Node* node = nullptr;

  int as(const Operand& operand, at::ScalarType type) {
    return kernel.cast(operand.value, *irDType(type));
  }
  int constant(double value, at::ScalarType type) {
    return kernel.constant(*irDType(type), value);
  }
  int unary(Op op, int x) { return kernel.unary(op, x); }
  int binary(Op op, int a, int b) { return kernel.binary(op, a, b); }
  int select(int c, int a, int b) { return kernel.select(c, a, b); }
  double scalarArg(size_t index, double fallback) {
    auto value = torch::jit::toIValue(node->input(index));
    if (!value || value->isNone()) return fallback;
    return value->isDouble() ? value->toDouble() : value->isInt() ? static_cast<double>(value->toInt())
                                                                  : static_cast<double>(value->toBool());
  }
  std::optional<double> optionalArg(size_t index) {
    auto value = torch::jit::toIValue(node->input(index));
    if (!value || value->isNone()) return std::nullopt;
    return scalarArg(index, 0);
  }
  // The constant argument `index` as an IR value of type `type`: an int stays exact (past 2^53)
  // when computing in an integer type, as eager's Scalar does; `fallback` when absent.
  int argConstant(size_t index, double fallback, at::ScalarType type) {
    auto value = torch::jit::toIValue(node->input(index));
    if (value && value->isInt() && at::isIntegralType(type, /*includeBool=*/false)) {
      return kernel.cast(kernel.integerConstant(ir::DType::kInt64, value->toInt()), *irDType(type));
    }
    return constant(scalarArg(index, fallback), type);
  }
  bool argIsOne(size_t index) {
    auto value = torch::jit::toIValue(node->input(index));
    if (!value || value->isNone()) return true;
    return value->isInt() ? value->toInt() == 1 : scalarArg(index, 1) == 1;
  }
};

// ---- op formulas: each returns the result in `compute`; the caller rounds it to `out` ----

#define KILN_LOWER(name) \
  int name(Lowerer& L, const Node* n, const std::vector<Operand>& v, at::ScalarType out, at::ScalarType ct)

// The activations' rules (fuser/activation_lowering.cpp), added to the op table.
void addActivationRules(std::unordered_map<std::string, OpRule>& table);

// The row reductions' rules (fuser/row_lowering.cpp), added to the op table.
void addRowReductionRules(std::unordered_map<std::string, OpRule>& table);

// Whether `node`'s result is per element or per row, recording in `lowered` what the runtime
// must check (fuser/row_lowering.cpp).
OutputRows trackRows(const OpRule& rule, const Node* node, const std::vector<Operand>& args,
                     const std::vector<const Value*>& arg_values,
                     std::unordered_map<const Value*, std::vector<int>>& sources, LoweredGroup& lowered,
                     std::string* problem);

}  // namespace kiln::lowering
