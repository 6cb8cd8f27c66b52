// Every supported elementwise op as a TorchScript expression, the dtypes and the layouts the op
// tests run them in. Shared by the CPU op coverage test and the GPU one.
#pragma once

#include <gtest/gtest.h>
#include <torch/jit.h>
#include <torch/torch.h>

#include <string>
#include <vector>

#include "support/graph_testing.h"

namespace kiln::testing {

struct OpCase {
  const char* name;
  const char* expression;  // of x, y (same dtype) and m (bool)
  bool float_only = false; // fused only for floating dtypes; integers take the fallback
  // For half/bfloat16: the op computed in float32 and rounded once. Eager's vectorized CPU loop
  // rounds an intermediate to the storage type where its scalar loop (0-dim operands, loop tails)
  // does not, so an element of eager's result may come from either; kiln computes as this does.
  const char* opmath_expression = nullptr;
  // Where eager's CUDA kernel computes otherwise than its CPU one: the op as the CUDA kernel does,
  // the expected value of a CUDA kernel run on the CPU (the emulator).
  const char* cuda_expression = nullptr;
};

// hardsigmoid and hardswish on CUDA end with * (1.0f / 6.0f), a float constant even in float64;
// on the CPU with / 6.
#define KILN_CUDA_SIXTH "0.1666666716337204"
// hardswish(x) as eager's CUDA kernel computes it, in TorchScript (the fuzzer's reference too).
#define KILN_CUDA_HARDSWISH \
  "x * torch.clamp(x + 3, 0, 6) * " KILN_CUDA_SIXTH " if x.dtype == 7 else torch.hardswish(x)"

inline const OpCase kOps[] = {
    {"add", "x + y"}, {"add_alpha", "torch.add(x, y, alpha=2)"}, {"add_scalar", "x + 3"},
    {"sub", "x - y"}, {"rsub", "torch.rsub(x, y, alpha=2)"}, {"rsub_scalar", "1.5 - x"},
    {"mul", "x * y"}, {"mul_scalar", "x * 2.5"}, {"div", "x / y"}, {"div_scalar", "x / 4"},
    {"div_trunc", "torch.div(x, y, rounding_mode='trunc')", true,
     "torch.div(x.float(), y.float(), rounding_mode='trunc').to(x.dtype)"},
    {"div_floor", "torch.div(x, y, rounding_mode='floor')", true,
     "torch.div(x.float(), y.float(), rounding_mode='floor').to(x.dtype)"},
    {"neg", "-x"}, {"abs", "torch.abs(x)"}, {"reciprocal", "torch.reciprocal(x)"},
    {"pow", "torch.pow(torch.abs(x) + 0.5, y)", true}, {"pow2", "torch.pow(x, 2)", true},
    {"pow_half", "torch.pow(torch.abs(x), 0.5)", true}, {"pow_m1", "torch.pow(x, -1.0)", true},
    {"pow_scalar_base", "torch.pow(2.0, x)", true}, {"pow_general", "torch.pow(torch.abs(x), 1.7)", true},
    {"sqrt", "torch.sqrt(torch.abs(x))"}, {"rsqrt", "torch.rsqrt(torch.abs(x) + 1)"},
    {"exp", "torch.exp(x)"}, {"exp2", "torch.exp2(x)"}, {"expm1", "torch.expm1(x)"},
    {"log", "torch.log(torch.abs(x) + 1)"}, {"log2", "torch.log2(torch.abs(x) + 1)"},
    {"log10", "torch.log10(torch.abs(x) + 1)"}, {"log1p", "torch.log1p(torch.abs(x))"},
    {"sin", "torch.sin(x)"}, {"cos", "torch.cos(x)"}, {"tan", "torch.tan(x)"},
    {"tanh", "torch.tanh(x)"}, {"sigmoid", "torch.sigmoid(x)"}, {"relu", "torch.relu(x)"},
    {"leaky_relu", "torch.leaky_relu(x, 0.1)", true}, {"elu", "torch.elu(x, 0.7)", true},
    {"silu", "torch.silu(x)", true}, {"gelu", "torch.gelu(x)", true},
    {"gelu_tanh", "torch.gelu(x, approximate='tanh')", true}, {"hardtanh", "torch.hardtanh(x, -0.5, 0.7)"},
    {"hardsigmoid", "torch.hardsigmoid(x)", true, nullptr,
     "torch.clamp(x + 3, 0, 6) * " KILN_CUDA_SIXTH " if x.dtype == 7 else torch.hardsigmoid(x)"},
    {"hardswish", "torch.hardswish(x)", true, nullptr, KILN_CUDA_HARDSWISH},
    {"softplus", "torch.softplus(x, 2.0, 3.0)", true}, {"erf", "torch.erf(x)"},
    {"erfc", "torch.erfc(x)"}, {"clamp", "torch.clamp(x, -1, 1)"}, {"clamp_min", "torch.clamp_min(x, 0.5)"},
    {"clamp_max", "torch.clamp_max(x, 0.5)"}, {"minimum", "torch.minimum(x, y)"},
    {"maximum", "torch.maximum(x, y)"}, {"where", "torch.where(m, x, y)"},
    {"where_scalar", "torch.where(m, x, 0.5)"}, {"masked_fill", "x.masked_fill(m, 2.0)"},
    {"lt", "x < y"}, {"le", "x <= y"}, {"gt", "x > 0.5"}, {"ge", "x >= y"}, {"eq", "x == y"},
    {"ne", "x != y"}, {"logical_and", "torch.logical_and(x, y)"}, {"logical_or", "torch.logical_or(x, y)"},
    {"logical_not", "torch.logical_not(x)"}, {"floor", "torch.floor(x)"}, {"ceil", "torch.ceil(x)"},
    {"round", "torch.round(x)"}, {"trunc", "torch.trunc(x)"}, {"frac", "torch.frac(x)", true},
    {"sign", "torch.sign(x)"}, {"lerp", "torch.lerp(x, y, 0.3)", true},
    {"lerp_tensor", "torch.lerp(x, y, torch.sigmoid(y))", true},
    {"addcmul", "torch.addcmul(x, y, x, value=0.5)"}, {"addcdiv", "torch.addcdiv(x, y, torch.abs(x) + 1, value=0.5)", true},
    {"fmod", "torch.fmod(x, torch.abs(y) + 0.5)", true}, {"remainder", "torch.remainder(x, y + 0.25)", true},
    {"nan_to_num", "torch.nan_to_num(torch.log(x), 0.5)", true},
    {"to_half", "x.to(5)"}, {"to_double", "x.to(7)"}, {"to_int", "x.to(3)"},
    {"to_bool", "x.to(11)"}, {"type_as", "x.type_as(m)"}, {"type_as_broadcast", "x.type_as(m[0])"}, {"dropout_eval", "torch.dropout(x, 0.5, False)"},
};

inline const at::ScalarType kDTypes[] = {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kInt, at::kLong, at::kBool};

inline at::Tensor randomTensor(std::vector<int64_t> shape, at::ScalarType dtype, c10::Device device = c10::kCPU) {
  at::Tensor t;
  if (dtype == at::kBool) {
    t = torch::rand(shape) > 0.5;
  } else if (at::isIntegralType(dtype, false)) {
    t = torch::randint(1, 10, shape, at::TensorOptions().dtype(dtype));
    t = t * (torch::rand(shape) > 0.5).to(dtype).mul(2).sub(1);  // nonzero, either sign
  } else {
    t = (torch::randn(shape) * 2).to(dtype);
  }
  return t.to(device);
}

enum class Layout { kContiguous, kTransposed, kSliced, kExpanded, kZeroDim, kEmpty };

inline at::Tensor inLayout(Layout layout, at::ScalarType dtype, c10::Device device = c10::kCPU) {
  switch (layout) {
    case Layout::kContiguous: return randomTensor({5, 37}, dtype, device);
    case Layout::kTransposed: return randomTensor({37, 5}, dtype, device).t();
    case Layout::kSliced: return randomTensor({5, 74}, dtype, device).slice(1, 0, 74, 2);
    case Layout::kExpanded: return randomTensor({1, 37}, dtype, device).expand({5, 37});
    case Layout::kZeroDim: return randomTensor({}, dtype, device);
    case Layout::kEmpty: return randomTensor({0, 37}, dtype, device);
  }
  return {};
}

// Fuses `op` alone and runs it against eager on `device` in every dtype and layout. On
// float32 contiguous inputs the kernel itself must have run (no fallback). emulated_cuda: the
// kernels are CUDA's run on the CPU, expected to compute as eager's CUDA kernels do.
inline void checkOpMatchesEager(const OpCase& op, c10::Device device, bool emulated_cuda = false) {
  std::string source = std::string("def f(x, y, m):\n    return ") + op.expression + "\n";
  if (op.opmath_expression) source += std::string("def opmath(x, y, m):\n    return ") + op.opmath_expression + "\n";
  const bool as_cuda = emulated_cuda && op.cuda_expression;
  if (as_cuda) source += std::string("def cuda(x, y, m):\n    return ") + op.cuda_expression + "\n";
  auto unit = torch::jit::compile(source);
  auto& function = torch::jit::toGraphFunction(unit->get_function("f"));
  for (at::ScalarType dtype : kDTypes) {
    for (Layout layout : {Layout::kContiguous, Layout::kTransposed, Layout::kSliced, Layout::kExpanded,
                          Layout::kZeroDim, Layout::kEmpty}) {
      // Every layout for float32 and int64; contiguous, 0-dim and empty for the other dtypes.
      bool full = dtype == at::kFloat || dtype == at::kLong;
      if (!full && (layout == Layout::kTransposed || layout == Layout::kSliced || layout == Layout::kExpanded)) continue;
      SCOPED_TRACE(std::string(op.name) + " " + c10::toString(dtype) + " layout " + std::to_string(static_cast<int>(layout)));
      at::Tensor x = inLayout(layout, dtype, device);
      at::Tensor y = layout == Layout::kZeroDim ? randomTensor({}, dtype, device) : randomTensor({5, 37}, dtype, device).slice(0, 0, x.size(0));
      at::Tensor m = (layout == Layout::kZeroDim ? torch::rand({}) > 0.5 : torch::rand({x.size(0), 37}) > 0.5).to(device);
      std::vector<c10::IValue> inputs = {x, y, m};
      std::shared_ptr<torch::jit::Graph> original = function.graph()->copy();
      std::shared_ptr<torch::jit::Graph> graph = function.graph()->copy();
      fuse(graph, testOptions(1));
      // Statistics are per group code, shared with every identical group this process ran before.
      const Report before = report(graph);
      ASSERT_FALSE(before.groups.empty()) << "op not fused: " << *graph;
      std::vector<c10::IValue> expected, actual;
      try {
        expected = as_cuda ? std::vector<c10::IValue>{unit->get_function("cuda")(inputs)} : runGraph(original, inputs);
      } catch (const std::exception&) {
        // Eager rejects this dtype; the fused graph must reject it the same way.
        EXPECT_ANY_THROW(runGraph(graph, inputs));
        continue;
      }
      actual = runGraph(graph, inputs);
      if (op.opmath_expression && (dtype == at::kHalf || dtype == at::kBFloat16)) {
        at::Tensor opmath = unit->get_function("opmath")(inputs).toTensor();
        ASSERT_TRUE(sameTensorAsEither(actual[0].toTensor(), expected[0].toTensor(), opmath, 2.0));
      } else {
        ASSERT_TRUE(sameTensor(actual[0].toTensor(), expected[0].toTensor(), 2.0));
      }
      Report r = report(graph);
      ASSERT_FALSE(r.groups.empty()) << "op not fused: " << *graph;
      bool expect_fused = !op.float_only || at::isFloatingType(dtype);
      if (expect_fused && layout == Layout::kContiguous && dtype == at::kFloat) {
        EXPECT_EQ(r.groups[0].fallbacks, before.groups[0].fallbacks) << "float32 took the fallback on " << device;
        EXPECT_GT(r.groups[0].calls, before.groups[0].calls);
      }
    }
  }
}

}  // namespace kiln::testing
