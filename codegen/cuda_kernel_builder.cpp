#include "codegen/cuda_kernel_builder.h"

#include <chrono>
#include <sstream>
#include <stdexcept>

#include "codegen/cuda_driver.h"
#include "codegen/kernel_cache.h"
#include "codegen/kernel_dump.h"
#include "codegen/nvrtc_compiler.h"

namespace kiln {
namespace {

// A cached entry: one header line with what ptxas reported, then the binary.
std::string packEntry(const NvrtcResult& result) {
  std::ostringstream header;
  header << "kiln-cuda cubin=" << (result.is_cubin ? 1 : 0) << " registers=" << result.registers
         << " spill_bytes=" << result.spill_bytes << " compile_ms=" << result.compile_ms << "\n";
  return header.str() + result.binary;
}

bool unpackEntry(const std::string& payload, CudaKernelBinary* out) {
  const size_t end = payload.find('\n');
  if (end == std::string::npos) return false;
  std::istringstream header(payload.substr(0, end));
  std::string tag, cubin, registers, spills, compile_ms;
  header >> tag >> cubin >> registers >> spills >> compile_ms;
  if (tag != "kiln-cuda" || cubin.rfind("cubin=", 0) != 0 || registers.rfind("registers=", 0) != 0 ||
      spills.rfind("spill_bytes=", 0) != 0) {
    return false;
  }
  try {
    out->is_cubin = cubin == "cubin=1";
    out->registers = std::stoi(registers.substr(10));
    out->spill_bytes = std::stoi(spills.substr(12));
  } catch (const std::exception&) {
    return false;
  }
  out->binary = payload.substr(end + 1);
  return !out->binary.empty();
}

}  // namespace

CudaKernelBinary obtainCudaKernel(const ir::Kernel& kernel, const CudaSpecialization& specialization,
                                  const std::string& arch, bool fast_math) {
  const auto start = std::chrono::steady_clock::now();
  CudaSource source = emitCuda(kernel, specialization);
  KernelCacheKey key;
  key.ir = ir::print(kernel);
  key.source = source.source;  // the emitter and device helpers that made it are part of the key
  key.specialization = specialization.toString();
  key.arch = arch;
  key.compiler = "nvrtc " + cuda::nvrtcVersion();
  key.options = fast_math ? "--use_fast_math" : "--fmad=false";
  CudaKernelBinary binary;
  binary.name = source.name;
  binary.arch = arch;
  binary.cache_key = key.hashHex();
  auto elapsed = [&] { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count(); };

  if (std::optional<std::string> cached = KernelCache::global().load(key)) {
    if (unpackEntry(*cached, &binary)) {
      binary.from_cache = true;
      binary.fetch_ms = elapsed();
      return binary;
    }
  }
  NvrtcResult result = compileCuda(source.source, source.name, arch, fast_math);
  if (dumpEnabled()) {
    const std::string stem = dumpStem(source.name, binary.cache_key);
    dumpKernelFiles(stem, {{"cu", source.source},
                           {"kir", key.ir + "# specialization " + key.specialization + "\n"},
                           {"log", result.log}});
    if (result.ok && !result.is_cubin) dumpKernelFiles(stem, {{"ptx", result.binary}});
  }
  if (!result.ok) throw std::runtime_error("kiln: NVRTC failed to compile " + source.name + " for " + arch + ":\n" + result.log);
  binary.binary = result.binary;
  binary.is_cubin = result.is_cubin;
  binary.compile_ms = result.compile_ms;
  binary.registers = result.registers;
  binary.spill_bytes = result.spill_bytes;
  KernelCache::global().store(key, packEntry(result));
  binary.fetch_ms = elapsed();
  return binary;
}

}  // namespace kiln
