// float32 math the CPU backend emits inline rather than calling SLEEF: a chain of math ops then
// stays in registers (a call makes the whole vector register file caller-saved, and those spills
// cost more than the math). Each works on a float32 scalar or vector of any width. Internal to
// codegen/.
#pragma once

#include <llvm/IR/IRBuilder.h>

#include "codegen/kernel_ir.h"

namespace kiln {

// The SLEEF function for a math op ("exp" for Sleef_expf16_u10) and, in *ulp, its accuracy
// suffix; nullptr for an op SLEEF does not compute.
const char* sleefBase(ir::Op op, const char** ulp);

// Math that costs a SLEEF call or an inline polynomial (exp, log, tanh, erf, sigmoid, pow, …).
bool isTranscendental(ir::Op op);

// a·b + c, fused where the target has FMA (one rounding instead of two: never less accurate).
llvm::Value* multiplyAdd(llvm::IRBuilder<>& builder, llvm::Value* a, llvm::Value* b, llvm::Value* c);

// exp: 2^n · p(r), Cephes expf's polynomial (under 2 ULP), overflow and gradual underflow as eager.
llvm::Value* inlineExp(llvm::IRBuilder<>& builder, llvm::Value* x);

// tanh: Cephes tanhf (an odd polynomial below 0.625, 1 − 2/(e^{2|x|} + 1) above).
llvm::Value* inlineTanh(llvm::IRBuilder<>& builder, llvm::Value* x);

// erf: Abramowitz & Stegun 7.1.26 for |x| ≥ 1 (ATen's vectorized formula), a polynomial below.
llvm::Value* inlineErf(llvm::IRBuilder<>& builder, llvm::Value* x);

}  // namespace kiln
