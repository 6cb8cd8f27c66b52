// The CUDA kernels of kiln::attention and kiln::attention_explicit: the checked operands
// (attention_operands.h) become the FlashAttention-2 kernel's parameters (kernels/), launched on
// torch's current stream under a guard for the query's device. The output comes from torch's
// caching allocator. float16 and bfloat16 with head dims 32, 64, 96 and 128 (value dim equal) run
// the kernel; anything else is a clear error, and the fuser's guard never sends it here.
#include "torch_ops/attention_operands.h"

#if defined(KILN_HAVE_CUDA_KERNELS)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "kiln/kernels/flash_attention.h"
#endif

namespace kiln {

#if defined(KILN_HAVE_CUDA_KERNELS)
namespace {

namespace kk = kiln::kernels;

bool kernelDtype(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

// The kernel reads 16-byte chunks of each row: the head dim must be contiguous, and every other
// stride and the base pointer 16-byte aligned. Expanded (zero) strides qualify.
bool chunkAligned(const at::Tensor& t) {
  if (t.stride(-1) != 1 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && (t.stride(d) * t.element_size()) % 16 != 0) return false;
  return true;
}

// The batch dims folded into at most kMaxBatchDims; leading size-1 dims are dropped first.
std::vector<int64_t> foldedBatch(const std::vector<int64_t>& batch_shape) {
  std::vector<int64_t> folded;
  for (int64_t size : batch_shape)
    if (!(folded.empty() && size == 1)) folded.push_back(size);
  return folded;
}

void fillOperand(kk::StridedOperand& operand, const at::Tensor& t, int64_t skipped_dims) {
  operand.data = t.const_data_ptr();
  const int64_t batch_rank = t.dim() - 2 - skipped_dims;
  for (int64_t d = 0; d < batch_rank; ++d) operand.batch_strides[d] = t.stride(skipped_dims + d);
  operand.row_stride = t.stride(-2);
  operand.col_stride = t.stride(-1);
}

kk::MaskDtype maskDtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kBool:
      return kk::MaskDtype::kBool;
    case at::kFloat:
      return kk::MaskDtype::kFloat;
    case at::kHalf:
      return kk::MaskDtype::kHalf;
    case at::kBFloat16:
      return kk::MaskDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "kiln::attention: mask dtype ", dtype, " has no CUDA kernel");
  }
}

// Why the CUDA kernel cannot run a problem of this shape and dtype; empty when it can. The op
// raises it, and the fuser's guard (cudaAttentionSupports) asks the same question.
std::string unsupportedReason(at::ScalarType dtype, int64_t head_dim, int64_t value_dim,
                              c10::IntArrayRef batch_shape, int64_t query_len, int64_t key_len) {
  if (!kernelDtype(dtype))
    return c10::str("kiln::attention: the CUDA kernel takes float16 or bfloat16, got ", dtype,
                    " (call it on CPU tensors, or use scaled_dot_product_attention, for other "
                    "dtypes)");
  if (value_dim != head_dim || !kk::flashAttentionSupportsHeadDim(static_cast<int>(head_dim)))
    return c10::str("kiln::attention: the CUDA kernel takes head dims 32, 64, 96 or 128 with the "
                    "value dim equal, got head dim ",
                    head_dim, " and value dim ", value_dim);
  if (static_cast<int>(foldedBatch(batch_shape.vec()).size()) > kk::kMaxBatchDims)
    return c10::str("kiln::attention: the CUDA kernel takes at most ", kk::kMaxBatchDims,
                    " batch dims beyond leading ones of size 1, got shape ", batch_shape);
  if (query_len > kk::kMaxQueryLen || key_len > kk::kMaxKeyLen)
    return c10::str("kiln::attention: the CUDA kernel takes up to ", kk::kMaxQueryLen,
                    " queries and ", kk::kMaxKeyLen, " keys, got ", query_len, " and ", key_len);
  return "";
}

at::Tensor runCuda(AttentionOperands operands) {
  const at::Tensor& query = operands.query;
  const std::string reason =
      unsupportedReason(query.scalar_type(), operands.head_dim, operands.value_dim,
                        operands.batch_shape, operands.query_len, operands.key_len);
  TORCH_CHECK(reason.empty(), reason);
  const std::vector<int64_t> batch = foldedBatch(operands.batch_shape);
  // Operands the kernel cannot read in 16-byte chunks are copied once (rare: views of [B, S, H, D]
  // projections qualify).
  for (at::Tensor* t : {&operands.query, &operands.key, &operands.value})
    if (!chunkAligned(*t)) *t = t->contiguous();

  const int64_t skipped = static_cast<int64_t>(operands.batch_shape.size() - batch.size());
  kk::AttentionParams params;
  params.dtype = query.scalar_type() == at::kHalf ? kk::AttentionDtype::kHalf
                                                   : kk::AttentionDtype::kBFloat16;
  params.batch_rank = static_cast<int>(batch.size());
  params.batch = 1;
  for (size_t d = 0; d < batch.size(); ++d) {
    params.batch_sizes[d] = batch[d];
    params.batch *= batch[d];
  }
  params.query_len = static_cast<int>(operands.query_len);
  params.key_len = static_cast<int>(operands.key_len);
  params.head_dim = static_cast<int>(operands.head_dim);
  fillOperand(params.query, operands.query, skipped);
  fillOperand(params.key, operands.key, skipped);
  fillOperand(params.value, operands.value, skipped);
  params.output = operands.output.data_ptr();
  for (int64_t d = 0; d < params.batch_rank; ++d)
    params.output_batch_strides[d] = operands.output.stride(skipped + d);
  params.output_row_stride = operands.output.stride(-2);
  params.scale = static_cast<float>(operands.scale);
  params.causal = operands.causal;
  if (operands.mask.defined()) {
    params.mask_dtype = maskDtype(operands.mask.scalar_type());
    fillOperand(params.mask, operands.mask, skipped);
  }
  if (operands.fill_keep.defined()) {
    fillOperand(params.fill_keep, operands.fill_keep, skipped);
    params.fill = static_cast<float>(operands.fill);
    params.fill_adds_mask = operands.fill_adds_mask;
  }
  params.empty_rows_nan = operands.empty_rows_nan;
  params.scores_in_dtype = operands.scores_in_dtype;

  const c10::cuda::CUDAGuard device_guard(query.device());
  const cudaError_t status =
      kk::flashAttentionForward(params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == cudaSuccess, "kiln::attention: CUDA kernel launch failed: ",
              cudaGetErrorString(status));
  return operands.output;
}

at::Tensor attentionCuda(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                         const std::optional<at::Tensor>& mask, std::optional<double> scale,
                         bool causal, bool /*heads_last: a permission; the CUDA kernel writes [B, H, S, D]*/) {
  return runCuda(checkAttention(query, key, value, mask, scale, causal));
}

at::Tensor attentionExplicitCuda(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                 const std::optional<at::Tensor>& keep, double scale, double fill,
                                 bool fill_adds_mask, bool /*heads_last*/) {
  return runCuda(
      checkAttentionExplicit(query, key, value, mask, keep, scale, fill, fill_adds_mask));
}

}  // namespace

bool cudaAttentionSupports(const at::Tensor& query, const at::Tensor& key,
                           const at::Tensor& value) {
  return unsupportedReason(query.scalar_type(), query.size(-1), value.size(-1),
                           query.sizes().slice(0, query.dim() - 2), query.size(-2),
                           key.size(-2))
      .empty();
}

TORCH_LIBRARY_IMPL(kiln, CUDA, m) {
  m.impl("attention", &attentionCuda);
  m.impl("attention_explicit", &attentionExplicitCuda);
}

#else

bool cudaAttentionSupports(const at::Tensor&, const at::Tensor&, const at::Tensor&) { return false; }

#endif

}  // namespace kiln
