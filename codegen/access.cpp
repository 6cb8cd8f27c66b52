#include "codegen/access.h"

namespace kiln {

Geometry mergeDimensions(const std::vector<int64_t>& shape, const std::vector<std::vector<int64_t>>& strides,
                         bool keep_rows) {
  if (keep_rows && !shape.empty()) {
    std::vector<std::vector<int64_t>> outer_strides;
    for (const auto& operand : strides) outer_strides.emplace_back(operand.begin(), operand.end() - 1);
    Geometry geometry = mergeDimensions(std::vector<int64_t>(shape.begin(), shape.end() - 1), outer_strides);
    geometry.sizes.push_back(shape.back());
    geometry.numel *= shape.back();
    for (size_t k = 0; k < strides.size(); ++k) geometry.strides[k].push_back(strides[k].back());
    return geometry;
  }
  Geometry geometry;
  const size_t operands = strides.size();
  geometry.strides.resize(operands);
  geometry.numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    geometry.numel *= shape[d];
    if (shape[d] == 1) continue;
    // Merge into the previous dimension when every operand's stride there is this one's times
    // this size: the two walk as one.
    bool merge = !geometry.sizes.empty();
    for (size_t k = 0; merge && k < operands; ++k) merge = geometry.strides[k].back() == strides[k][d] * shape[d];
    if (merge) {
      geometry.sizes.back() *= shape[d];
      for (size_t k = 0; k < operands; ++k) geometry.strides[k].back() = strides[k][d];
    } else {
      geometry.sizes.push_back(shape[d]);
      for (size_t k = 0; k < operands; ++k) geometry.strides[k].push_back(strides[k][d]);
    }
  }
  if (geometry.sizes.empty()) {
    geometry.sizes.push_back(1);
    for (auto& operand : geometry.strides) operand.push_back(0);
  }
  return geometry;
}

std::vector<Access> classifyOperands(const Geometry& geometry, const std::vector<int64_t>& element_sizes) {
  const size_t rank = geometry.rank();
  std::vector<Access> accesses;
  for (size_t k = 0; k < geometry.strides.size(); ++k) {
    const std::vector<int64_t>& strides = geometry.strides[k];
    const int64_t element = element_sizes[k];
    const int64_t inner = strides[rank - 1];
    bool all_zero = true;
    for (int64_t stride : strides) all_zero &= stride == 0;
    if (all_zero) {
      accesses.push_back(Access::kBroadcast);
    } else if (rank == 1) {
      accesses.push_back(inner == element ? Access::kContiguous : Access::kStrided);
    } else if (rank == 2 && inner == element && strides[0] == geometry.sizes[1] * element) {
      accesses.push_back(Access::kContiguous);
    } else if (rank == 2 && inner == element && strides[0] == 0) {
      accesses.push_back(Access::kRow);
    } else if (rank == 2 && inner == 0 && strides[0] == element) {
      accesses.push_back(Access::kColumn);
    } else {
      accesses.push_back(inner == element ? Access::kInnerContiguous
                         : inner == 0     ? Access::kInnerBroadcast
                                          : Access::kStrided);
    }
  }
  return accesses;
}

Access innerAccess(Access access) {
  switch (access) {
    case Access::kContiguous:
    case Access::kRow:
    case Access::kInnerContiguous: return Access::kContiguous;
    case Access::kBroadcast:
    case Access::kColumn:
    case Access::kInnerBroadcast: return Access::kBroadcast;
    case Access::kStrided: break;
  }
  return Access::kStrided;
}

bool isLinearAccess(Access access) {
  return access == Access::kContiguous || access == Access::kBroadcast || access == Access::kRow ||
         access == Access::kColumn;
}

std::string accessText(const std::vector<Access>& accesses) {
  std::string text;
  for (Access access : accesses) text += static_cast<char>(access);
  return text;
}

}  // namespace kiln
