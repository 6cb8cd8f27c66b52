// The seed models, whole, for kernel developers: each file that scripts/save_seed_models.py wrote
// into $KILN_SEED_MODELS (NAME.pt with NAME.inputs.pt beside it) under TorchScript's default
// executor (Baseline) and kiln::optimize (Kiln), fp32, and kiln::optimize in bf16 (Kiln_Bf16).
// Without $KILN_SEED_MODELS nothing registers. `kiln bench MODEL.pt` compares more routes.
//
//   python scripts/save_seed_models.py models/
//   KILN_SEED_MODELS=models build/bin/kiln_bench --benchmark_filter=SeedModel
#include <benchmark/benchmark.h>
#include <dirent.h>
#include <torch/script.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "kiln/kiln.h"

namespace {

struct SeedModel {
  std::string name;
  std::string path;
  std::vector<torch::jit::IValue> inputs;
};

std::vector<torch::jit::IValue> loadInputs(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return {};
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  c10::IValue saved = torch::jit::pickle_load(bytes);
  if (saved.isList()) return saved.toList().vec();
  if (saved.isTuple()) return saved.toTupleRef().elements().vec();
  return {};
}

void run(benchmark::State& state, const SeedModel& seed, int route) {
  torch::NoGradGuard no_grad;
  torch::jit::Module module = torch::jit::load(seed.path);
  module.eval();
  const bool was_enabled = kiln::enabled();
  kiln::disable();  // Baseline is TorchScript's own executor; Kiln is kiln::optimize alone
  if (route > 0) {
    kiln::Options options = kiln::Options::global();
    options.precision = route == 2 ? kiln::Precision::kBFloat16 : kiln::Precision::kFloat32;
    module = kiln::optimize(module, options);
  }
  for (int call = 0; call < 3; ++call) module.forward(seed.inputs);  // profiling run, measuring, compiling
  for (auto _ : state) benchmark::DoNotOptimize(module.forward(seed.inputs));
  if (was_enabled) kiln::enable();
}

// Registers the benchmarks at load time, like the GPU suites, only where the models are.
const bool registered = [] {
  const char* dir = std::getenv("KILN_SEED_MODELS");
  if (dir == nullptr || *dir == '\0') return false;
  std::vector<SeedModel> seeds;
  if (DIR* listing = opendir(dir)) {
    while (dirent* entry = readdir(listing)) {
      const std::string file = entry->d_name;
      const std::string suffix = ".inputs.pt";
      if (file.size() <= suffix.size() || file.compare(file.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
      SeedModel seed;
      seed.name = file.substr(0, file.size() - suffix.size());
      seed.path = std::string(dir) + "/" + seed.name + ".pt";
      seed.inputs = loadInputs(std::string(dir) + "/" + file);
      if (!seed.inputs.empty()) seeds.push_back(seed);
    }
    closedir(listing);
  }
  std::sort(seeds.begin(), seeds.end(), [](const SeedModel& a, const SeedModel& b) { return a.name < b.name; });
  const char* routes[] = {"Baseline_SeedModel/", "Kiln_SeedModel/", "Kiln_Bf16_SeedModel/"};
  for (const SeedModel& seed : seeds) {
    for (int route = 0; route < 3; ++route) {
      benchmark::RegisterBenchmark((routes[route] + seed.name).c_str(),
                                   [seed, route](benchmark::State& state) { run(state, seed, route); })
          ->Unit(benchmark::kMillisecond)
          ->UseRealTime();
    }
  }
  return true;
}();

}  // namespace
