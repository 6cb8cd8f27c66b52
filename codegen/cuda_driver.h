// The CUDA driver API, reached through a lazily dlopen'ed libcuda.so.1 (never linked), and NVRTC,
// likewise loaded on first use. Nothing here runs until a caller asks for a GPU, so the library
// works on machines with no driver. Only the entry points kiln uses are declared.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace kiln::cuda {

using CUresult = int;
using CUdevice = int;
using CUcontext = struct CUctx_st*;
using CUmodule = struct CUmod_st*;
using CUfunction = struct CUfunc_st*;
using CUstream = struct CUstream_st*;

struct DriverApi {
  CUresult (*cuInit)(unsigned int);
  CUresult (*cuDriverGetVersion)(int*);
  CUresult (*cuDeviceGetCount)(int*);
  CUresult (*cuDeviceGet)(CUdevice*, int);
  CUresult (*cuDeviceGetName)(char*, int, CUdevice);
  CUresult (*cuDeviceGetAttribute)(int*, int, CUdevice);
  CUresult (*cuDeviceTotalMem)(size_t*, CUdevice);
  CUresult (*cuGetErrorString)(CUresult, const char**);
  CUresult (*cuDevicePrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*cuCtxGetCurrent)(CUcontext*);
  CUresult (*cuCtxSetCurrent)(CUcontext);
  CUresult (*cuModuleLoadData)(CUmodule*, const void*);
  CUresult (*cuModuleUnload)(CUmodule);
  CUresult (*cuModuleGetFunction)(CUfunction*, CUmodule, const char*);
  CUresult (*cuLaunchKernel)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned,
                             unsigned, unsigned, CUstream, void**, void**);
  CUresult (*cuOccupancyMaxActiveBlocksPerMultiprocessor)(int*, CUfunction, int, size_t);
  CUresult (*cuStreamIsCapturing)(CUstream, int*);  // status 0: not capturing
};

// The driver, loaded and initialised on first call; nullptr (with *why set) if unavailable.
const DriverApi* driver(std::string* why = nullptr);

// Raises std::runtime_error naming `what` if result is not CUDA_SUCCESS.
void checkDriver(CUresult result, const char* what);

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0;
  int minor = 0;
  int multiprocessors = 0;
  size_t total_memory = 0;
};

// Every visible GPU; empty when there is no driver or no device.
std::vector<DeviceInfo> devices();
// One GPU by driver ordinal; false (with *why set) when there is no driver or no such device.
bool deviceInfo(int index, DeviceInfo* info, std::string* why = nullptr);
// The driver's CUDA version as "13.0", or "none (reason)".
std::string driverVersion();

struct NvrtcApi {
  int (*nvrtcVersion)(int*, int*);
  int (*nvrtcCreateProgram)(void**, const char*, const char*, int, const char* const*,
                            const char* const*);
  int (*nvrtcDestroyProgram)(void**);
  int (*nvrtcCompileProgram)(void*, int, const char* const*);
  int (*nvrtcGetProgramLogSize)(void*, size_t*);
  int (*nvrtcGetProgramLog)(void*, char*);
  int (*nvrtcGetCUBINSize)(void*, size_t*);
  int (*nvrtcGetCUBIN)(void*, char*);
  int (*nvrtcGetPTXSize)(void*, size_t*);
  int (*nvrtcGetPTX)(void*, char*);
  const char* (*nvrtcGetErrorString)(int);
  int (*nvrtcGetNumSupportedArchs)(int*);
  int (*nvrtcGetSupportedArchs)(int*);
};

// NVRTC from the CUDA toolkit (CUDA_HOME, default /usr/local/cuda) or the system's loader path.
const NvrtcApi* nvrtc(std::string* why = nullptr);
// NVRTC's version as "13.0", or "none (reason)".
std::string nvrtcVersion();

}  // namespace kiln::cuda
