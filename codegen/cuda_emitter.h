// The CUDA C++ emitter: kernel IR → CUDA source for NVRTC, one kernel per (IR, CudaSpecialization).
// The same IR the LLVM CPU backend compiles; each op means exactly what it means there and in the
// reference interpreter (NaN-propagating max/min, saturating float → int casts, half/bfloat16
// computed in float and rounded on every cast).
//
// Note: a kernel is specialized on its schedule, never on sizes. Linear: after the runtime has
// collapsed dimensions, every operand is contiguous or broadcast (stride 0) along one dimension;
// linear-vectorized adds that every contiguous operand is aligned for an access of kVectorBytes
// (the widest operand moves 16 bytes per access, like Triton's divisibility-16 specialization),
// with a scalar tail for the last numel % vector elements. Linear schedules also read a row
// broadcast over rows (a bias) or one value per row (Access); vectorized, the row length is
// then a multiple of the vector, so a vector never straddles two rows. Strided: any rank up to
// kMaxCudaRank, sizes and element strides as arguments. Index arithmetic is 32-bit when every
// offset fits (numel and each operand's largest element offset below 2^31), else 64-bit.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "codegen/access.h"
#include "codegen/kernel_ir.h"

namespace kiln {

constexpr int kMaxCudaRank = 8;
constexpr int kCudaBlockSize = 256;
// The longest row a warp reduces alone in the rows schedule (32 elements per lane).
constexpr int64_t kCudaWarpRowLength = 1024;
// The most bytes an argument block may have (the launch parameter limit every architecture
// accepts).
constexpr size_t kMaxCudaArgumentBytes = 4096;

// kRows: a kernel with row reductions. One block per row (a grid-stride loop over rows), its
// threads striding along the row; each stage's reductions are combined across the block (warp
// shuffles, then shared memory), per-row values are computed by every thread, per-row outputs
// stored by thread 0. Rows of up to kCudaWarpRowLength take a warp each instead (warp_rows: 8
// rows per block, shuffles only, no block synchronization). Operands are addressed as in
// kStrided (sizes and strides per dimension, the row innermost).
enum class CudaSchedule { kLinear, kLinearVectorized, kStrided, kRows };

struct CudaSpecialization {
  CudaSchedule schedule = CudaSchedule::kLinear;
  int rank = 1;                  // collapsed rank (kStrided, kRows); 1 for the linear schedules
  // Per operand (inputs, then outputs; linear schedules), one of the linear accesses
  // (isLinearAccess): at linear index e of the space seen as [rows, inner], kContiguous reads
  // element e, kBroadcast element 0, kRow e % inner, kColumn e / inner (inner: a kernel argument).
  std::vector<Access> access;
  bool index64 = false;
  bool warp_rows = false;        // kRows: a warp per row (short rows)

  // Whether some operand is read by row or by column (the kernel then takes `inner`).
  bool usesInner() const;

  // A stable text naming the specialization (part of the kernel's cache key and file names).
  std::string toString() const;
};

// Elements per thread and access in the vectorized schedule: 16 bytes of the widest operand.
int cudaVectorWidth(const ir::Kernel& kernel);

struct CudaSource {
  std::string name;    // the __global__ function's name
  std::string kernel;  // its parameter struct and the kernel itself
  std::string source;  // the whole translation unit: device helpers, then `kernel`
};

// Throws std::runtime_error if the IR is invalid or the specialization does not fit it. The
// function is named kiln_<kernel.name>.
CudaSource emitCuda(const ir::Kernel& kernel, const CudaSpecialization& specialization);

// The device helpers every generated translation unit starts with (codegen/cuda/kiln_device.cuh).
const char* cudaDeviceHelpers();

// The kernel's argument block, built by the host in this order, every field 8 bytes:
//   data pointers [operands], sizes [rank], element strides [operands][rank], inner [0 or 1],
//   numel, float scalars [max(1, n)], integer scalars [max(1, n)].
// (Linear schedules: rank 0, no sizes and no strides; `inner` only when usesInner().)
struct CudaArgumentLayout {
  int operands = 0;
  int rank = 0;
  bool inner = false;
  int float_scalars = 0;
  int int_scalars = 0;
  // The block's size in bytes.
  size_t bytes() const;
};
CudaArgumentLayout cudaArgumentLayout(const ir::Kernel& kernel, const CudaSpecialization& specialization);

// The argument block itself, in cudaArgumentLayout's order. `geometry` is the call's merged
// space (byte strides; each must be a whole number of elements), `pointers` the operands' data
// (inputs, then outputs), scalars as the kernel's scalar inputs (the float and int views of each).
std::vector<int64_t> packCudaArguments(const ir::Kernel& kernel, const CudaSpecialization& specialization,
                                       const Geometry& geometry, const std::vector<const void*>& pointers,
                                       const std::vector<double>& float_scalars,
                                       const std::vector<int64_t>& int_scalars);

// Grid-stride iterations of a call, in threads: vectors for the vectorized schedule, a block per
// row for kRows, elements otherwise.
int64_t cudaWorkItems(const ir::Kernel& kernel, const CudaSpecialization& specialization, const Geometry& geometry);

// The grid of a launch: one thread per grid-stride iteration (cudaWorkItems), in blocks of
// kCudaBlockSize, up to `resident_blocks`, what the device holds at once.
int64_t cudaGridBlocks(int64_t work, int64_t resident_blocks);

// The schedule for one call: linear-vectorized, linear or strided (kRows for a kernel with
// reductions), 32- or 64-bit indexing.
// `addresses` holds where each input's data starts, or on a host standing in for a device, its
// byte offset within its allocation (allocations are aligned beyond any vector); outputs are
// fresh allocations. nullopt with *why when none fits.
std::optional<CudaSpecialization> chooseCudaSpecialization(const ir::Kernel& kernel, const Geometry& geometry,
                                                           const std::vector<Access>& accesses,
                                                           const std::vector<uintptr_t>& addresses,
                                                           std::string* why);

}  // namespace kiln
