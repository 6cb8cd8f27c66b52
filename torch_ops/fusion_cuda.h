// The CUDA half of the fusion runtime: a generated kernel compiled for one device's exact
// architecture (or fetched from the disk cache), loaded once per device per process into the
// device's primary context (the one torch uses), and launched on torch's current stream for that
// device under a device guard. The driver is reached through the lazily opened libcuda
// (codegen/cuda_driver.h); torch's libc10_cuda gives the current stream and the guard.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "codegen/cuda_emitter.h"
#include "codegen/cuda_kernel_builder.h"

namespace kiln {

// One generated kernel, loaded on one device.
struct CudaFunction;

// Whether generated kernels can run on CUDA device `device`: kiln built with CUDA support, a
// driver, NVRTC and an architecture it can target. The answer is worked out once per device.
bool cudaFusionAvailable(int device, std::string* why);

// The architecture kernels are compiled for on `device` ("sm_90", or "compute_XY" when this
// NVRTC only knows older GPUs); empty when cudaFusionAvailable() is false.
std::string cudaArch(int device);

// Loads a binary obtained for cudaArch(device) onto the device (the pipeline's CudaLoader).
// Throws std::runtime_error with the driver's error.
std::shared_ptr<const CudaFunction> loadCudaFunction(const CudaKernelBinary& binary, int device);

// Launches on the current stream of `device`. `arguments` is the kernel's argument block
// (cudaArgumentLayout, 8 bytes per field); `work` is the number of grid-stride iterations the
// kernel has in all (vectors for the vectorized schedule, elements otherwise).
void launchCudaFunction(const CudaFunction& function, int device, std::vector<int64_t>& arguments,
                        int64_t work);

// Whether the current stream of `device` is capturing a CUDA graph (a kernel's first compile and
// module load must not happen inside a capture).
bool cudaCaptureUnderway(int device);

}  // namespace kiln
