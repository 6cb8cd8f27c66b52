// Generated CUDA kernels run on the CPU: the CUDA C++ that emitCuda() writes for NVRTC, compiled
// unchanged by the host's C++ compiler against a small grid emulator (codegen/cuda/kiln_emulator.h)
// and loaded as a shared library. The runtime's emulated device (torch_ops/fusion_runtime.h,
// CudaEmulation) launches such kernels exactly as it would on a GPU: same specialization, same
// argument block, same grid, so tests check the generator's index math and op semantics against
// eager on a machine without a GPU. A check of the generator, not of the hardware.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "codegen/cuda_emitter.h"

namespace kiln {

// A generated kernel compiled for the host.
struct EmulatedCudaKernel;

// The CUDA "architecture" the emulated device reports; kernels for it are built by the host
// compiler, never by NVRTC.
inline constexpr const char* kEmulatedCudaArch = "emulated";

// Compiles `source` (as emitCuda() returned it) for the host and loads it; a source seen before
// in this process is not compiled again. Kernels with block synchronization or warp collectives
// run their threads in lockstep. Throws std::runtime_error with the compiler's output.
std::shared_ptr<const EmulatedCudaKernel> compileEmulatedCuda(const CudaSource& source);

// Runs the kernel over `blocks` blocks of kCudaBlockSize threads with the argument block built by
// packCudaArguments(). Throws std::runtime_error if the kernel's threads diverge at a barrier.
void launchEmulatedCuda(const EmulatedCudaKernel& kernel, int64_t blocks, const std::vector<int64_t>& arguments);

// The host compiler the emulator runs: $KILN_HOST_CXX, else the compiler kiln was built with.
std::string emulatorCompiler();

}  // namespace kiln
