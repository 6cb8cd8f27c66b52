// kiln::linear on CUDA (cuBLASLt with its epilogue, torch_ops/cublaslt.h) beside ATen's fused
// GEMM + bias + activation, at::_addmm_activation (itself a cuBLASLt call with an epilogue), and
// eager's linear then activation; float16 and bfloat16 at BERT-base's shapes, 8 x 512 tokens:
//
//   Kiln_LinearBiasGelu_Cuda/M/K/N/bf16       kiln::linear(x, w, b, "gelu_tanh")
//   Baseline_AddmmActivation_Cuda/M/K/N/bf16  at::_addmm_activation(b, x, wᵀ, use_gelu=true)
//   Baseline_Eager_LinearGelu_Cuda/M/K/N/bf16 at::gelu(at::linear(x, w, b), "tanh")
//
// Each timed with CUDA events around 10 calls on the current stream. Registered only where a
// device exists.
#include <ATen/ATen.h>
#include <benchmark/benchmark.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include "cuda_timing.h"
#include "kiln/kiln.h"

namespace {

constexpr int kCalls = 10;


enum class Variant { kKiln, kAddmmActivation, kEager };

void runLinearGelu(benchmark::State& state, Variant variant) {
  torch::NoGradGuard no_grad;
  const int64_t m = state.range(0), k = state.range(1), n = state.range(2);
  const at::ScalarType dtype = state.range(3) ? at::kBFloat16 : at::kHalf;
  const auto options = at::TensorOptions().device(at::kCUDA).dtype(dtype);
  at::Tensor x = at::randn({m, k}, options), w = at::randn({n, k}, options) * 0.02, b = at::randn({n}, options);
  static const auto linear = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::linear", "");
  auto call = [&] {
    switch (variant) {
      case Variant::kKiln: {
        torch::jit::Stack stack{x, w, b, c10::IValue(), std::string("gelu_tanh")};
        linear.callBoxed(&stack);
        return stack.front().toTensor();
      }
      case Variant::kAddmmActivation: return at::_addmm_activation(b, x, w.t(), 1, 1, /*use_gelu=*/true);
      case Variant::kEager: return at::gelu(at::linear(x, w, b), "tanh");
    }
    return at::Tensor();
  };
  for (int i = 0; i < 3; ++i) call();
  torch::cuda::synchronize();
  for (auto _ : state) state.SetIterationTime(kiln_bench::timeOnStream(call, kCalls));
  state.counters["TFLOP/s"] = benchmark::Counter(2.0 * static_cast<double>(m * k * n) / 1e12,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(c10::toString(dtype));
}

void bertShapes(benchmark::internal::Benchmark* b) {
  for (int64_t dtype : {0, 1}) {
    for (auto [k, n] : {std::pair<int64_t, int64_t>{768, 3072}, {768, 2304}, {3072, 768}, {768, 768}})
      b->Args({4096, k, n, dtype});
  }
  b->ArgNames({"M", "K", "N", "bf16"})->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.05);
}

const bool registered = [] {
  if (!torch::cuda::is_available()) return false;
  const std::pair<const char*, Variant> variants[] = {{"Kiln_LinearBiasGelu_Cuda", Variant::kKiln},
                                                      {"Baseline_AddmmActivation_Cuda", Variant::kAddmmActivation},
                                                      {"Baseline_Eager_LinearGelu_Cuda", Variant::kEager}};
  for (const auto& [name, variant] : variants) {
    bertShapes(benchmark::RegisterBenchmark(name, [variant = variant](benchmark::State& state) {
      runLinearGelu(state, variant);
    }));
  }
  return true;
}();

}  // namespace
