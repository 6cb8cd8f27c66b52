#include "codegen/kernel_ir.h"

#include <algorithm>
#include <stdexcept>

namespace kiln::ir {
namespace {

struct OpInfo {
  Op op;
  const char* name;
  int arity;
};

constexpr OpInfo kOps[] = {
    {Op::kLoad, "load", 0},       {Op::kScalar, "scalar", 0},   {Op::kConstant, "const", 0},
    {Op::kCast, "cast", 1},       {Op::kNeg, "neg", 1},         {Op::kAbs, "abs", 1},
    {Op::kReciprocal, "reciprocal", 1}, {Op::kSqrt, "sqrt", 1}, {Op::kRsqrt, "rsqrt", 1},
    {Op::kExp, "exp", 1},         {Op::kExp2, "exp2", 1},       {Op::kExpm1, "expm1", 1},
    {Op::kLog, "log", 1},         {Op::kLog2, "log2", 1},       {Op::kLog10, "log10", 1},
    {Op::kLog1p, "log1p", 1},     {Op::kSin, "sin", 1},         {Op::kCos, "cos", 1},
    {Op::kTan, "tan", 1},         {Op::kTanh, "tanh", 1},       {Op::kSigmoid, "sigmoid", 1},
    {Op::kErf, "erf", 1},         {Op::kErfc, "erfc", 1},       {Op::kFloor, "floor", 1},
    {Op::kCeil, "ceil", 1},       {Op::kRound, "round", 1},     {Op::kTrunc, "trunc", 1},
    {Op::kNot, "not", 1},         {Op::kIsNan, "isnan", 1},     {Op::kAdd, "add", 2},
    {Op::kSub, "sub", 2},         {Op::kMul, "mul", 2},         {Op::kDiv, "div", 2},
    {Op::kPow, "pow", 2},         {Op::kMax, "max", 2},         {Op::kMin, "min", 2},
    {Op::kFmod, "fmod", 2},       {Op::kAnd, "and", 2},         {Op::kOr, "or", 2},
    {Op::kLt, "lt", 2},           {Op::kLe, "le", 2},           {Op::kGt, "gt", 2},
    {Op::kGe, "ge", 2},           {Op::kEq, "eq", 2},           {Op::kNe, "ne", 2},
    {Op::kSelect, "select", 3},   {Op::kFma, "fma", 3},         {Op::kReduceSum, "reduce_sum", 1},
    {Op::kReduceMax, "reduce_max", 1}, {Op::kReduceMin, "reduce_min", 1},
    {Op::kReduceVar, "reduce_var", 1}, {Op::kRowSize, "rowsize", 0},
};

const OpInfo& info(Op op) {
  for (const OpInfo& entry : kOps) {
    if (entry.op == op) return entry;
  }
  throw std::logic_error("kiln ir: unknown op");
}

struct DTypeInfo {
  DType type;
  const char* name;
  int64_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::kBool, "bool", 1},    {DType::kInt32, "i32", 4},   {DType::kInt64, "i64", 8},
    {DType::kFloat16, "f16", 2},  {DType::kBFloat16, "bf16", 2}, {DType::kFloat32, "f32", 4},
    {DType::kFloat64, "f64", 8},
};

// Appends an instruction computing `type` from `operands` and returns its index.
int append(Kernel& kernel, Op op, DType type, std::vector<int> operands) {
  Instr instr;
  instr.op = op;
  instr.type = type;
  instr.operands = std::move(operands);
  kernel.body.push_back(instr);
  return static_cast<int>(kernel.body.size()) - 1;
}

}  // namespace

const char* dtypeName(DType type) {
  for (const DTypeInfo& entry : kDTypes) {
    if (entry.type == type) return entry.name;
  }
  return "?";
}

bool parseDType(const std::string& name, DType* out) {
  for (const DTypeInfo& entry : kDTypes) {
    if (name == entry.name) {
      *out = entry.type;
      return true;
    }
  }
  return false;
}

int64_t dtypeSize(DType type) {
  for (const DTypeInfo& entry : kDTypes) {
    if (entry.type == type) return entry.size;
  }
  return 0;
}

bool isFloating(DType type) {
  return type == DType::kFloat16 || type == DType::kBFloat16 || type == DType::kFloat32 ||
         type == DType::kFloat64;
}
bool isInteger(DType type) { return type == DType::kInt32 || type == DType::kInt64; }
bool isStorageOnly(DType type) { return type == DType::kFloat16 || type == DType::kBFloat16; }

const char* opName(Op op) { return info(op).name; }
int opArity(Op op) { return info(op).arity; }

bool parseOp(const std::string& name, Op* out) {
  for (const OpInfo& entry : kOps) {
    if (name == entry.name) {
      *out = entry.op;
      return true;
    }
  }
  return false;
}

bool isComparison(Op op) {
  return op == Op::kLt || op == Op::kLe || op == Op::kGt || op == Op::kGe || op == Op::kEq ||
         op == Op::kNe;
}

bool isReduction(Op op) {
  return op == Op::kReduceSum || op == Op::kReduceMax || op == Op::kReduceMin || op == Op::kReduceVar;
}

int Kernel::reduce(Op op, int value) { return append(*this, op, body.at(static_cast<size_t>(value)).type, {value}); }

int Kernel::rowSize(DType type) { return append(*this, Op::kRowSize, type, {}); }

int Kernel::fma(int a, int b, int c) { return append(*this, Op::kFma, body.at(static_cast<size_t>(a)).type, {a, b, c}); }

bool Kernel::hasReductions() const {
  for (const Instr& instr : body) {
    if (isReduction(instr.op)) return true;
  }
  return false;
}

RowSchedule rowSchedule(const Kernel& kernel) {
  RowSchedule schedule;
  schedule.per_element.assign(kernel.body.size(), false);
  schedule.stage.assign(kernel.body.size(), 0);
  for (size_t i = 0; i < kernel.body.size(); ++i) {
    const Instr& instr = kernel.body[i];
    bool per_element = instr.op == Op::kLoad;
    int stage = 0;
    for (int operand : instr.operands) {
      if (operand < 0 || static_cast<size_t>(operand) >= i) continue;  // verify() reports it
      per_element |= schedule.per_element[static_cast<size_t>(operand)];
      stage = std::max(stage, schedule.stage[static_cast<size_t>(operand)]);
    }
    if (isReduction(instr.op)) {
      per_element = false;
      stage += 1;
    }
    schedule.per_element[i] = per_element;
    schedule.stage[i] = stage;
    schedule.stages = std::max(schedule.stages, stage);
  }
  for (size_t o = 0; o < kernel.outputs.size(); ++o) schedule.per_element_outputs |= !kernel.isRowOutput(o);
  return schedule;
}

std::vector<bool> dependencies(const Kernel& kernel, const std::vector<int>& roots, const std::vector<bool>& stop) {
  std::vector<bool> wanted(kernel.body.size(), false);
  for (int root : roots) wanted[static_cast<size_t>(root)] = true;
  for (size_t k = kernel.body.size(); k-- > 0;) {
    if (!wanted[k] || stop[k]) continue;
    for (int operand : kernel.body[k].operands) wanted[static_cast<size_t>(operand)] = true;
  }
  return wanted;
}

int Kernel::load(int input) {
  Instr instr;
  instr.op = Op::kLoad;
  instr.type = tensor_inputs.at(static_cast<size_t>(input));
  instr.param = input;
  body.push_back(instr);
  return static_cast<int>(body.size()) - 1;
}

int Kernel::scalar(int input) {
  Instr instr;
  instr.op = Op::kScalar;
  instr.type = scalar_inputs.at(static_cast<size_t>(input));
  instr.param = input;
  body.push_back(instr);
  return static_cast<int>(body.size()) - 1;
}

int Kernel::constant(DType type, double value) {
  Instr instr;
  instr.op = Op::kConstant;
  instr.type = type;
  if (isFloating(type)) {
    instr.float_value = value;
  } else if (type == DType::kBool) {
    instr.int_value = value != 0;
  } else {
    instr.int_value = static_cast<int64_t>(value);
  }
  body.push_back(instr);
  return static_cast<int>(body.size()) - 1;
}

int Kernel::integerConstant(DType type, int64_t value) {
  Instr instr;
  instr.op = Op::kConstant;
  instr.type = type;
  if (isFloating(type)) {
    instr.float_value = static_cast<double>(value);
  } else {
    instr.int_value = type == DType::kBool ? (value != 0) : value;
  }
  body.push_back(instr);
  return static_cast<int>(body.size()) - 1;
}

int Kernel::cast(int value, DType type) {
  if (body.at(static_cast<size_t>(value)).type == type) return value;
  return append(*this, Op::kCast, type, {value});
}

int Kernel::unary(Op op, int value) {
  return append(*this, op, (op == Op::kIsNan || op == Op::kNot) ? DType::kBool : body.at(static_cast<size_t>(value)).type,
                {value});
}

int Kernel::binary(Op op, int lhs, int rhs) {
  return append(*this, op, isComparison(op) ? DType::kBool : body.at(static_cast<size_t>(lhs)).type, {lhs, rhs});
}

int Kernel::select(int condition, int if_true, int if_false) {
  return append(*this, Op::kSelect, body.at(static_cast<size_t>(if_true)).type, {condition, if_true, if_false});
}

std::string verify(const Kernel& kernel) {
  std::string problems;
  const RowSchedule schedule = rowSchedule(kernel);
  auto problem = [&](size_t index, const std::string& what) {
    problems += "%" + std::to_string(index) + ": " + what + "\n";
  };
  for (size_t i = 0; i < kernel.body.size(); ++i) {
    const Instr& instr = kernel.body[i];
    if (static_cast<int>(instr.operands.size()) != opArity(instr.op)) {
      problem(i, std::string(opName(instr.op)) + " takes " + std::to_string(opArity(instr.op)) +
                     " operands");
      continue;
    }
    bool operands_ok = true;
    for (int operand : instr.operands) {
      if (operand < 0 || static_cast<size_t>(operand) >= i) {
        problem(i, "operand %" + std::to_string(operand) + " is not an earlier value");
        operands_ok = false;
      }
    }
    if (!operands_ok) continue;
    auto type_of = [&](size_t k) { return kernel.body[static_cast<size_t>(instr.operands[k])].type; };
    switch (instr.op) {
      case Op::kLoad:
        if (instr.param < 0 || static_cast<size_t>(instr.param) >= kernel.tensor_inputs.size()) {
          problem(i, "load of a missing tensor input");
        } else if (kernel.tensor_inputs[static_cast<size_t>(instr.param)] != instr.type) {
          problem(i, "load type differs from the input's");
        }
        break;
      case Op::kScalar:
        if (instr.param < 0 || static_cast<size_t>(instr.param) >= kernel.scalar_inputs.size()) {
          problem(i, "read of a missing scalar input");
        } else if (kernel.scalar_inputs[static_cast<size_t>(instr.param)] != instr.type) {
          problem(i, "scalar type differs from the input's");
        }
        break;
      case Op::kConstant:
        if (isStorageOnly(instr.type)) problem(i, "constants cannot be f16/bf16");
        break;
      case Op::kCast:
        break;
      case Op::kRowSize:
        if (instr.type != DType::kFloat32 && instr.type != DType::kFloat64 && instr.type != DType::kInt64) {
          problem(i, "rowsize must be f32, f64 or i64");
        }
        break;
      case Op::kFma:
        if (instr.type != DType::kFloat32 && instr.type != DType::kFloat64) problem(i, "fma is on f32 or f64");
        for (size_t k = 0; k < 3; ++k) {
          if (type_of(k) != instr.type) problem(i, "fma operand types differ from its result's");
        }
        break;
      case Op::kReduceSum: case Op::kReduceMax: case Op::kReduceMin: case Op::kReduceVar:
        if (instr.type != DType::kFloat32 && instr.type != DType::kFloat64) problem(i, "reductions are on f32 or f64");
        if (type_of(0) != instr.type) problem(i, "result type differs from operand type");
        if (!schedule.per_element[static_cast<size_t>(instr.operands[0])]) {
          problem(i, "the operand of a reduction must be a per-element value");
        }
        break;
      case Op::kSelect:
        if (type_of(0) != DType::kBool) problem(i, "select condition must be bool");
        if (type_of(1) != instr.type || type_of(2) != instr.type) problem(i, "select arms must match");
        if (isStorageOnly(instr.type)) problem(i, "select on a storage-only type");
        break;
      default:
        for (size_t k = 0; k < instr.operands.size(); ++k) {
          if (isStorageOnly(type_of(k))) problem(i, "arithmetic on a storage-only type");
          if (k > 0 && type_of(k) != type_of(0)) problem(i, "operand types differ");
        }
        if (isComparison(instr.op) || instr.op == Op::kIsNan || instr.op == Op::kNot) {
          if (instr.type != DType::kBool) problem(i, "result must be bool");
        } else if (instr.type != type_of(0)) {
          problem(i, "result type differs from operand type");
        }
        if ((instr.op == Op::kAnd || instr.op == Op::kOr || instr.op == Op::kNot) &&
            type_of(0) != DType::kBool) {
          problem(i, "logical op on a non-bool value");
        }
        break;
    }
  }
  if (kernel.outputs.empty()) problems += "kernel has no outputs\n";
  if (!kernel.row_outputs.empty() && kernel.row_outputs.size() != kernel.outputs.size()) {
    problems += "row_outputs does not match the outputs\n";
  }
  for (size_t o = 0; o < kernel.outputs.size(); ++o) {
    const int output = kernel.outputs[o];
    if (output < 0 || static_cast<size_t>(output) >= kernel.body.size()) {
      problems += "output names a missing value %" + std::to_string(output) + "\n";
    } else if (kernel.isRowOutput(o) && schedule.stages == 0) {
      problems += "row output " + std::to_string(o) + " in a kernel without reductions\n";
    } else if (kernel.isRowOutput(o) && schedule.per_element[static_cast<size_t>(output)]) {
      problems += "row output " + std::to_string(o) + " names a per-element value\n";
    }
  }
  return problems;
}

}  // namespace kiln::ir
