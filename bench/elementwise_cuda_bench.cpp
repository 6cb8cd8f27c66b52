// Elementwise chains on the GPU (bench/elementwise_chains.py: arith2, arith4, arith8), through
// the same TorchScript executor: eager ATen kernels
// (Baseline_Eager_Cuda, torch's TensorExpr fuser off), torch's own CUDA fuser
// (Baseline_TorchFuser_Cuda, TensorExpr/NNC on) and kiln's generated kernel (Kiln_Cuda, kiln on,
// TensorExpr off), beside a device-to-device copy of the same tensor (Baseline_Copy_Cuda), the
// bandwidth ceiling an elementwise kernel can reach. Timed with CUDA events on the current stream,
// 10 calls per timed window.
// torch.compile runs the same chains in scripts/elementwise_torch_compile.py (Python only).
//
// Args: chain (2, 4 or 8 ops), dtype (0: float32, 1: bfloat16), broadcast (0: y is x's shape;
// 1: y is a [4096] row broadcast along x's rows). x is 256 MiB: [16384, 4096] float32 or
// [32768, 4096] bfloat16.
// Counters: GB/s = bytes a fused kernel must move (x and y read once, the output written once)
// per second; pct_copy = that rate against the copy's rate measured in the same process.
// Kiln_LaunchOverhead_Cuda / Baseline_EagerLaunch_Cuda: CPU time per call of a 4-op chain on
// 1024 elements (the GPU is never the bottleneck there).
// Only registered when a CUDA device is present.
#include <benchmark/benchmark.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/csrc/jit/passes/tensorexpr_fuser.h>
#include <torch/cuda.h>
#include <torch/jit.h>
#include <torch/torch.h>

#include "cuda_timing.h"
#include "elementwise_chains.h"
#include "kiln/kiln.h"

namespace {


enum class Mode { kEager, kTorchFuser, kKiln };

constexpr int64_t kColumns = 4096;
constexpr int64_t kTensorBytes = int64_t{256} << 20;

// Calls per timed window: the host enqueues the next call while the GPU runs the previous
// one, so the window measures the GPU, not the first call's host latency.
constexpr int kCallsPerWindow = 10;

// Seconds one call of `body` takes on the current stream (bench/cuda_timing.h).
template <typename Body>
double timeOnStream(Body&& body, int calls = kCallsPerWindow) {
  return kiln_bench::timeOnStream(std::forward<Body>(body), calls);
}

// The device-to-device copy rate (bytes read + written per second) of a 256 MiB tensor, the
// best of 5 windows timed as the benchmarks are; measured once per process.
double copyBytesPerSecond() {
  static const double rate = [] {
    at::Tensor source = torch::empty({kTensorBytes / 4}, torch::dtype(at::kFloat).device(at::kCUDA)).uniform_();
    at::Tensor target = torch::empty_like(source);
    for (int i = 0; i < 3; ++i) target.copy_(source);
    double best = 1e9;
    for (int i = 0; i < 5; ++i) best = std::min(best, timeOnStream([&] { target.copy_(source); }));
    return 2.0 * static_cast<double>(kTensorBytes) / best;
  }();
  return rate;
}

struct ModeScope {
  bool kiln_was = kiln::enabled();
  bool nnc_was = torch::jit::tensorExprFuserEnabled();
  explicit ModeScope(Mode mode) {
    mode == Mode::kKiln ? kiln::enable() : kiln::disable();
    torch::jit::setTensorExprFuserEnabled(mode == Mode::kTorchFuser);
  }
  ~ModeScope() {
    kiln_was ? kiln::enable() : kiln::disable();
    torch::jit::setTensorExprFuserEnabled(nnc_was);
  }
};

void runChain(benchmark::State& state, Mode mode) {
  torch::NoGradGuard no_grad;
  const int64_t ops = state.range(0);
  const at::ScalarType dtype = state.range(1) != 0 ? at::kBFloat16 : at::kFloat;
  const bool broadcast = state.range(2) != 0;
  const auto options = torch::dtype(dtype).device(at::kCUDA);
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t rows = kTensorBytes / element / kColumns;
  at::Tensor x = torch::randn({rows, kColumns}, options);
  at::Tensor y = broadcast ? torch::randn({kColumns}, options) : torch::randn({rows, kColumns}, options);
  ModeScope scope(mode);
  auto unit = torch::jit::compile(kiln::bench::elementwiseChains());
  torch::jit::Function& function = unit->get_function("arith" + std::to_string(ops));
  std::vector<c10::IValue> inputs = {x, y};
  // The profiling executor specializes after its profiling runs; kiln compiles on first use.
  for (int i = 0; i < 5; ++i) function(inputs);
  torch::cuda::synchronize();
  for (auto _ : state) {
    state.SetIterationTime(timeOnStream([&] { benchmark::DoNotOptimize(function(inputs)); }));
  }
  const double bytes = static_cast<double>(x.numel() * element * 2 + y.numel() * element);
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_copy"] = benchmark::Counter(bytes * 100 / copyBytesPerSecond(),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

void runCopy(benchmark::State& state) {
  const at::ScalarType dtype = state.range(1) != 0 ? at::kBFloat16 : at::kFloat;
  const int64_t element = static_cast<int64_t>(c10::elementSize(dtype));
  at::Tensor source = torch::randn({kTensorBytes / element / kColumns, kColumns}, torch::dtype(dtype).device(at::kCUDA));
  at::Tensor target = torch::empty_like(source);
  for (int i = 0; i < 3; ++i) target.copy_(source);
  for (auto _ : state) state.SetIterationTime(timeOnStream([&] { target.copy_(source); }));
  const double bytes = 2.0 * static_cast<double>(kTensorBytes);
  state.counters["GB/s"] = benchmark::Counter(bytes / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["pct_copy"] = benchmark::Counter(bytes * 100 / copyBytesPerSecond(),
                                                  benchmark::Counter::kIsIterationInvariantRate);
}

void runLaunchOverhead(benchmark::State& state, Mode mode) {
  torch::NoGradGuard no_grad;
  at::Tensor x = torch::randn({1024}, torch::device(at::kCUDA));
  at::Tensor y = torch::randn({1024}, torch::device(at::kCUDA));
  ModeScope scope(mode);
  auto unit = torch::jit::compile(kiln::bench::elementwiseChains());
  torch::jit::Function& function = unit->get_function("arith4");
  std::vector<c10::IValue> inputs = {x, y};
  for (int i = 0; i < 5; ++i) function(inputs);
  torch::cuda::synchronize();
  for (auto _ : state) benchmark::DoNotOptimize(function(inputs));
  torch::cuda::synchronize();
}

void chainArgs(benchmark::internal::Benchmark* bench) {
  for (int64_t broadcast : {0, 1})
    for (int64_t dtype : {0, 1})
      for (int64_t ops : {2, 4, 8}) bench->Args({ops, dtype, broadcast});
  bench->ArgNames({"ops", "bf16", "bcast"})->UseManualTime()->Unit(benchmark::kMicrosecond)->MinTime(0.05);
}

const bool registered = [] {
  if (!torch::cuda::is_available()) return false;
  const std::pair<const char*, Mode> variants[] = {{"Kiln_Cuda", Mode::kKiln},
                                                   {"Baseline_Eager_Cuda", Mode::kEager},
                                                   {"Baseline_TorchFuser_Cuda", Mode::kTorchFuser}};
  for (const auto& [name, mode] : variants) {
    chainArgs(benchmark::RegisterBenchmark(name, [mode = mode](benchmark::State& state) { runChain(state, mode); }));
  }
  benchmark::RegisterBenchmark("Baseline_Copy_Cuda", runCopy)
      ->Args({0, 0, 0})
      ->Args({0, 1, 0})
      ->ArgNames({"ops", "bf16", "bcast"})
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond)
      ->MinTime(0.05);
  benchmark::RegisterBenchmark("Kiln_LaunchOverhead_Cuda", [](benchmark::State& state) {
    runLaunchOverhead(state, Mode::kKiln);
  })->Unit(benchmark::kMicrosecond);
  benchmark::RegisterBenchmark("Baseline_EagerLaunch_Cuda", [](benchmark::State& state) {
    runLaunchOverhead(state, Mode::kEager);
  })->Unit(benchmark::kMicrosecond);
  return true;
}();

}  // namespace
