// kiln::attention(q, k, v, mask, scale, causal): scaled dot-product attention with the inference
// semantics of torch.nn.functional.scaled_dot_product_attention (no dropout). This file checks the
// inputs, broadcasts the batch dims and the mask as views (zero strides, nothing copied) and hands
// the strided operands to the CPU kernel (torch_ops/attention_cpu.h). The CUDA kernel is separate
// work; the dispatcher reports a missing backend for CUDA tensors until it lands.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "torch_ops/attention_cpu.h"

namespace kiln {
namespace {

bool isAttentionDtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
         dtype == at::kDouble;
}

void checkOperand(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(tensor.defined(), "kiln::attention: ", name, " is undefined");
  TORCH_CHECK(tensor.layout() == at::kStrided, "kiln::attention: ", name,
              " must be a strided (dense) tensor, got layout ", tensor.layout());
  TORCH_CHECK(tensor.device().is_cpu(), "kiln::attention: ", name,
              " must be on the CPU for the CPU kernel, got device ", tensor.device());
  TORCH_CHECK(tensor.dim() >= 2, "kiln::attention: ", name,
              " must have at least 2 dims ([..., seq, head_dim], usually [B, H, S, D]), got ",
              tensor.dim(), " dims with shape ", tensor.sizes());
}

// The flattened batch offsets of a tensor already expanded to [batch_shape..., rows, cols].
std::vector<int64_t> batchOffsets(const at::Tensor& expanded, int64_t batch_rank) {
  int64_t batch = 1;
  for (int64_t d = 0; d < batch_rank; ++d) batch *= expanded.size(d);
  std::vector<int64_t> offsets(batch);
  std::vector<int64_t> index(batch_rank, 0);
  int64_t offset = 0;
  for (int64_t n = 0; n < batch; ++n) {
    offsets[n] = offset;
    // Odometer increment over the batch dims, innermost first.
    for (int64_t d = batch_rank - 1; d >= 0; --d) {
      if (++index[d] < expanded.size(d)) {
        offset += expanded.stride(d);
        break;
      }
      offset -= (expanded.size(d) - 1) * expanded.stride(d);
      index[d] = 0;
    }
  }
  return offsets;
}

cpu::StridedMatrices stridedMatrices(const at::Tensor& expanded, int64_t batch_rank) {
  cpu::StridedMatrices matrices;
  matrices.data = expanded.const_data_ptr();
  matrices.batch_offsets = batchOffsets(expanded, batch_rank);
  matrices.row_stride = expanded.stride(-2);
  matrices.col_stride = expanded.stride(-1);
  return matrices;
}

at::Tensor attentionCpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const std::optional<at::Tensor>& mask, std::optional<double> scale,
                        bool causal) {
  checkOperand(query, "query");
  checkOperand(key, "key");
  checkOperand(value, "value");
  TORCH_CHECK(isAttentionDtype(query.scalar_type()),
              "kiln::attention: query must be float32, float64, float16 or bfloat16, got ",
              query.scalar_type());
  TORCH_CHECK(
      key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
      "kiln::attention: query, key and value must have the same dtype, got query ",
      query.scalar_type(), ", key ", key.scalar_type(), ", value ", value.scalar_type());
  const int64_t query_len = query.size(-2);
  const int64_t key_len = key.size(-2);
  const int64_t head_dim = query.size(-1);
  const int64_t value_dim = value.size(-1);
  TORCH_CHECK(key.size(-1) == head_dim, "kiln::attention: key's last dim (head_dim) must equal ",
              "query's, got query ", query.sizes(), " and key ", key.sizes());
  TORCH_CHECK(value.size(-2) == key_len, "kiln::attention: value's sequence dim (-2) must equal ",
              "key's, got key ", key.sizes(), " and value ", value.sizes());

  // Leading dims broadcast as in a batched matmul.
  const auto batchDims = [](const at::Tensor& t) { return t.sizes().slice(0, t.dim() - 2); };
  std::vector<int64_t> batch_shape;
  try {
    batch_shape =
        at::infer_size(at::infer_size(batchDims(query), batchDims(key)), batchDims(value));
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "kiln::attention: the batch dims (all but the last two) of query, key ",
                "and value must broadcast, got query ", query.sizes(), ", key ", key.sizes(),
                ", value ", value.sizes());
  }
  const int64_t batch_rank = static_cast<int64_t>(batch_shape.size());
  const auto expandedTo = [&](const at::Tensor& t, int64_t rows, int64_t cols) {
    std::vector<int64_t> shape = batch_shape;
    shape.push_back(rows);
    shape.push_back(cols);
    return t.expand(shape);
  };

  cpu::AttentionProblem problem;
  problem.dtype = query.scalar_type();
  problem.batch = c10::multiply_integers(batch_shape);
  problem.query_len = query_len;
  problem.key_len = key_len;
  problem.head_dim = head_dim;
  problem.value_dim = value_dim;
  const at::Tensor query_view = expandedTo(query, query_len, head_dim);
  const at::Tensor key_view = expandedTo(key, key_len, head_dim);
  const at::Tensor value_view = expandedTo(value, key_len, value_dim);
  problem.query = stridedMatrices(query_view, batch_rank);
  problem.key = stridedMatrices(key_view, batch_rank);
  problem.value = stridedMatrices(value_view, batch_rank);

  at::Tensor mask_view;
  if (mask.has_value() && mask->defined()) {
    checkOperand(*mask, "mask");
    const at::ScalarType mask_dtype = mask->scalar_type();
    TORCH_CHECK(
        mask_dtype == at::kBool || mask_dtype == at::kFloat || mask_dtype == query.scalar_type(),
        "kiln::attention: mask must be bool (true keeps a score), float32 or the query's "
        "dtype (",
        query.scalar_type(), "; added to the scores), got ", mask_dtype);
    std::vector<int64_t> scores_shape = batch_shape;
    scores_shape.push_back(query_len);
    scores_shape.push_back(key_len);
    TORCH_CHECK(at::is_expandable_to(mask->sizes(), scores_shape), "kiln::attention: mask of ",
                "shape ", mask->sizes(), " does not broadcast to the scores' shape ",
                c10::IntArrayRef(scores_shape), " ([..., query_len, key_len])");
    mask_view = mask->expand(scores_shape);
    problem.mask_kind = mask_dtype == at::kBool ? cpu::MaskKind::kKeep : cpu::MaskKind::kAdditive;
    problem.mask_dtype = mask_dtype;
    problem.mask = stridedMatrices(mask_view, batch_rank);
  }
  problem.causal = causal;
  problem.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(head_dim));

  std::vector<int64_t> output_shape = batch_shape;
  output_shape.push_back(query_len);
  output_shape.push_back(value_dim);
  at::Tensor output = at::empty(output_shape, query.options());
  problem.output = output.data_ptr();
  cpu::attentionForward(problem);
  return output;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float? scale=None, "
      "bool causal=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("attention", &attentionCpu); }

}  // namespace kiln
