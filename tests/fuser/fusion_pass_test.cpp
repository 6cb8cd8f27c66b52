// The fusion pass, text in / text out: TorchScript IR parsed from strings, the pass run,
// FileCheck on the result; and the fused graph's output against the original's.
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>

#include "support/graph_testing.h"

namespace kiln {
namespace {

using torch::jit::testing::FileCheck;
using namespace kiln::testing;

std::shared_ptr<torch::jit::Graph> fused(const std::string& text, int min_group_size = 2) {
  auto graph = parseGraph(text);
  fuse(graph, testOptions(min_group_size));
  graph->lint();
  return graph;
}

void expectSameOutputs(const std::string& text, std::vector<c10::IValue> inputs) {
  auto original = parseGraph(text);
  auto graph = fused(text);
  std::vector<c10::IValue> expected = runGraph(original, inputs);
  std::vector<c10::IValue> actual = runGraph(graph, inputs);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_TRUE(sameTensor(actual[i].toTensor(), expected[i].toTensor())) << "output " << i;
  }
}

TEST(FusionPass, ChainBecomesOneGuardedGroupWithFallback) {
  auto graph = fused(R"IR(
graph(%x : Tensor, %y : Tensor):
  %one : int = prim::Constant[value=1]()
  %a : Tensor = aten::mul(%x, %y)
  %b : Tensor = aten::add(%a, %y, %one)
  %c : Tensor = aten::relu(%b)
  return (%c))IR");
  FileCheck()
      .check("kiln::fusion_guard")
      ->check("prim::If")
      ->check("kiln::fusion_group")
      ->check("aten::mul")  // the fallback block
      ->check("aten::add")
      ->check("aten::relu")
      ->run(*graph);
  // Exactly one group, and the subgraph text names all three ops in order.
  Report r = report(graph);
  ASSERT_EQ(r.groups.size(), 1u);
  EXPECT_EQ(r.groups[0].ops, (std::vector<std::string>{"aten::mul", "aten::add", "aten::relu"}));
}

TEST(FusionPass, NonFusibleOpSplitsGroupsAndSingletonsStayUnfused) {
  auto graph = fused(R"IR(
graph(%x : Tensor, %y : Tensor):
  %a : Tensor = aten::mul(%x, %y)
  %b : Tensor = aten::matmul(%a, %y)
  %c : Tensor = aten::sigmoid(%b)
  return (%c))IR");
  FileCheck().check_not("kiln::fusion_group")->run(*graph);
  FileCheck().check("aten::mul")->check("aten::matmul")->check("aten::sigmoid")->run(*graph);
}

TEST(FusionPass, DiamondFusesIntoOneGroup) {
  const char* text = R"IR(
graph(%x : Tensor, %y : Tensor):
  %one : int = prim::Constant[value=1]()
  %a : Tensor = aten::mul(%x, %y)
  %b : Tensor = aten::exp(%a)
  %c : Tensor = aten::sin(%a)
  %d : Tensor = aten::add(%b, %c, %one)
  return (%d))IR";
  auto graph = fused(text);
  Report r = report(graph);
  ASSERT_EQ(r.groups.size(), 1u);
  EXPECT_EQ(r.groups[0].ops.size(), 4u);
  expectSameOutputs(text, {torch::randn({4, 5}), torch::randn({4, 5})});
}

TEST(FusionPass, MultiOutputGroupWhenIntermediateIsUsedOutside) {
  const char* text = R"IR(
graph(%x : Tensor, %y : Tensor):
  %one : int = prim::Constant[value=1]()
  %a : Tensor = aten::mul(%x, %y)
  %b : Tensor = aten::tanh(%a)
  %c : Tensor = aten::add(%b, %x, %one)
  %m : Tensor = aten::matmul(%a, %c)
  return (%m))IR";
  auto graph = fused(text);
  Report r = report(graph);
  ASSERT_EQ(r.groups.size(), 1u);
  EXPECT_EQ(r.groups[0].num_outputs, 2);
  FileCheck().check("kiln::fusion_group")->check("Tensor, %")->check("prim::ListUnpack")->check("aten::matmul")->run(*graph);
  expectSameOutputs(text, {torch::randn({6, 6}), torch::randn({6, 6})});
}

TEST(FusionPass, FusesInsideIfAndLoopBodies) {
  const char* text = R"IR(
graph(%x : Tensor, %cond : bool, %n : int):
  %one : int = prim::Constant[value=1]()
  %true : bool = prim::Constant[value=1]()
  %r : Tensor = prim::If(%cond)
    block0():
      %a : Tensor = aten::mul(%x, %x)
      %b : Tensor = aten::sigmoid(%a)
      -> (%b)
    block1():
      %c : Tensor = aten::neg(%x)
      -> (%c)
  %out : Tensor = prim::Loop(%n, %true, %r)
    block0(%i : int, %acc : Tensor):
      %d : Tensor = aten::add(%acc, %x, %one)
      %e : Tensor = aten::tanh(%d)
      -> (%true, %e)
  return (%out))IR";
  auto graph = fused(text);
  EXPECT_EQ(report(graph).groups.size(), 2u);
  FileCheck().check("prim::If")->check("kiln::fusion_group")->check("prim::Loop")->check("kiln::fusion_group")->run(*graph);
  for (bool cond : {true, false}) {
    expectSameOutputs(text, {torch::randn({3, 7}), cond, static_cast<int64_t>(3)});
  }
}

TEST(FusionPass, NeverMovesReadsAcrossAnInPlaceWrite) {
  // %a reads %x before add_ writes it; fusing mul with the later add would read the new %x.
  const char* text = R"IR(
graph(%x : Tensor, %y : Tensor):
  %one : int = prim::Constant[value=1]()
  %a : Tensor = aten::mul(%x, %y)
  %w : Tensor = aten::add_(%x, %y, %one)
  %b : Tensor = aten::add(%a, %x, %one)
  %c : Tensor = aten::exp(%b)
  return (%c))IR";
  auto graph = fused(text);
  FileCheck().check("aten::mul")->check("aten::add_")->check("kiln::fusion_group")->run(*graph);
  auto original = parseGraph(text);
  at::Tensor x = torch::randn({5}), y = torch::randn({5});
  at::Tensor expected = runGraph(original, {x.clone(), y})[0].toTensor();
  at::Tensor actual = runGraph(graph, {x.clone(), y})[0].toTensor();
  EXPECT_TRUE(sameTensor(actual, expected));
}

TEST(FusionPass, AliasingConversionNotFusedWhenItsResultIsMutated) {
  const char* text = R"IR(
graph(%x : Tensor):
  %one : int = prim::Constant[value=1]()
  %dtype : int = prim::Constant[value=6]()
  %false : bool = prim::Constant[value=0]()
  %none : NoneType = prim::Constant()
  %a : Tensor = aten::to(%x, %dtype, %false, %false, %none)
  %w : Tensor = aten::add_(%a, %one, %one)
  %b : Tensor = aten::mul(%x, %x)
  %c : Tensor = aten::exp(%b)
  return (%c, %a))IR";
  auto graph = fused(text);
  // to() may return %x itself; add_ then writes %x, so to() must stay where it is, unfused.
  FileCheck().check("aten::to")->check("aten::add_")->run(*graph);
  at::Tensor x = torch::randn({4});
  auto expected = runGraph(parseGraph(text), {x.clone()});
  auto actual = runGraph(graph, {x.clone()});
  EXPECT_TRUE(sameTensor(actual[0].toTensor(), expected[0].toTensor()));
  EXPECT_TRUE(sameTensor(actual[1].toTensor(), expected[1].toTensor()));
}

TEST(FusionPass, ScalarInputsAreRuntimeArguments) {
  const char* text = R"IR(
graph(%x : Tensor, %s : float, %k : int):
  %two : int = prim::Constant[value=2]()
  %a : Tensor = aten::mul(%x, %s)
  %b : Tensor = aten::add(%a, %k, %two)
  %c : Tensor = aten::sub(%b, %s, %two)
  return (%c))IR";
  auto graph = fused(text);
  FileCheck().check("float[] = prim::ListConstruct(%s")->check("int[] = prim::ListConstruct(%k")->check("kiln::fusion_group")->run(*graph);
  expectSameOutputs(text, {torch::randn({8}), 0.25, static_cast<int64_t>(3)});
  expectSameOutputs(text, {torch::randn({8}), -2.5, static_cast<int64_t>(-1)});
}

TEST(FusionPass, MixedDevicesFallBackToEager) {
  // Device is checked at run time by the guard; a CPU-only kiln sends meta tensors to the fallback.
  const char* text = R"IR(
graph(%x : Tensor, %y : Tensor):
  %a : Tensor = aten::mul(%x, %y)
  %b : Tensor = aten::exp(%a)
  return (%b))IR";
  auto graph = fused(text);
  at::Tensor x = torch::randn({4}, at::TensorOptions().device(at::kMeta));
  auto outputs = runGraph(graph, {x, x});
  EXPECT_EQ(outputs[0].toTensor().device().type(), c10::DeviceType::Meta);
  EXPECT_EQ(report(graph).groups[0].fallbacks, 1);
}

TEST(FusionPass, RowReductionsJoinTheirPrologueAndEpilogue) {
  // BERT's residual add + layer_norm, its normalized_shape built from a constant as tracing
  // writes it, with an epilogue; and a softmax over dim 1 of a tensor the profile says is 3-D,
  // which is not its last dim: left to eager.
  const std::string text = R"IR(
graph(%x : Tensor, %y : Tensor, %w : Tensor, %b : Tensor, %z : Float(2, 3, 4)):
  %one : int = prim::Constant[value=1]()
  %len : int = prim::Constant[value=4]()
  %eps : float = prim::Constant[value=1e-12]()
  %cudnn : bool = prim::Constant[value=1]()
  %none : NoneType = prim::Constant()
  %shape : int[] = prim::ListConstruct(%len)
  %s : Tensor = aten::add(%x, %y, %one)
  %n : Tensor = aten::layer_norm(%s, %shape, %w, %b, %eps, %cudnn)
  %r : Tensor = aten::relu(%n)
  %t : Tensor = aten::mul(%z, %z)
  %u : Tensor = aten::softmax(%t, %one, %none)
  return (%r, %u))IR";
  auto graph = fused(text);
  FileCheck().check("kiln::fusion_guard")->check("kiln::fusion_group")->check("aten::layer_norm")  // the fallback
      ->check_not("kiln::fusion_guard")->check("aten::softmax")->run(*graph);
  Report r = report(graph);
  ASSERT_EQ(r.groups.size(), 1u);
  EXPECT_EQ(r.groups[0].ops, (std::vector<std::string>{"aten::add", "aten::layer_norm", "aten::relu"}));
  expectSameOutputs(text, {torch::randn({3, 4}), torch::randn({4}), torch::randn({4}), torch::randn({4}),
                           torch::randn({2, 3, 4})});
}

TEST(FusionPass, AReductionThatDropsItsDimEndsItsGroup) {
  const std::string text = R"IR(
graph(%x : Tensor, %y : Tensor):
  %dims : int[] = prim::Constant[value=[-1]]()
  %keep : bool = prim::Constant[value=0]()
  %none : NoneType = prim::Constant()
  %a : Tensor = aten::mul(%x, %y)
  %m : Tensor = aten::mean(%a, %dims, %keep, %none)
  %e : Tensor = aten::exp(%m)
  %f : Tensor = aten::neg(%e)
  return (%f))IR";
  auto graph = fused(text);
  Report r = report(graph);
  ASSERT_EQ(r.groups.size(), 2u) << *graph;
  EXPECT_EQ(r.groups[0].ops, (std::vector<std::string>{"aten::mul", "aten::mean"}));
  EXPECT_EQ(r.groups[1].ops, (std::vector<std::string>{"aten::exp", "aten::neg"}));
  expectSameOutputs(text, {torch::randn({5, 7}), torch::randn({7})});
}

TEST(FusionPass, DisabledOptionLeavesGraphUntouched) {
  const char* text = R"IR(
graph(%x : Tensor):
  %a : Tensor = aten::exp(%x)
  %b : Tensor = aten::sin(%a)
  return (%b))IR";
  auto graph = parseGraph(text);
  Options options = testOptions();
  options.disabled = true;
  fuse(graph, options);
  FileCheck().check_not("kiln::")->run(*graph);
}

}  // namespace
}  // namespace kiln
