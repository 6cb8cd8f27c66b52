// Elementwise chains on the CPU: eager ATen ops (Baseline_Eager) and kiln's fused kernel (Kiln),
// through the same TorchScript executor. torch's own TensorExpr fuser cannot fuse on the CPU in
// the 2.11 wheel (built without NNC's LLVM backend: "LLVM Backend not found"), so it has no row.
// Arg 0: elements. Counters: the bytes a fused kernel must move, per second; the peak memory one
// call allocates (eager: every intermediate it holds at once; fused: the outputs only).
#include <benchmark/benchmark.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/jit.h>
#include <torch/script.h>

#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include "elementwise_chains.h"
#include "kiln/kiln.h"

namespace {


enum class Mode { kEager, kKiln };

// Peak bytes held by tensors allocated on this thread while it is installed (ATen's CPU allocator
// reports every allocation and free to the thread's memory-reporting hook, as the profiler uses).
class PeakMemory : public c10::MemoryReportingInfoBase {
 public:
  void reportMemoryUsage(void*, int64_t bytes, size_t, size_t, c10::Device) override {
    current_ += bytes;
    peak_ = std::max(peak_, current_);
  }
  bool memoryProfilingEnabled() const override { return true; }
  int64_t peak() const { return peak_; }

 private:
  int64_t current_ = 0;
  int64_t peak_ = 0;
};

// Peak extra bytes one call of `function` allocates (its outputs included).
int64_t peakBytesOfOneCall(torch::jit::Function& function, std::vector<c10::IValue> inputs) {
  auto tracker = std::make_shared<PeakMemory>();
  {
    c10::DebugInfoGuard guard(c10::DebugInfoKind::PROFILER_STATE, tracker);
    function(inputs);
  }
  return tracker->peak();
}

void runChain(benchmark::State& state, const std::string& name, Mode mode) {
  torch::NoGradGuard no_grad;
  const int64_t n = state.range(0);
  at::Tensor x = torch::randn({n});
  at::Tensor y = torch::randn({n});
  const bool kiln_was = kiln::enabled();
  mode == Mode::kKiln ? kiln::enable() : kiln::disable();
  auto unit = torch::jit::compile(kiln::bench::elementwiseChains());
  torch::jit::Function& function = unit->get_function(name);
  std::vector<c10::IValue> inputs = {x, y};
  for (int i = 0; i < 3; ++i) function(inputs);
  const int64_t peak_bytes = peakBytesOfOneCall(function, inputs);
  for (auto _ : state) {
    benchmark::DoNotOptimize(function(inputs));
  }
  kiln_was ? kiln::enable() : kiln::disable();
  const double bytes = 3.0 * 4.0 * static_cast<double>(n);  // two inputs read, one output written
  state.counters["fused_bytes/s"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_MB"] = static_cast<double>(peak_bytes) / 1e6;
}

#define KILN_CHAIN(chain)                                                                        \
  void Baseline_Eager_##chain(benchmark::State& s) { runChain(s, #chain, Mode::kEager); }        \
  void Kiln_##chain(benchmark::State& s) { runChain(s, #chain, Mode::kKiln); }                   \
  BENCHMARK(Baseline_Eager_##chain)->Arg(1 << 20)->Arg(1 << 24)->Unit(benchmark::kMicrosecond)->UseRealTime(); \
  BENCHMARK(Kiln_##chain)->Arg(1 << 20)->Arg(1 << 24)->Unit(benchmark::kMicrosecond)->UseRealTime();

KILN_CHAIN(arith2)
KILN_CHAIN(arith4)
KILN_CHAIN(arith8)
KILN_CHAIN(transcendental4)

}  // namespace
