// Chooses the build of the CPU attention kernel (torch_ops/cpu/attention_kernel.cpp, compiled once
// per instruction set) that this CPU can run, once per process, the way ATen chooses its own.
#include "torch_ops/attention_cpu.h"

#include <c10/util/Exception.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <string>

namespace kiln::cpu {

// One entry point per build, named after its CPU_CAPABILITY.
void attentionKernel_DEFAULT(const AttentionProblem& problem);
#if defined(KILN_ATTENTION_X86_KERNELS)
void attentionKernel_AVX2(const AttentionProblem& problem);
void attentionKernel_AVX512(const AttentionProblem& problem);
void attentionKernel_AMX(const AttentionProblem& problem);

namespace {

// AMX's tile data is a state Linux hands out per process on request (arch_prctl); without it the
// first tile instruction faults. oneDNN asks the same way; asking twice is harmless.
bool amxGranted() {
  static const bool granted = [] {
    if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16") ||
        !__builtin_cpu_supports("avx512bf16"))
      return false;
    constexpr int kArchRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr int kTileData = 18;                   // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kArchRequestPermission, kTileData) == 0;
  }();
  return granted;
}

}  // namespace
#endif

bool cpuIsaSupported(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kDefault:
      return true;
#if defined(KILN_ATTENTION_X86_KERNELS)
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case CpuIsa::kAmx:
      return cpuIsaSupported(CpuIsa::kAvx512) && amxGranted();
#endif
    default:
      return false;
  }
}

const char* cpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAmx:
      return "amx";
    default:
      return "default";
  }
}

CpuIsa bestCpuIsa() {
  static const CpuIsa best = [] {
    // ATEN_CPU_CAPABILITY caps ATen's kernels; kiln's follow it so both can be pinned together.
    const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string limit = cap != nullptr ? cap : "";
    CpuIsa isa = CpuIsa::kDefault;
    if (limit != "default" && cpuIsaSupported(CpuIsa::kAvx2)) isa = CpuIsa::kAvx2;
    if (limit != "default" && limit != "avx2" && cpuIsaSupported(CpuIsa::kAvx512))
      isa = CpuIsa::kAvx512;
    if (limit.empty() && cpuIsaSupported(CpuIsa::kAmx)) isa = CpuIsa::kAmx;
    return isa;
  }();
  return best;
}

namespace {
std::atomic<int> pinned_isa{-1};
}  // namespace

void overrideCpuIsa(std::optional<CpuIsa> isa) {
  if (isa.has_value())
    TORCH_CHECK(cpuIsaSupported(*isa), "kiln::attention: this CPU or build has no ",
                cpuIsaName(*isa), " kernel");
  pinned_isa.store(isa.has_value() ? static_cast<int>(*isa) : -1);
}

void attentionForward(const AttentionProblem& problem) {
  const int pinned = pinned_isa.load();
  attentionForward(problem, pinned >= 0 ? static_cast<CpuIsa>(pinned) : bestCpuIsa());
}

void attentionForward(const AttentionProblem& problem, CpuIsa isa) {
  TORCH_CHECK(cpuIsaSupported(isa), "kiln::attention: this CPU or build has no ", cpuIsaName(isa),
              " kernel");
  switch (isa) {
#if defined(KILN_ATTENTION_X86_KERNELS)
    case CpuIsa::kAmx:
      if (problem.dtype == c10::ScalarType::BFloat16) return attentionKernel_AMX(problem);
      return attentionKernel_AVX512(problem);
    case CpuIsa::kAvx512:
      return attentionKernel_AVX512(problem);
    case CpuIsa::kAvx2:
      return attentionKernel_AVX2(problem);
#endif
    default:
      return attentionKernel_DEFAULT(problem);
  }
}

}  // namespace kiln::cpu
