// The reference interpreter for the kernel IR: evaluates a kernel element by element with plain
// C++ math. It is the oracle the backends are tested against, not a fast path.
#pragma once

#include <cstdint>
#include <vector>

#include "codegen/kernel_ir.h"

namespace kiln::ir {

// A strided 1-D view of an operand: element i lives at data + i * stride elements.
struct Operand1D {
  void* data = nullptr;
  int64_t stride = 1;
};

// Runs `kernel` over n elements. Scalars are passed as doubles (integers exactly representable).
void interpret(const Kernel& kernel, const std::vector<Operand1D>& inputs,
               const std::vector<double>& scalars, const std::vector<Operand1D>& outputs, int64_t n);

}  // namespace kiln::ir
