// Row reductions with what surrounds them (bench/reduction_patterns.py), on the CPU: eager ATen
// ops (Baseline_Eager) and kiln's fused kernel (Kiln), through the same TorchScript executor, and
// a copy of the input
// (Baseline_Copy: one read and one write, the floor a fused kernel approaches).
// Args: rows, row length, dtype (0 float32, 1 bfloat16). Counter bytes_per_second: the bytes
// the fused kernel must move (inputs read once, outputs written once) per second.
#include <benchmark/benchmark.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/jit.h>
#include <torch/script.h>

#include "kiln/kiln.h"
#include "reduction_patterns.h"

namespace {


enum class Mode { kEager, kKiln, kCopy };

// Inputs read and outputs written by each pattern, in units of one [rows, cols] tensor.
double tensorsMoved(const std::string& pattern) {
  if (pattern == "add_layer_norm" || pattern == "scale_mask_softmax") return 3;
  return 2;
}

void runPattern(benchmark::State& state, const std::string& pattern, Mode mode) {
  torch::NoGradGuard no_grad;
  const int64_t rows = state.range(0);
  const int64_t cols = state.range(1);
  const at::ScalarType dtype = state.range(2) ? at::kBFloat16 : at::kFloat;
  auto options = at::TensorOptions().dtype(dtype);
  at::Tensor x = torch::randn({rows, cols}, options);
  at::Tensor y = torch::randn({rows, cols}, options);
  at::Tensor w = torch::randn({cols}, options);
  at::Tensor b = torch::randn({cols}, options);
  const double bytes = tensorsMoved(pattern) * static_cast<double>(x.numel() * x.element_size());
  state.SetLabel(std::string(c10::toString(dtype)));
  if (mode == Mode::kCopy) {
    for (auto _ : state) benchmark::DoNotOptimize(x.clone());
    state.counters["bytes_per_second"] =
        benchmark::Counter(2.0 * static_cast<double>(x.numel() * x.element_size()), benchmark::Counter::kIsIterationInvariantRate);
    return;
  }
  const bool kiln_was = kiln::enabled();
  mode == Mode::kKiln ? kiln::enable() : kiln::disable();
  auto unit = torch::jit::compile(kiln::bench::reductionPatterns());
  torch::jit::Function& function = unit->get_function(pattern);
  std::vector<c10::IValue> inputs = {x, y, w, b};
  for (int i = 0; i < 3; ++i) function(inputs);
  for (auto _ : state) benchmark::DoNotOptimize(function(inputs));
  state.counters["bytes_per_second"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  kiln_was ? kiln::enable() : kiln::disable();
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int64_t dtype : {0, 1}) {
    b->Args({1024, 768, dtype});
    b->Args({8192, 4096, dtype});
    b->Args({32, 65536, dtype});
  }
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}

#define KILN_REDUCTION_BENCH(pattern)                                                                   \
  void Baseline_Eager_##pattern(benchmark::State& state) { runPattern(state, #pattern, Mode::kEager); } \
  void Kiln_##pattern(benchmark::State& state) { runPattern(state, #pattern, Mode::kKiln); }            \
  BENCHMARK(Baseline_Eager_##pattern)->Apply(shapes);                                                   \
  BENCHMARK(Kiln_##pattern)->Apply(shapes);

KILN_REDUCTION_BENCH(add_layer_norm)
KILN_REDUCTION_BENCH(scale_softmax)
KILN_REDUCTION_BENCH(scale_mask_softmax)
KILN_REDUCTION_BENCH(rms_norm)
KILN_REDUCTION_BENCH(log_softmax)

void Baseline_Copy(benchmark::State& state) { runPattern(state, "copy", Mode::kCopy); }
BENCHMARK(Baseline_Copy)->Apply(shapes);

}  // namespace
