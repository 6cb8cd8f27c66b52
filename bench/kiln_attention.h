// kiln::attention through the dispatcher, as the attention benchmarks call it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

namespace kiln::bench {

inline at::Tensor kilnAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                bool causal) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("kiln::attention", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, std::optional<double>, bool, bool)>();
  return op.call(q, k, v, std::nullopt, std::nullopt, causal, false);
}

}  // namespace kiln::bench
