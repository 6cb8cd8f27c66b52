// The group code (fuser/group_code.h): every constant kind torch makes round-trips bit for bit,
// scope and source-range notes never enter it, and malformed codes are rejected by line.
#include <gtest/gtest.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/testing/file_check.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "fuser/group_code.h"
#include "support/graph_testing.h"

namespace kiln {
namespace {

using torch::jit::Graph;
using torch::jit::Value;

uint64_t bitsOf(double value) {
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// Each constant of `graph`, in order.
std::vector<c10::IValue> constantsOf(const Graph& graph) {
  std::vector<c10::IValue> values;
  for (const torch::jit::Node* node : graph.nodes()) {
    if (node->kind() == torch::jit::prim::Constant) values.push_back(*torch::jit::toIValue(node->output()));
  }
  return values;
}

bool identical(const c10::IValue& a, const c10::IValue& b) {
  if (a.isDouble() && b.isDouble()) return bitsOf(a.toDouble()) == bitsOf(b.toDouble());
  if (a.isDoubleList() && b.isDoubleList()) {
    auto x = a.toDoubleVector(), y = b.toDoubleVector();
    if (x.size() != y.size()) return false;
    for (size_t i = 0; i < x.size(); ++i) {
      if (bitsOf(x[i]) != bitsOf(y[i])) return false;
    }
    return true;
  }
  if (a.tagKind() != b.tagKind()) return false;
  if (a.isDevice()) return a.toDevice() == b.toDevice();
  return a == b;
}

TEST(GroupCode, EveryConstantKindRoundTripsExactly) {
  const std::vector<c10::IValue> constants = {
      std::nan(""), INFINITY, -INFINITY, -0.0, 0.0, 1e-310, 5e-324, 1e308, -2.5,
      std::numeric_limits<double>::denorm_min(), std::numeric_limits<double>::max(),
      int64_t{0}, int64_t{-1}, std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(),
      int64_t{(int64_t{1} << 53) + 1}, true, false,
      std::string("tanh"), std::string(""), std::string("a # b\nc, scope: x %1 = \"q\""),
      std::string("\xc3\xa9\xe2\x82\xac"), c10::IValue(), c10::Device("cuda:1"), c10::Device("cpu"),
      std::vector<int64_t>{1, -2, std::numeric_limits<int64_t>::min()}, std::vector<int64_t>{},
      std::vector<double>{std::nan(""), -0.0, 1e-310}, c10::List<bool>({true, false})};
  auto graph = std::make_shared<Graph>();
  Value* x = graph->addInput("x")->setType(c10::TensorType::get());
  graph->addInput("s")->setType(c10::FloatType::get());
  graph->addInput("k")->setType(c10::IntType::get());
  graph->addInput("b")->setType(c10::BoolType::get());
  for (const c10::IValue& constant : constants) graph->insertConstant(constant);
  Value* two = graph->insertConstant(2.0);
  Value* y = graph->insert(c10::Symbol::fromQualString("aten::mul"), {x, two});
  graph->registerOutput(y);

  std::string why;
  std::optional<std::string> code = encodeGroupCode(*graph, KernelOptions{}, &why);
  ASSERT_TRUE(code) << why;
  std::shared_ptr<Graph> decoded = decodeGroupCode(*code);
  std::optional<std::string> again = encodeGroupCode(*decoded, KernelOptions{}, &why);
  ASSERT_TRUE(again) << why;
  EXPECT_EQ(*again, *code);
  std::vector<c10::IValue> round_tripped = constantsOf(*decoded);
  ASSERT_EQ(round_tripped.size(), constants.size() + 1);
  for (size_t i = 0; i < constants.size(); ++i) {
    EXPECT_TRUE(identical(round_tripped[i], constants[i])) << "constant " << i << ": " << constants[i] << " came back as "
                                                           << round_tripped[i];
  }
  // The decoded graph is an ordinary graph: its ops resolve to their schemas.
  for (const torch::jit::Node* node : decoded->nodes()) {
    if (node->kind() != torch::jit::prim::Constant) {
      EXPECT_NE(node->maybeSchema(), nullptr) << *node;
    }
  }
}

TEST(GroupCode, ScopesAndSourceRangesStayOut) {
  auto graph = testing::parseGraph(R"IR(
graph(%x : Tensor):
  %c : float = prim::Constant[value=2.]()
  %one : int = prim::Constant[value=1]()
  %y : Tensor = aten::mul(%x, %c)
  %z : Tensor = aten::add(%y, %c, %one)
  return (%z))IR");
  auto scope = c10::make_intrusive<torch::jit::Scope>()->push(c10::Symbol::scope("__module.child"));
  for (torch::jit::Node* node : graph->nodes()) node->setScope(scope);
  ASSERT_NE(graph->toString(false).find("scope: __module.child"), std::string::npos);
  std::string why;
  std::optional<std::string> code = encodeGroupCode(*graph, KernelOptions{}, &why);
  ASSERT_TRUE(code) << why;
  EXPECT_EQ(code->find("scope"), std::string::npos) << *code;
  torch::jit::testing::FileCheck()
      .check("kiln.group 1")
      ->check("in %0 : Tensor")
      ->check("%1 = const float 0x4000000000000000 # 2")
      ->check("%3 = aten::mul %0 %1 : Tensor")
      ->check("%4 = aten::add %3 %1 %2 : Tensor")
      ->check("out %4")
      ->run(*code);
}

// A tensor input that stands for a Python number (a traced `x * 0.5`, frozen as a 0-dim wrapped
// number) keeps that mark in the code, where torch.jit.save would lose it on the tensor.
TEST(GroupCode, NumberInputsKeepTheirMark) {
  auto graph = std::make_shared<torch::jit::Graph>();
  torch::jit::parseIR(R"IR(
graph(%x : Tensor, %half : Tensor):
  %y : Tensor = aten::mul(%x, %half)
  return (%y))IR", graph.get());
  std::string why;
  std::optional<std::string> code = encodeGroupCode(*graph, KernelOptions{}, &why, {false, true});
  ASSERT_TRUE(code) << why;
  torch::jit::testing::FileCheck().check("in %0 : Tensor\n")->check("in %1 : Tensor number\n")->run(*code);
  EXPECT_EQ(groupCodeNumberInputs(*code), (std::vector<bool>{false, true}));
  std::shared_ptr<torch::jit::Graph> decoded = decodeGroupCode(*code);
  EXPECT_EQ(encodeGroupCode(*decoded, KernelOptions{}, &why, groupCodeNumberInputs(*code)), code);
  EXPECT_EQ(groupCodeNumberInputs(*encodeGroupCode(*graph, KernelOptions{}, &why)), (std::vector<bool>{false, false}));
}

TEST(GroupCode, MalformedCodeIsRejectedByLine) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"", "empty code"},
      {"graph(%x : Tensor):\n  return (%x)\n", "line 1: expected 'kiln.group 1'"},
      {"kiln.group 1\nin %0 : Tensor\nout %1\n", "line 3: undefined value %1"},
      {"kiln.group 1\nin %1 : Tensor\n", "line 2: values must be numbered in order"},
      {"kiln.group 1\nin %0 : float number\n", "line 2: only a tensor input can be a number"},
      {"kiln.group 1\nin %0 : Tensor numbers\n", "line 2: expected 'in %N : TYPE'"},
      {"kiln.group 1\n%0 = const float 0x12\n", "line 2: bad float bits"},
      {"kiln.group 1\n%0 = const int 99999999999999999999\n", "line 2: bad integer"},
      {"kiln.group 1\n%0 = const blob 1\n", "line 2: unknown constant kind 'blob'"},
      {"kiln.group 1\nin %0 : Tensor\n%1 = mul %0 : Tensor\n", "line 3: bad op name"},
      {"kiln.group 1\nin %0 : Matrix\n", "line 2: unknown type 'Matrix'"},
      {"kiln.group 1\nwhat\n", "line 2: unrecognized line"},
      {"kiln.group 1\nin %0 : Tensor\noptions fast_math 0 cpu_parallel_grain 1\n", "line 3: options must follow the header"},
      {"kiln.group 1\noptions fast_math 2 cpu_parallel_grain 1\n", "line 2: expected 'options fast_math 0|1"},
      {"kiln.group 1\noptions fast_math 1 cpu_parallel_grain 0\n", "line 2: cpu_parallel_grain must be at least 1"},
  };
  for (const auto& [code, message] : cases) {
    try {
      decodeGroupCode(code);
      ADD_FAILURE() << "accepted: " << code;
    } catch (const c10::Error& error) {
      EXPECT_NE(std::string(error.what()).find(message), std::string::npos) << error.what();
    }
  }
}

// The options given to kiln::fuse travel in the code; a code without them (an older kiln's)
// still decodes and says it has none.
TEST(GroupCode, OptionsTravelWithTheCode) {
  auto graph = testing::parseGraph(R"IR(
graph(%x : Tensor):
  %y : Tensor = aten::tanh(%x)
  return (%y))IR");
  KernelOptions options;
  options.fast_math = true;
  options.cpu_parallel_grain = 12345;
  std::string why;
  std::optional<std::string> code = encodeGroupCode(*graph, options, &why);
  ASSERT_TRUE(code) << why;
  torch::jit::testing::FileCheck().check("kiln.group 1\noptions fast_math 1 cpu_parallel_grain 12345\nin %0")->run(*code);
  std::optional<KernelOptions> decoded = groupCodeOptions(*code);
  ASSERT_TRUE(decoded);
  EXPECT_TRUE(*decoded == options);
  EXPECT_EQ(decodeGroupCode(*code)->nodes().front()->kind().toQualString(), std::string("aten::tanh"));
  const std::string old_code = "kiln.group 1\nin %0 : Tensor\nout %0\n";
  EXPECT_FALSE(groupCodeOptions(old_code));
  EXPECT_EQ(decodeGroupCode(old_code)->inputs().size(), 1u);
}

TEST(GroupCode, UnencodableConstantIsSaidWhy) {
  auto graph = std::make_shared<Graph>();
  Value* x = graph->addInput("x")->setType(c10::TensorType::get());
  Value* tuple = graph->insertConstant(c10::ivalue::Tuple::create({int64_t{1}, 2.0}));
  graph->registerOutput(x);
  (void)tuple;
  std::string why;
  EXPECT_FALSE(encodeGroupCode(*graph, KernelOptions{}, &why));
  EXPECT_NE(why.find("constant of type"), std::string::npos) << why;
}

}  // namespace
}  // namespace kiln
