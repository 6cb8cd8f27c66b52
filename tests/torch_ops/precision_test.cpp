// Reduced precision (fuser/precision.cpp): kiln::optimize with Options::precision bf16 / fp16
// converts a float32 model's weights once and runs its activations in the low dtype, while the
// module's inputs and outputs keep their dtypes and integer tensors pass untouched; the outputs
// stay close to float32's (cosine, relative error) on fresh random inputs.
#include <gtest/gtest.h>
#include <torch/script.h>

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
