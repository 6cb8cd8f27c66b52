// The host CPU as LLVM sees it (cpu_kernel.h's CpuTarget), and LLVM's native target registered
// once per process.
#include <llvm/ADT/StringMap.h>
#include <llvm/Support/TargetSelect.h>
#include <llvm/TargetParser/Host.h>

#include <mutex>
#include <string>

#include "codegen/cpu_emitter.h"
#include "codegen/cpu_kernel.h"

namespace kiln {
namespace {

std::string describeFeatures() {
  llvm::StringMap<bool> features;
  llvm::sys::getHostCPUFeatures(features);
  std::string joined;
  for (const auto& entry : features) {
    if (!joined.empty()) joined += ",";
    joined += (entry.getValue() ? "+" : "-") + entry.getKey().str();
  }
  return joined;
}

}  // namespace

void initializeLlvm() {
  static std::once_flag once;
  std::call_once(once, [] {
    llvm::InitializeNativeTarget();
    llvm::InitializeNativeTargetAsmPrinter();
    llvm::InitializeNativeTargetAsmParser();
  });
}

const CpuTarget& CpuTarget::host() {
  // Never destroyed: a background compile may still read it while the process exits.
  static const CpuTarget& target = *[] {
    auto* t = new CpuTarget();
    llvm::StringMap<bool> features;
    llvm::sys::getHostCPUFeatures(features);
    auto has = [&](const char* name) { return features.count(name) && features[name]; };
    t->vector_bits = has("avx512f") ? 512 : has("avx2") ? 256 : 128;
    t->cpu = llvm::sys::getHostCPUName().str();
    t->features = describeFeatures();
    t->triple = llvm::sys::getProcessTriple();
    return t;
  }();
  return target;
}

}  // namespace kiln
