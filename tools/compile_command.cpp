// `kiln compile`'s compiling: the kernels a model needs, obtained for one target (this CPU or a
// GPU architecture) from the disk cache or compiled into it, in parallel.
#include "tools/compile_command.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>

#include "codegen/cpu_kernel.h"
#include "codegen/cuda_driver.h"
#include "codegen/cuda_kernel_builder.h"
#include "codegen/json.h"
#include "codegen/kernel_cache.h"
#include "codegen/versions.h"
#include "tools/cli_args.h"

namespace kiln::cli {
namespace {

// One recorded kernel, obtained for the CLI's target: from the disk cache or compiled.
struct CompiledForCli {
  std::string name;
  std::string specialization;
  bool from_cache = false;
  double compile_ms = 0;  // compiling (0 when cached)
  double fetch_ms = 0;    // obtaining it, cache lookup included
  int registers = -1;     // CUDA only
  int spill_bytes = 0;
  size_t binary_bytes = 0;
  std::string cache_key;
  std::string error;
};

CompiledForCli obtainForCli(const RecordedKernel& recorded, const std::string& arch) {
  CompiledForCli out;
  try {
    if (arch == "host") {
      CpuKernelResult result = obtainCpuKernel(recorded.kernel, recorded.cpu_layout);
      out.name = "kiln_" + recorded.kernel.name + "_" + result.cache_key.substr(0, 8);
      out.specialization = "layout " + recorded.cpu_layout.toString();
      out.from_cache = result.from_cache;
      out.fetch_ms = result.fetch_ms;
      out.compile_ms = result.from_cache ? 0 : result.fetch_ms;
      out.cache_key = result.cache_key;
      return out;
    }
    CudaKernelBinary binary = obtainCudaKernel(recorded.kernel, *recorded.cuda, arch, recorded.options.fast_math);
    out.name = binary.name + "_" + binary.cache_key.substr(0, 8);
    out.specialization = recorded.cuda->toString();
    out.from_cache = binary.from_cache;
    out.compile_ms = binary.compile_ms;
    out.fetch_ms = binary.fetch_ms;
    out.registers = binary.registers;
    out.spill_bytes = binary.spill_bytes;
    out.binary_bytes = binary.binary.size();
    out.cache_key = binary.cache_key;
  } catch (const std::exception& error) {
    out.name = "kiln_" + recorded.kernel.name;
    out.error = errorLine(error.what());
  }
  return out;
}

}  // namespace

int compileKernels(const std::vector<RecordedKernel>& wanted, const std::vector<std::string>& skipped,
                   const std::string& arch, int64_t jobs, bool json) {
  // Compiles are independent: each worker takes the next kernel until none is left.
  std::vector<CompiledForCli> results(wanted.size());
  std::atomic<size_t> next{0};
  // On a terminal (and without --json), one line that counts the kernels done, rewritten in place.
  const bool progress = !json && isatty(STDERR_FILENO);
  std::atomic<size_t> done{0};
  std::mutex progress_mutex;
  auto worker = [&] {
    for (size_t i = next++; i < wanted.size(); i = next++) {
      results[i] = obtainForCli(wanted[i], arch);
      const size_t finished = ++done;
      if (!progress) continue;
      std::lock_guard<std::mutex> lock(progress_mutex);
      std::fprintf(stderr, "\rkiln compile: kernel %zu of %zu for %s%s", finished, wanted.size(), arch.c_str(),
                   finished == wanted.size() ? "\n" : "");
      std::fflush(stderr);
    }
  };
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (int64_t j = 1; j < std::min<int64_t>(jobs, static_cast<int64_t>(wanted.size())); ++j) workers.emplace_back(worker);
  worker();
  for (std::thread& thread : workers) thread.join();
  const double wall_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

  int compiled = 0, cached = 0, failed = 0;
  std::ostringstream kernels;
  for (size_t i = 0; i < results.size(); ++i) {
    const CompiledForCli& r = results[i];
    (!r.error.empty() ? failed : r.from_cache ? cached : compiled)++;
    const char* status = !r.error.empty() ? "failed" : r.from_cache ? "cached" : "compiled";
    if (json) {
      kernels << (i ? ", " : "") << "{\"name\": " << jsonQuote(r.name)
              << ", \"specialization\": " << jsonQuote(r.specialization) << ", \"status\": \"" << status << "\""
              << ", \"compile_ms\": " << r.compile_ms << ", \"fetch_ms\": " << r.fetch_ms
              << ", \"registers\": " << r.registers << ", \"spill_bytes\": " << r.spill_bytes
              << ", \"binary_bytes\": " << r.binary_bytes << ", \"cache_key\": " << jsonQuote(r.cache_key)
              << ", \"error\": " << jsonQuote(r.error) << "}";
    } else if (!r.error.empty()) {
      std::printf("%-32s failed: %s\n", r.name.c_str(), r.error.c_str());
    } else if (arch == "host") {
      std::printf("%-32s %-16s %-9s %8.1f ms\n", r.name.c_str(), r.specialization.c_str(), status, r.fetch_ms);
    } else {
      std::printf("%-32s %-22s %-9s %8.1f ms  %3d registers  %d spill bytes\n", r.name.c_str(), r.specialization.c_str(),
                  status, r.from_cache ? r.fetch_ms : r.compile_ms, r.registers, r.spill_bytes);
    }
  }
  const KernelCache::Info info = KernelCache::global().info();
  const std::string compiler = arch == "host" ? "llvm " + llvmVersion() : "nvrtc " + cuda::nvrtcVersion();
  if (json) {
    std::cout << "{\"arch\": " << jsonQuote(arch) << ", \"compiler\": " << jsonQuote(compiler)
              << ", \"cache_dir\": " << jsonQuote(info.dir) << ", \"jobs\": " << jobs
              << ", \"wall_ms\": " << wall_ms << ", \"compiled\": " << compiled << ", \"cached\": " << cached
              << ", \"failed\": " << failed << ", \"kernels\": [" << kernels.str() << "], \"skipped\": [";
    for (size_t i = 0; i < skipped.size(); ++i) std::cout << (i ? ", " : "") << jsonQuote(skipped[i]);
    std::cout << "]}\n";
  } else {
    std::printf("%zu kernels for %s: %d compiled, %d from the cache, %d failed, in %.0f ms on %lld threads (%s)\n",
                results.size(), arch.c_str(), compiled, cached, failed, wall_ms, static_cast<long long>(jobs),
                info.dir.c_str());
    for (const std::string& why : skipped) std::printf("skipped a group: %s\n", why.c_str());
  }
  return failed == 0 ? 0 : 1;
}

}  // namespace kiln::cli
