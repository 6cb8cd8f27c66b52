#include "codegen/ir_interpreter.h"

#include <cmath>
#include <limits>
#include <stdexcept>

#include "codegen/float_bits.h"

namespace kiln::ir {
namespace {

// A value is held as double (floats, already rounded to their type) or int64 (ints, bool).
struct Value {
  double f = 0;
  int64_t i = 0;
};

double roundTo(DType type, double value) {
  switch (type) {
    case DType::kFloat32: return static_cast<float>(value);
    case DType::kFloat16: return halfToFloat(floatToHalf(static_cast<float>(value)));
    case DType::kBFloat16: return bfloat16ToFloat(floatToBFloat16(static_cast<float>(value)));
    default: return value;
  }
}

int64_t saturate(double value, DType type) {
  if (std::isnan(value)) return 0;
  const double lo = type == DType::kInt32 ? -2147483648.0 : -9223372036854775808.0;
  const double hi = type == DType::kInt32 ? 2147483647.0 : 9223372036854775807.0;
  if (value <= lo) return type == DType::kInt32 ? std::numeric_limits<int32_t>::min() : std::numeric_limits<int64_t>::min();
  if (value >= hi) return type == DType::kInt32 ? std::numeric_limits<int32_t>::max() : std::numeric_limits<int64_t>::max();
  return static_cast<int64_t>(value);
}

Value castValue(const Value& in, DType from, DType to) {
  Value out;
  if (isFloating(from)) {
    if (isFloating(to)) out.f = roundTo(to, in.f);
    else if (to == DType::kBool) out.i = in.f != 0;
    else out.i = saturate(in.f, to);
  } else {
    if (isFloating(to)) out.f = roundTo(to, static_cast<double>(in.i));
    else if (to == DType::kBool) out.i = in.i != 0;
    else if (to == DType::kInt32) out.i = static_cast<int32_t>(static_cast<uint32_t>(in.i));
    else out.i = in.i;
  }
  return out;
}

Value loadElement(DType type, const void* base, int64_t index) {
  Value v;
  switch (type) {
    case DType::kBool: v.i = static_cast<const bool*>(base)[index]; break;
    case DType::kInt32: v.i = static_cast<const int32_t*>(base)[index]; break;
    case DType::kInt64: v.i = static_cast<const int64_t*>(base)[index]; break;
    case DType::kFloat16: v.f = halfToFloat(static_cast<const uint16_t*>(base)[index]); break;
    case DType::kBFloat16: v.f = bfloat16ToFloat(static_cast<const uint16_t*>(base)[index]); break;
    case DType::kFloat32: v.f = static_cast<const float*>(base)[index]; break;
    case DType::kFloat64: v.f = static_cast<const double*>(base)[index]; break;
  }
  return v;
}

void storeElement(DType type, void* base, int64_t index, const Value& v) {
  switch (type) {
    case DType::kBool: static_cast<bool*>(base)[index] = v.i != 0; break;
    case DType::kInt32: static_cast<int32_t*>(base)[index] = static_cast<int32_t>(v.i); break;
    case DType::kInt64: static_cast<int64_t*>(base)[index] = v.i; break;
    case DType::kFloat16: static_cast<uint16_t*>(base)[index] = floatToHalf(static_cast<float>(v.f)); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[index] = floatToBFloat16(static_cast<float>(v.f)); break;
    case DType::kFloat32: static_cast<float*>(base)[index] = static_cast<float>(v.f); break;
    case DType::kFloat64: static_cast<double*>(base)[index] = v.f; break;
  }
}

double nanMax(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::max(a, b); }
double nanMin(double a, double b) { return (std::isnan(a) || std::isnan(b)) ? NAN : std::min(a, b); }

double floatUnary(Op op, double x) {
  switch (op) {
    case Op::kNeg: return -x;
    case Op::kAbs: return std::fabs(x);
    case Op::kReciprocal: return 1.0 / x;
    case Op::kSqrt: return std::sqrt(x);
    case Op::kRsqrt: return 1.0 / std::sqrt(x);
    case Op::kExp: return std::exp(x);
    case Op::kExp2: return std::exp2(x);
    case Op::kExpm1: return std::expm1(x);
    case Op::kLog: return std::log(x);
    case Op::kLog2: return std::log2(x);
    case Op::kLog10: return std::log10(x);
    case Op::kLog1p: return std::log1p(x);
    case Op::kSin: return std::sin(x);
    case Op::kCos: return std::cos(x);
    case Op::kTan: return std::tan(x);
    case Op::kTanh: return std::tanh(x);
    case Op::kSigmoid: return 1.0 / (1.0 + std::exp(-x));
    case Op::kErf: return std::erf(x);
    case Op::kErfc: return std::erfc(x);
    case Op::kFloor: return std::floor(x);
    case Op::kCeil: return std::ceil(x);
    case Op::kRound: return std::nearbyint(x);
    case Op::kTrunc: return std::trunc(x);
    default: throw std::logic_error("kiln interpreter: not a float unary op");
  }
}

int64_t wrap(DType type, int64_t value) {
  return type == DType::kInt32 ? static_cast<int32_t>(static_cast<uint32_t>(value)) : value;
}

// Evaluates instruction k of `kernel` at `element` of `row` into values[k].
void evaluate(const Kernel& kernel, size_t k, std::vector<Value>& values, const std::vector<Operand1D>& inputs,
            const std::vector<double>& scalars, int64_t row, int64_t element, int64_t n) {
  const Instr& instr = kernel.body[k];
  const DType type = instr.type;
  auto operand = [&](size_t j) -> const Value& { return values[static_cast<size_t>(instr.operands[j])]; };
  auto operandType = [&](size_t j) { return kernel.body[static_cast<size_t>(instr.operands[j])].type; };
  Value out;
  switch (instr.op) {
    case Op::kLoad: {
      const Operand1D& in = inputs.at(static_cast<size_t>(instr.param));
      out = loadElement(type, in.data, row * in.row_stride + element * in.stride);
      break;
    }
    case Op::kRowSize:
      out.f = static_cast<double>(n);
      out.i = n;
      break;
    case Op::kReduceSum: case Op::kReduceMax: case Op::kReduceMin: case Op::kReduceVar:
      throw std::logic_error("kiln interpreter: a reduction is not evaluated per element");
    case Op::kScalar: {
      double s = scalars.at(static_cast<size_t>(instr.param));
      if (isFloating(type)) out.f = s;
      else out.i = type == DType::kBool ? (s != 0) : static_cast<int64_t>(s);
      break;
    }
    case Op::kConstant:
      out.f = instr.float_value;
      out.i = instr.int_value;
      break;
    case Op::kCast:
      out = castValue(operand(0), operandType(0), type);
      break;
    case Op::kNot: out.i = !operand(0).i; break;
    case Op::kIsNan: out.i = isFloating(operandType(0)) && std::isnan(operand(0).f); break;
    case Op::kSelect: out = operand(0).i ? operand(1) : operand(2); break;
    case Op::kFma:
      out.f = type == DType::kFloat32 ? static_cast<double>(std::fma(static_cast<float>(operand(0).f), static_cast<float>(operand(1).f),
                                                                       static_cast<float>(operand(2).f)))
                                      : std::fma(operand(0).f, operand(1).f, operand(2).f);
      break;
    case Op::kAnd: out.i = operand(0).i && operand(1).i; break;
    case Op::kOr: out.i = operand(0).i || operand(1).i; break;
    case Op::kLt: case Op::kLe: case Op::kGt: case Op::kGe: case Op::kEq: case Op::kNe: {
      bool floating = isFloating(operandType(0));
      double a = floating ? operand(0).f : 0;
      double b = floating ? operand(1).f : 0;
      int64_t x = operand(0).i;
      int64_t y = operand(1).i;
      bool r = false;
      switch (instr.op) {
        case Op::kLt: r = floating ? a < b : x < y; break;
        case Op::kLe: r = floating ? a <= b : x <= y; break;
        case Op::kGt: r = floating ? a > b : x > y; break;
        case Op::kGe: r = floating ? a >= b : x >= y; break;
        case Op::kEq: r = floating ? a == b : x == y; break;
        default: r = floating ? a != b : x != y; break;
      }
      out.i = r;
      break;
    }
    default:
      if (isFloating(type)) {
        const bool single = type == DType::kFloat32;
        if (opArity(instr.op) == 1) {
          double x = operand(0).f;
          out.f = single ? static_cast<double>(static_cast<float>(floatUnary(instr.op, static_cast<float>(x))))
                         : floatUnary(instr.op, x);
        } else {
          double a = operand(0).f;
          double b = operand(1).f;
          switch (instr.op) {
            case Op::kAdd: out.f = a + b; break;
            case Op::kSub: out.f = a - b; break;
            case Op::kMul: out.f = a * b; break;
            case Op::kDiv: out.f = a / b; break;
            case Op::kPow: out.f = std::pow(a, b); break;
            case Op::kMax: out.f = nanMax(a, b); break;
            case Op::kMin: out.f = nanMin(a, b); break;
            case Op::kFmod: out.f = std::fmod(a, b); break;
            default: throw std::logic_error("kiln interpreter: bad float op");
          }
        }
        out.f = roundTo(type, out.f);
      } else {
        int64_t a = operand(0).i;
        int64_t b = opArity(instr.op) > 1 ? operand(1).i : 0;
        auto ua = static_cast<uint64_t>(a);
        auto ub = static_cast<uint64_t>(b);
        switch (instr.op) {
          case Op::kNeg: out.i = static_cast<int64_t>(0 - ua); break;
          case Op::kAbs: out.i = a < 0 ? static_cast<int64_t>(0 - ua) : a; break;
          case Op::kFloor: case Op::kCeil: case Op::kRound: case Op::kTrunc: out.i = a; break;
          case Op::kAdd: out.i = static_cast<int64_t>(ua + ub); break;
          case Op::kSub: out.i = static_cast<int64_t>(ua - ub); break;
          case Op::kMul: out.i = static_cast<int64_t>(ua * ub); break;
          case Op::kMax: out.i = std::max(a, b); break;
          case Op::kMin: out.i = std::min(a, b); break;
          default:
            throw std::logic_error(std::string("kiln interpreter: ") + opName(instr.op) +
                                   " is not defined on integers");
        }
        out.i = type == DType::kBool ? (out.i != 0) : wrap(type, out.i);
      }
  }
  values[k] = out;
}

// Row reduction `op` of `row_values` (already rounded to `type`), rounded to `type`.
double reduceRow(Op op, DType type, const std::vector<double>& row_values) {
  double result = 0;
  switch (op) {
    case Op::kReduceSum:
      for (double v : row_values) result += v;
      break;
    case Op::kReduceMax:
    case Op::kReduceMin:
      result = op == Op::kReduceMax ? -INFINITY : INFINITY;
      for (double v : row_values) result = op == Op::kReduceMax ? nanMax(result, v) : nanMin(result, v);
      break;
    default: {  // kReduceVar
      double mean = 0;
      for (double v : row_values) mean += v;
      mean /= static_cast<double>(row_values.size());
      for (double v : row_values) result += (v - mean) * (v - mean);
      result /= static_cast<double>(row_values.size());
    }
  }
  return roundTo(type, result);
}

}  // namespace

void interpret(const Kernel& kernel, const std::vector<Operand1D>& inputs,
               const std::vector<double>& scalars, const std::vector<Operand1D>& outputs, int64_t n,
               int64_t rows) {
  const RowSchedule schedule = rowSchedule(kernel);
  std::vector<Value> values(kernel.body.size());
  std::vector<std::vector<double>> row_values(kernel.body.size());
  for (int64_t row = 0; row < rows; ++row) {
    // Stage by stage: per-row values of earlier stages are known; each reduction of this stage
    // sees its operand at every element of the row.
    for (int stage = 1; stage <= schedule.stages; ++stage) {
      for (auto& list : row_values) list.clear();
      for (int64_t element = 0; element < n; ++element) {
        for (size_t k = 0; k < kernel.body.size(); ++k) {
          const Instr& instr = kernel.body[k];
          if (schedule.stage[k] >= stage) {
            if (isReduction(instr.op) && schedule.stage[k] == stage) {
              row_values[k].push_back(values[static_cast<size_t>(instr.operands[0])].f);
            }
            continue;
          }
          if (!isReduction(instr.op)) evaluate(kernel, k, values, inputs, scalars, row, element, n);
        }
      }
      for (size_t k = 0; k < kernel.body.size(); ++k) {
        const Instr& instr = kernel.body[k];
        if (isReduction(instr.op) && schedule.stage[k] == stage) {
          values[k].f = n == 0 && instr.op != Op::kReduceSum ? NAN : reduceRow(instr.op, instr.type, row_values[k]);
        }
      }
    }
    // Per-row values (their stages done) first, then the elements.
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      if (!schedule.per_element[k] && !isReduction(kernel.body[k].op)) {
        evaluate(kernel, k, values, inputs, scalars, row, 0, n);
      }
    }
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      if (kernel.isRowOutput(o)) {
        storeElement(kernel.outputType(o), outputs[o].data, row * outputs[o].row_stride,
                     values[static_cast<size_t>(kernel.outputs[o])]);
      }
    }
    if (!schedule.per_element_outputs) continue;
    for (int64_t element = 0; element < n; ++element) {
      for (size_t k = 0; k < kernel.body.size(); ++k) {
        const bool row_value = isReduction(kernel.body[k].op) || (!schedule.per_element[k] && schedule.stage[k] > 0);
        if (!row_value) evaluate(kernel, k, values, inputs, scalars, row, element, n);
      }
      for (size_t o = 0; o < kernel.outputs.size(); ++o) {
        const auto value = static_cast<size_t>(kernel.outputs[o]);
        if (!kernel.isRowOutput(o)) {
          storeElement(kernel.outputType(o), outputs[o].data, row * outputs[o].row_stride + element * outputs[o].stride,
                       values[value]);
        }
      }
    }
  }
}

}  // namespace kiln::ir
