// The LLVM CPU backend: kernel IR -> LLVM IR -> machine code through ORC's LLJIT, for the host.
//
// A CPU kernel is a 2-D loop in the style of ATen's TensorIterator loop2d: the caller hands it the
// base pointer of every operand (tensor inputs, then outputs), each operand's inner and outer byte
// strides, and the two extents; the caller walks any further dimensions and splits the work
// across ATen's thread pool. The kernel is specialized on what its inner loop sees of each
// operand (innerAccess: contiguous, broadcast or strided): contiguous and broadcast operands make
// the inner loop SIMD-vectorized (with SLEEF vector math, the library ATen's own CPU kernels use);
// any strided operand makes it scalar. obtainCpuKernel() goes through the disk cache: the object
// code is stored there and later loaded into the JIT without running LLVM's optimizer again.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "codegen/access.h"
#include "codegen/kernel_ir.h"

namespace kiln {

struct CpuLayout {
  std::vector<Access> operands;  // tensor inputs, then outputs: kContiguous, kBroadcast, kStrided
  std::string toString() const;  // e.g. "cbsc"
};

// The layout a CPU kernel is specialized on, from each operand's access (its innerAccess).
CpuLayout cpuLayoutFor(const std::vector<Access>& accesses);

// void kernel(char** data, const int64_t* strides /* inner[nops], outer[nops], bytes */,
//             int64_t inner_size, int64_t outer_size, const double* float_args,
//             const int64_t* int_args)
// data holds the operands (tensor inputs, then outputs), then a reduction kernel's scratch rows
// (planCpuStash): each inner_size elements of its size, private to the calling thread.
using CpuKernelFn = void (*)(char**, const int64_t*, int64_t, int64_t, const double*,
                             const int64_t*);

// Per-element values a reduction kernel computes in one read of a row and loads back in a later
// read instead of computing them again (softmax's exp(x - max), a residual sum's rounding): each
// is kept in an output of its type, whose own value is stored last, or in a scratch row.
struct CpuStash {
  int value = 0;    // body index
  int stage = 0;    // the read that writes it
  int output = -1;  // the output it is kept in, or -1
  int scratch = -1; // else its scratch row
};
struct CpuStashPlan {
  std::vector<CpuStash> values;
  std::vector<int64_t> scratch_element_bytes;  // per scratch row
};
CpuStashPlan planCpuStash(const ir::Kernel& kernel);

struct CpuTarget {
  int vector_bits = 256;   // widest SIMD register the host has (128, 256, 512)
  std::string cpu;         // LLVM's name for the host CPU
  std::string features;    // LLVM's feature string for it
  std::string triple;      // the process's target triple
  static const CpuTarget& host();
};

// Initializes LLVM's host target and reads the host CPU once. Background compiles call it on the
// submitting thread first, so that what they use was made before their worker pool (and so is
// destroyed after it at exit).
void prepareCpuBackend();

struct CpuKernelResult;
CpuKernelResult obtainCpuKernel(const ir::Kernel& kernel, const CpuLayout& layout);

class CpuKernel {
 public:
  CpuKernelFn function() const { return function_; }
  const std::string& llvmIr() const { return llvm_ir_; }      // the optimized LLVM IR
  const std::string& assembly() const { return assembly_; }   // host assembly
  double compileMilliseconds() const { return compile_ms_; }
  ~CpuKernel();

  // Compiles `kernel` for `layout` (no disk cache); throws std::runtime_error on failure.
  static std::unique_ptr<CpuKernel> compile(const ir::Kernel& kernel, const CpuLayout& layout,
                                            bool keep_text = false);

 private:
  friend CpuKernelResult obtainCpuKernel(const ir::Kernel& kernel, const CpuLayout& layout);
  CpuKernel() = default;
  // Links object code into a JIT of this kernel's own and finds its function.
  void link(const std::string& object, const std::vector<std::string>& declarations, const std::string& symbol);
  struct Jit;
  std::unique_ptr<Jit> jit_;
  CpuKernelFn function_ = nullptr;
  std::string llvm_ir_;
  std::string assembly_;
  double compile_ms_ = 0;
};

struct CpuKernelResult {
  std::shared_ptr<CpuKernel> kernel;
  bool from_cache = false;  // its object code came from the disk cache: LLVM only linked it
  double fetch_ms = 0;      // time to obtain it, cache lookup included
  std::string cache_key;    // hex hash of the cache key
};

// Obtains `kernel` for `layout` through KernelCache::global(): the key names the IR, the
// unoptimized LLVM IR the emitter made of it, the host (triple, CPU, features), LLVM's version
// and the optimization level. A hit links the stored object code; a miss optimizes, emits the
// object, stores it and links it. KILN_DUMP receives the IR (and on a compile, .ll and .s).
// Throws std::runtime_error on failure.
CpuKernelResult obtainCpuKernel(const ir::Kernel& kernel, const CpuLayout& layout);

}  // namespace kiln
