// How each operand of a generated kernel walks its iteration space: one vocabulary for the CPU
// and CUDA backends. The pipeline (codegen/pipeline.h) merges a call's dimensions and classifies
// every operand once; the CPU layout and the CUDA schedule are both read off these classes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

// A call's iteration space after merging: sizes innermost last (at least one dimension), and
// each operand's byte strides over them (0 where it is broadcast). Operands are the kernel's
// tensor inputs, then its outputs.
struct Geometry {
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> strides;  // [operand][dimension], bytes
  int64_t numel = 0;
  size_t rank() const { return sizes.size(); }
};

// Drops size-1 dimensions and merges neighbours that every operand walks as one. `strides` are
// per operand over `shape`, in bytes. With `keep_rows` (a kernel with row reductions) the
// innermost dimension is the row and stays as it is, after at least one outer dimension.
Geometry mergeDimensions(const std::vector<int64_t>& shape, const std::vector<std::vector<int64_t>>& strides,
                         bool keep_rows = false);

// One operand's access over a merged space seen as [..., rows, inner].
enum class Access : char {
  kContiguous = 'c',       // dense over the whole space: element e
  kBroadcast = 'b',        // stride 0 everywhere: element 0
  kRow = 'r',              // [rows, inner]: one row broadcast over the rows (a bias): e % inner
  kColumn = 'o',           // [rows, inner]: one value per row ([N, 1]): e / inner
  kInnerContiguous = 'i',  // contiguous along the innermost dimension, strided outside it
  kInnerBroadcast = 'z',   // stride 0 along the innermost dimension, strided outside it
  kStrided = 's',          // any other innermost stride
};

// Each operand's access; `element_sizes` per operand in bytes.
std::vector<Access> classifyOperands(const Geometry& geometry, const std::vector<int64_t>& element_sizes);

// What a kernel's innermost loop sees of an access: kContiguous, kBroadcast or kStrided.
Access innerAccess(Access access);

// Whether a linear (one-index) schedule can read the operand: kContiguous, kBroadcast, kRow,
// kColumn.
bool isLinearAccess(Access access);

// One character per operand, e.g. "crb".
std::string accessText(const std::vector<Access>& accesses);

}  // namespace kiln
