// The kernel IR: a target-neutral description of one generated kernel. Inputs are typed tensors
// (their sizes and strides are run-time values, never part of the IR) and scalars; the body is a
// DAG of scalar instructions in SSA order, evaluated once per element of the iteration space;
// outputs name body values. The fuser lowers a TorchScript group to it; the LLVM (CPU) and CUDA
// emitters and the reference interpreter all read it.
//
// Row reductions: a kernel with reduce_* instructions sees its iteration space as rows of the
// innermost dimension. A reduction combines its operand over one row and gives one value per row,
// which later instructions may use as a per-element value broadcast along the row (softmax's
// max, layer_norm's mean). `rowsize` is the row's length. A value that depends on a load other
// than through a reduction is per element; any other is per row. An output is stored at every
// element, or, marked `row`, once per row (it must name a per-row value). Reductions that depend on other reductions' results form later
// stages (softmax: max, then the sum of exp(x - max)); a backend reads the row once per stage,
// then once more for the per-element outputs. reduce_var is the population variance (divisor
// n), computed in one pass with Welford's update.
//
// Note: half and bfloat16 are storage types. A value of those types only comes from a load or a
// cast and only feeds a cast or an output: arithmetic happens in float32, and a cast down and back
// up reproduces eager's rounding of intermediates. The verifier enforces this.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln::ir {

enum class DType { kBool, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat64 };

const char* dtypeName(DType type);  // "bool", "i32", "i64", "f16", "bf16", "f32", "f64"
bool parseDType(const std::string& name, DType* out);
int64_t dtypeSize(DType type);
bool isFloating(DType type);
bool isInteger(DType type);  // i32, i64 (not bool)
bool isStorageOnly(DType type);  // f16, bf16

enum class Op {
  // leaves
  kLoad,      // tensor input `param` at the current element
  kScalar,    // scalar input `param`
  kConstant,  // literal (float_value for floats, int_value otherwise)
  // conversion (C semantics with saturation for float -> int; x != 0 for -> bool)
  kCast,
  // unary
  kNeg, kAbs, kReciprocal, kSqrt, kRsqrt, kExp, kExp2, kExpm1, kLog, kLog2, kLog10, kLog1p,
  kSin, kCos, kTan, kTanh, kSigmoid, kErf, kErfc, kFloor, kCeil, kRound, kTrunc, kNot, kIsNan,
  // binary (operands and result share `type`, except comparisons whose result is bool)
  kAdd, kSub, kMul, kDiv, kPow, kMax, kMin, kFmod, kAnd, kOr,
  kLt, kLe, kGt, kGe, kEq, kNe,
  // ternary: operands[0] (bool) ? operands[1] : operands[2]
  kSelect,
  // ternary, floating: operands[0] · operands[1] + operands[2] with one rounding (eager's
  // vectorized add/sub with alpha)
  kFma,
  // row reductions of a per-element f32/f64 operand (result of the same type, one per row)
  kReduceSum, kReduceMax, kReduceMin, kReduceVar,
  // leaf: the length of the reduced row, as `type` (f32, f64 or i64)
  kRowSize,
};

const char* opName(Op op);
bool parseOp(const std::string& name, Op* out);
int opArity(Op op);  // 0 for leaves
bool isComparison(Op op);
bool isReduction(Op op);

struct Instr {
  Op op = Op::kConstant;
  DType type = DType::kFloat32;   // the result's type
  std::vector<int> operands;      // indices of earlier instructions
  int param = -1;                 // input index for kLoad / kScalar
  double float_value = 0;         // kConstant of floating type
  int64_t int_value = 0;          // kConstant of integer or bool type
};

struct Kernel {
  std::string name = "kernel";
  std::vector<DType> tensor_inputs;  // loaded by kLoad
  std::vector<DType> scalar_inputs;  // f64, i64 or bool, read by kScalar
  std::vector<Instr> body;
  std::vector<int> outputs;          // body indices; output i has type body[outputs[i]].type
  std::vector<bool> row_outputs;     // per output (or empty: none): stored once per row

  bool isRowOutput(size_t i) const { return i < row_outputs.size() && row_outputs[i]; }

  DType outputType(size_t i) const { return body[outputs[i]].type; }
  // Operand k of a kernel's memory interface: the tensor inputs, then the outputs.
  DType operandType(size_t k) const {
    return k < tensor_inputs.size() ? tensor_inputs[k] : outputType(k - tensor_inputs.size());
  }

  // Builders: each appends an instruction and returns its index.
  int load(int input);
  int scalar(int input);
  int constant(DType type, double value);
  int integerConstant(DType type, int64_t value);  // exact for every int64 (past 2^53 too)
  int cast(int value, DType type);
  int unary(Op op, int value);
  int binary(Op op, int lhs, int rhs);
  int select(int condition, int if_true, int if_false);
  int fma(int a, int b, int c);
  int reduce(Op op, int value);
  int rowSize(DType type);

  bool hasReductions() const;
};

// Where each value of a kernel is computed (see the note on row reductions above).
struct RowSchedule {
  std::vector<bool> per_element;  // per body value: depends on a load other than via a reduction
  std::vector<int> stage;         // per body value: reduction stages it waits for (0: none)
  int stages = 0;                 // the largest stage: the row is read once per stage
  bool per_element_outputs = false;  // some output is per element: one more read of the row
};
RowSchedule rowSchedule(const Kernel& kernel);

// The body values `roots` depend on, up to (and not through) those where `stop` is set (roots and
// stopping values included).
std::vector<bool> dependencies(const Kernel& kernel, const std::vector<int>& roots, const std::vector<bool>& stop);


// Stable text form; parse(print(k)) == k.
std::string print(const Kernel& kernel);
// Throws std::invalid_argument with the line and what was wrong.
Kernel parse(const std::string& text);
// Empty if well formed, else every problem found, one per line.
std::string verify(const Kernel& kernel);

}  // namespace kiln::ir
