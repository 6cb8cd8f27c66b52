// kiln::optimize'd modules for the library-call tests (library_ops_test.cpp,
// measured_choice_test.cpp): a linear module and its eager twin, optimized without convolution
// regions, and their results compared.
#pragma once

#include <gtest/gtest.h>
#include <torch/script.h>

#include <cmath>
#include <string>
#include <vector>

#include "kiln/kiln.h"
#include "kiln/options.h"
#include "support/graph_testing.h"

namespace kiln::testing {

// These tests are of the library calls themselves: kiln::optimize without convolution regions
// (conv_region_test.cpp has those).
inline torch::jit::Module optimize(const torch::jit::Module& module) {
  Options options = Options::global();
  options.conv_regions = false;
  return kiln::optimize(module, options);
}

// A module whose forward is `body`, with parameters w [n, k], b [n], and its eager twin: the same
// module not optimized. Each test defines its own class name: scripted modules of one class share
// their compiled methods.
inline torch::jit::Module linearModule(const std::string& name, const std::string& body, int64_t k, int64_t n,
                                at::ScalarType dtype = at::kFloat) {
  torch::jit::Module m(name);
  m.register_parameter("w", (torch::randn({n, k}) / std::sqrt(static_cast<double>(k))).to(dtype), false);
  m.register_parameter("b", torch::randn({n}).to(dtype), false);
  m.define(body);
  m.eval();
  return m;
}

inline at::Tensor forward(torch::jit::Module& m, std::vector<c10::IValue> inputs) { return m.forward(std::move(inputs)).toTensor(); }

inline void expectClose(const at::Tensor& actual, const at::Tensor& expected, double scale, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  EXPECT_TRUE(closeTo(actual, expected, scale).all().item<bool>())
      << what << ": max diff " << (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
}

}  // namespace kiln::testing
