#include "codegen/cuda_driver.h"

#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "codegen/dynamic_library.h"

namespace kiln::cuda {
namespace {

constexpr int kAttributeMultiprocessorCount = 16;
constexpr int kAttributeComputeCapabilityMajor = 75;
constexpr int kAttributeComputeCapabilityMinor = 76;

template <typename Fn>
bool bind(const DynamicLibrary& library, const char* name, Fn& slot, std::string& missing) {
  slot = reinterpret_cast<Fn>(library.symbol(name));
  if (!slot) missing += std::string(missing.empty() ? "" : ", ") + name;
  return slot != nullptr;
}

struct LoadedDriver {
  DriverApi api{};
  std::string error;
  bool ok = false;
  LoadedDriver() {
    static DynamicLibrary library({"libcuda.so.1", "libcuda.so"});
    if (!library.loaded()) {
      error = "libcuda.so.1 not found (no NVIDIA driver)";
      return;
    }
    std::string missing;
    bind(library, "cuInit", api.cuInit, missing);
    bind(library, "cuDriverGetVersion", api.cuDriverGetVersion, missing);
    bind(library, "cuDeviceGetCount", api.cuDeviceGetCount, missing);
    bind(library, "cuDeviceGet", api.cuDeviceGet, missing);
    bind(library, "cuDeviceGetName", api.cuDeviceGetName, missing);
    bind(library, "cuDeviceGetAttribute", api.cuDeviceGetAttribute, missing);
    bind(library, "cuDeviceTotalMem_v2", api.cuDeviceTotalMem, missing);
    bind(library, "cuGetErrorString", api.cuGetErrorString, missing);
    bind(library, "cuDevicePrimaryCtxRetain", api.cuDevicePrimaryCtxRetain, missing);
    bind(library, "cuCtxGetCurrent", api.cuCtxGetCurrent, missing);
    bind(library, "cuCtxSetCurrent", api.cuCtxSetCurrent, missing);
    bind(library, "cuModuleLoadData", api.cuModuleLoadData, missing);
    bind(library, "cuModuleUnload", api.cuModuleUnload, missing);
    bind(library, "cuModuleGetFunction", api.cuModuleGetFunction, missing);
    bind(library, "cuLaunchKernel", api.cuLaunchKernel, missing);
    bind(library, "cuOccupancyMaxActiveBlocksPerMultiprocessor", api.cuOccupancyMaxActiveBlocksPerMultiprocessor, missing);
    bind(library, "cuStreamIsCapturing", api.cuStreamIsCapturing, missing);
    if (!missing.empty()) {
      error = "libcuda lacks " + missing;
      return;
    }
    CUresult status = api.cuInit(0);
    if (status != 0) {
      error = "cuInit failed with error " + std::to_string(status);
      return;
    }
    ok = true;
  }
};

struct LoadedNvrtc {
  NvrtcApi api{};
  std::string error;
  bool ok = false;
  LoadedNvrtc() {
    std::vector<std::string> names = {"libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"};
    const char* home = std::getenv("CUDA_HOME");
    std::string root = (home && *home) ? home : "/usr/local/cuda";
    names.push_back(root + "/lib64/libnvrtc.so");
    names.push_back(root + "/lib64/libnvrtc.so.13");
    static DynamicLibrary library(names);
    if (!library.loaded()) {
      error = "libnvrtc not found (install the CUDA toolkit or set CUDA_HOME)";
      return;
    }
    std::string missing;
    bind(library, "nvrtcVersion", api.nvrtcVersion, missing);
    bind(library, "nvrtcCreateProgram", api.nvrtcCreateProgram, missing);
    bind(library, "nvrtcDestroyProgram", api.nvrtcDestroyProgram, missing);
    bind(library, "nvrtcCompileProgram", api.nvrtcCompileProgram, missing);
    bind(library, "nvrtcGetProgramLogSize", api.nvrtcGetProgramLogSize, missing);
    bind(library, "nvrtcGetProgramLog", api.nvrtcGetProgramLog, missing);
    bind(library, "nvrtcGetCUBINSize", api.nvrtcGetCUBINSize, missing);
    bind(library, "nvrtcGetCUBIN", api.nvrtcGetCUBIN, missing);
    bind(library, "nvrtcGetPTXSize", api.nvrtcGetPTXSize, missing);
    bind(library, "nvrtcGetPTX", api.nvrtcGetPTX, missing);
    bind(library, "nvrtcGetErrorString", api.nvrtcGetErrorString, missing);
    bind(library, "nvrtcGetNumSupportedArchs", api.nvrtcGetNumSupportedArchs, missing);
    bind(library, "nvrtcGetSupportedArchs", api.nvrtcGetSupportedArchs, missing);
    if (!missing.empty()) {
      error = library.path() + " lacks " + missing;
      return;
    }
    ok = true;
  }
};

}  // namespace

const DriverApi* driver(std::string* why) {
  static LoadedDriver loaded;
  if (!loaded.ok && why) *why = loaded.error;
  return loaded.ok ? &loaded.api : nullptr;
}

void checkDriver(CUresult result, const char* what) {
  if (result == 0) return;
  const char* message = nullptr;
  if (const DriverApi* api = driver()) api->cuGetErrorString(result, &message);
  throw std::runtime_error(std::string("kiln: CUDA driver call ") + what + " failed: " +
                           (message ? message : std::to_string(result)));
}

bool deviceInfo(int index, DeviceInfo* info, std::string* why) {
  const DriverApi* api = driver(why);
  if (!api) return false;
  CUdevice device = 0;
  CUresult status = api->cuDeviceGet(&device, index);
  if (status != 0) {
    if (why) *why = "no CUDA device " + std::to_string(index) + " (cuDeviceGet error " + std::to_string(status) + ")";
    return false;
  }
  info->index = index;
  char name[256] = {};
  api->cuDeviceGetName(name, sizeof(name) - 1, device);
  info->name = name;
  api->cuDeviceGetAttribute(&info->major, kAttributeComputeCapabilityMajor, device);
  api->cuDeviceGetAttribute(&info->minor, kAttributeComputeCapabilityMinor, device);
  api->cuDeviceGetAttribute(&info->multiprocessors, kAttributeMultiprocessorCount, device);
  api->cuDeviceTotalMem(&info->total_memory, device);
  return true;
}

std::vector<DeviceInfo> devices() {
  std::vector<DeviceInfo> result;
  const DriverApi* api = driver();
  if (!api) return result;
  int count = 0;
  if (api->cuDeviceGetCount(&count) != 0) return result;
  for (int i = 0; i < count; ++i) {
    DeviceInfo info;
    if (deviceInfo(i, &info)) result.push_back(info);
  }
  return result;
}

std::string driverVersion() {
  std::string why;
  const DriverApi* api = driver(&why);
  if (!api) return "none (" + why + ")";
  int version = 0;
  api->cuDriverGetVersion(&version);
  return std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
}

const NvrtcApi* nvrtc(std::string* why) {
  static LoadedNvrtc loaded;
  if (!loaded.ok && why) *why = loaded.error;
  return loaded.ok ? &loaded.api : nullptr;
}

std::string nvrtcVersion() {
  std::string why;
  const NvrtcApi* api = nvrtc(&why);
  if (!api) return "none (" + why + ")";
  int major = 0;
  int minor = 0;
  api->nvrtcVersion(&major, &minor);
  return std::to_string(major) + "." + std::to_string(minor);
}

}  // namespace kiln::cuda
