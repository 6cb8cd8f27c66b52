// Failure containment and constants, end to end through the fused graph:
// - every constant kind torch makes (nan, ±inf, -0.0, subnormals, ints past 2^53) runs fused and
//   gives eager's bits;
// - a fault injected at each stage of a group's life (decode, lower, guard, compile, load,
//   launch) sends the group to its original ops for good with one warning, never an exception.
#include <gtest/gtest.h>
#include <torch/csrc/jit/ir/constants.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cmath>
#include <random>
#include <sstream>

#include "codegen/fault_injection.h"
#include "support/graph_testing.h"

namespace kiln {
namespace {

using namespace kiln::testing;
using torch::jit::Graph;

// Sets libkiln's fault switch (its own copy of codegen; this binary links another).
void setLibraryFault(FaultStage stage) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::_inject_fault", "").typed<void(const std::string&)>();
  op.call(faultStageName(stage));
}

// Replaces the constant whose value is `placeholder` (a float or int) by `value`.
void setConstant(Graph& graph, double placeholder, const c10::IValue& value) {
  for (torch::jit::Node* node : graph.nodes()) {
    if (node->kind() != torch::jit::prim::Constant) continue;
    auto current = torch::jit::toIValue(node->output());
    if (!current || !(current->isDouble() || current->isInt()) || current->toScalar().toDouble() != placeholder) continue;
    torch::jit::WithInsertPoint point(node);
    node->output()->replaceAllUsesWith(graph.insertConstant(value));
    node->destroy();
    return;
  }
  FAIL() << "no constant " << placeholder;
}

// Same dtype and shape, and the same bits in every element (any NaN matches any NaN).
::testing::AssertionResult sameBits(const at::Tensor& actual, const at::Tensor& expected) {
  if (actual.scalar_type() != expected.scalar_type() || actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "dtype/shape " << actual.scalar_type() << actual.sizes() << " vs eager "
                                         << expected.scalar_type() << expected.sizes();
  }
  at::Tensor a = actual.contiguous(), e = expected.contiguous();
  at::Tensor same;
  if (at::isFloatingType(a.scalar_type())) {
    at::ScalarType bits = a.element_size() == 8 ? at::kLong : a.element_size() == 4 ? at::kInt : at::kShort;
    same = a.view(bits).eq(e.view(bits)) | (a.isnan() & e.isnan());
  } else {
    same = a.eq(e);
  }
  if (same.all().item<bool>()) return ::testing::AssertionSuccess();
  int64_t first = (~same).flatten().nonzero()[0][0].item<int64_t>();
  std::ostringstream out;
  out << std::setprecision(17) << "element " << first << ": kiln " << a.flatten()[first].item() << " vs eager "
      << e.flatten()[first].item();
  return ::testing::AssertionFailure() << out.str();
}

struct ConstantCase {
  const char* name;
  const char* ir;      // placeholders: float 1001.5 (and 1002.5), int 1001
  std::vector<std::pair<double, c10::IValue>> constants;
  at::ScalarType dtype;
};

const int64_t kInt64Max = std::numeric_limits<int64_t>::max();
const int64_t kPast2To53 = (int64_t{1} << 53) + 1;

std::vector<ConstantCase> constantCases() {
  const char* add_scalar = R"IR(
graph(%x : Tensor, %m : Tensor):
  %c : float = prim::Constant[value=2.]()
  %d : float = prim::Constant[value=1001.5]()
  %one : int = prim::Constant[value=1]()
  %y : Tensor = aten::mul(%x, %c)
  %z : Tensor = aten::add(%y, %d, %one)
  return (%z))IR";
  const char* int_mul_add = R"IR(
graph(%x : Tensor, %m : Tensor):
  %c : int = prim::Constant[value=1001]()
  %one : int = prim::Constant[value=1]()
  %y : Tensor = aten::mul(%x, %c)
  %z : Tensor = aten::add(%y, %one, %one)
  return (%z))IR";
  return {
      {"add_nan", add_scalar, {{1001.5, std::nan("")}}, at::kFloat},
      {"add_inf", add_scalar, {{1001.5, INFINITY}}, at::kFloat},
      {"add_minus_inf", add_scalar, {{1001.5, -INFINITY}}, at::kDouble},
      {"add_subnormal", add_scalar, {{1001.5, 1e-310}}, at::kDouble},
      {"add_smallest_subnormal", add_scalar, {{1001.5, 5e-324}}, at::kDouble},
      {"where_nan", R"IR(
graph(%x : Tensor, %m : Tensor):
  %zero : float = prim::Constant[value=0.]()
  %d : float = prim::Constant[value=1001.5]()
  %c : Tensor = aten::gt(%x, %zero)
  %y : Tensor = aten::where(%c, %x, %d)
  %z : Tensor = aten::relu(%y)
  return (%z))IR", {{1001.5, std::nan("")}}, at::kFloat},
      {"clamp_min_nan", R"IR(
graph(%x : Tensor, %m : Tensor):
  %none : NoneType = prim::Constant()
  %d : float = prim::Constant[value=1001.5]()
  %y : Tensor = aten::clamp(%x, %d, %none)
  %z : Tensor = aten::neg(%y)
  return (%z))IR", {{1001.5, std::nan("")}}, at::kFloat},
      {"masked_fill_nan", R"IR(
graph(%x : Tensor, %m : Tensor):
  %d : float = prim::Constant[value=1001.5]()
  %y : Tensor = aten::masked_fill(%x, %m, %d)
  %z : Tensor = aten::abs(%y)
  return (%z))IR", {{1001.5, std::nan("")}}, at::kFloat},
      {"leaky_relu_subnormal_slope", R"IR(
graph(%x : Tensor, %m : Tensor):
  %d : float = prim::Constant[value=1001.5]()
  %c : float = prim::Constant[value=1e+300]()
  %y : Tensor = aten::leaky_relu(%x, %d)
  %z : Tensor = aten::mul(%y, %c)
  return (%z))IR", {{1001.5, 1e-310}}, at::kDouble},
      {"mul_minus_zero", R"IR(
graph(%x : Tensor, %m : Tensor):
  %d : float = prim::Constant[value=1001.5]()
  %y : Tensor = aten::mul(%x, %d)
  %z : Tensor = aten::relu(%y)
  return (%y, %z))IR", {{1001.5, -0.0}}, at::kFloat},
      {"int64_max", int_mul_add, {{1001, kInt64Max}}, at::kLong},
      {"int64_min", int_mul_add, {{1001, std::numeric_limits<int64_t>::min()}}, at::kLong},
      {"int_past_2_53", int_mul_add, {{1001, kPast2To53}}, at::kLong},
      {"int_past_2_53_on_float", int_mul_add, {{1001, kPast2To53}}, at::kFloat},
      {"alpha_past_2_53", R"IR(
graph(%x : Tensor, %m : Tensor):
  %alpha : int = prim::Constant[value=1001]()
  %y : Tensor = aten::add(%x, %x, %alpha)
  %z : Tensor = aten::neg(%y)
  return (%z))IR", {{1001, kPast2To53}}, at::kLong},
      {"clamp_ints_past_2_53", R"IR(
graph(%x : Tensor, %m : Tensor):
  %lo : int = prim::Constant[value=1001]()
  %hi : int = prim::Constant[value=1002]()
  %c : int = prim::Constant[value=1003]()
  %w : Tensor = aten::mul(%x, %c)
  %y : Tensor = aten::clamp(%w, %lo, %hi)
  return (%y))IR", {{1001, -kPast2To53}, {1002, kPast2To53 + 2}, {1003, int64_t{1} << 51}}, at::kLong},
  };
}

at::Tensor inputFor(at::ScalarType dtype) {
  if (dtype == at::kLong) {
    at::Tensor x = torch::randint(-5, 6, {64}, at::kLong);
    x[0] = -2;
    x[1] = 3;
    x[2] = 0;
    return x;
  }
  at::Tensor x = (torch::randn({64}) * 3).to(dtype);
  x[0] = 0.0;
  x[1] = -0.0;
  return x;
}

TEST(Constants, EveryKindRunsFusedWithEagersBits) {
  torch::NoGradGuard no_grad;
  for (const ConstantCase& c : constantCases()) {
    SCOPED_TRACE(c.name);
    std::shared_ptr<Graph> original = parseGraph(c.ir);
    for (const auto& [placeholder, value] : c.constants) setConstant(*original, placeholder, value);
    std::shared_ptr<Graph> graph = original->copy();
    fuse(graph, testOptions());
    ASSERT_EQ(report(graph).groups.size(), 1u) << *graph;
    at::Tensor x = inputFor(c.dtype), m = torch::rand({64}) > 0.5;
    std::vector<c10::IValue> expected = runGraph(original, {x, m});
    const GroupReport before = report(graph).groups[0];  // two cases may share one group code
    for (int call = 0; call < 3; ++call) {
      std::vector<c10::IValue> actual = runGraph(graph, {x, m});
      ASSERT_EQ(actual.size(), expected.size());
      for (size_t i = 0; i < actual.size(); ++i) EXPECT_TRUE(sameBits(actual[i].toTensor(), expected[i].toTensor()));
    }
    Report r = report(graph);
    EXPECT_EQ(r.groups[0].fallbacks, before.fallbacks) << "the group did not run fused";
    EXPECT_EQ(r.groups[0].calls, before.calls + 3);
  }
}

// Lines of `text` that are kiln warnings.
std::vector<std::string> warnings(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("kiln warning", 0) == 0) lines.push_back(line);
  }
  return lines;
}

class FaultInjection : public ::testing::TestWithParam<FaultStage> {
 protected:
  void TearDown() override { setLibraryFault(FaultStage::kNone); }
};

TEST_P(FaultInjection, GroupRunsItsOriginalOpsForGoodWithOneWarning) {
  torch::NoGradGuard no_grad;
  const FaultStage stage = GetParam();
  // A constant no other test uses, so this group is decoded, lowered and compiled afresh here.
  std::shared_ptr<Graph> original = parseGraph(R"IR(
graph(%x : Tensor, %y : Tensor):
  %c : float = prim::Constant[value=1001.5]()
  %one : int = prim::Constant[value=1]()
  %p : Tensor = aten::mul(%x, %y)
  %q : Tensor = aten::add(%p, %c, %one)
  %r : Tensor = aten::tanh(%q)
  return (%r))IR");
  setConstant(*original, 1001.5, 1.0 + static_cast<double>(std::random_device{}() % 1000000) * 1e-7);
  std::shared_ptr<Graph> graph = original->copy();
  fuse(graph, testOptions());
  ASSERT_EQ(report(graph).groups.size(), 1u);
  at::Tensor x = torch::randn({16, 33}), y = torch::randn({33});

  setLibraryFault(stage);
  ::testing::internal::CaptureStderr();
  for (int call = 0; call < 3; ++call) {
    std::vector<c10::IValue> actual;
    EXPECT_NO_THROW(actual = runGraph(graph, {x, y}));
    if (!actual.empty()) {
      EXPECT_TRUE(sameBits(actual[0].toTensor(), runGraph(original, {x, y})[0].toTensor()));
    }
  }
  std::string log = ::testing::internal::GetCapturedStderr();
  setLibraryFault(FaultStage::kNone);

  std::vector<std::string> lines = warnings(log);
  ASSERT_EQ(lines.size(), 1u) << log;
  EXPECT_NE(lines[0].find(std::string("injected fault at ") + faultStageName(stage)), std::string::npos) << lines[0];
  // For good: with the fault gone, the group still runs its original ops, silently.
  ::testing::internal::CaptureStderr();
  std::vector<c10::IValue> later = runGraph(graph, {x, y});
  EXPECT_TRUE(warnings(::testing::internal::GetCapturedStderr()).empty());
  EXPECT_TRUE(sameBits(later[0].toTensor(), runGraph(original, {x, y})[0].toTensor()));
  Report r = report(graph);
  EXPECT_EQ(r.groups[0].calls, 0) << "a kernel ran after the fault";
}

INSTANTIATE_TEST_SUITE_P(Stages, FaultInjection,
                         ::testing::Values(FaultStage::kDecode, FaultStage::kLower, FaultStage::kGuard,
                                           FaultStage::kCompile, FaultStage::kLoad, FaultStage::kLaunch),
                         [](const ::testing::TestParamInfo<FaultStage>& info) {
                           return std::string(faultStageName(info.param));
                         });

TEST(Containment, CodeFromAnOlderKilnRunsTheOriginalOps) {
  torch::NoGradGuard no_grad;
  // A group whose code is TorchScript IR text, as kiln wrote it before the group code existed.
  std::shared_ptr<Graph> graph = parseGraph(R"IR(
graph(%x : Tensor):
  %old : str = prim::Constant[value="graph(%x : Tensor):\n  %y : Tensor = aten::relu(%x)\n  return (%y)\n"]()
  %tensors : Tensor[] = prim::ListConstruct(%x)
  %floats : float[] = prim::ListConstruct()
  %ints : int[] = prim::ListConstruct()
  %ok : bool = kiln::fusion_guard(%tensors, %floats, %ints, %old)
  %out : Tensor = prim::If(%ok)
    block0():
      %list : Tensor[] = kiln::fusion_group(%tensors, %floats, %ints, %old)
      %a : Tensor = prim::ListUnpack(%list)
      -> (%a)
    block1():
      %b : Tensor = aten::relu(%x)
      -> (%b)
  return (%out))IR");
  at::Tensor x = torch::randn({8});
  ::testing::internal::CaptureStderr();
  for (int call = 0; call < 3; ++call) EXPECT_TRUE(sameBits(runGraph(graph, {x})[0].toTensor(), x.relu()));
  std::vector<std::string> lines = warnings(::testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("expected 'kiln.group 1'"), std::string::npos) << lines[0];
}

}  // namespace
}  // namespace kiln
