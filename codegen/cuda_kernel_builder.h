// From kernel IR to a CUDA binary, through the disk cache: emit CUDA C++ for the specialization,
// look the key up in KernelCache::global(), and only on a miss compile with NVRTC and store the
// result. Used by the runtime and by `kiln compile` (which warms a cache with no GPU present).
// KILN_DUMP=DIR receives the .cu, the IR, the PTX or the NVRTC log of every compile.
#pragma once

#include <string>

#include "codegen/cuda_emitter.h"

namespace kiln {

struct CudaKernelBinary {
  std::string name;          // the kernel function's name
  std::string arch;          // "sm_90" (cubin) or "compute_90" (PTX)
  std::string binary;        // cubin or PTX
  bool is_cubin = false;
  bool from_cache = false;   // found in the disk cache, not compiled by this call
  double compile_ms = 0;     // NVRTC time (0 when cached)
  double fetch_ms = 0;       // time to obtain it, cache lookup included
  int registers = -1;
  int spill_bytes = 0;
  std::string cache_key;     // hex hash of the cache key
};

// Throws std::runtime_error when NVRTC is missing or the kernel fails to compile (with its log).
CudaKernelBinary obtainCudaKernel(const ir::Kernel& kernel, const CudaSpecialization& specialization,
                                  const std::string& arch, bool fast_math);

}  // namespace kiln
