#include "torch_ops/fusion_cuda.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>

#include "codegen/cuda_driver.h"
#include "codegen/fault_injection.h"

#if defined(KILN_HAVE_CUDA_KERNELS)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "codegen/nvrtc_compiler.h"
#include "kiln/options.h"
#endif

namespace kiln {

struct CudaFunction {
  cuda::CUfunction function = nullptr;
  int64_t resident_blocks = 1;  // blocks the whole device holds at once (SMs × blocks per SM)
};

#if defined(KILN_HAVE_CUDA_KERNELS)
namespace {

// What kiln needs to know about one device, worked out on first use.
struct DeviceState {
  std::string error;  // empty when usable
  cuda::CUcontext context = nullptr;  // the primary context, retained for the process
  int multiprocessors = 0;
  std::string arch;  // "sm_90", or "compute_XY" when this NVRTC only knows older GPUs
};

DeviceState probe(int index) {
  DeviceState state;
  cuda::DeviceInfo info;
  if (!cuda::deviceInfo(index, &info, &state.error) || !cuda::nvrtc(&state.error)) return state;
  try {
    state.multiprocessors = info.multiprocessors;
    bool as_ptx = false;
    state.arch = archForDevice(info.major, info.minor, &as_ptx);
    if (as_ptx) state.arch = "compute_" + state.arch.substr(3);
    const cuda::DriverApi& api = *cuda::driver();
    cuda::CUdevice device = 0;
    cuda::checkDriver(api.cuDeviceGet(&device, index), "cuDeviceGet");
    cuda::checkDriver(api.cuDevicePrimaryCtxRetain(&state.context, device), "cuDevicePrimaryCtxRetain");
  } catch (const std::exception& error) {
    state.error = error.what();
  }
  return state;
}

// One slot per device index, probed once; no lock after that (every launch asks).
constexpr int kMaxDevices = 64;

const DeviceState& deviceState(int index) {
  struct Slot {
    std::once_flag once;
    DeviceState state;
  };
  static Slot* slots = new Slot[kMaxDevices];
  static const DeviceState out_of_range = [] {
    DeviceState state;
    state.error = "device index outside 0.." + std::to_string(kMaxDevices - 1);
    return state;
  }();
  if (index < 0 || index >= kMaxDevices) return out_of_range;
  Slot& slot = slots[index];
  std::call_once(slot.once, [&] { slot.state = probe(index); });
  return slot.state;
}

// Makes the device's primary context current on this thread (the caller holds a device guard
// for it, so the runtime and the driver agree on the device).
const cuda::DriverApi& enterDevice(int index) {
  const DeviceState& state = deviceState(index);
  if (!state.error.empty()) throw std::runtime_error("kiln: CUDA device " + std::to_string(index) + ": " + state.error);
  const cuda::DriverApi& api = *cuda::driver();
  cuda::CUcontext current = nullptr;
  cuda::checkDriver(api.cuCtxGetCurrent(&current), "cuCtxGetCurrent");
  if (current != state.context) cuda::checkDriver(api.cuCtxSetCurrent(state.context), "cuCtxSetCurrent");
  return api;
}

}  // namespace

bool cudaFusionAvailable(int device, std::string* why) {
  const DeviceState& state = deviceState(device);
  if (state.error.empty()) return true;
  if (why) *why = "CUDA device " + std::to_string(device) + ": " + state.error;
  return false;
}

std::string cudaArch(int device) { return deviceState(device).arch; }

std::shared_ptr<const CudaFunction> loadCudaFunction(const CudaKernelBinary& binary, int device) {
  const DeviceState& state = deviceState(device);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cuda::DriverApi& api = enterDevice(device);
  // Modules stay loaded for the life of the process: one per kernel and device, and unloading
  // during static destruction would race the driver's own teardown.
  cuda::CUmodule module = nullptr;
  failIfInjected(FaultStage::kLoad);
  cuda::checkDriver(api.cuModuleLoadData(&module, binary.binary.data()), "cuModuleLoadData");
  auto function = std::make_shared<CudaFunction>();
  cuda::checkDriver(api.cuModuleGetFunction(&function->function, module, binary.name.c_str()), "cuModuleGetFunction");
  int per_multiprocessor = 0;
  cuda::checkDriver(api.cuOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, function->function,
                                                                     kCudaBlockSize, 0),
                    "cuOccupancyMaxActiveBlocksPerMultiprocessor");
  function->resident_blocks = std::max<int64_t>(1, int64_t{per_multiprocessor} * state.multiprocessors);
  log(LogLevel::kDebug, std::string("loaded ") + binary.name + " on cuda:" + std::to_string(device) + " (" + state.arch +
                            (binary.from_cache ? ", from the disk cache" : ", compiled") + ", " +
                            std::to_string(binary.registers) + " registers, " +
                            std::to_string(per_multiprocessor) + " blocks per SM)");
  return function;
}

bool cudaCaptureUnderway(int device) {
  const cuda::DriverApi* api = cuda::driver();
  if (!api) return false;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  int status = 0;
  cuda::checkDriver(api->cuStreamIsCapturing(reinterpret_cast<cuda::CUstream>(stream), &status), "cuStreamIsCapturing");
  return status != 0;
}

void launchCudaFunction(const CudaFunction& function, int device, std::vector<int64_t>& arguments, int64_t work) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cuda::DriverApi& api = enterDevice(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  const int64_t blocks = cudaGridBlocks(work, function.resident_blocks);
  void* parameters[] = {arguments.data()};
  cuda::checkDriver(api.cuLaunchKernel(function.function, static_cast<unsigned>(blocks), 1, 1, kCudaBlockSize, 1, 1, 0,
                                       reinterpret_cast<cuda::CUstream>(stream), parameters, nullptr),
                    "cuLaunchKernel");
}

#else  // kiln built without the CUDA toolkit

bool cudaFusionAvailable(int, std::string* why) {
  if (why) *why = "kiln was built without CUDA support (no CUDA toolkit at configure time)";
  return false;
}

std::string cudaArch(int) { return ""; }

std::shared_ptr<const CudaFunction> loadCudaFunction(const CudaKernelBinary&, int) {
  throw std::runtime_error("kiln was built without CUDA support");
}

bool cudaCaptureUnderway(int) { return false; }

void launchCudaFunction(const CudaFunction&, int, std::vector<int64_t>&, int64_t) {
  throw std::runtime_error("kiln was built without CUDA support");
}

#endif

}  // namespace kiln
