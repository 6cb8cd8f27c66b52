// From a lowered kernel and one call's operands to a kernel ready to launch: the steps are listed
// in order in pipeline.cpp. Torch-free: the runtime (torch_ops/fusion_runtime.cpp) hands in
// shapes, byte strides and addresses, and launches what comes back.
//
// Note: kernels are specialized on the operands' access classes (codegen/access.h) and, on CUDA,
// on the schedule they allow, never on sizes: a new batch size reuses the compiled kernel. A
// kernel is compiled once per process per key (target and specialization), whichever thread
// asks first, and obtained from the disk cache when another process compiled it before.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "codegen/access.h"
#include "codegen/cpu_kernel.h"
#include "codegen/cuda_emitter.h"
#include "codegen/cuda_kernel_builder.h"
#include "kiln/options.h"

namespace kiln {

struct CudaFunction;  // a generated kernel loaded on one device (torch_ops/fusion_cuda.h)
struct EmulatedCudaKernel;  // a generated CUDA kernel compiled for the host (codegen/cuda_emulator.h)

// Loads a CUDA binary onto a device (the runtime's, which holds torch's device guard). Throws
// on failure.
using CudaLoader = std::function<std::shared_ptr<const CudaFunction>(const CudaKernelBinary& binary, int device)>;

// One call as the runtime sees it.
struct KernelCall {
  int cuda_device = -1;       // -1: the host CPU
  std::string cuda_arch;      // the device's architecture, e.g. "sm_90" (CUDA only); kEmulatedCudaArch:
                              // the host runs the CUDA kernel (codegen/cuda_emulator.h)
  std::vector<int64_t> shape;                 // the iteration space (eager's output shape)
  std::vector<std::vector<int64_t>> strides;  // per operand (inputs, then outputs) over `shape`, bytes
  std::vector<int64_t> element_sizes;         // per operand
  std::vector<uintptr_t> addresses;           // per input: as chooseCudaSpecialization reads them
  // Asked only when the kernel is not in memory yet: false means do not make it now (a module
  // load would break a CUDA graph capture). Empty: always.
  std::function<bool()> may_compile;
  struct KernelRecorder* recorder = nullptr;  // set: record the kernel instead of making it
  // CPU: a kernel not yet in memory is made on a worker thread (codegen/compile_pool.h) and the
  // call runs its fallback meanwhile (Options::background_compile).
  bool background_compile = false;
};

// One compiled kernel, shared by every call and thread with the same key.
struct CompiledKernel {
  std::shared_ptr<CpuKernel> cpu;                  // on the CPU
  std::shared_ptr<const CudaFunction> cuda;        // on a CUDA device
  std::shared_ptr<const EmulatedCudaKernel> emulated;  // on the emulated CUDA device
  std::string error;                               // why there is neither
  std::atomic<bool> launch_failed{false};          // a launch threw: it is not used again
};

// What one call runs.
struct LaunchPlan {
  Geometry geometry;                          // merged dimensions, byte strides
  std::vector<Access> access;                 // per operand
  CpuLayout cpu_layout;                       // on the CPU
  CudaSpecialization cuda;                    // on a CUDA device
  std::shared_ptr<CompiledKernel> compiled;   // null when the space is empty
};

// A lowered kernel and its compiled forms by key: the in-memory kernel cache.
class KernelFamily {
 public:
  KernelFamily(ir::Kernel kernel, KernelOptions options);
  const ir::Kernel& kernel() const { return kernel_; }
  const KernelOptions& options() const { return options_; }

  // The kernel for `key`, made by `make` on first request (one make per key across threads);
  // null when it is not in memory and `may_compile` says no, or when `background` sent the make
  // to a worker thread that has not finished it yet (the family must outlive that make).
  std::shared_ptr<CompiledKernel> obtain(const std::string& key, const std::function<bool()>& may_compile,
                                         const std::function<void(CompiledKernel&)>& make, bool background = false);

 private:
  struct Slot {
    std::once_flag once;
    std::atomic<bool> made{false};
    std::atomic<bool> submitted{false};  // sent to a worker thread
    std::shared_ptr<CompiledKernel> kernel = std::make_shared<CompiledKernel>();
  };
  const ir::Kernel kernel_;
  const KernelOptions options_;
  std::mutex mutex_;
  std::map<std::string, std::shared_ptr<Slot>> slots_;
};

// Kernels a group's calls would need, recorded instead of made (`kiln compile` runs a model on the
// CPU this way, then compiles what was recorded, in parallel, into the disk cache): the CPU
// layout, and the CUDA specialization the same shapes and strides would take on a GPU.
struct RecordedKernel {
  ir::Kernel kernel;
  KernelOptions options;
  CpuLayout cpu_layout;
  std::optional<CudaSpecialization> cuda;  // nullopt: no CUDA schedule fits (cuda_skipped says why)
  std::string cuda_skipped;
};

struct KernelRecorder {
  std::vector<RecordedKernel> kernels;
  void record(RecordedKernel kernel);  // once per distinct kernel

 private:
  std::vector<std::string> keys_;
};

// Plans `call` and obtains its kernel (see pipeline.cpp). False with *why when the call must run
// the group's original ops: no schedule fits, compiling failed, the kernel failed to launch
// before, or `recorder` took the kernel down instead of making it.
bool planLaunch(KernelFamily& family, const KernelCall& call, const CudaLoader& load_cuda, LaunchPlan* plan,
                std::string* why);

// Kernels made in memory by this copy of the pipeline so far, compiled or from the disk cache.
int64_t kernelsMade();

}  // namespace kiln
