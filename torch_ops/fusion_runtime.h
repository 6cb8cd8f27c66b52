// The run-time half of a fusion group: from the group code and the actual inputs to a launched
// kernel. kiln::fusion_guard asks prepare() whether kiln can run these inputs exactly as eager
// would; kiln::fusion_group runs what prepare() set up.
//
// Note: a failure inside kiln (the code cannot be decoded, lowering, an internal check, compile,
// load, launch) never reaches the caller: prepare() then answers "fallback" for good and logs
// once, and a fusion_group whose launch fails runs the group's original ops itself.
//
// Note: a group is lowered once per signature (dtype and rank of each input); what happens from
// the lowered kernel to a launchable one (dimension merging, operand access, CPU layout or CUDA
// schedule, the kernel caches) is codegen/pipeline.cpp. Sizes and strides are arguments, so a
// new batch size or sequence length reuses the compiled kernel.
#pragma once

#include <ATen/ATen.h>

#include "codegen/kernel_cache.h"
#include "codegen/pipeline.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

struct FusionProgram;
struct PreparedLaunch;

// The program for a group code (decoded once per process, shared by all threads).
std::shared_ptr<FusionProgram> programFor(const c10::intrusive_ptr<c10::ivalue::ConstantString>& code);

// Everything needed to run one call; nullptr (with *why) when the inputs must take the fallback,
// which is then counted in the group's statistics.
std::shared_ptr<PreparedLaunch> prepare(const std::shared_ptr<FusionProgram>& program,
                                        const std::vector<at::Tensor>& tensors,
                                        const std::vector<double>& floats,
                                        const std::vector<int64_t>& ints, std::string* why);

std::vector<at::Tensor> launch(const PreparedLaunch& prepared);

// Runs `prepared` (may be null); if there is none or its launch fails, the group's original ops
// on the same arguments, so the caller sees exactly what eager gives (its errors included).
std::vector<at::Tensor> launchOrFallback(const std::shared_ptr<PreparedLaunch>& prepared,
                                         const std::shared_ptr<FusionProgram>& program,
                                         const std::vector<at::Tensor>& tensors,
                                         const std::vector<double>& floats,
                                         const std::vector<int64_t>& ints);

// Kernels this process's runtime has made in memory, compiled or from the disk cache (for
// tests: a new size must not add one).
int64_t kernelCompileCount();

// The runtime's disk-cache counts in this process (libkiln's own cache object: a program that
// links kiln's codegen itself has another).
KernelCache::Stats kernelCacheStats();

// While one is alive on a thread, every fusion group run on that thread records the kernels it
// needs instead of making them, and runs its original ops (`kiln compile`). `for_cuda`: the
// groups are lowered as for a CUDA device (the calls run on the CPU), so the kernels recorded
// are the ones a GPU will ask for.
class KernelRecording {
 public:
  explicit KernelRecording(bool for_cuda = false);
  ~KernelRecording();
  KernelRecording(const KernelRecording&) = delete;
  KernelRecording& operator=(const KernelRecording&) = delete;
  const std::vector<RecordedKernel>& kernels() const { return recorder_.kernels; }

 private:
  KernelRecorder recorder_;
};

// While one is alive, every fusion group whose inputs are on the CPU runs as it would on a CUDA
// device, lowered for CUDA and launched as the CUDA kernel, which the host compiles and runs
// (codegen/cuda_emulator.h): a check of the generated CUDA without a GPU. `resident_blocks`
// stands for what the device holds at once, so grids stay small and grid-stride loops turn.
// Process-wide; for tests.
class CudaEmulation {
 public:
  explicit CudaEmulation(int64_t resident_blocks = 3);
  ~CudaEmulation();
  CudaEmulation(const CudaEmulation&) = delete;
  CudaEmulation& operator=(const CudaEmulation&) = delete;
};

}  // namespace kiln
