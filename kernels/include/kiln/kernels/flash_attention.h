// The CUDA fused attention kernel (FlashAttention-2 forward): torch-free parameters and launcher.
// torch_ops/attention_cuda.cpp fills AttentionParams from tensors and launches on torch's current
// stream. Any strides, except that the last (head) dim of q, k, v and the output is contiguous and
// every other stride and base pointer is 16-byte aligned (torch_ops/attention_cuda.cpp copies
// operands that are not).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace kiln::kernels {

enum class AttentionDtype { kHalf, kBFloat16 };
enum class MaskDtype { kNone, kBool, kFloat, kHalf, kBFloat16 };

constexpr int kMaxBatchDims = 4;
// Query blocks of 64 go in grid.y (at most 65535); key indices stay clear of int overflow.
constexpr int64_t kMaxQueryLen = 65535LL * 64;
constexpr int64_t kMaxKeyLen = 0x7fffffffLL - 128;

// A [batch..., rows, cols] operand: up to kMaxBatchDims batch strides (elements; zero where it is
// broadcast), then the row stride; the column stride is 1 for q, k, v and the output.
struct StridedOperand {
  const void* data = nullptr;
  int64_t batch_strides[kMaxBatchDims] = {0, 0, 0, 0};
  int64_t row_stride = 0;
  int64_t col_stride = 1;  // masks only; 1 elsewhere
};

struct AttentionParams {
  AttentionDtype dtype = AttentionDtype::kHalf;
  int batch_rank = 0;                          // <= kMaxBatchDims
  int64_t batch_sizes[kMaxBatchDims] = {1, 1, 1, 1};
  int64_t batch = 1;                           // product of batch_sizes
  int query_len = 0;
  int key_len = 0;
  int head_dim = 0;  // of q, k, v and the output: 32, 64, 96 or 128
  StridedOperand query, key, value;
  void* output = nullptr;
  int64_t output_batch_strides[kMaxBatchDims] = {0, 0, 0, 0};
  int64_t output_row_stride = 0;
  float scale = 1.0f;
  bool causal = false;  // key j is kept for query i only when j <= i (top-left aligned)
  // Added to the scaled scores (float kinds) or, for kBool, true keeps a score.
  MaskDtype mask_dtype = MaskDtype::kNone;
  StridedOperand mask;
  // The explicit matmul/softmax form: where fill_keep is false the score becomes fill (plus the
  // additive mask when fill_adds_mask). nullptr when absent.
  StridedOperand fill_keep;
  float fill = 0.0f;
  bool fill_adds_mask = false;
  bool empty_rows_nan = false;  // a query whose every score is -inf: NaN (softmax) or 0 (SDPA)
  // The explicit form, whose graph holds the scores in the inputs' dtype: each scaled, masked
  // score is rounded to it (a row of finfo.min-masked scores then ties as in eager: -65504 plus a
  // score is -65504 in float16, not in float32).
  bool scores_in_dtype = false;
};

// Head dims with a compiled kernel.
bool flashAttentionSupportsHeadDim(int head_dim);

// Launches on `stream`; returns the launch's error (cudaSuccess when queued).
cudaError_t flashAttentionForward(const AttentionParams& params, cudaStream_t stream);

}  // namespace kiln::kernels
