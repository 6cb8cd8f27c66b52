// The pipeline from a lowered kernel to a launchable one; see pipeline.h. planLaunch() lists the
// steps in order; each is one call into the module that owns it.
#include "codegen/pipeline.h"

#include <algorithm>

#include "codegen/compile_pool.h"
#include "codegen/cuda_emulator.h"
#include "codegen/fault_injection.h"

namespace kiln {
namespace {

std::atomic<int64_t> kernels_made{0};

bool fail(std::string* why, const std::string& reason) {
  if (why) *why = reason;
  return false;
}

// CPU: the object code from the disk cache, else compiled by LLVM; linked into the host's JIT.
void makeCpuKernel(const KernelFamily& family, const CpuLayout& layout, CompiledKernel& out) {
  out.cpu = obtainCpuKernel(family.kernel(), layout).kernel;
}

// CUDA: the binary from the disk cache, else compiled by NVRTC for the device's architecture;
// loaded on the device by the runtime. The emulated device compiles the same source for the host.
void makeCudaKernel(const KernelFamily& family, const KernelCall& call, const CudaSpecialization& schedule,
                    const CudaLoader& load_cuda, CompiledKernel& out) {
  failIfInjected(FaultStage::kCompile);
  if (call.cuda_arch == kEmulatedCudaArch) {
    out.emulated = compileEmulatedCuda(emitCuda(family.kernel(), schedule));
    return;
  }
  const CudaKernelBinary binary = obtainCudaKernel(family.kernel(), schedule, call.cuda_arch, family.options().fast_math);
  out.cuda = load_cuda(binary, call.cuda_device);
}

// The CUDA schedule for the planned call; nullopt with *why when none fits or its arguments would
// not fit one launch.
std::optional<CudaSpecialization> cudaScheduleFor(const ir::Kernel& kernel, const LaunchPlan& plan,
                                                  const KernelCall& call, std::string* why) {
  std::optional<CudaSpecialization> schedule =
      chooseCudaSpecialization(kernel, plan.geometry, plan.access, call.addresses, why);
  if (schedule && cudaArgumentLayout(kernel, *schedule).bytes() > kMaxCudaArgumentBytes) {
    *why = "too many operands for one CUDA kernel's arguments";
    return std::nullopt;
  }
  return schedule;
}

// The family's kernel for `key`: made on this thread, or for the CPU on a worker thread when the
// call asks (null until it is made).
std::shared_ptr<CompiledKernel> obtainKernel(KernelFamily& family, const std::string& key, const KernelCall& call,
                                             const LaunchPlan& plan, const CudaLoader& load_cuda) {
  if (call.cuda_device >= 0) {
    return family.obtain(key, call.may_compile,
                         [&](CompiledKernel& out) { makeCudaKernel(family, call, plan.cuda, load_cuda, out); });
  }
  if (call.background_compile) prepareCpuBackend();
  return family.obtain(key, call.may_compile,
                       [family = &family, layout = plan.cpu_layout](CompiledKernel& out) {
                         makeCpuKernel(*family, layout, out);
                       },
                       call.background_compile);
}

}  // namespace

bool planLaunch(KernelFamily& family, const KernelCall& call, const CudaLoader& load_cuda, LaunchPlan* plan,
                std::string* why) {
  const ir::Kernel& kernel = family.kernel();
  const bool on_cuda = call.cuda_device >= 0;
  // 1. Merge dimensions: drop size-1 ones, join neighbours every operand walks as one (a kernel
  //    with reductions keeps its rows: the innermost dimension).
  plan->geometry = mergeDimensions(call.shape, call.strides, kernel.hasReductions());
  // 2. An empty space needs no kernel: the runtime makes the outputs and is done.
  if (plan->geometry.numel == 0) return true;
  // 3. Classify each operand once: how it walks the merged space (one vocabulary, both targets).
  plan->access = classifyOperands(plan->geometry, call.element_sizes);
  // 4. Specialize: the CPU kernel's inner-loop layout; the CUDA schedule where one is needed.
  plan->cpu_layout = cpuLayoutFor(plan->access);
  std::string no_schedule;
  std::optional<CudaSpecialization> schedule;
  if (on_cuda || call.recorder) schedule = cudaScheduleFor(kernel, *plan, call, &no_schedule);
  if (on_cuda && !schedule) return fail(why, no_schedule);
  if (schedule) plan->cuda = *schedule;
  // 5. `kiln compile` records what the call needs instead of making it.
  if (call.recorder) {
    call.recorder->record({kernel, family.options(), plan->cpu_layout, schedule, no_schedule});
    return fail(why, "recorded for kiln compile");
  }
  // 6. The key within the family: the target and the specialization.
  const std::string key = on_cuda ? "cuda:" + std::to_string(call.cuda_device) + " " + plan->cuda.toString()
                                  : "cpu " + plan->cpu_layout.toString();
  // 7. The kernel: from memory, else from the disk cache, else compiled; once per key (for the
  //    CPU on a worker thread when asked, the call running its fallback meanwhile).
  plan->compiled = obtainKernel(family, key, call, *plan, load_cuda);
  // 8. Only a kernel that exists and has never failed to launch runs.
  if (!plan->compiled) {
    return fail(why, on_cuda ? "first use of this kernel during CUDA graph capture" : "its kernel is compiling in the background");
  }
  if (!plan->compiled->error.empty()) return fail(why, "compile failed: " + plan->compiled->error);
  if (plan->compiled->launch_failed.load()) return fail(why, "its kernel failed to launch");
  return true;
}

KernelFamily::KernelFamily(ir::Kernel kernel, KernelOptions options)
    : kernel_(std::move(kernel)), options_(options) {}

std::shared_ptr<CompiledKernel> KernelFamily::obtain(const std::string& key, const std::function<bool()>& may_compile,
                                                     const std::function<void(CompiledKernel&)>& make, bool background) {
  std::shared_ptr<Slot> slot;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    std::shared_ptr<Slot>& entry = slots_[key];
    if (!entry) entry = std::make_shared<Slot>();
    slot = entry;
  }
  if (slot->made.load()) return slot->kernel;
  if (may_compile && !may_compile()) return nullptr;
  // Whoever runs `once` makes the kernel; anyone else asking meanwhile waits for it, unless it
  // asked for the background.
  auto makeOnce = [slot, make, key, name = kernel_.name] {
    std::call_once(slot->once, [&] {
      try {
        make(*slot->kernel);
        kernels_made++;
        log(LogLevel::kDebug, "made kernel " + name + " for " + key);
      } catch (const std::exception& error) {
        slot->kernel->error = error.what();
        log(LogLevel::kWarning, "a fusion group's kernel failed to compile or load (" + key +
                                    "); the group runs unfused for these inputs from now on: " + slot->kernel->error);
      }
      slot->made.store(true);
    });
  };
  if (!background) {
    makeOnce();
    return slot->kernel;
  }
  if (!slot->submitted.exchange(true)) compileInBackground(makeOnce);
  return slot->made.load() ? slot->kernel : nullptr;
}

int64_t kernelsMade() { return kernels_made.load(); }

void KernelRecorder::record(RecordedKernel kernel) {
  std::string key = ir::print(kernel.kernel) + "|" + kernel.cpu_layout.toString() + "|" +
                    (kernel.cuda ? kernel.cuda->toString() : "-") + "|" + (kernel.options.fast_math ? "fast" : "");
  if (std::find(keys_.begin(), keys_.end(), key) != keys_.end()) return;
  keys_.push_back(std::move(key));
  kernels.push_back(std::move(kernel));
}

}  // namespace kiln
