// Time to first result in a fresh process, the cost of every service restart: TorchScript's own
// first call of a seed model (Baseline_TorchScript) beside kiln's first call of the same model
// fused by `kiln fuse`, with an empty disk cache (Kiln_ColdCache: every kernel compiled on the
// calling thread; Kiln_ColdCacheBackground: compiled on worker threads across the cores while the
// first calls run unfused, KILN_BACKGROUND_COMPILE=1) and a warm one (Kiln_WarmCache: every
// kernel's object code loaded). Baseline_KilnDisabled runs the fused file with KILN_DISABLE=1:
// the same frozen graph with no kernel made, so Kiln_WarmCache minus it is what kiln's kernels
// cost a start. Each iteration runs one child, `kiln run MODEL --inputs INPUTS --calls 1 --json`;
// the manual time is the child's own load + first call, and process_ms the whole child from
// spawn to exit.
//
// Models come from scripts/save_seed_models.py: KILN_BENCH_MODELS=DIR (default: models/ beside
// the build's bin/). Without them this suite registers nothing.
#include <benchmark/benchmark.h>
#include <dirent.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

// Note: plain POSIX calls for files, not std::filesystem: libtorch.so exports its own copies of
// some std::filesystem functions, and calling them from here crashes.
namespace {

std::string parentOf(const std::string& path) { return path.substr(0, path.rfind('/')); }

std::string binDirectory() {
  char buffer[PATH_MAX];
  const ssize_t n = readlink("/proc/self/exe", buffer, sizeof buffer - 1);
  return n > 0 ? parentOf(std::string(buffer, static_cast<size_t>(n))) : ".";
}

std::string modelDirectory() {
  if (const char* dir = std::getenv("KILN_BENCH_MODELS")) return dir;
  return parentOf(binDirectory()) + "/models";
}

bool exists(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// Removes the files in `dir` (the kernel cache keeps no subdirectories).
void emptyDirectory(const std::string& dir) {
  if (DIR* handle = opendir(dir.c_str())) {
    while (dirent* entry = readdir(handle)) {
      const std::string name = entry->d_name;
      if (name != "." && name != "..") unlink((dir + "/" + name).c_str());
    }
    closedir(handle);
  }
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

ChildRun runChild(const std::string& environment, const std::string& model, const std::string& inputs) {
  const std::string command = environment + " " + quoted(binDirectory() + "/kiln") + " run " + quoted(model) +
                              " --inputs " + quoted(inputs) +
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

struct Variant {
  const char* label;
  const char* model_suffix;  // ".pt" (as traced) or ".kiln.pt" (kiln fuse)
  const char* environment;   // beside KILN_CACHE_DIR
  bool cache_warm;           // filled once before timing, else emptied before each run
};

const Variant kVariants[] = {
    {"Baseline_TorchScript", ".pt", "KILN_DISABLE=1", false},
    {"Baseline_KilnDisabled", ".kiln.pt", "KILN_DISABLE=1", false},
    {"Kiln_ColdCache", ".kiln.pt", "", false},
    {"Kiln_ColdCacheBackground", ".kiln.pt", "KILN_BACKGROUND_COMPILE=1", false},
    {"Kiln_WarmCache", ".kiln.pt", "", true},
};

void coldStart(benchmark::State& state, const std::string& name, const Variant& variant) {
  const std::string dir = modelDirectory();
  const std::string inputs = dir + "/" + name + ".inputs.pt";
  const std::string model = dir + "/" + name + variant.model_suffix;
  char cache_template[] = "/tmp/kiln-cold-start-XXXXXX";  // mode 0700, as the cache requires
  if (!mkdtemp(cache_template)) {
    state.SkipWithError("cannot make a cache directory");
    return;
  }
  const std::string cache = cache_template;
  const std::string cache_env = "KILN_CACHE_DIR=" + quoted(cache);
  const std::string environment = std::string(variant.environment) + " " + cache_env;
  try {
    if (variant.cache_warm) runChild(environment, model, inputs);  // fills the cache
    ChildRun total;
    for (auto _ : state) {
      if (!variant.cache_warm) {
        state.PauseTiming();
        emptyDirectory(cache);
        state.ResumeTiming();
      }
      const ChildRun run = runChild(environment, model, inputs);
      state.SetIterationTime(run.first_result_ms / 1e3);
      total.load_ms += run.load_ms;
      total.first_result_ms += run.first_result_ms;
      total.process_ms += run.process_ms;
      total.cache_hits += run.cache_hits;
      total.cache_misses += run.cache_misses;
    }
    state.counters["load_ms"] = benchmark::Counter(total.load_ms, benchmark::Counter::kAvgIterations);
    state.counters["first_call_ms"] =
        benchmark::Counter(total.first_result_ms - total.load_ms, benchmark::Counter::kAvgIterations);
    state.counters["process_ms"] = benchmark::Counter(total.process_ms, benchmark::Counter::kAvgIterations);
    state.counters["cache_hits"] = benchmark::Counter(total.cache_hits, benchmark::Counter::kAvgIterations);
    state.counters["cache_misses"] = benchmark::Counter(total.cache_misses, benchmark::Counter::kAvgIterations);
  } catch (const std::exception& error) {
    state.SkipWithError(error.what());
  }
  emptyDirectory(cache);
  rmdir(cache.c_str());
}

const bool registered = [] {
  const char* names[] = {"bert_base_seed"};
  for (const char* name : names) {
    if (!exists(modelDirectory() + "/" + name + ".kiln.pt")) continue;
    for (const Variant& variant : kVariants) {
      benchmark::RegisterBenchmark((std::string("ColdStart/") + variant.label + "/" + name).c_str(),
                                   [name = std::string(name), &variant](benchmark::State& state) {
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
