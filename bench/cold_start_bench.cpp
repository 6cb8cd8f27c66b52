// Time to first result in a fresh process, the cost of every service restart: TorchScript's own
// first call of a seed model (Baseline_TorchScript) beside kiln's first call of the same model
// fused by `kiln fuse`, with an empty disk cache (Kiln_ColdCache: every kernel compiled) and a
// warm one (Kiln_WarmCache: every kernel's object code loaded). Each iteration runs one child,
// `kiln run MODEL --inputs INPUTS --calls 1 --json`; the manual time is the child's own load +
// first call, and process_ms the whole child from spawn to exit.
//
// Models come from scripts/save_seed_models.py: KILN_BENCH_MODELS=DIR (default: models/ beside
// the build's bin/). Without them this suite registers nothing.
#include <benchmark/benchmark.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>

namespace {

namespace fs = std::filesystem;

fs::path binDirectory() { return fs::read_symlink("/proc/self/exe").parent_path(); }

fs::path modelDirectory() {
  if (const char* dir = std::getenv("KILN_BENCH_MODELS")) return dir;
  return binDirectory().parent_path() / "models";
}

// Single-quoted for the shell.
std::string quoted(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// A number after "key": in one line of JSON.
double jsonNumber(const std::string& json, const std::string& key) {
  const size_t at = json.find("\"" + key + "\": ");
  if (at == std::string::npos) throw std::runtime_error("no " + key + " in: " + json);
  return std::strtod(json.c_str() + at + key.size() + 4, nullptr);
}

struct ChildRun {
  double first_result_ms = 0;
  double load_ms = 0;
  double process_ms = 0;
  double cache_hits = 0;
  double cache_misses = 0;
};

ChildRun runChild(const std::string& environment, const fs::path& model, const fs::path& inputs) {
  const std::string command = environment + " " + quoted((binDirectory() / "kiln").string()) + " run " +
                              quoted(model.string()) + " --inputs " + quoted(inputs.string()) +
                              " --calls 1 --json 2>/dev/null";
  const auto start = std::chrono::steady_clock::now();
  FILE* pipe = popen(command.c_str(), "r");
  if (!pipe) throw std::runtime_error("cannot run " + command);
  std::string output;
  std::array<char, 4096> buffer;
  while (size_t n = fread(buffer.data(), 1, buffer.size(), pipe)) output.append(buffer.data(), n);
  const int status = pclose(pipe);
  ChildRun run;
  run.process_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  if (status != 0) throw std::runtime_error(command + " failed: " + output);
  run.first_result_ms = jsonNumber(output, "first_result_ms");
  run.load_ms = jsonNumber(output, "load_ms");
  run.cache_hits = jsonNumber(output, "hits");
  run.cache_misses = jsonNumber(output, "misses");
  return run;
}

enum class Variant { kTorchScript, kKilnCold, kKilnWarm };

void coldStart(benchmark::State& state, const std::string& name, Variant variant) {
  const fs::path dir = modelDirectory();
  const fs::path inputs = dir / (name + ".inputs.pt");
  const fs::path model = dir / (name + (variant == Variant::kTorchScript ? ".pt" : ".kiln.pt"));
  const fs::path cache = fs::temp_directory_path() / ("kiln-cold-start-" + std::to_string(getpid()));
  fs::remove_all(cache);
  fs::create_directories(cache);
  fs::permissions(cache, fs::perms::owner_all, fs::perm_options::replace);
  const std::string cache_env = "KILN_CACHE_DIR=" + quoted(cache.string());
  const std::string environment = variant == Variant::kTorchScript ? "KILN_DISABLE=1 " + cache_env : cache_env;
  try {
    if (variant == Variant::kKilnWarm) runChild(environment, model, inputs);  // fills the cache
    ChildRun total;
    for (auto _ : state) {
      if (variant == Variant::kKilnCold) {
        state.PauseTiming();
        for (const auto& entry : fs::directory_iterator(cache)) fs::remove_all(entry.path());
        state.ResumeTiming();
      }
      const ChildRun run = runChild(environment, model, inputs);
      state.SetIterationTime(run.first_result_ms / 1e3);
      total.load_ms += run.load_ms;
      total.process_ms += run.process_ms;
      total.cache_hits += run.cache_hits;
      total.cache_misses += run.cache_misses;
    }
    state.counters["load_ms"] = benchmark::Counter(total.load_ms, benchmark::Counter::kAvgIterations);
    state.counters["process_ms"] = benchmark::Counter(total.process_ms, benchmark::Counter::kAvgIterations);
    state.counters["cache_hits"] = benchmark::Counter(total.cache_hits, benchmark::Counter::kAvgIterations);
    state.counters["cache_misses"] = benchmark::Counter(total.cache_misses, benchmark::Counter::kAvgIterations);
  } catch (const std::exception& error) {
    state.SkipWithError(error.what());
  }
  fs::remove_all(cache);
}

const bool registered = [] {
  const char* names[] = {"bert_base_seed"};
  for (const char* name : names) {
    const fs::path dir = modelDirectory();
    if (!fs::exists(dir / (std::string(name) + ".kiln.pt"))) continue;
    const std::pair<const char*, Variant> variants[] = {{"Baseline_TorchScript", Variant::kTorchScript},
                                                         {"Kiln_ColdCache", Variant::kKilnCold},
                                                         {"Kiln_WarmCache", Variant::kKilnWarm}};
    for (const auto& [label, variant] : variants) {
      benchmark::RegisterBenchmark((std::string("ColdStart/") + label + "/" + name).c_str(),
                                   [name = std::string(name), variant = variant](benchmark::State& state) {
                                     coldStart(state, name, variant);
                                   })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->Iterations(5);
    }
  }
  return true;
}();

}  // namespace
