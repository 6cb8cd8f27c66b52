// Lowering of fusion subgraphs to the kernel IR: the table of supported ops and, for each, the
// scalar formula eager's CPU kernel uses.
#include "fuser/lowering.h"
#include "fuser/lowering_rules.h"

#include <ATen/ATen.h>
#include <torch/csrc/jit/ir/constants.h>

#include <cmath>
#include <functional>
#include <limits>
#include <unordered_map>

namespace kiln {
namespace {

using namespace lowering;


template <Op op>
KILN_LOWER(unaryOp) { return L.unary(op, L.as(v[0], ct)); }

template <Op op>
KILN_LOWER(binaryOp) { return L.binary(op, L.as(v[0], ct), L.as(v[1], ct)); }

template <Op op>
KILN_LOWER(compareOp) { return L.binary(op, L.as(v[0], ct), L.as(v[1], ct)); }

// a ± alpha·b, alpha being input 2. In floating point with alpha ≠ 1, as eager's vectorized
// CPU loop computes it: fma(b, ±alpha, a), one rounding (alpha·b may overflow where the sum does
// not: 3e38 · -3.4e38 + inf is inf, not NaN).
int addScaled(Lowerer& L, int a, int b, at::ScalarType ct, bool subtract) {
  if (L.argIsOne(2)) return L.binary(subtract ? Op::kSub : Op::kAdd, a, b);
  int alpha = L.argConstant(2, 1, ct);
  if (at::isFloatingType(ct) && !L.cuda) return L.kernel.fma(b, subtract ? L.unary(Op::kNeg, alpha) : alpha, a);
  return L.binary(subtract ? Op::kSub : Op::kAdd, a, L.binary(Op::kMul, b, alpha));
}
KILN_LOWER(lowerAdd) { return addScaled(L, L.as(v[0], ct), L.as(v[1], ct), ct, false); }
KILN_LOWER(lowerSub) { return addScaled(L, L.as(v[0], ct), L.as(v[1], ct), ct, true); }
KILN_LOWER(lowerRsub) { return addScaled(L, L.as(v[1], ct), L.as(v[0], ct), ct, true); }

KILN_LOWER(lowerDiv) {
  int a = L.as(v[0], ct);
  int b = L.as(v[1], ct);
  auto mode = n->inputs().size() > 2 ? torch::jit::toIValue(n->input(2)) : std::nullopt;
  if (!mode || mode->isNone()) return L.binary(Op::kDiv, a, b);
  if (!at::isFloatingType(ct)) return -1;  // integer division raises on zero in eager: left to eager
  int quotient = L.binary(Op::kDiv, a, b);
  // Note: for half/bfloat16, eager's vectorized CPU loop rounds the quotient to the storage type
  // before truncating or flooring it, while its scalar loop (0-dim operands, loop tails) does not,
  // so one tensor's elements can come from either. kiln computes as the scalar loop does: the
  // exact quotient in float32, rounded once, the same for every layout.
  if (mode->toStringRef() == "trunc") return L.unary(Op::kTrunc, quotient);
  // floor: c10::div_floor_floating.
  int zero = L.constant(0, ct);
  int mod = L.binary(Op::kFmod, a, b);
  int div = L.binary(Op::kDiv, L.binary(Op::kSub, a, mod), b);
  int adjust = L.binary(Op::kAnd, L.binary(Op::kNe, mod, zero),
                        L.binary(Op::kNe, L.binary(Op::kLt, b, zero), L.binary(Op::kLt, mod, zero)));
  div = L.select(adjust, L.binary(Op::kSub, div, L.constant(1, ct)), div);
  int floored = L.unary(Op::kFloor, div);
  floored = L.select(L.binary(Op::kGt, L.binary(Op::kSub, div, floored), L.constant(0.5, ct)),
                     L.binary(Op::kAdd, floored, L.constant(1, ct)), floored);
  int signed_zero = L.select(L.binary(Op::kLt, quotient, zero), L.constant(-0.0, ct), zero);
  floored = L.select(L.binary(Op::kNe, div, zero), floored, signed_zero);
  return L.select(L.binary(Op::kEq, b, zero), quotient, floored);
}

KILN_LOWER(lowerRemainder) {
  if (!at::isFloatingType(ct)) return -1;
  int a = L.as(v[0], ct);
  int b = L.as(v[1], ct);
  int zero = L.constant(0, ct);
  int mod = L.binary(Op::kFmod, a, b);
  int fix = L.binary(Op::kAnd, L.binary(Op::kNe, mod, zero),
                     L.binary(Op::kNe, L.binary(Op::kLt, b, zero), L.binary(Op::kLt, mod, zero)));
  return L.select(fix, L.binary(Op::kAdd, mod, b), mod);
}

KILN_LOWER(lowerFmod) {
  if (!at::isFloatingType(ct)) return -1;
  return L.binary(Op::kFmod, L.as(v[0], ct), L.as(v[1], ct));
}

KILN_LOWER(lowerPow) {
  if (!at::isFloatingType(ct)) return -1;  // integer pow raises on negative exponents: eager's
  int base = L.as(v[0], ct);
  if (!v[1].is_tensor) {
    if (auto exponent = torch::jit::toIValue(n->input(1))) {
      // ATen's pow_tensor_scalar special cases.
      double e = exponent->isDouble() ? exponent->toDouble() : static_cast<double>(exponent->toInt());
      // An exponent that float32 flushes to 0 or overflows to inf: eager's scalar loop raises to
      // the double exponent, its vectorized loop to the float one; left to eager.
      const double narrowed = static_cast<double>(static_cast<float>(e));
      if (ct != at::kDouble && ((narrowed == 0 && e != 0) || (std::isinf(narrowed) && std::isfinite(e)))) return -1;
      int one = L.constant(1, ct);
      if (e == 2) return L.binary(Op::kMul, base, base);
      if (e == 3) return L.binary(Op::kMul, L.binary(Op::kMul, base, base), base);
      if (e == 0.5) return L.unary(Op::kSqrt, base);
      if (e == -0.5) return L.unary(Op::kRsqrt, base);
      if (e == -1) return L.binary(Op::kDiv, one, base);
      if (e == -2) return L.binary(Op::kDiv, one, L.binary(Op::kMul, base, base));
    }
  }
  return L.binary(Op::kPow, base, L.as(v[1], ct));
}

KILN_LOWER(lowerLogicalAnd) {
  return L.binary(Op::kAnd, L.as(v[0], at::kBool), L.as(v[1], at::kBool));
}
KILN_LOWER(lowerLogicalOr) {
  return L.binary(Op::kOr, L.as(v[0], at::kBool), L.as(v[1], at::kBool));
}
KILN_LOWER(lowerLogicalNot) { return L.unary(Op::kNot, L.as(v[0], at::kBool)); }

// The clamp family as eager's CPU kernels compute it: a bound replaces x only where x is strictly
// beyond it (std::max(x, lo) / std::min(x, hi)), so a NaN x stays NaN, relu(-0.0) is -0.0 and a
// NaN bound given alone to clamp leaves x as it is. The ops that check their bounds first
// (clamp with both bounds, clamp_min, clamp_max, hardtanh) give NaN everywhere for a NaN bound.
int clampBelow(Lowerer& L, int x, int lo) { return L.select(L.binary(Op::kLt, x, lo), lo, x); }
int clampAbove(Lowerer& L, int x, int hi) { return L.select(L.binary(Op::kGt, x, hi), hi, x); }
bool isNanArg(Lowerer& L, size_t index) {
  auto value = L.optionalArg(index);
  return value && std::isnan(*value);
}

KILN_LOWER(lowerRelu) { return clampBelow(L, L.as(v[0], ct), L.constant(0, ct)); }

KILN_LOWER(lowerClamp) {
  int x = L.as(v[0], ct);
  const std::optional<double> lo = L.optionalArg(1), hi = L.optionalArg(2);
  if (lo && hi && (std::isnan(*lo) || std::isnan(*hi))) return L.constant(NAN, ct);
  if (lo) x = clampBelow(L, x, L.argConstant(1, 0, ct));
  if (hi) x = clampAbove(L, x, L.argConstant(2, 0, ct));
  return x;
}
KILN_LOWER(lowerClampMin) {
  if (isNanArg(L, 1)) return L.constant(NAN, ct);
  return clampBelow(L, L.as(v[0], ct), L.argConstant(1, 0, ct));
}
KILN_LOWER(lowerClampMax) {
  if (isNanArg(L, 1)) return L.constant(NAN, ct);
  return clampAbove(L, L.as(v[0], ct), L.argConstant(1, 0, ct));
}
KILN_LOWER(lowerHardtanh) {
  if (isNanArg(L, 1) || isNanArg(L, 2)) return L.constant(NAN, ct);
  return clampAbove(L, clampBelow(L, L.as(v[0], ct), L.argConstant(1, -1, ct)), L.argConstant(2, 1, ct));
}

// Eval-mode batch_norm as eager's CPU kernel computes it: alpha = w / sqrt(var + eps),
// beta = b − mean·alpha, y = x·alpha + beta. The [C] parameters reach the kernel viewed as
// [C, 1, …] (see ChannelParam), so they broadcast along dim 1 of x.
KILN_LOWER(lowerBatchNorm) {
  int x = L.as(v[0], ct);
  int invstd = L.binary(Op::kDiv, L.constant(1, ct),
                        L.unary(Op::kSqrt, L.binary(Op::kAdd, L.as(v[4], ct), L.constant(L.scalarArg(7, 1e-5), ct))));
  int alpha = v[1].value >= 0 ? L.binary(Op::kMul, invstd, L.as(v[1], ct)) : invstd;
  int shift = L.binary(Op::kMul, L.as(v[3], ct), alpha);
  int beta = v[2].value >= 0 ? L.binary(Op::kSub, L.as(v[2], ct), shift) : L.unary(Op::kNeg, shift);
  return L.binary(Op::kAdd, L.binary(Op::kMul, x, alpha), beta);
}

KILN_LOWER(lowerFrac) {
  int x = L.as(v[0], ct);
  return L.binary(Op::kSub, x, L.unary(Op::kTrunc, x));
}

KILN_LOWER(lowerSign) {
  if (ct == at::kBool) return L.as(v[0], ct);
  int x = L.as(v[0], ct);
  int zero = L.constant(0, ct);
  int positive = L.kernel.cast(L.binary(Op::kLt, zero, x), *irDType(ct));
  int negative = L.kernel.cast(L.binary(Op::kLt, x, zero), *irDType(ct));
  return L.binary(Op::kSub, positive, negative);
}

KILN_LOWER(lowerNanToNum) {
  if (!at::isFloatingType(out)) return L.as(v[0], ct);
  int x = L.as(v[0], ct);
  double max = 0, lowest = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out, "nan_to_num", [&] {
    max = static_cast<double>(std::numeric_limits<scalar_t>::max());
    lowest = static_cast<double>(std::numeric_limits<scalar_t>::lowest());
  });
  double nan = L.scalarArg(1, 0);
  double posinf = L.optionalArg(2).value_or(max);
  double neginf = L.optionalArg(3).value_or(lowest);
  x = L.select(L.unary(Op::kIsNan, x), L.constant(nan, ct), x);
  x = L.select(L.binary(Op::kEq, x, L.constant(INFINITY, ct)), L.constant(posinf, ct), x);
  return L.select(L.binary(Op::kEq, x, L.constant(-INFINITY, ct)), L.constant(neginf, ct), x);
}

KILN_LOWER(lowerWhere) {
  return L.select(L.as(v[0], at::kBool), L.as(v[1], ct), L.as(v[2], ct));
}

KILN_LOWER(lowerMaskedFill) {
  return L.select(L.as(v[1], at::kBool), L.as(v[2], ct), L.as(v[0], ct));
}

KILN_LOWER(lowerLerp) {
  int start = L.as(v[0], ct);
  int end = L.as(v[1], ct);
  int weight = L.as(v[2], ct);
  int diff = L.binary(Op::kSub, end, start);
  int small = L.binary(Op::kLt, L.unary(Op::kAbs, weight), L.constant(0.5, ct));
  int low = L.binary(Op::kAdd, start, L.binary(Op::kMul, weight, diff));
  int high = L.binary(Op::kSub, end, L.binary(Op::kMul, diff, L.binary(Op::kSub, L.constant(1, ct), weight)));
  return L.select(small, low, high);
}

KILN_LOWER(lowerAddcmul) {
  int product = L.binary(Op::kMul, L.binary(Op::kMul, L.argConstant(3, 1, ct), L.as(v[1], ct)), L.as(v[2], ct));
  return L.binary(Op::kAdd, L.as(v[0], ct), product);
}

KILN_LOWER(lowerAddcdiv) {
  if (!at::isFloatingType(ct)) return -1;
  int quotient = L.binary(Op::kDiv, L.binary(Op::kMul, L.constant(L.scalarArg(3, 1), ct), L.as(v[1], ct)), L.as(v[2], ct));
  return L.binary(Op::kAdd, L.as(v[0], ct), quotient);
}

// Conversions go straight from the operand's dtype to the result's, as eager's copy does.
KILN_LOWER(lowerConvert) { return L.as(v[0], out); }
KILN_LOWER(lowerIdentity) { return L.as(v[0], out); }

template <Op op>
KILN_LOWER(floatOnlyUnary) { return L.unary(op, L.as(v[0], ct)); }

KILN_LOWER(lowerReciprocal) { return L.binary(Op::kDiv, L.constant(1, ct), L.as(v[0], ct)); }

const std::unordered_map<std::string, OpRule>& rules() {
  static const auto* table = [] {
    auto* rules = new std::unordered_map<std::string, OpRule>{
        {"aten::add.Tensor", {{0, 1}, lowerAdd}},
        {"aten::add.Scalar", {{0, 1}, lowerAdd}},
        {"aten::sub.Tensor", {{0, 1}, lowerSub}},
        {"aten::sub.Scalar", {{0, 1}, lowerSub}},
        {"aten::rsub.Tensor", {{0, 1}, lowerRsub}},
        {"aten::rsub.Scalar", {{0, 1}, lowerRsub}},
        {"aten::mul.Tensor", {{0, 1}, binaryOp<Op::kMul>}},
        {"aten::mul.Scalar", {{0, 1}, binaryOp<Op::kMul>}},
        {"aten::div.Tensor", {{0, 1}, lowerDiv}},
        {"aten::div.Scalar", {{0, 1}, lowerDiv}},
        {"aten::div.Tensor_mode", {{0, 1}, lowerDiv}},
        {"aten::div.Scalar_mode", {{0, 1}, lowerDiv}},
        {"aten::neg", {{0}, unaryOp<Op::kNeg>}},
        {"aten::abs", {{0}, unaryOp<Op::kAbs>}},
        {"aten::reciprocal", {{0}, lowerReciprocal}},
        {"aten::pow.Tensor_Tensor", {{0, 1}, lowerPow}},
        {"aten::pow.Tensor_Scalar", {{0, 1}, lowerPow}},
        {"aten::pow.Scalar", {{0, 1}, lowerPow}},
        {"aten::sqrt", {{0}, floatOnlyUnary<Op::kSqrt>}},
        {"aten::rsqrt", {{0}, floatOnlyUnary<Op::kRsqrt>}},
        {"aten::exp", {{0}, floatOnlyUnary<Op::kExp>}},
        {"aten::exp2", {{0}, floatOnlyUnary<Op::kExp2>}},
        {"aten::expm1", {{0}, floatOnlyUnary<Op::kExpm1>}},
        {"aten::log", {{0}, floatOnlyUnary<Op::kLog>}},
        {"aten::log2", {{0}, floatOnlyUnary<Op::kLog2>}},
        {"aten::log10", {{0}, floatOnlyUnary<Op::kLog10>}},
        {"aten::log1p", {{0}, floatOnlyUnary<Op::kLog1p>}},
        {"aten::sin", {{0}, floatOnlyUnary<Op::kSin>}},
        {"aten::cos", {{0}, floatOnlyUnary<Op::kCos>}},
        {"aten::tan", {{0}, floatOnlyUnary<Op::kTan>}},
        {"aten::tanh", {{0}, floatOnlyUnary<Op::kTanh>}},
        {"aten::sigmoid", {{0}, floatOnlyUnary<Op::kSigmoid>}},
        {"aten::erf", {{0}, floatOnlyUnary<Op::kErf>}},
        {"aten::erfc", {{0}, floatOnlyUnary<Op::kErfc>}},
        {"aten::floor", {{0}, unaryOp<Op::kFloor>}},
        {"aten::ceil", {{0}, unaryOp<Op::kCeil>}},
        {"aten::round", {{0}, unaryOp<Op::kRound>}},
        {"aten::trunc", {{0}, unaryOp<Op::kTrunc>}},
        {"aten::frac", {{0}, lowerFrac}},
        {"aten::sign", {{0}, lowerSign}},
        {"aten::relu", {{0}, lowerRelu}},
        {"aten::hardtanh", {{0}, lowerHardtanh}},
        {"aten::clamp", {{0}, lowerClamp}},
        {"aten::clamp_min", {{0}, lowerClampMin}},
        {"aten::clamp_max", {{0}, lowerClampMax}},
        {"aten::minimum", {{0, 1}, binaryOp<Op::kMin>}},
        {"aten::maximum", {{0, 1}, binaryOp<Op::kMax>}},
        {"aten::fmod.Tensor", {{0, 1}, lowerFmod}},
        {"aten::fmod.Scalar", {{0, 1}, lowerFmod}},
        {"aten::remainder.Tensor", {{0, 1}, lowerRemainder}},
        {"aten::remainder.Scalar", {{0, 1}, lowerRemainder}},
        {"aten::nan_to_num", {{0}, lowerNanToNum}},
        {"aten::where.self", {{0, 1, 2}, lowerWhere}},
        {"aten::where.ScalarSelf", {{0, 1, 2}, lowerWhere}},
        {"aten::where.ScalarOther", {{0, 1, 2}, lowerWhere}},
        {"aten::where.Scalar", {{0, 1, 2}, lowerWhere}},
        {"aten::masked_fill.Scalar", {{0, 1, 2}, lowerMaskedFill}},
        {"aten::masked_fill.Tensor", {{0, 1, 2}, lowerMaskedFill}},
        {"aten::lerp.Scalar", {{0, 1, 2}, lowerLerp}},
        {"aten::lerp.Tensor", {{0, 1, 2}, lowerLerp}},
        {"aten::addcmul", {{0, 1, 2}, lowerAddcmul}},
        {"aten::addcdiv", {{0, 1, 2}, lowerAddcdiv}},
        {"aten::logical_and", {{0, 1}, lowerLogicalAnd}},
        {"aten::logical_or", {{0, 1}, lowerLogicalOr}},
        {"aten::logical_not", {{0}, lowerLogicalNot}},
        {"aten::lt.Tensor", {{0, 1}, compareOp<Op::kLt>, true}},
        {"aten::lt.Scalar", {{0, 1}, compareOp<Op::kLt>, true}},
        {"aten::le.Tensor", {{0, 1}, compareOp<Op::kLe>, true}},
        {"aten::le.Scalar", {{0, 1}, compareOp<Op::kLe>, true}},
        {"aten::gt.Tensor", {{0, 1}, compareOp<Op::kGt>, true}},
        {"aten::gt.Scalar", {{0, 1}, compareOp<Op::kGt>, true}},
        {"aten::ge.Tensor", {{0, 1}, compareOp<Op::kGe>, true}},
        {"aten::ge.Scalar", {{0, 1}, compareOp<Op::kGe>, true}},
        {"aten::eq.Tensor", {{0, 1}, compareOp<Op::kEq>, true}},
        {"aten::eq.Scalar", {{0, 1}, compareOp<Op::kEq>, true}},
        {"aten::ne.Tensor", {{0, 1}, compareOp<Op::kNe>, true}},
        {"aten::ne.Scalar", {{0, 1}, compareOp<Op::kNe>, true}},
        {"aten::to.dtype", {{0}, lowerConvert}},
        {"aten::type_as", {{0}, lowerConvert, false, 1}},
        {"aten::dropout", {{0}, lowerIdentity}},
        {"aten::batch_norm", {{0, 1, 2, 3, 4}, lowerBatchNorm, false, -1, true}},
    };
    addActivationRules(*rules);
    addRowReductionRules(*rules);
    return rules;
  }();
  return *table;
}

const OpRule* ruleFor(const Node* node) {
  const c10::FunctionSchema* schema = node->maybeSchema();
  if (!schema) return nullptr;
  std::string key = schema->name();
  if (!schema->overload_name().empty()) key += "." + schema->overload_name();
  auto found = rules().find(key);
  return found == rules().end() ? nullptr : &found->second;
}

bool isNumberType(const c10::TypePtr& type) {
  return type->kind() == c10::TypeKind::FloatType || type->kind() == c10::TypeKind::IntType ||
         type->kind() == c10::TypeKind::BoolType;
}

c10::IValue sampleFor(const InputSignature& input) {
  if (input.is_tensor) {
    at::Tensor sample = at::ones(std::vector<int64_t>(static_cast<size_t>(input.dim), 1), at::TensorOptions().dtype(input.dtype));
    if (input.wrapped_number) sample.unsafeGetTensorImpl()->set_wrapped_number(true);
    return sample;
  }
  if (input.dtype == at::kDouble) return c10::IValue(1.0);
  if (input.dtype == at::kBool) return c10::IValue(true);
  return c10::IValue(static_cast<int64_t>(1));
}

at::ScalarType promoted(const c10::IValue& a, const c10::IValue& b) {
  if (a.isTensor() && b.isTensor()) return at::result_type(a.toTensor(), b.toTensor());
  if (a.isTensor()) return at::result_type(a.toTensor(), b.toScalar());
  if (b.isTensor()) return at::result_type(a.toScalar(), b.toTensor());
  return at::result_type(a.toScalar(), b.toScalar());
}

// Checks that each per-channel operand of `node` (batch_norm) is a 1-D group input used only
// as such, and records how the runtime must view it. Returns a reason when it is not.
std::string recordChannelParams(const torch::jit::Graph& subgraph, const Node* node,
                                const std::unordered_map<const Value*, Operand>& operands,
                                std::unordered_map<const Value*, std::vector<int>>& sources,
                                std::vector<ChannelParam>& params) {
  const int64_t x_rank = operands.at(node->input(0)).sample.toTensor().dim();
  for (size_t i = 1; i <= 4; ++i) {
    const Value* param = node->input(i);
    if (param->type()->kind() == c10::TypeKind::NoneType) continue;
    auto position = std::find(subgraph.inputs().begin(), subgraph.inputs().end(), param);
    if (position == subgraph.inputs().end()) return "batch_norm parameter computed inside the group";
    const Operand& operand = operands.at(param);
    if (!operand.is_tensor || operand.sample.toTensor().dim() != 1) return "batch_norm parameter is not 1-D";
    for (const torch::jit::Use& use : param->uses()) {
      if (!isChannelOperandUse(use)) return "a batch_norm parameter is also an operand of another op";
    }
    ChannelParam entry{sources.at(param).front(), x_rank, sources.at(node->input(0))};
    auto same = std::find_if(params.begin(), params.end(), [&](const ChannelParam& p) { return p.input == entry.input; });
    if (same != params.end()) {
      if (same->x_rank != x_rank) return "a batch_norm parameter shared across ranks";
      continue;
    }
    params.push_back(entry);
  }
  return "";
}

// Removes the values no output depends on, and the scalar inputs only they read: the kernel
// is then the same whether an attribute came as a constant or as a scalar it never reads.
// `scalar_sources` gets, per scalar input kept, the scalar input it was.
void dropDeadValues(ir::Kernel& kernel, std::vector<int>* scalar_sources) {
  std::vector<bool> live(kernel.body.size(), false);
  for (int output : kernel.outputs) live[static_cast<size_t>(output)] = true;
  for (size_t k = kernel.body.size(); k-- > 0;) {
    if (!live[k]) continue;
    for (int operand : kernel.body[k].operands) live[static_cast<size_t>(operand)] = true;
  }
  std::vector<int> scalar_index(kernel.scalar_inputs.size(), -1);
  std::vector<ir::DType> scalars;
  for (size_t k = 0; k < kernel.body.size(); ++k) {
    const ir::Instr& instr = kernel.body[k];
    if (!live[k] || instr.op != Op::kScalar || scalar_index[static_cast<size_t>(instr.param)] >= 0) continue;
    scalar_index[static_cast<size_t>(instr.param)] = 0;  // numbered below, in input order
  }
  scalar_sources->clear();
  for (size_t j = 0; j < scalar_index.size(); ++j) {
    if (scalar_index[j] < 0) continue;
    scalar_index[j] = static_cast<int>(scalars.size());
    scalars.push_back(kernel.scalar_inputs[j]);
    scalar_sources->push_back(static_cast<int>(j));
  }
  std::vector<int> renumbered(kernel.body.size(), -1);
  std::vector<ir::Instr> body;
  for (size_t k = 0; k < kernel.body.size(); ++k) {
    if (!live[k]) continue;
    ir::Instr instr = kernel.body[k];
    for (int& operand : instr.operands) operand = renumbered[static_cast<size_t>(operand)];
    if (instr.op == Op::kScalar) instr.param = scalar_index[static_cast<size_t>(instr.param)];
    renumbered[k] = static_cast<int>(body.size());
    body.push_back(instr);
  }
  for (int& output : kernel.outputs) output = renumbered[static_cast<size_t>(output)];
  kernel.body = std::move(body);
  kernel.scalar_inputs = std::move(scalars);
}

}  // namespace

std::optional<ir::DType> irDType(at::ScalarType type) {
  switch (type) {
    case at::kBool: return ir::DType::kBool;
    case at::kInt: return ir::DType::kInt32;
    case at::kLong: return ir::DType::kInt64;
    case at::kHalf: return ir::DType::kFloat16;
    case at::kBFloat16: return ir::DType::kBFloat16;
    case at::kFloat: return ir::DType::kFloat32;
    case at::kDouble: return ir::DType::kFloat64;
    default: return std::nullopt;
  }
}

bool isRowLengthList(const Node* node) {
  if (node->kind() != torch::jit::prim::ListConstruct || node->inputs().size() != 1 ||
      node->input(0)->type()->kind() != c10::TypeKind::IntType) {
    return false;
  }
  // Used only as normalized_shape, directly or through a group being built around its user.
  std::function<bool(const Value*)> onlyNormalizedShape = [&](const Value* list) {
    for (const torch::jit::Use& use : list->uses()) {
      if (use.user->kind() == torch::jit::prim::FusionGroup) {
        const Value* inner = use.user->g(torch::jit::attr::Subgraph)->inputs()[use.offset];
        if (!onlyNormalizedShape(inner)) return false;
        continue;
      }
      const OpRule* rule = ruleFor(use.user);
      if (!rule || static_cast<int>(use.offset) != rule->normalized_shape_arg) return false;
    }
    return true;
  };
  return onlyNormalizedShape(node->output());
}

bool isRowReduction(const Node* node) {
  const OpRule* rule = ruleFor(node);
  return rule && rule->isRowOp();
}

bool dropsReducedDim(const Node* node) {
  const OpRule* rule = ruleFor(node);
  if (!rule || rule->keepdim_arg < 0) return false;
  auto keepdim = torch::jit::toIValue(node->input(static_cast<size_t>(rule->keepdim_arg)));
  return !keepdim || !keepdim->toBool();
}

bool isChannelOperandUse(const torch::jit::Use& use) {
  static const c10::Symbol batch_norm = c10::Symbol::fromQualString("aten::batch_norm");
  return use.user->kind() == batch_norm && use.offset >= 1 && use.offset <= 4;
}

bool hasFusibleFunctionalForm(const Node* node) {
  std::string name = node->kind().toQualString();
  if (!node->kind().is_aten() || name.size() < 2 || name.back() != '_') return false;
  name.pop_back();
  for (const auto& [key, rule] : rules()) {
    if (key.compare(0, name.size(), name) == 0 && (key.size() == name.size() || key[name.size()] == '.')) return true;
  }
  return false;
}

bool isFusibleNode(const Node* node) {
  if (isRowLengthList(node)) return true;
  if (!node->kind().is_aten() || !node->blocks().empty()) return false;
  const OpRule* rule = ruleFor(node);
  if (!rule) return false;
  for (const Value* output : node->outputs()) {
    if (output->type()->kind() != c10::TypeKind::TensorType) return false;
  }
  for (size_t i = 0; i < node->inputs().size(); ++i) {
    const Value* input = node->input(i);
    bool is_operand = std::find(rule->operands.begin(), rule->operands.end(), static_cast<int>(i)) != rule->operands.end();
    if (static_cast<int>(i) == rule->dtype_only) {
      if (input->type()->kind() != c10::TypeKind::TensorType) return false;
    } else if (is_operand && rule->channel_params && i > 0) {
      // weight and bias may be None; the running statistics must be tensors.
      const bool none = input->type()->kind() == c10::TypeKind::NoneType;
      if (input->type()->kind() != c10::TypeKind::TensorType && !(none && i <= 2)) return false;
    } else if (is_operand && rule->optional_tensors && i > 0) {
      if (input->type()->kind() != c10::TypeKind::TensorType && input->type()->kind() != c10::TypeKind::NoneType) {
        return false;
      }
    } else if (is_operand) {
      if (input->type()->kind() != c10::TypeKind::TensorType && !isNumberType(input->type())) return false;
    } else if (static_cast<int>(i) == rule->normalized_shape_arg && isRowLengthList(input->node())) {
      continue;  // [n]: n joins the group as an int input
    } else if (!torch::jit::toIValue(input)) {
      return false;  // attributes (alpha, rounding mode, dtype, ...) must be constants
    }
  }
  if (rule->isRowOp()) {
    // The innermost dimension only: -1, or the last of a rank the profile knows.
    if (node->input(0)->type()->kind() != c10::TypeKind::TensorType) return false;
    if (rule->dim_arg >= 0) {
      std::optional<int64_t> dim = reducedDim(node, static_cast<size_t>(rule->dim_arg));
      std::optional<size_t> rank = node->input(0)->type()->expect<c10::TensorType>()->dim();
      if (!dim || !(*dim == -1 || (rank && *rank >= 1 && *dim == static_cast<int64_t>(*rank) - 1))) return false;
    }
    if (rule->dtype_arg >= 0 && !torch::jit::toIValue(node->input(static_cast<size_t>(rule->dtype_arg)))->isNone()) {
      return false;
    }
    if (rule->normalized_shape_arg >= 0) {
      const auto index = static_cast<size_t>(rule->normalized_shape_arg);
      if (!normalizedLength(node, index) && !isRowLengthList(node->input(index)->node())) return false;
    }
  }
  if (node->kind() == c10::Symbol::fromQualString("aten::batch_norm")) {
    auto training = torch::jit::toIValue(node->input(5));
    if (!training || training->toBool()) return false;
  }
  if (node->kind() == c10::Symbol::fromQualString("aten::dropout")) {
    auto train = torch::jit::toIValue(node->input(2));
    if (!train || train->toBool()) return false;
  }
  if (node->kind() == c10::Symbol::fromQualString("aten::to")) {
    auto dtype = torch::jit::toIValue(node->input(1));
    auto format = torch::jit::toIValue(node->input(4));
    if (!dtype || dtype->isNone() || !format || !format->isNone()) return false;
  }
  return true;
}

std::optional<LoweredGroup> lowerGroup(const torch::jit::Graph& subgraph,
                                       const std::vector<InputSignature>& signature,
                                       std::string* why, bool cuda) {
  auto fail = [&](const std::string& reason) -> std::optional<LoweredGroup> {
    if (why) *why = reason;
    return std::nullopt;
  };
  if (signature.size() != subgraph.inputs().size()) return fail("signature does not match the subgraph");
  LoweredGroup lowered;
  ir::Kernel& kernel = lowered.kernel;
  kernel.name = "fused";
  std::unordered_map<const Value*, Operand> operands;
  // Tensor inputs that each value depends on, for output shapes.
  std::unordered_map<const Value*, std::vector<int>> sources;
  int tensor_index = 0;
  int scalar_index = 0;
  for (size_t i = 0; i < signature.size(); ++i) {
    const InputSignature& input = signature[i];
    auto type = irDType(input.dtype);
    if (!type) return fail(std::string("unsupported dtype ") + c10::toString(input.dtype));
    Operand operand;
    operand.dtype = input.dtype;
    operand.is_tensor = input.is_tensor;
    operand.sample = sampleFor(input);
    if (input.is_tensor) {
      kernel.tensor_inputs.push_back(*type);
      operand.value = kernel.load(tensor_index);
      operand.input = tensor_index;
      sources[subgraph.inputs()[i]] = {tensor_index};
      tensor_index++;
    } else {
      kernel.scalar_inputs.push_back(*type);
      operand.input = scalar_index;
      operand.value = kernel.scalar(scalar_index++);
    }
    operands[subgraph.inputs()[i]] = operand;
  }

  Lowerer lowerer{kernel, cuda};
  for (const Node* node : subgraph.nodes()) {
    if (node->kind() == torch::jit::prim::Constant) continue;
    // A normalized_shape built at run time ([self.hidden_size]): read by the normalization.
    if (node->kind() == torch::jit::prim::ListConstruct) continue;
    const OpRule* rule = ruleFor(node);
    if (!rule) return fail(std::string("unsupported op ") + node->kind().toQualString());
    // Run the op once on one-element samples: its result dtype is eager's, by construction.
    torch::jit::Stack stack;
    std::vector<Operand> args;
    std::vector<const Value*> arg_values;  // per entry of args
    std::vector<int> node_sources;
    for (size_t i = 0; i < node->inputs().size(); ++i) {
      const Value* input = node->input(i);
      bool is_operand = std::find(rule->operands.begin(), rule->operands.end(), static_cast<int>(i)) != rule->operands.end();
      if (auto found = operands.find(input); found != operands.end()) {
        stack.push_back(found->second.sample);
        if (is_operand) {
          args.push_back(found->second);
          arg_values.push_back(input);
        }
        if (static_cast<int>(i) != rule->dtype_only) {
          auto& from = sources[input];
          node_sources.insert(node_sources.end(), from.begin(), from.end());
        }
        continue;
      }
      if (static_cast<int>(i) == rule->normalized_shape_arg && input->node()->kind() == torch::jit::prim::ListConstruct) {
        // One dimension given by an int group input: the runtime checks the row against it.
        auto length = operands.find(input->node()->input(0));
        if (length == operands.end() || length->second.is_tensor) return fail("normalized_shape is not a group input");
        if (lowered.row_length_scalar >= 0 && lowered.row_length_scalar != length->second.input) {
          return fail("normalizations of different lengths");
        }
        lowered.row_length_scalar = length->second.input;
        stack.push_back(c10::IValue(std::vector<int64_t>{1}));
        continue;
      }
      auto constant = torch::jit::toIValue(input);
      if (!constant) return fail("non-constant attribute of " + std::string(node->kind().toQualString()));
      // The samples have one element: a normalized_shape of one dimension becomes [1].
      stack.push_back(static_cast<int>(i) == rule->normalized_shape_arg ? c10::IValue(std::vector<int64_t>{1}) : *constant);
      if (is_operand) arg_values.push_back(input);
      if (is_operand && constant->isNone()) {
        args.push_back(Operand{});  // an absent optional operand (batch_norm weight/bias): value -1
        continue;
      }
      if (is_operand) {
        if (constant->isTensor()) return fail("tensor constant operand");
        Operand literal;
        literal.sample = *constant;
        literal.dtype = constant->isDouble() ? at::kDouble : constant->isBool() ? at::kBool : at::kLong;
        literal.value = constant->isDouble() ? kernel.constant(ir::DType::kFloat64, constant->toDouble())
                        : constant->isBool() ? kernel.integerConstant(ir::DType::kBool, constant->toBool())
                                             : kernel.integerConstant(ir::DType::kInt64, constant->toInt());
        args.push_back(literal);
      }
    }
    at::ScalarType out;
    int64_t out_dim = 0;
    try {
      node->getOperation()(stack);
      const at::Tensor& result = stack.back().toTensor();
      out = result.scalar_type();
      out_dim = result.dim();
    } catch (const std::exception& error) {
      return fail(std::string(node->kind().toQualString()) + " rejects these dtypes: " + error.what());
    }
    if (!irDType(out)) return fail(std::string("unsupported result dtype ") + c10::toString(out));
    if (rule->channel_params) {
      std::string problem = recordChannelParams(subgraph, node, operands, sources, lowered.channel_params);
      if (!problem.empty()) return fail(problem);
    }
    at::ScalarType compute = rule->compare ? opmath(promoted(args[0].sample, args[1].sample)) : opmath(out);
    lowerer.node = node;
    int result = rule->lower(lowerer, node, args, out, compute);
    if (result < 0) {
      return fail(std::string(node->kind().toQualString()) + " on " + c10::toString(compute) + " is left to eager");
    }
    std::string row_problem;
    const OutputRows rows = trackRows(*rule, node, args, arg_values, sources, lowered, &row_problem);
    if (!row_problem.empty()) return fail(row_problem);
    Operand produced;
    produced.rows = rows;
    produced.dtype = out;
    produced.is_tensor = true;
    produced.value = kernel.cast(result, *irDType(out));
    produced.sample = at::ones(std::vector<int64_t>(static_cast<size_t>(out_dim), 1), at::TensorOptions().dtype(out));
    std::sort(node_sources.begin(), node_sources.end());
    node_sources.erase(std::unique(node_sources.begin(), node_sources.end()), node_sources.end());
    sources[node->output()] = node_sources;
    operands[node->output()] = produced;
    // Unfused, this op reads each tensor operand of the result's rank and writes its result once
    // per element. An operand of lower rank (a bias, layer_norm's weight, batch_norm's [C]
    // statistics) and a per-row result are small beside them: not counted.
    for (const Operand& arg : args) {
      if (arg.is_tensor && arg.sample.isTensor() && arg.sample.toTensor().dim() == out_dim) {
        lowered.unfused_bytes_per_element += c10::elementSize(arg.dtype);
      }
    }
    if (rows == OutputRows::kElements) lowered.unfused_bytes_per_element += c10::elementSize(out);
  }
  for (const Value* output : subgraph.outputs()) {
    auto found = operands.find(output);
    if (found == operands.end() || !found->second.is_tensor) return fail("group output is not a computed tensor");
    kernel.outputs.push_back(found->second.value);
    lowered.output_rows.push_back(found->second.rows);
    lowered.output_dtypes.push_back(found->second.dtype);
    lowered.output_sources.push_back(sources[output]);
  }
  dropDeadValues(kernel, &lowered.scalar_sources);
  for (size_t o = 0; kernel.hasReductions() && o < lowered.output_rows.size(); ++o) {
    kernel.row_outputs.push_back(lowered.output_rows[o] != OutputRows::kElements);
  }
  std::string problems = ir::verify(kernel);
  if (!problems.empty()) return fail("lowering produced invalid IR: " + problems);
  return lowered;
}

}  // namespace kiln
