// kiln::Options: every knob kiln has, in one place, filled from the environment once.
// codegen/ and fuser/ read these; nothing else keeps static flags. Torch-free on purpose.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

enum class LogLevel { kWarning = 0, kInfo = 1, kDebug = 2 };

// The precision kiln::optimize runs a float32 model in (docs/precision.md). kFloat32 changes
// nothing; kBFloat16 / kFloat16 convert the weights once and run the activations in that dtype,
// the module's inputs and outputs keeping their own.
enum class Precision { kFloat32, kBFloat16, kFloat16 };
const char* precisionName(Precision precision);  // "fp32", "bf16", "fp16"
// "fp32"/"float32", "bf16"/"bfloat16", "fp16"/"float16" into *out; false for anything else.
bool parsePrecision(const std::string& text, Precision* out);

struct Options {
  bool disabled = false;           // KILN_DISABLE=1: the pass leaves graphs untouched
  std::string cache_dir;           // KILN_CACHE_DIR, default ~/.cache/kiln
  std::string dump_dir;            // KILN_DUMP=DIR: write generated code and IR there
  LogLevel log_level = LogLevel::kWarning;  // KILN_LOG=info|debug
  int64_t cache_max_mb = 1024;     // KILN_CACHE_MAX_MB, a whole number from 1 to kMaxCacheMb
  int min_group_size = 2;          // fewest fusible ops worth a kernel
  // CPU kernels: below this many elements a group runs on the calling thread only.
  int64_t cpu_parallel_grain = 32768;
  bool fast_math = false;          // KILN_FAST_MATH=1: approximate math in generated kernels
  Precision precision = Precision::kFloat32;  // kiln::optimize only; set by the caller
  // With a reduced precision and example inputs (kiln::optimize's second form): the least cosine
  // similarity to float32 every floating output must keep; the leading ops stay float32 as far as
  // that needs. 0: no bound; below 1 (a fused module is not bit-identical even in float32). Set by
  // the caller.
  double min_cosine = 0;
  // KILN_BACKGROUND_COMPILE=1: a CPU kernel not yet made is compiled (or loaded from the disk
  // cache) on a worker thread while its group runs its original ops; cold starts then compile
  // in parallel across cores, and the first calls run unfused.
  bool background_compile = false;
  // kiln::optimize in float32: runs of convolutions become kiln::conv_region ops, each run the
  // fastest of ATen, kiln's library calls and oneDNN Graph (KILN_CONV_REGIONS=0: never).
  bool conv_regions = true;
  // Environment values that were rejected, their defaults kept: one line each naming the
  // variable, the value and what is accepted. The library warns about them once, where the
  // setting is first used (KernelCache::global()); the kiln CLI refuses to run (exit code 2).
  std::vector<std::string> problems;

  static constexpr int64_t kMaxCacheMb = int64_t{1} << 20;  // 1 TiB

  // The process-wide options, read from the environment on first use.
  static const Options& global();
  // Parses the environment into a fresh Options (for tests and tools).
  static Options fromEnvironment();
};

// The options a fused group's kernels follow. They travel with the group's code, so a module
// fused with fast math keeps it in any process that loads it; a code that carries none (an older
// kiln's) takes Options::global()'s values when it is first read.
struct KernelOptions {
  bool fast_math = false;
  int64_t cpu_parallel_grain = 32768;
  static KernelOptions from(const Options& options) { return {options.fast_math, options.cpu_parallel_grain}; }
  bool operator==(const KernelOptions& other) const {
    return fast_math == other.fast_math && cpu_parallel_grain == other.cpu_parallel_grain;
  }
};

// Logging that honours Options::log_level; writes one line to stderr.
void log(LogLevel level, const std::string& message);

// The one line of a torch error worth printing: a TorchScript traceback ends with the error
// itself ("RuntimeError: ..."); any other message starts with it.
std::string errorLine(const std::string& message);

}  // namespace kiln
