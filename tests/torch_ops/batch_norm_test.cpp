// Eval-mode batch_norm fused with its neighbours (the conv → bn → relu tail of CNNs), against
// eager on fresh random inputs: ranks 2 to 5, weight/bias present or None, float32, float64,
// bfloat16 (float parameters, as eager's mixed-dtype kernel allows), non-contiguous inputs, and a
// channel mismatch that must raise eager's error through the fallback.
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>
#include <torch/jit.h>

#include "support/graph_testing.h"

namespace kiln {
namespace {

using namespace kiln::testing;

constexpr const char* kSource = R"JIT(
def with_affine(x, w, b, mean, var):
    return torch.relu(torch.batch_norm(x, w, b, mean, var, False, 0.1, 1e-3, False) + 0.5)

def without_affine(x, mean, var):
    return torch.batch_norm(x * 2.0, None, None, mean, var, False, 0.1, 1e-5, False).sigmoid()

def params_from_ops(x, w, b, mean, var):
    return torch.batch_norm(x.tanh(), w * 2.0, b, mean, var.abs() + 0.5, False, 0.1, 1e-5, False) - x
)JIT";

struct Params {
  at::Tensor w, b, mean, var;
};

Params randomParams(int64_t channels, at::ScalarType dtype) {
  auto options = at::TensorOptions().dtype(dtype);
  return {torch::randn({channels}, options), torch::randn({channels}, options), torch::randn({channels}, options),
          torch::rand({channels}, options) + 0.1};
}

std::shared_ptr<torch::jit::Graph> graphOf(const std::string& name) {
  static auto unit = torch::jit::compile(kSource);
  return torch::jit::toGraphFunction(unit->get_function(name)).graph()->copy();
}

void expectFusedMatchesEager(const std::string& name, const std::vector<c10::IValue>& inputs, size_t groups = 1) {
  std::shared_ptr<torch::jit::Graph> original = graphOf(name);
  std::shared_ptr<torch::jit::Graph> graph = graphOf(name);
  fuse(graph, testOptions());
  Report before = report(graph);
  ASSERT_EQ(before.groups.size(), groups) << *graph;
  auto expected = runGraph(original, inputs);
  auto actual = runGraph(graph, inputs);
  ASSERT_TRUE(sameTensor(actual[0].toTensor(), expected[0].toTensor(), 2.0));
  Report after = report(graph);
  for (const GroupReport& group : after.groups) {
    EXPECT_EQ(group.fallbacks, 0) << "took the fallback";
    EXPECT_GT(group.calls, 0);
  }
}

TEST(BatchNorm, EveryRankFusedWithItsNeighbours) {
  for (std::vector<int64_t> shape : std::vector<std::vector<int64_t>>{{6, 5}, {4, 5, 9}, {2, 5, 7, 3}, {2, 5, 3, 2, 4}}) {
    SCOPED_TRACE("rank " + std::to_string(shape.size()));
    Params p = randomParams(5, at::kFloat);
    at::Tensor x = torch::randn(shape);
    expectFusedMatchesEager("with_affine", {x, p.w, p.b, p.mean, p.var});
    expectFusedMatchesEager("without_affine", {x, p.mean, p.var});
  }
}

TEST(BatchNorm, DtypesAndLayouts) {
  Params p = randomParams(8, at::kFloat);
  // channels-last NHWC memory viewed as NCHW, and a sliced batch
  at::Tensor channels_last = torch::randn({2, 6, 5, 8}).permute({0, 3, 1, 2});
  at::Tensor sliced = torch::randn({4, 8, 6, 5}).slice(0, 0, 4, 2);
  expectFusedMatchesEager("with_affine", {channels_last, p.w, p.b, p.mean, p.var});
  expectFusedMatchesEager("with_affine", {sliced, p.w, p.b, p.mean, p.var});
  Params d = randomParams(8, at::kDouble);
  expectFusedMatchesEager("with_affine", {torch::randn({3, 8, 4}, at::kDouble), d.w, d.b, d.mean, d.var});
  // bfloat16 input with float32 parameters (eager's mixed-dtype path), and all-bfloat16
  expectFusedMatchesEager("with_affine", {torch::randn({3, 8, 4}).to(at::kBFloat16), p.w, p.b, p.mean, p.var});
  Params h = randomParams(8, at::kBFloat16);
  expectFusedMatchesEager("with_affine", {torch::randn({3, 8, 4}).to(at::kBFloat16), h.w, h.b, h.mean, h.var});
}

TEST(BatchNorm, ParametersComputedByOpsStayOutsideTheGroup) {
  Params p = randomParams(5, at::kFloat);
  std::shared_ptr<torch::jit::Graph> graph = graphOf("params_from_ops");
  fuse(graph, testOptions());
  // w * 2.0 and var.abs() + 0.5 are fusible but feed per-channel operands: they stay out of the
  // batch_norm group (abs + add make a group of their own; the lone mul runs unfused).
  torch::jit::testing::FileCheck()
      .check("aten::mul")->check("kiln::fusion_guard")->check("kiln::fusion_guard")->check("aten::batch_norm")
      ->run(*graph);
  expectFusedMatchesEager("params_from_ops", {torch::randn({3, 5, 4}), p.w, p.b, p.mean, p.var}, 2);
}

TEST(BatchNorm, ChannelMismatchRaisesEagersError) {
  Params p = randomParams(5, at::kFloat);
  std::shared_ptr<torch::jit::Graph> graph = graphOf("with_affine");
  fuse(graph, testOptions());
  at::Tensor wrong = torch::randn({3, 4, 6});  // 4 channels, parameters for 5
  // A single channel must not broadcast to five either.
  for (const at::Tensor& x : {wrong, torch::randn({3, 1, 6})}) {
    try {
      runGraph(graph, {x, p.w, p.b, p.mean, p.var});
      ADD_FAILURE() << "no error for " << x.sizes();
    } catch (const std::exception& error) {
      EXPECT_NE(std::string(error.what()).find("running_mean should contain"), std::string::npos) << error.what();
    }
  }
}

TEST(BatchNorm, TrainingModeIsNotFused) {
  auto graph = parseGraph(R"IR(
graph(%x : Tensor, %w : Tensor, %b : Tensor, %mean : Tensor, %var : Tensor):
  %train : bool = prim::Constant[value=1]()
  %cudnn : bool = prim::Constant[value=0]()
  %momentum : float = prim::Constant[value=0.1]()
  %eps : float = prim::Constant[value=1e-05]()
  %y : Tensor = aten::batch_norm(%x, %w, %b, %mean, %var, %train, %momentum, %eps, %cudnn)
  %z : Tensor = aten::relu(%y)
  %q : Tensor = aten::sigmoid(%z)
  return (%q))IR");
  fuse(graph, testOptions());
  // Training mode updates the running statistics: batch_norm stays ahead of the relu-sigmoid group.
  torch::jit::testing::FileCheck().check("aten::batch_norm")->check("kiln::fusion_guard")->check("kiln::fusion_group")
      ->check_not("aten::batch_norm")->run(*graph);
}

}  // namespace
}  // namespace kiln
