// Reduced precision (fuser/precision.cpp): kiln::optimize with Options::precision bf16 / fp16
// converts a float32 model's weights once and runs its activations in the low dtype, while the
// module's inputs and outputs keep their dtypes and integer tensors pass untouched; the outputs
// stay close to float32's (cosine, relative error) on fresh random inputs.
#include <gtest/gtest.h>
#include <torch/script.h>

#include <torch/csrc/jit/ir/irparser.h>
#include <torch/csrc/jit/passes/freeze_module.h>
#include <torch/csrc/jit/runtime/interpreter.h>

#include "fuser/fusion_pass.h"
#include "kiln/kiln.h"

namespace kiln {
namespace {

Options withPrecision(Precision precision) {
  Options options = Options::fromEnvironment();
  options.disabled = false;
  options.precision = precision;
  return options;
}

double cosine(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble).flatten(), y = b.to(at::kDouble).flatten();
  return (x.dot(y) / (x.norm() * y.norm())).item<double>();
}

double relativeError(const at::Tensor& actual, const at::Tensor& expected) {
  const at::Tensor x = actual.to(at::kDouble), y = expected.to(at::kDouble);
  return ((x - y).abs().max() / y.abs().max()).item<double>();
}

// A transformer-ish block: token embedding (integer input), linear + gelu, a residual into
// layer_norm, an explicit float32 upcast the model makes on purpose before its last linear, and a
// tuple output with an integer tensor in it.
torch::jit::Module block(const std::string& name) {
  torch::jit::Module m(name);
  m.register_parameter("emb", torch::randn({50, 32}), false);
  m.register_parameter("w1", torch::randn({64, 32}) / 6.0, false);
  m.register_parameter("b1", torch::randn({64}) * 0.1, false);
  m.register_parameter("w2", torch::randn({32, 64}) / 8.0, false);
  m.register_parameter("b2", torch::randn({32}) * 0.1, false);
  m.register_parameter("gamma", torch::rand({32}) + 0.5, false);
  m.register_parameter("beta", torch::randn({32}) * 0.1, false);
  m.register_parameter("w3", torch::randn({8, 32}) / 6.0, false);
  m.define(R"(
def forward(self, ids, x):
  h = torch.embedding(self.emb, ids) + x
  u = torch.gelu(torch.linear(h, self.w1, self.b1))
  r = torch.linear(u, self.w2, self.b2) + h
  n = torch.layer_norm(r, [32], self.gamma, self.beta, 1e-5)
  logits = torch.linear(n.float(), self.w3, None)
  return logits.softmax(-1), ids * 2
)");
  m.eval();
  return m;
}

TEST(Precision, BlockRunsInReducedPrecisionWithItsOwnInputAndOutputDtypes) {
  torch::NoGradGuard no_grad;
  int index = 0;
  for (Precision precision : {Precision::kBFloat16, Precision::kFloat16}) {
    torch::jit::Module eager = block("PrecisionBlock" + std::to_string(index++));
    torch::jit::Module low = optimize(eager, withPrecision(precision));
    const std::string text = low.get_method("forward").graph()->toString();
    EXPECT_NE(text.find("kiln::cast_floating"), std::string::npos) << text;
    EXPECT_NE(text.find(precision == Precision::kBFloat16 ? "BFloat16(" : "Half("), std::string::npos) << text;
    EXPECT_EQ(text.find("Float(32, 64"), std::string::npos) << "a float32 weight was left: " << text;
    for (int64_t batch : {1, 5}) {
      at::Tensor ids = torch::randint(0, 50, {batch, 7});
      at::Tensor x = torch::randn({batch, 7, 32});
      const at::Tensor ids_before = ids.clone(), x_before = x.clone();
      auto expected = eager.forward({ids, x}).toTuple();
      auto actual = low.forward({ids, x}).toTuple();
      const at::Tensor probs = actual->elements()[0].toTensor();
      EXPECT_EQ(probs.scalar_type(), at::kFloat);
      EXPECT_EQ(actual->elements()[1].toTensor().scalar_type(), at::kLong);
      EXPECT_TRUE(actual->elements()[1].toTensor().equal(expected->elements()[1].toTensor()));
      EXPECT_GT(cosine(probs, expected->elements()[0].toTensor()), 0.999) << precisionName(precision);
      EXPECT_LT(relativeError(probs, expected->elements()[0].toTensor()), 0.05) << precisionName(precision);
      EXPECT_TRUE(ids.equal(ids_before));
      EXPECT_TRUE(x.equal(x_before));
    }
  }
}

TEST(Precision, ConvolutionsRunInBFloat16) {
  torch::NoGradGuard no_grad;
  torch::jit::Module m("PrecisionConv");
  m.register_parameter("w", torch::randn({16, 3, 3, 3}) / 5.0, false);
  m.register_parameter("w2", torch::randn({16, 16, 3, 3}) / 12.0, false);
  m.register_parameter("b", torch::randn({16}) * 0.1, false);
  m.register_buffer("mean", torch::randn({16}) * 0.1);
  m.register_buffer("var", torch::rand({16}) + 0.5);
  m.define(R"(
def forward(self, x):
  y = torch.relu(torch.batch_norm(torch.conv2d(x, self.w, self.b, 1, 1), None, None, self.mean, self.var, False, 0.1, 1e-5, False))
  z = torch.conv2d(y, self.w2, self.b, 1, 1)
  z += y
  return torch.relu_(z).mean([2, 3])
)");
  m.eval();
  torch::jit::Module low = optimize(m, withPrecision(Precision::kBFloat16));
  at::Tensor x = torch::randn({2, 3, 12, 12});
  at::Tensor expected = m.forward({x}).toTensor(), actual = low.forward({x}).toTensor();
  EXPECT_EQ(actual.scalar_type(), at::kFloat);
  EXPECT_GT(cosine(actual, expected), 0.999);
  EXPECT_LT(relativeError(actual, expected), 0.05);
  // The float32 weights the conversion replaced are gone from the graph, not kept beside the bf16
  // ones (a dead constant still holds its tensor).
  for (const torch::jit::Node* node : low.get_method("forward").graph()->nodes()) {
    if (node->kind() == torch::jit::prim::Constant && node->output()->type()->kind() == c10::TypeKind::TensorType) {
      EXPECT_FALSE(node->output()->uses().empty()) << *node;
    }
  }
}

TEST(Precision, Float32LeavesTheGraphAsItWas) {
  torch::jit::Module eager = block("PrecisionFp32");
  const std::string text = optimize(eager, withPrecision(Precision::kFloat32)).get_method("forward").graph()->toString();
  EXPECT_EQ(text.find("kiln::cast_floating"), std::string::npos) << text;
  EXPECT_EQ(text.find("BFloat16("), std::string::npos) << text;
}

// A model whose front is ill-conditioned in bf16: its first linear's outputs sit near 1000 (bf16
// spacing 4 there) and are centred by their mean, which leaves rounding noise as large as the
// signal; what follows is well-conditioned. Kept float32 through the centring, the rest in bf16
// keeps a cosine near 1.
torch::jit::Module illConditionedFront(const std::string& name) {
  torch::jit::Module m(name);
  m.register_parameter("w1", torch::randn({32, 16}) / 4.0, false);
  m.register_parameter("b1", torch::full({32}, 1000.0), false);
  m.register_parameter("w2", torch::randn({24, 32}) / 6.0, false);
  m.register_parameter("b2", torch::randn({24}) * 0.1, false);
  m.register_parameter("w3", torch::randn({8, 24}) / 5.0, false);
  m.define(R"(
def forward(self, x):
  a = torch.linear(x, self.w1, self.b1)
  c = a - a.mean(-1, keepdim=True)
  h = torch.gelu(torch.linear(c, self.w2, self.b2))
  return torch.linear(h, self.w3, None)
)");
  m.eval();
  return m;
}

Options withBound(double min_cosine) {
  Options options = withPrecision(Precision::kBFloat16);
  options.min_cosine = min_cosine;
  return options;
}

// The dtypes of the kiln::linear weights in graph order.
std::vector<at::ScalarType> linearWeightDtypes(const torch::jit::Module& module) {
  std::vector<at::ScalarType> dtypes;
  for (const torch::jit::Node* node : module.get_method("forward").graph()->nodes()) {
    if (std::string(node->kind().toQualString()) != "kiln::linear") continue;
    std::optional<c10::IValue> weight = torch::jit::toIValue(node->input(1));
    if (weight && weight->isTensor()) dtypes.push_back(weight->toTensor().scalar_type());
  }
  return dtypes;
}

TEST(Precision, LeadingOpsKeepFloat32AsFarAsTheBoundNeeds) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = illConditionedFront("PrecisionIllFront");
  const at::Tensor example = torch::randn({64, 16});
  const at::Tensor expected = eager.forward({example}).toTensor();
  // Every op in bf16 falls far below the bound on this model.
  const double all_low = cosine(optimize(eager, withPrecision(Precision::kBFloat16)).forward({example}).toTensor(), expected);
  ASSERT_LT(all_low, 0.99);
  PrecisionPlan plan;
  torch::jit::Module low = optimize(eager, withBound(0.999), {example}, &plan);
  EXPECT_NEAR(plan.cosine_all_low, all_low, 0.05);
  EXPECT_GE(plan.cosine, 0.999);
  EXPECT_GT(plan.ops_float32, 0);
  EXPECT_LT(plan.ops_float32, plan.ops_total) << "everything was kept float32: " << plan.toText();
  EXPECT_EQ(plan.library_calls_total, 3);
  EXPECT_EQ(plan.library_calls_float32, 1) << plan.toText();
  EXPECT_NE(plan.last_float32_op, "");
  EXPECT_GT(plan.trials, 1);
  EXPECT_NE(plan.toText().find("kept float32"), std::string::npos) << plan.toText();
  EXPECT_NE(plan.toJson().find("\"ops_float32\": " + std::to_string(plan.ops_float32)), std::string::npos);
  // The first GEMM keeps its float32 weight, the two after it run in bf16.
  EXPECT_EQ(linearWeightDtypes(low), (std::vector<at::ScalarType>{at::kFloat, at::kBFloat16, at::kBFloat16}));
  for (int64_t rows : {64, 5}) {
    const at::Tensor x = torch::randn({rows, 16});
    const at::Tensor actual = low.forward({x}).toTensor();
    EXPECT_EQ(actual.scalar_type(), at::kFloat);
    EXPECT_GT(cosine(actual, eager.forward({x}).toTensor()), 0.999) << rows << " rows";
  }
}

TEST(Precision, ABoundAlreadyMetKeepsNothingInFloat32) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = block("PrecisionBoundMet");
  const at::Tensor ids = torch::randint(0, 50, {3, 7}), x = torch::randn({3, 7, 32});
  PrecisionPlan plan;
  torch::jit::Module low = optimize(eager, withBound(0.99), {ids, x}, &plan);
  EXPECT_EQ(plan.ops_float32, 0) << plan.toText();
  EXPECT_EQ(plan.library_calls_float32, 0);
  EXPECT_EQ(plan.trials, 1);
  EXPECT_GE(plan.cosine, 0.99);
  EXPECT_NE(plan.toText().find("every op in bf16"), std::string::npos) << plan.toText();
  EXPECT_EQ(linearWeightDtypes(low), (std::vector<at::ScalarType>(linearWeightDtypes(low).size(), at::kBFloat16)));
  // A bound no bf16 op meets keeps everything: the graph is the float32 one. A bound of 1 is
  // refused: the fused module is not bit-identical to the model even in float32.
  torch::jit::Module all = optimize(eager, withBound(0.999999999), {ids, x}, &plan);
  EXPECT_EQ(plan.ops_float32, plan.ops_total);
  EXPECT_EQ(all.get_method("forward").graph()->toString().find("kiln::cast_floating"), std::string::npos);
}

TEST(Precision, ABoundWithoutExampleInputsIsRefused) {
  torch::jit::Module eager = block("PrecisionBoundNoInputs");
  EXPECT_THROW(optimize(eager, withBound(0.999)), std::invalid_argument);
  for (double wrong : {1.0, 1.5}) {
    EXPECT_THROW(optimize(eager, withBound(wrong), {torch::randint(0, 50, {1, 7}), torch::randn({1, 7, 32})}),
                 std::invalid_argument);
  }
}

// Text in, text out: a constant both parts read stays float32 for the first and is converted for
// the second; what the first hands the second is cast where the second begins; the graph's
// input, read only by the float32 part, is not cast.
TEST(Precision, AFloat32PartSharesConstantsAndCastsWhatItHandsOn) {
  torch::jit::Module m("PrecisionShared");
  m.register_buffer("s", torch::rand({8}) + 0.5);
  m.define(R"(
def forward(self, x):
  a = x * self.s
  b = torch.relu(a)
  return b * self.s
)");
  m.eval();
  torch::jit::Module frozen = torch::jit::freeze_module(m.clone());
  std::shared_ptr<torch::jit::Graph> graph = frozen.get_method("forward").graph();
  ASSERT_EQ(precisionOpCount(*graph), 3);  // mul, relu, mul
  EXPECT_EQ(convertPrecision(graph, Precision::kBFloat16, 2), 2) << *graph;  // b on its way in, the output
  std::vector<at::ScalarType> scales;
  for (const torch::jit::Node* node : graph->nodes()) {
    if (node->kind() != c10::Symbol::fromQualString("aten::mul")) continue;
    scales.push_back(torch::jit::toIValue(node->input(1))->toTensor().scalar_type());
  }
  EXPECT_EQ(scales, (std::vector<at::ScalarType>{at::kFloat, at::kBFloat16})) << *graph;
  const at::Tensor x = torch::randn({4, 8});
  torch::jit::Code code(graph, "shared");
  torch::jit::InterpreterState state(code);
  torch::jit::Stack stack{frozen._ivalue(), x};
  state.run(stack);
  const at::Tensor expected = m.forward({x}).toTensor();
  EXPECT_EQ(stack.back().toTensor().scalar_type(), at::kFloat);
  EXPECT_GT(cosine(stack.back().toTensor(), expected), 0.9999);
}

// No cut falls between a list of tensors and the op that reads it: the list cannot be cast.
TEST(Precision, CutsAvoidListsOfTensors) {
  auto graph = std::make_shared<torch::jit::Graph>();
  torch::jit::parseIR(R"IR(
graph(%x : Tensor):
  %zero : int = prim::Constant[value=0]()
  %a : Tensor = aten::relu(%x)
  %list : Tensor[] = prim::ListConstruct(%a, %x)
  %b : Tensor = aten::neg(%x)
  %c : Tensor = aten::cat(%list, %zero)
  %d : Tensor = aten::add(%c, %b, %zero)
  return (%d)
)IR", graph.get());
  EXPECT_EQ(precisionOpCount(*graph), 5);
  // Ops: relu 0, ListConstruct 1, neg 2, cat 3, add 4: the list crosses cuts 2 and 3.
  EXPECT_EQ(precisionCuts(*graph), (std::vector<int64_t>{0, 1, 4, 5}));
}

TEST(Precision, NamesParseBothWays) {
  for (Precision precision : {Precision::kFloat32, Precision::kBFloat16, Precision::kFloat16}) {
    Precision parsed = Precision::kFloat32;
    ASSERT_TRUE(parsePrecision(precisionName(precision), &parsed));
    EXPECT_EQ(parsed, precision);
  }
  Precision parsed = Precision::kFloat32;
  EXPECT_TRUE(parsePrecision("bfloat16", &parsed));
  EXPECT_EQ(parsed, Precision::kBFloat16);
  EXPECT_FALSE(parsePrecision("int8", &parsed));
}

}  // namespace
}  // namespace kiln
