// Lowering of activations (leaky_relu, elu, silu, gelu, hardsigmoid, hardswish, softplus) to the
// kernel IR, each as eager's kernel computes it, gelu as this CPU's eager does at the extremes.
#include <cmath>

#include <ATen/ATen.h>

#include "fuser/lowering_rules.h"

namespace kiln::lowering {
namespace {

KILN_LOWER(lowerLeakyRelu) {
  int x = L.as(v[0], ct);
  int zero = L.constant(0, ct);
  return L.select(L.binary(Op::kGt, x, zero), x, L.binary(Op::kMul, x, L.constant(L.scalarArg(1, 0.01), ct)));
}

KILN_LOWER(lowerElu) {
  int x = L.as(v[0], ct);
  double alpha = L.scalarArg(1, 1), scale = L.scalarArg(2, 1), input_scale = L.scalarArg(3, 1);
  int negative = L.binary(Op::kMul, L.unary(Op::kExpm1, L.binary(Op::kMul, x, L.constant(input_scale, ct))),
                          L.constant(alpha * scale, ct));
  return L.select(L.binary(Op::kLe, x, L.constant(0, ct)), negative, L.binary(Op::kMul, x, L.constant(scale, ct)));
}

KILN_LOWER(lowerSilu) {
  int x = L.as(v[0], ct);
  int one = L.constant(1, ct);
  return L.binary(Op::kDiv, x, L.binary(Op::kAdd, one, L.unary(Op::kExp, L.unary(Op::kNeg, x))));
}

// How this CPU's eager computes float32 gelu (half and bfloat16 compute in it) on a contiguous
// tensor at the extremes, which differs between CPUs: on AVX-512 through oneDNN's kernel, x past
// half of the largest float overflows to inf ((x·(1 + erf))·0.5) and ±inf gives NaN (its erf has
// no value there); on an AVX2-only CPU, x·0.5·(1 + erf): 3e38 stays finite, +inf gives inf.
// Probed once, from eager itself.
struct EagerGelu {
  bool overflows = true;   // (x·(1 + erf))·0.5, else x·0.5·(1 + erf)
  bool nan_at_inf = true;  // NaN at ±inf whatever the formula gives
};

const EagerGelu& eagerGelu() {
  static const EagerGelu probed = [] {
    EagerGelu result;
    try {
      at::NoGradGuard no_grad;
      // Long enough for the vectorized loop (a tail of a few elements may take another path).
      at::Tensor x = at::full({64}, 3e38, at::kFloat);
      x[1] = INFINITY;
      at::Tensor y = at::gelu(x, "none");
      result.overflows = std::isinf(y[0].item<float>());
      result.nan_at_inf = std::isnan(y[1].item<float>());
    } catch (const std::exception&) {
      // Keep the oneDNN behaviour kiln was first written against.
    }
    return result;
  }();
  return probed;
}

KILN_LOWER(lowerGelu) {
  int x = L.as(v[0], ct);
  auto approximate = torch::jit::toIValue(n->input(1));
  int half = L.constant(0.5, ct);
  if (approximate && approximate->isString() && approximate->toStringRef() == "tanh") {
    int one = L.constant(1, ct);
    const double beta = M_SQRT2 * M_2_SQRTPI * 0.5;
    int cube = L.binary(Op::kMul, L.binary(Op::kMul, x, x), x);
    int inner = L.binary(Op::kMul, L.constant(beta, ct),
                         L.binary(Op::kAdd, x, L.binary(Op::kMul, L.constant(0.044715, ct), cube)));
    return L.binary(Op::kMul, L.binary(Op::kMul, half, x), L.binary(Op::kAdd, one, L.unary(Op::kTanh, inner)));
  }
  // As eager computes it on a contiguous tensor. float32 on the CPU: as this CPU's eager does
  // (eagerGelu). float64 and CUDA: x·0.5·(1 + erf(x/√2)), ATen's own loop. Eager's scalar loop on
  // the CPU (strided tensors) differs from the vectorized one at the extremes; kiln follows the
  // contiguous case everywhere.
  int erf = L.unary(Op::kErf, L.binary(Op::kMul, x, L.constant(M_SQRT1_2, ct)));
  int one_plus_erf = L.binary(Op::kAdd, L.constant(1, ct), erf);
  const bool cpu_float = ct != at::kDouble && !L.cuda;
  int gelu = cpu_float && eagerGelu().overflows ? L.binary(Op::kMul, L.binary(Op::kMul, x, one_plus_erf), half)
                                                : L.binary(Op::kMul, L.binary(Op::kMul, x, half), one_plus_erf);
  if (!cpu_float || !eagerGelu().nan_at_inf) return gelu;
  int infinite = L.binary(Op::kEq, L.unary(Op::kAbs, x), L.constant(INFINITY, ct));
  return L.select(infinite, L.constant(NAN, ct), gelu);
}

int hardsigmoidCore(Lowerer& L, int x, at::ScalarType ct) {
  int shifted = L.binary(Op::kAdd, x, L.constant(3, ct));
  return L.binary(Op::kMin, L.binary(Op::kMax, shifted, L.constant(0, ct)), L.constant(6, ct));
}
// The last step of both: eager's CPU kernel divides by 6; its CUDA kernel multiplies by
// 1.0f / 6.0f, a float constant even in float64 (3e-8 off a sixth).
int timesOneSixth(Lowerer& L, int x, at::ScalarType ct) {
  if (L.cuda) return L.binary(Op::kMul, x, L.constant(static_cast<double>(1.0f / 6.0f), ct));
  return L.binary(Op::kDiv, x, L.constant(6, ct));
}
KILN_LOWER(lowerHardsigmoid) { return timesOneSixth(L, hardsigmoidCore(L, L.as(v[0], ct), ct), ct); }
KILN_LOWER(lowerHardswish) {
  int x = L.as(v[0], ct);
  return timesOneSixth(L, L.binary(Op::kMul, x, hardsigmoidCore(L, x, ct)), ct);
}

KILN_LOWER(lowerSoftplus) {
  int x = L.as(v[0], ct);
  double beta = L.scalarArg(1, 1), threshold = L.scalarArg(2, 20);
  int scaled = L.binary(Op::kMul, x, L.constant(beta, ct));
  int soft = L.binary(Op::kDiv, L.unary(Op::kLog1p, L.unary(Op::kExp, scaled)), L.constant(beta, ct));
  return L.select(L.binary(Op::kGt, scaled, L.constant(threshold, ct)), x, soft);
}

}  // namespace

void addActivationRules(std::unordered_map<std::string, OpRule>& table) {
  table.insert({
      {"aten::leaky_relu", {{0}, lowerLeakyRelu}},
      {"aten::elu", {{0}, lowerElu}},
      {"aten::silu", {{0}, lowerSilu}},
      {"aten::gelu", {{0}, lowerGelu}},
      {"aten::hardsigmoid", {{0}, lowerHardsigmoid}},
      {"aten::hardswish", {{0}, lowerHardswish}},
      {"aten::softplus", {{0}, lowerSoftplus}},
  });
}

}  // namespace kiln::lowering
