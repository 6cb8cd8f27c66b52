// The CPU kernel behind kiln::attention: a blocked online-softmax (FlashAttention-style) loop that
// never materializes the query x key score matrix. torch_ops/attention_op.cpp validates inputs,
// broadcasts them and fills AttentionProblem; the kernel reads every operand through its strides.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace kiln::cpu {

// One [rows, cols] matrix per flattened batch index (all leading dims, heads included), read
// through arbitrary strides: a [B, S, H, D] tensor viewed as [B, H, S, D] is never copied.
struct StridedMatrices {
  const void* data = nullptr;
  std::vector<int64_t> batch_offsets;  // elements, one per flattened batch index
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

enum class MaskKind {
  kNone,
  kKeep,      // bool: true keeps the score, false drops it (as scaled_dot_product_attention)
  kAdditive,  // floating point, added to the scaled scores
};

struct AttentionProblem {
  c10::ScalarType dtype = c10::ScalarType::Float;  // of query, key, value and the output
  int64_t batch = 0;                               // product of all leading dims
  int64_t query_len = 0;
  int64_t key_len = 0;
  int64_t head_dim = 0;   // of query and key
  int64_t value_dim = 0;  // of value and the output
  StridedMatrices query;  // [query_len, head_dim]
  StridedMatrices key;    // [key_len, head_dim]
  StridedMatrices value;  // [key_len, value_dim]
  MaskKind mask_kind = MaskKind::kNone;
  c10::ScalarType mask_dtype = c10::ScalarType::Bool;
  StridedMatrices mask;  // [query_len, key_len], usually with zero (broadcast) strides
  bool causal = false;   // keep key j for query i only when j <= i (top-left aligned)
  double scale = 1.0;
  // The explicit matmul/softmax form (kiln::attention_explicit): where `fill_keep` is false the
  // score becomes `fill` (plus the additive mask when fill_adds_mask), as masked_fill or where
  // left it in the original graph. A finite fill still takes part in the softmax.
  bool has_fill_keep = false;
  StridedMatrices fill_keep;  // bool [query_len, key_len]
  double fill = 0.0;          // already rounded to dtype, as eager rounds it into the scores
  bool fill_adds_mask = false;
  // A query whose every score is -inf: 0 as scaled_dot_product_attention gives (false), or NaN as
  // softmax gives in the explicit form (true).
  bool empty_rows_nan = false;
  // The explicit form in float16 or bfloat16, whose graph holds the scores in that dtype: each
  // scaled, masked score is rounded to it (a row of finfo.min-masked scores then ties as in eager).
  bool scores_in_dtype = false;
  void* output = nullptr;  // [batch, query_len, value_dim] at these offsets and row stride:
  std::vector<int64_t> output_offsets;  // elements, one per flattened batch index; empty: contiguous
  int64_t output_row_stride = 0;        // 0: value_dim (columns are always adjacent)
};

// The instruction sets the kernel is compiled for (torch_ops/cpu/attention_kernel.cpp is built
// once per set, as ATen builds its CPU kernels). kAmx: bfloat16 runs on AMX tiles
// (torch_ops/cpu/attention_amx.cpp), every other dtype as kAvx512.
enum class CpuIsa { kDefault, kAvx2, kAvx512, kAmx };

// The best set this CPU runs, capped by ATEN_CPU_CAPABILITY (default|avx2|avx512) like ATen.
// AMX also needs the kernel's leave to use the tile registers, asked for once per process.
CpuIsa bestCpuIsa();
bool cpuIsaSupported(CpuIsa isa);
const char* cpuIsaName(CpuIsa isa);

// Pins one build for every later call (tests and benchmarks compare them); std::nullopt goes
// back to bestCpuIsa().
void overrideCpuIsa(std::optional<CpuIsa> isa);

// Writes problem.output. Runs in parallel over batch x query blocks on ATen's thread pool.
void attentionForward(const AttentionProblem& problem);
void attentionForward(const AttentionProblem& problem, CpuIsa isa);

}  // namespace kiln::cpu
