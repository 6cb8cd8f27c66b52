// The LLVM CPU backend: kernel IR -> LLVM IR -> machine code through ORC's LLJIT, for the host.
//
// A CPU kernel is a 2-D loop in the style of ATen's TensorIterator loop2d: the caller hands it the
// base pointer of every operand (tensor inputs, then outputs), each operand's inner and outer byte
// strides, and the two extents; the caller walks any further dimensions and splits the work
// across ATen's thread pool. The kernel is specialized on each operand's inner stride class:
// contiguous and broadcast operands make the inner loop SIMD-vectorized (with SLEEF vector math,
// the library ATen's own CPU kernels use); any strided operand makes it scalar.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "codegen/kernel_ir.h"

namespace kiln {

enum class StrideClass : uint8_t { kContiguous, kBroadcast, kStrided };

struct CpuLayout {
  std::vector<StrideClass> operands;  // tensor inputs, then outputs
  std::string toString() const;       // e.g. "cbs|c"
};

// void kernel(char** data, const int64_t* strides /* inner[nops], outer[nops], bytes */,
//             int64_t inner_size, int64_t outer_size, const double* float_args,
//             const int64_t* int_args)
using CpuKernelFn = void (*)(char**, const int64_t*, int64_t, int64_t, const double*,
                             const int64_t*);

struct CpuTarget {
  int vector_bits = 256;   // widest SIMD register the host has (128, 256, 512)
  std::string cpu;         // LLVM's name for the host CPU
  std::string features;    // LLVM's feature string for it
  static const CpuTarget& host();
};

class CpuKernel {
 public:
  CpuKernelFn function() const { return function_; }
  const std::string& llvmIr() const { return llvm_ir_; }      // the optimized LLVM IR
  const std::string& assembly() const { return assembly_; }   // host assembly
  double compileMilliseconds() const { return compile_ms_; }
  ~CpuKernel();

  // Compiles `kernel` for `layout`; throws std::runtime_error on failure.
  static std::unique_ptr<CpuKernel> compile(const ir::Kernel& kernel, const CpuLayout& layout,
                                            bool keep_text = false);

 private:
  CpuKernel() = default;
  struct Jit;
  std::unique_ptr<Jit> jit_;
  CpuKernelFn function_ = nullptr;
  std::string llvm_ir_;
  std::string assembly_;
  double compile_ms_ = 0;
};

}  // namespace kiln
