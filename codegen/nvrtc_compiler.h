// NVRTC compilation of generated CUDA C++: to a cubin for the device's exact architecture, or to
// PTX (JIT-compiled by the driver) when the device is newer than any architecture this NVRTC
// knows. Needs the NVRTC library only, not a GPU: CI compiles every generated kernel this way.
#pragma once

#include <string>
#include <vector>

namespace kiln {

struct NvrtcResult {
  bool ok = false;
  bool is_cubin = false;     // else PTX
  std::string binary;        // cubin or PTX text
  std::string log;           // NVRTC's log (warnings, errors, the ptxas -v report)
  std::string arch;          // e.g. "sm_90"
  double compile_ms = 0;
  int registers = -1;        // per thread, from ptxas (-1 if not reported)
  int spill_bytes = 0;       // spill stores + loads, from ptxas
};

// Compiles `source` for `arch` ("sm_80", "sm_90", ...). fast_math adds --use_fast_math; without it
// --fmad=false keeps every product rounded as eager rounds it.
// Never throws for a compile error: ok is false and log says why. Throws std::runtime_error if
// NVRTC itself cannot be loaded.
NvrtcResult compileCuda(const std::string& source, const std::string& program_name, const std::string& arch,
                        bool fast_math);

// The sm_XY architectures this NVRTC can compile cubins for, ascending.
std::vector<int> nvrtcSupportedArchs();

// The architecture to build for on a device of compute capability major.minor: itself if NVRTC
// knows it, else the newest it knows (as PTX, which the driver compiles for the device).
std::string archForDevice(int major, int minor, bool* as_ptx);

}  // namespace kiln
