#include "codegen/nvrtc_compiler.h"

#include <algorithm>
#include <chrono>
#include <regex>
#include <stdexcept>

#include "codegen/cuda_driver.h"

namespace kiln {

std::vector<int> nvrtcSupportedArchs() {
  std::string why;
  const cuda::NvrtcApi* api = cuda::nvrtc(&why);
  if (!api) throw std::runtime_error("kiln: " + why);
  int count = 0;
  api->nvrtcGetNumSupportedArchs(&count);
  std::vector<int> archs(static_cast<size_t>(std::max(count, 0)));
  if (count > 0) api->nvrtcGetSupportedArchs(archs.data());
  std::sort(archs.begin(), archs.end());
  return archs;
}

std::string archForDevice(int major, int minor, bool* as_ptx) {
  const int wanted = major * 10 + minor;
  std::vector<int> archs = nvrtcSupportedArchs();
  *as_ptx = false;
  if (std::find(archs.begin(), archs.end(), wanted) != archs.end()) return "sm_" + std::to_string(wanted);
  *as_ptx = true;
  int best = archs.empty() ? 80 : archs.front();
  for (int arch : archs) {
    if (arch <= wanted) best = arch;
  }
  return "sm_" + std::to_string(best);
}

NvrtcResult compileCuda(const std::string& source, const std::string& program_name, const std::string& arch,
                        bool fast_math) {
  std::string why;
  const cuda::NvrtcApi* api = cuda::nvrtc(&why);
  if (!api) throw std::runtime_error("kiln: " + why);
  NvrtcResult result;
  result.arch = arch;
  const bool as_ptx = arch.rfind("compute_", 0) == 0;
  const auto start = std::chrono::steady_clock::now();

  void* program = nullptr;
  int status = api->nvrtcCreateProgram(&program, source.c_str(), (program_name + ".cu").c_str(), 0, nullptr, nullptr);
  if (status != 0) {
    result.log = std::string("nvrtcCreateProgram: ") + api->nvrtcGetErrorString(status);
    return result;
  }
  std::vector<std::string> options = {"--gpu-architecture=" + arch, "--std=c++17", "--device-as-default-execution-space"};
  if (!as_ptx) options.push_back("--ptxas-options=-v");
  // Without fast math, no contraction of a * b + c into one FMA either: eager rounds the
  // product in its own kernel, and a memory-bound kernel loses nothing by doing the same.
  options.push_back(fast_math ? "--use_fast_math" : "--fmad=false");
  std::vector<const char*> option_pointers;
  for (const std::string& option : options) option_pointers.push_back(option.c_str());
  status = api->nvrtcCompileProgram(program, static_cast<int>(option_pointers.size()), option_pointers.data());
  size_t log_size = 0;
  api->nvrtcGetProgramLogSize(program, &log_size);
  if (log_size > 1) {
    result.log.resize(log_size);
    api->nvrtcGetProgramLog(program, result.log.data());
    result.log.resize(log_size - 1);  // drop the terminating NUL
  }
  if (status == 0) {
    size_t size = 0;
    if (as_ptx) {
      api->nvrtcGetPTXSize(program, &size);
      result.binary.resize(size);
      api->nvrtcGetPTX(program, result.binary.data());
    } else {
      api->nvrtcGetCUBINSize(program, &size);
      result.binary.resize(size);
      api->nvrtcGetCUBIN(program, result.binary.data());
      result.is_cubin = true;
    }
    result.ok = true;
  } else if (result.log.empty()) {
    result.log = api->nvrtcGetErrorString(status);
  }
  api->nvrtcDestroyProgram(&program);
  result.compile_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();

  // ptxas -v: "Used 12 registers, ..." and "0 bytes spill stores, 0 bytes spill loads".
  std::smatch match;
  if (std::regex_search(result.log, match, std::regex("Used ([0-9]+) registers"))) result.registers = std::stoi(match[1]);
  if (std::regex_search(result.log, match, std::regex("([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads"))) {
    result.spill_bytes = std::stoi(match[1]) + std::stoi(match[2]);
  }
  return result;
}

}  // namespace kiln
