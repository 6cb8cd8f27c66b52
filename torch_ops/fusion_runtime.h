// The run-time half of a fusion group: from the group code and the actual inputs to a launched
// kernel. kiln::fusion_guard asks prepare() whether kiln can run these inputs exactly as eager
// would; kiln::fusion_group runs what prepare() set up.
//
// Note: a failure inside kiln (the code cannot be decoded, lowering, an internal check, compile,
// load, launch) never reaches the caller: prepare() then answers "fallback" for good and logs
// once, and a fusion_group whose launch fails runs the group's original ops itself.
//
// Note: kernels are specialized on the signature (dtype and rank of each input) and on the layout
// (each operand's inner stride class after broadcasting and dimension collapsing), never on sizes:
// a new batch size or sequence length reuses the compiled kernel. Sizes and strides are arguments.
#pragma once

#include <ATen/ATen.h>

#include "codegen/cuda_emitter.h"

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

// Compiles done so far by this process (for tests: a new size must not add one).
int64_t kernelCompileCount();

// A kernel a CUDA launch of a prepared group would need: its IR and CUDA specialization.
struct CudaTarget {
  ir::Kernel kernel;
  CudaSpecialization specialization;
};

// The CUDA specialization for the tensors of `prepared` (the same shapes and strides on a GPU):
// linear-vectorized, linear or strided, 32- or 64-bit indexing. nullopt with *why if none fits.
std::optional<CudaSpecialization> cudaSpecializationFor(const PreparedLaunch& prepared, std::string* why);

// While one is alive on a thread, every group prepared on that thread also records the CUDA
// kernel it would need (`kiln compile` runs a model on the CPU with example inputs this way and
// compiles what it recorded for a GPU architecture). Duplicates are recorded once.
class CudaTargetRecorder;
void recordCudaTarget(const PreparedLaunch& prepared);

class CudaTargetRecorder {
 public:
  CudaTargetRecorder();
  ~CudaTargetRecorder();
  CudaTargetRecorder(const CudaTargetRecorder&) = delete;
  CudaTargetRecorder& operator=(const CudaTargetRecorder&) = delete;
  const std::vector<CudaTarget>& targets() const { return targets_; }
  std::vector<std::string> skipped;  // groups with no CUDA specialization, and why

 private:
  friend void recordCudaTarget(const PreparedLaunch& prepared);
  std::vector<CudaTarget> targets_;
  std::vector<std::string> keys_;
};

}  // namespace kiln
