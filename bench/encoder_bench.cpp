// The demo's BERT-base encoder layer through the TorchScript executor: unfused (Baseline) and
// with kiln's pass (Kiln), on the CPU, batch 8 x sequence 128.
#include <benchmark/benchmark.h>

#include "kiln/kiln.h"
#include "tools/demo_model.h"

namespace {

void runEncoder(benchmark::State& state, bool use_kiln) {
  torch::NoGradGuard no_grad;
  kiln::demo::EncoderConfig config;
  config.sequence = state.range(0);
  torch::jit::Module layer = kiln::demo::encoderLayer(config, torch::kCPU, torch::kFloat);
  auto inputs = kiln::demo::encoderInputs(config, torch::kCPU, torch::kFloat);
  const bool was_enabled = kiln::enabled();
  use_kiln ? kiln::enable() : kiln::disable();
  torch::jit::Module module = layer.clone();
  for (int i = 0; i < 3; ++i) module.forward(inputs);
  for (auto _ : state) benchmark::DoNotOptimize(module.forward(inputs));
  was_enabled ? kiln::enable() : kiln::disable();
  state.counters["tokens/s"] = benchmark::Counter(
      static_cast<double>(config.batch * config.sequence), benchmark::Counter::kIsIterationInvariantRate);
}

void Baseline_EncoderLayer(benchmark::State& state) { runEncoder(state, false); }
void Kiln_EncoderLayer(benchmark::State& state) { runEncoder(state, true); }

BENCHMARK(Baseline_EncoderLayer)->Arg(128)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(Kiln_EncoderLayer)->Arg(128)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
