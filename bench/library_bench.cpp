// GEMMs and convolutions with their epilogues: ATen's ops as eager runs them (Baseline) beside
// kiln::linear / kiln::conv2d (Kiln), which run the fastest way measured on this machine (oneDNN
// with fused post-ops on a prepacked weight, ATen over a transposed weight, or ATen's own).
//
//   LinearBiasGelu/M/K/N/bf16   BERT-base's FFN up-projection: linear + bias + gelu
//   LinearBiasAdd/M/K/N/bf16    its down-projection and attention output: linear + bias + residual
//   ConvBnRelu/batch/C/H        ResNet-18's 3x3 layers: conv + batch_norm + relu (Kiln: the
//                               batch_norm folded into the weight, as kiln::optimize does)
//   LinearCall/M/K/N            what a call costs beyond its GEMM: a toy transformer's linear
//                               (32 x 64 -> 64 + bias), Baseline ATen's addmm over the weight
//                               transposed once (the way measuring picks there), Kiln the same
//                               through kiln::linear; both called boxed, as the interpreter does
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <torch/script.h>

#include "kiln/kiln.h"

namespace {

at::ScalarType dtypeArg(int64_t code) { return code == 1 ? at::kBFloat16 : at::kFloat; }

const c10::OperatorHandle& kilnOp(const char* name) {
  static const auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::linear", "");
  static const auto conv2d = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::conv2d", "");
  return std::string(name) == "linear" ? linear : conv2d;
}

at::Tensor callKiln(const char* name, torch::jit::Stack stack) {
  kilnOp(name).callBoxed(&stack);
  return stack.front().toTensor();
}

void setLinearCounters(benchmark::State& state, int64_t m, int64_t k, int64_t n) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m * k * n),
                                                 benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  state.SetLabel(std::string(c10::toString(dtypeArg(state.range(3)))));
}

struct LinearOperands {
  at::Tensor x, w, b, residual;
  LinearOperands(int64_t m, int64_t k, int64_t n, at::ScalarType dtype)
      : x(at::randn({m, k}).to(dtype)), w((at::randn({n, k}) * 0.02).to(dtype)), b(at::randn({n}).to(dtype)),
        residual(at::randn({m, n}).to(dtype)) {}
};

void Baseline_LinearBiasGelu(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  LinearOperands o(m, k, n, dtypeArg(state.range(3)));
  for (auto _ : state) benchmark::DoNotOptimize(at::gelu(at::linear(o.x, o.w, o.b)));
  setLinearCounters(state, m, k, n);
}

void Kiln_LinearBiasGelu(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  LinearOperands o(m, k, n, dtypeArg(state.range(3)));
  callKiln("linear", {o.x, o.w, o.b, c10::IValue(), "gelu"});  // measures once, prepacks
  for (auto _ : state) benchmark::DoNotOptimize(callKiln("linear", {o.x, o.w, o.b, c10::IValue(), "gelu"}));
  setLinearCounters(state, m, k, n);
}

void Baseline_LinearBiasAdd(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  LinearOperands o(m, k, n, dtypeArg(state.range(3)));
  for (auto _ : state) benchmark::DoNotOptimize(at::add(at::linear(o.x, o.w, o.b), o.residual));
  setLinearCounters(state, m, k, n);
}

void Kiln_LinearBiasAdd(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  LinearOperands o(m, k, n, dtypeArg(state.range(3)));
  callKiln("linear", {o.x, o.w, o.b, o.residual, "add"});
  for (auto _ : state) benchmark::DoNotOptimize(callKiln("linear", {o.x, o.w, o.b, o.residual, "add"}));
  setLinearCounters(state, m, k, n);
}

struct ConvOperands {
  at::Tensor x, w, b, mean, var, gamma, beta, folded_w, folded_b;
  ConvOperands(int64_t batch, int64_t c, int64_t h)
      : x(at::randn({batch, c, h, h})), w(at::randn({c, c, 3, 3}) / std::sqrt(9.0 * c)), b(at::randn({c})),
        mean(at::randn({c})), var(at::rand({c}) + 0.5), gamma(at::randn({c})), beta(at::randn({c})) {
    at::Tensor scale = gamma / at::sqrt(var + 1e-5);
    folded_w = w * scale.view({c, 1, 1, 1});
    folded_b = (b - mean) * scale + beta;
  }
};

void setConvCounters(benchmark::State& state) {
  const int64_t batch = state.range(0), c = state.range(1), h = state.range(2);
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(batch * c * c * 9 * h * h),
                                                 benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

void Baseline_ConvBnRelu(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  ConvOperands o(state.range(0), state.range(1), state.range(2));
  for (auto _ : state) {
    at::Tensor y = at::conv2d(o.x, o.w, o.b, 1, 1);
    y = at::batch_norm(y, o.gamma, o.beta, o.mean, o.var, false, 0.1, 1e-5, false);
    benchmark::DoNotOptimize(at::relu(y));
  }
  setConvCounters(state);
}

void Kiln_ConvBnRelu(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  ConvOperands o(state.range(0), state.range(1), state.range(2));
  const std::vector<int64_t> ones = {1, 1};
  auto call = [&] {
    return callKiln("conv2d", {o.x, o.folded_w, o.folded_b, c10::IValue(), ones, ones, ones, int64_t{1}, "relu"});
  };
  call();
  for (auto _ : state) benchmark::DoNotOptimize(call());
  setConvCounters(state);
}

void Baseline_LinearCall(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  LinearOperands o(m, k, n, at::kFloat);
  const at::Tensor transposed = o.w.t().contiguous();
  // Called boxed, as TorchScript's interpreter calls both.
  static const auto addmm = c10::Dispatcher::singleton().findSchemaOrThrow("aten::addmm", "");
  for (auto _ : state) {
    torch::jit::Stack stack{o.b, o.x, transposed, at::Scalar(1), at::Scalar(1)};
    addmm.callBoxed(&stack);
    benchmark::DoNotOptimize(stack.front());
  }
}

void Kiln_LinearCall(benchmark::State& state) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  LinearOperands o(m, k, n, at::kFloat);
  callKiln("linear", {o.x, o.w, o.b, c10::IValue(), ""});
  for (auto _ : state) benchmark::DoNotOptimize(callKiln("linear", {o.x, o.w, o.b, c10::IValue(), ""}));
}

void linearShapes(benchmark::internal::Benchmark* b, int64_t k, int64_t n) {
  for (int64_t dtype : {0, 1}) {
    for (int64_t m : {14, 1024}) b->Args({m, k, n, dtype});
  }
  b->ArgNames({"M", "K", "N", "bf16"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

void convShapes(benchmark::internal::Benchmark* b) {
  for (int64_t batch : {1, 16}) {
    for (auto [c, h] : {std::pair<int64_t, int64_t>{64, 56}, {128, 28}, {256, 14}, {512, 7}}) b->Args({batch, c, h});
  }
  b->ArgNames({"batch", "C", "H"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(Baseline_LinearBiasGelu)->Apply([](auto* b) { linearShapes(b, 768, 3072); });
BENCHMARK(Kiln_LinearBiasGelu)->Apply([](auto* b) { linearShapes(b, 768, 3072); });
BENCHMARK(Baseline_LinearBiasAdd)->Apply([](auto* b) { linearShapes(b, 3072, 768); });
BENCHMARK(Kiln_LinearBiasAdd)->Apply([](auto* b) { linearShapes(b, 3072, 768); });
BENCHMARK(Baseline_LinearCall)->Args({32, 64, 64})->ArgNames({"M", "K", "N"})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(Kiln_LinearCall)->Args({32, 64, 64})->ArgNames({"M", "K", "N"})->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(Baseline_ConvBnRelu)->Apply(convShapes);
BENCHMARK(Kiln_ConvBnRelu)->Apply(convShapes);

}  // namespace
