// The masks of an attention problem applied to a block of scores, shared by the CPU kernels
// (attention_kernel.cpp lays scores out key x query, attention_amx.cpp query x key; each TU
// compiles these for its own instruction set, hence the anonymous namespace).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <limits>
#include <type_traits>

#include "torch_ops/attention_cpu.h"

namespace kiln::cpu {
namespace {

// Calls f with a null pointer of the C++ type of a mask dtype (bool or a floating type).
template <typename F>
void withMaskType(c10::ScalarType dtype, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Bool:
      return f(static_cast<const bool*>(nullptr));
    case c10::ScalarType::Float:
      return f(static_cast<const float*>(nullptr));
    case c10::ScalarType::Double:
      return f(static_cast<const double*>(nullptr));
    case c10::ScalarType::BFloat16:
      return f(static_cast<const c10::BFloat16*>(nullptr));
    case c10::ScalarType::Half:
      return f(static_cast<const c10::Half*>(nullptr));
    default:
      TORCH_INTERNAL_ASSERT(false, "kiln::attention: unexpected mask dtype ", dtype);
  }
}

// scores[i * query_step + j * key_step] (+)= mask[query0 + i][key0 + j] for the block's valid
// queries i and keys j.
template <typename mask_t, typename acc_t>
void applyMask(const AttentionProblem& problem, int64_t batch_index, int64_t query0,
               int64_t query_count, int64_t key0, int64_t key_count, acc_t* scores,
               int64_t query_step, int64_t key_step) {
  const StridedMatrices& mask = problem.mask;
  const mask_t* base = static_cast<const mask_t*>(mask.data) + mask.batch_offsets[batch_index] +
                       query0 * mask.row_stride + key0 * mask.col_stride;
  constexpr acc_t kMinusInfinity = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < query_count; ++i) {
    const mask_t* row = base + i * mask.row_stride;
    acc_t* query_scores = scores + i * query_step;
    if constexpr (std::is_same_v<mask_t, bool>) {
      for (int64_t j = 0; j < key_count; ++j)
        if (!row[j * mask.col_stride]) query_scores[j * key_step] = kMinusInfinity;
    } else {
      for (int64_t j = 0; j < key_count; ++j)
        query_scores[j * key_step] += static_cast<acc_t>(row[j * mask.col_stride]);
    }
  }
}

template <typename acc_t>
void applyMask(const AttentionProblem& problem, int64_t batch_index, int64_t query0,
               int64_t query_count, int64_t key0, int64_t key_count, acc_t* scores,
               int64_t query_step, int64_t key_step) {
  if (problem.mask_kind == MaskKind::kNone) return;
  const auto apply = [&](auto typed_null) {
    using mask_t = std::remove_const_t<std::remove_pointer_t<decltype(typed_null)>>;
    applyMask<mask_t, acc_t>(problem, batch_index, query0, query_count, key0, key_count, scores,
                             query_step, key_step);
  };
  withMaskType(problem.mask_dtype, apply);
}

// Where fill_keep is false the score becomes the fill, plus the additive mask when the original
// graph added the mask after masked_fill/where.
template <typename mask_t, typename acc_t>
void applyFill(const AttentionProblem& problem, int64_t batch_index, int64_t query0,
               int64_t query_count, int64_t key0, int64_t key_count, acc_t* scores,
               int64_t query_step, int64_t key_step) {
  const StridedMatrices& keep = problem.fill_keep;
  const bool* keep_base = static_cast<const bool*>(keep.data) + keep.batch_offsets[batch_index] +
                          query0 * keep.row_stride + key0 * keep.col_stride;
  const StridedMatrices& mask = problem.mask;
  const mask_t* mask_base = nullptr;
  if (problem.fill_adds_mask)
    mask_base = static_cast<const mask_t*>(mask.data) + mask.batch_offsets[batch_index] +
                query0 * mask.row_stride + key0 * mask.col_stride;
  const acc_t fill = static_cast<acc_t>(problem.fill);
  for (int64_t i = 0; i < query_count; ++i) {
    const bool* keep_row = keep_base + i * keep.row_stride;
    acc_t* query_scores = scores + i * query_step;
    for (int64_t j = 0; j < key_count; ++j) {
      if (keep_row[j * keep.col_stride]) continue;
      acc_t value = fill;
      if (mask_base != nullptr)
        value += static_cast<acc_t>(mask_base[i * mask.row_stride + j * mask.col_stride]);
      query_scores[j * key_step] = value;
    }
  }
}

template <typename acc_t>
void applyMasks(const AttentionProblem& problem, int64_t batch_index, int64_t query0,
                int64_t query_count, int64_t key0, int64_t key_count, acc_t* scores,
                int64_t query_step, int64_t key_step) {
  applyMask(problem, batch_index, query0, query_count, key0, key_count, scores, query_step,
            key_step);
  if (!problem.has_fill_keep) return;
  const auto apply = [&](auto typed_null) {
    using mask_t = std::remove_const_t<std::remove_pointer_t<decltype(typed_null)>>;
    applyFill<mask_t, acc_t>(problem, batch_index, query0, query_count, key0, key_count, scores,
                             query_step, key_step);
  };
  // The additive mask's dtype matters only when the fill adds it (an additive mask is never bool).
  withMaskType(problem.fill_adds_mask ? problem.mask_dtype : c10::ScalarType::Float, apply);
}

// problem.scores_in_dtype: each valid score of the block rounded to the problem's dtype.
template <typename acc_t>
void roundScores(const AttentionProblem& problem, int64_t query_count, int64_t key_count,
                 acc_t* scores, int64_t query_step, int64_t key_step) {
  if (!problem.scores_in_dtype) return;
  const auto round = [&](auto typed_zero) {
    using dtype_t = decltype(typed_zero);
    for (int64_t i = 0; i < query_count; ++i)
      for (int64_t j = 0; j < key_count; ++j) {
        acc_t& score = scores[i * query_step + j * key_step];
        score = static_cast<acc_t>(static_cast<float>(dtype_t(static_cast<float>(score))));
      }
  };
  if (problem.dtype == c10::ScalarType::Half) round(c10::Half());
  if (problem.dtype == c10::ScalarType::BFloat16) round(c10::BFloat16());
}

}  // namespace
}  // namespace kiln::cpu
