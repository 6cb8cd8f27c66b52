// The checked operands of one kiln attention call, shared by the CPU and CUDA kernels: inputs are
// validated once (torch_ops/attention_op.cpp) and broadcast to a common batch shape as views
// (zero strides, nothing copied), and the output is allocated.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace kiln {

struct AttentionOperands {
  std::vector<int64_t> batch_shape;  // the broadcast leading dims
  int64_t query_len = 0;
  int64_t key_len = 0;
  int64_t head_dim = 0;   // of query and key
  int64_t value_dim = 0;  // of value and the output
  at::Tensor query, key, value;  // expanded to [batch_shape..., rows, cols]
  at::Tensor mask;               // [batch_shape..., query_len, key_len] or undefined
  at::Tensor fill_keep;          // likewise (explicit form only)
  double scale = 1.0;
  bool causal = false;
  double fill = 0.0;  // rounded to the query's dtype
  bool fill_adds_mask = false;
  bool empty_rows_nan = false;
  bool scores_in_dtype = false;  // the explicit form: its graph holds the scores in the dtype
  at::Tensor output;  // contiguous [batch_shape..., query_len, value_dim]
};

// kiln::attention's inputs (scaled_dot_product_attention's semantics).
AttentionOperands checkAttention(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                 std::optional<double> scale, bool causal);

// kiln::attention_explicit's inputs (the explicit matmul/softmax form).
AttentionOperands checkAttentionExplicit(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& keep, double scale,
                                         double fill, bool fill_adds_mask);

// Whether the CUDA kernel runs these inputs as they are (dtype, head dims); false when kiln was
// built without CUDA kernels. torch_ops/attention_cuda.cpp.
bool cudaAttentionSupports(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value);

}  // namespace kiln
