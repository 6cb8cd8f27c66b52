// kiln's attention operators called through the dispatcher, and the float64 math reference the
// tests compare them with (on the inputs' device). Shared by the CPU, pattern and GPU tests.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <limits>
#include <optional>

namespace kiln::testing {

inline at::Tensor attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& mask = std::nullopt,
                            std::optional<double> scale = std::nullopt, bool causal = false,
                            bool heads_last = false) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kiln::attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, std::optional<double>, bool, bool)>();
  return op.call(query, key, value, mask, scale, causal, heads_last);
}

inline at::Tensor attentionExplicit(const at::Tensor& query, const at::Tensor& key,
                                    const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                    const std::optional<at::Tensor>& keep, double scale, double fill,
                                    bool fill_adds_mask, bool heads_last = false) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kiln::attention_explicit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            double, double, bool, bool)>();
  return op.call(query, key, value, mask, keep, scale, fill, fill_adds_mask, heads_last);
}

// softmax(q k^T * scale + mask) v in float64, with scaled_dot_product_attention's conventions:
// bool masks keep where true, causal keeps key j <= query i (top-left), a query that keeps no
// key gets 0.
inline at::Tensor attentionReference(const at::Tensor& query, const at::Tensor& key,
                                     const at::Tensor& value,
                                     const std::optional<at::Tensor>& mask = std::nullopt,
                                     std::optional<double> scale = std::nullopt,
                                     bool causal = false) {
  const double factor = scale.value_or(1.0 / std::sqrt(static_cast<double>(query.size(-1))));
  at::Tensor scores =
      at::matmul(query.to(at::kDouble), key.to(at::kDouble).transpose(-2, -1)) * factor;
  const double minus_infinity = -std::numeric_limits<double>::infinity();
  if (mask.has_value()) {
    scores = mask->scalar_type() == at::kBool
                 ? scores.masked_fill(mask->logical_not(), minus_infinity)
                 : scores + mask->to(at::kDouble);
  }
  if (causal) {
    at::Tensor keep =
        at::ones({query.size(-2), key.size(-2)}, query.options().dtype(at::kBool)).tril();
    scores = scores.masked_fill(keep.logical_not(), minus_infinity);
  }
  at::Tensor kept_any = (scores != minus_infinity).any(-1, /*keepdim=*/true);
  at::Tensor probs = at::where(kept_any, at::softmax(scores, -1), at::zeros({}, scores.options()));
  return at::matmul(probs, value.to(at::kDouble));
}

}  // namespace kiln::testing
