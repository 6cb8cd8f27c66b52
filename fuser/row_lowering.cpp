// Lowering of row reductions (sum, mean, amax/amin, var/std, softmax, log_softmax, layer_norm,
// rms_norm over the innermost dimension) to the kernel IR's reduce_* instructions, computed as
// eager's CPU kernels accumulate; and the bookkeeping of which values are per row.
#include <cmath>
#include <limits>

#include "fuser/lowering_rules.h"

namespace kiln::lowering {
namespace {

// ---- row reductions over the innermost dimension, in float32 (or float64) as eager's CPU
// kernels accumulate ----

bool reducesLastDim(const Node* n, const std::vector<Operand>& v) {
  const int64_t rank = v[0].sample.toTensor().dim();
  std::optional<int64_t> dim = reducedDim(n, 1);
  return rank >= 1 && dim && (*dim == -1 || *dim == rank - 1);
}

template <Op op>
KILN_LOWER(lowerReduce) {
  if (!at::isFloatingType(ct) || !reducesLastDim(n, v)) return -1;
  return L.kernel.reduce(op, L.as(v[0], ct));
}

KILN_LOWER(lowerMean) {
  if (!at::isFloatingType(ct) || !reducesLastDim(n, v)) return -1;
  return L.binary(Op::kDiv, L.kernel.reduce(Op::kReduceSum, L.as(v[0], ct)), L.kernel.rowSize(*irDType(ct)));
}

// var as eager computes it: the sum of squared deviations over max(0, n - correction).
int variance(Lowerer& L, const Node* n, const std::vector<Operand>& v, at::ScalarType ct) {
  if (!at::isFloatingType(ct) || !reducesLastDim(n, v)) return -1;
  auto argument = torch::jit::toIValue(n->input(2));
  double correction = 1;
  if (n->schema().overload_name() == "dim") {
    correction = (!argument || argument->isNone() || argument->toBool()) ? 1 : 0;
  } else if (argument && !argument->isNone()) {
    correction = argument->isDouble() ? argument->toDouble() : static_cast<double>(argument->toInt());
  }
  int population = L.kernel.reduce(Op::kReduceVar, L.as(v[0], ct));
  if (correction == 0) return population;
  int count = L.kernel.rowSize(*irDType(ct));
  int divisor = L.binary(Op::kMax, L.binary(Op::kSub, count, L.constant(correction, ct)), L.constant(0, ct));
  return L.binary(Op::kDiv, L.binary(Op::kMul, population, count), divisor);
}
KILN_LOWER(lowerVar) { return variance(L, n, v, ct); }
KILN_LOWER(lowerStd) {
  int var = variance(L, n, v, ct);
  return var < 0 ? -1 : L.unary(Op::kSqrt, var);
}

// softmax as eager's vectorized CPU kernel: exp(x - max) times the reciprocal of its sum.
KILN_LOWER(lowerSoftmax) {
  if (!at::isFloatingType(ct) || !reducesLastDim(n, v)) return -1;
  int x = L.as(v[0], ct);
  int e = L.unary(Op::kExp, L.binary(Op::kSub, x, L.kernel.reduce(Op::kReduceMax, x)));
  return L.binary(Op::kMul, e, L.binary(Op::kDiv, L.constant(1, ct), L.kernel.reduce(Op::kReduceSum, e)));
}

KILN_LOWER(lowerLogSoftmax) {
  if (!at::isFloatingType(ct) || !reducesLastDim(n, v)) return -1;
  int x = L.as(v[0], ct);
  int shifted = L.binary(Op::kSub, x, L.kernel.reduce(Op::kReduceMax, x));
  int sum = L.kernel.reduce(Op::kReduceSum, L.unary(Op::kExp, shifted));
  return L.binary(Op::kSub, shifted, L.unary(Op::kLog, sum));
}

// layer_norm over one dimension: mean and variance in one pass (Welford), then
// (x - mean) / sqrt(var + eps) · weight + bias.
KILN_LOWER(lowerLayerNorm) {
  if (!at::isFloatingType(ct) || v[0].sample.toTensor().dim() < 1) return -1;
  int x = L.as(v[0], ct);
  int mean = L.binary(Op::kDiv, L.kernel.reduce(Op::kReduceSum, x), L.kernel.rowSize(*irDType(ct)));
  int var = L.kernel.reduce(Op::kReduceVar, x);
  int rstd = L.binary(Op::kDiv, L.constant(1, ct),
                      L.unary(Op::kSqrt, L.binary(Op::kAdd, var, L.constant(L.scalarArg(4, 1e-5), ct))));
  int y = L.binary(Op::kMul, L.binary(Op::kSub, x, mean), rstd);
  if (v[1].value >= 0) y = L.binary(Op::kMul, y, L.as(v[1], ct));
  if (v[2].value >= 0) y = L.binary(Op::kAdd, y, L.as(v[2], ct));
  return y;
}

// rms_norm as ATen composes it: x · rsqrt(mean(x²) + eps) in opmath, rounded to x's dtype, then
// times the weight. eps defaults to opmath's machine epsilon.
KILN_LOWER(lowerRmsNorm) {
  if (!at::isFloatingType(ct) || v[0].sample.toTensor().dim() < 1) return -1;
  const double epsilon = ct == at::kDouble ? std::numeric_limits<double>::epsilon()
                                           : static_cast<double>(std::numeric_limits<float>::epsilon());
  int x = L.as(v[0], ct);
  int mean_square = L.binary(Op::kDiv, L.kernel.reduce(Op::kReduceSum, L.binary(Op::kMul, x, x)),
                             L.kernel.rowSize(*irDType(ct)));
  int y = L.binary(Op::kMul, x, L.unary(Op::kRsqrt, L.binary(Op::kAdd, mean_square, L.constant(L.scalarArg(3, epsilon), ct))));
  if (v[1].value < 0) return y;
  y = L.kernel.cast(L.kernel.cast(y, *irDType(v[0].dtype)), *irDType(ct));
  return L.binary(Op::kMul, y, L.as(v[1], ct));
}

}  // namespace

void addRowReductionRules(std::unordered_map<std::string, OpRule>& table) {
  table.insert({
      {"aten::sum.dim_IntList", reduction(lowerReduce<Op::kReduceSum>, 2, 3)},
      {"aten::mean.dim", reduction(lowerMean, 2, 3)},
      {"aten::amax", reduction(lowerReduce<Op::kReduceMax>, 2)},
      {"aten::amin", reduction(lowerReduce<Op::kReduceMin>, 2)},
      {"aten::var.correction", reduction(lowerVar, 3)},
      {"aten::var.dim", reduction(lowerVar, 3)},
      {"aten::std.correction", reduction(lowerStd, 3)},
      {"aten::std.dim", reduction(lowerStd, 3)},
      {"aten::softmax.int", rowOp(lowerSoftmax)},
      {"aten::log_softmax.int", rowOp(lowerLogSoftmax)},
      {"aten::layer_norm", normalization({0, 2, 3}, lowerLayerNorm)},
      {"aten::rms_norm", normalization({0, 2}, lowerRmsNorm)},
  });
}

// Whether `node`'s result is per element or per row, recording what the runtime must check:
// the rows a reduction reads and the per-element operands met by per-row values must span the
// row; a normalization's row length and per-row parameters. Sets *problem when the group cannot
// compute it as eager does.
OutputRows trackRows(const OpRule& rule, const Node* node, const std::vector<Operand>& args,
                     const std::vector<const Value*>& arg_values,
                     std::unordered_map<const Value*, std::vector<int>>& sources, LoweredGroup& lowered,
                     std::string* problem) {
  if (rule.isRowOp()) {
    if (args[0].rows != OutputRows::kElements) {
      *problem = "a row reduction of a per-row value";
      return OutputRows::kElements;
    }
    lowered.row_spans.push_back(sources[node->input(0)]);
    if (rule.normalized_shape_arg >= 0) {
      if (std::optional<int64_t> length = normalizedLength(node, static_cast<size_t>(rule.normalized_shape_arg))) {
        if (lowered.row_length >= 0 && lowered.row_length != *length) *problem = "normalizations of different lengths";
        lowered.row_length = *length;
      }
      for (size_t a = 1; a < args.size(); ++a) {
        if (args[a].value < 0) continue;
        if (args[a].input < 0) *problem = "a normalization's weight or bias is computed inside the group";
        lowered.row_params.push_back(args[a].input);
      }
    }
    if (rule.keepdim_arg < 0) return OutputRows::kElements;
    return dropsReducedDim(node) ? OutputRows::kDropDim : OutputRows::kKeepDim;
  }
  // A 0-dim tensor (T5's epsilon, frozen into a constant) broadcasts to any shape and changes
  // none: it counts as a scalar here.
  auto zeroDim = [](const Operand& arg) { return arg.sample.isTensor() && arg.sample.toTensor().dim() == 0; };
  bool dropped = false, kept = false, elements = false;
  for (const Operand& arg : args) {
    if (!arg.is_tensor || zeroDim(arg)) continue;
    dropped |= arg.rows == OutputRows::kDropDim;
    kept |= arg.rows == OutputRows::kKeepDim;
    elements |= arg.rows == OutputRows::kElements;
  }
  if (dropped && (kept || elements)) {
    *problem = "a reduction without its dim meets another tensor";
    return OutputRows::kElements;
  }
  if (dropped) return OutputRows::kDropDim;
  if (!kept) return OutputRows::kElements;
  if (!elements) return OutputRows::kKeepDim;
  for (size_t a = 0; a < args.size(); ++a) {
    if (args[a].is_tensor && !zeroDim(args[a]) && args[a].rows == OutputRows::kElements) {
      lowered.row_spans.push_back(sources[arg_values[a]]);
    }
  }
  return OutputRows::kElements;
}

}  // namespace kiln::lowering
