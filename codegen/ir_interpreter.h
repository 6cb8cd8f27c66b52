// The reference interpreter for the kernel IR: evaluates a kernel element by element with plain
// C++ math. It is the oracle the backends are tested against, not a fast path.
#pragma once

#include <cstdint>
#include <vector>

#include "codegen/kernel_ir.h"

namespace kiln::ir {

// A strided view of an operand: element i of row r lives at data + r * row_stride + i * stride
// elements. A per-row output (a kernel with reductions) stores row r at data + r * row_stride.
struct Operand1D {
  void* data = nullptr;
  int64_t stride = 1;
  int64_t row_stride = 0;
};

// Runs `kernel` over `rows` rows of n elements. Scalars are passed as doubles (integers exactly
// representable). Reductions are computed in double, var in two passes: the oracle, not a model
// of any backend's order of operations.
void interpret(const Kernel& kernel, const std::vector<Operand1D>& inputs,
               const std::vector<double>& scalars, const std::vector<Operand1D>& outputs, int64_t n,
               int64_t rows = 1);

}  // namespace kiln::ir
