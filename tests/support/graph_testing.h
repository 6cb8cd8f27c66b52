// Helpers for fuser tests: parse TorchScript IR, run a graph with the interpreter, and compare
// tensors with dtype-fit tolerances.
#pragma once

#include <gtest/gtest.h>
#include <torch/csrc/jit/ir/irparser.h>
#include <torch/csrc/jit/runtime/interpreter.h>
#include <torch/jit.h>
#include <torch/script.h>

#include <string>
#include <vector>

#include "kiln/kiln.h"

namespace kiln::testing {

inline std::shared_ptr<torch::jit::Graph> parseGraph(const std::string& text) {
  auto graph = std::make_shared<torch::jit::Graph>();
  torch::jit::parseIR(text, graph.get(), /*parse_tensor_constants=*/true);
  return graph;
}

inline std::vector<c10::IValue> runGraph(const std::shared_ptr<torch::jit::Graph>& graph,
                                         std::vector<c10::IValue> inputs) {
  torch::jit::Code code(graph, "test");
  torch::jit::InterpreterState state(code);
  state.run(inputs);
  if (inputs.size() == 1 && inputs[0].isTuple()) {
    auto elements = inputs[0].toTupleRef().elements();
    return std::vector<c10::IValue>(elements.begin(), elements.end());
  }
  return inputs;
}

inline Options testOptions(int min_group_size = 2) {
  Options options = Options::fromEnvironment();
  options.disabled = false;
  options.min_group_size = min_group_size;
  return options;
}

// Function `f` of TorchScript `source` as a graph: fused by kiln, or as written.
inline std::shared_ptr<torch::jit::Graph> fusedFunction(const std::string& source, int min_group_size = 2) {
  auto unit = torch::jit::compile(source);
  std::shared_ptr<torch::jit::Graph> graph = torch::jit::toGraphFunction(unit->get_function("f")).graph()->copy();
  fuse(graph, testOptions(min_group_size));
  return graph;
}

inline std::shared_ptr<torch::jit::Graph> plainFunction(const std::string& source) {
  auto unit = torch::jit::compile(source);
  return torch::jit::toGraphFunction(unit->get_function("f")).graph()->copy();
}

// The counters of a graph's one group. They are shared by every graph with the same group in
// this process: tests look at how they change.
struct GroupCounts {
  int64_t calls = 0, fallbacks = 0;
};
inline GroupCounts groupCounts(const std::shared_ptr<torch::jit::Graph>& graph) {
  Report r = report(graph);
  EXPECT_EQ(r.groups.size(), 1u);
  return r.groups.empty() ? GroupCounts{} : GroupCounts{r.groups[0].calls, r.groups[0].fallbacks};
}

inline std::pair<double, double> tolerances(at::ScalarType type) {
  switch (type) {
    case at::kHalf: return {2e-3, 2e-3};
    case at::kBFloat16: return {1.6e-2, 1.6e-2};
    case at::kFloat: return {2e-5, 2e-5};
    case at::kDouble: return {1e-12, 1e-12};
    default: return {0, 0};
  }
}

// Where `actual` is within tolerance of `expected` (NaN where it has NaN), elementwise.
inline at::Tensor closeTo(const at::Tensor& actual, const at::Tensor& expected, double tolerance_scale) {
  auto [rtol, atol] = tolerances(expected.scalar_type());
  at::Tensor a = actual.to(at::kDouble);
  at::Tensor e = expected.to(at::kDouble);
  return ((a - e).abs() <= atol * tolerance_scale + rtol * tolerance_scale * e.abs()) | (a.isnan() & e.isnan()) | (a == e);
}

// Same dtype, shape, and values within tolerance (NaN where eager has NaN).
inline ::testing::AssertionResult sameTensor(const at::Tensor& actual, const at::Tensor& expected,
                                             double tolerance_scale = 1.0,
                                             const at::Tensor& alternate = at::Tensor()) {
  if (actual.scalar_type() != expected.scalar_type()) {
    return ::testing::AssertionFailure() << "dtype " << actual.scalar_type() << " vs eager "
                                         << expected.scalar_type();
  }
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " vs eager " << expected.sizes();
  }
  at::Tensor a = actual.to(at::kDouble);
  at::Tensor e = expected.to(at::kDouble);
  at::Tensor close = closeTo(actual, expected, tolerance_scale);
  if (alternate.defined()) close = close | closeTo(actual, alternate, tolerance_scale);
  if (close.all().item<bool>()) return ::testing::AssertionSuccess();
  at::Tensor bad = (~close).flatten().nonzero();
  int64_t first = bad[0][0].item<int64_t>();
  return ::testing::AssertionFailure()
         << bad.size(0) << " of " << close.numel() << " elements differ; first at flat index " << first
         << ": kiln " << a.flatten()[first].item<double>() << " vs eager " << e.flatten()[first].item<double>();
}

// Each element of `actual` matches `expected` or `alternate`: for ops where eager's own result
// depends on which of its loops computed an element (see OpCase::opmath_expression).
inline ::testing::AssertionResult sameTensorAsEither(const at::Tensor& actual, const at::Tensor& expected,
                                                     const at::Tensor& alternate, double tolerance_scale = 1.0) {
  return sameTensor(actual, expected, tolerance_scale, alternate);
}

}  // namespace kiln::testing
