// GEMMs and convolutions with their epilogues (fuser/library_calls.h): what kiln::optimize makes of
// linear and conv2d chains, and that every way kiln::linear / kiln::conv2d can run them (ATen,
// ATen over a transposed weight, oneDNN with post-ops, oneDNN on channels-last input) gives eager's
// results, on fresh random inputs, in fp32 and bf16; that a residual is written in place only
// where no one can see it; that the strides a module returns stay as eager's; that autograd,
// saving and failures behave (measured_choice_test.cpp has the measured choice).
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>
#include <torch/script.h>
#include <torch/version.h>

#include <filesystem>
#include <random>
#include <thread>
#include <unistd.h>

#include "support/graph_testing.h"
#include "support/library_modules.h"
#include "support/library_testing.h"
#include "codegen/kernel_cache.h"
#include "fuser/library_calls.h"
#include "kiln/options.h"
#include "torch_ops/measured_choice.h"

namespace kiln {
namespace {

using testing::closeTo;
using testing::ForcedChoice;
using testing::InjectedFault;
using testing::expectClose;
using testing::forward;
using testing::linearModule;
using testing::optimize;

std::string graphText(torch::jit::Module& m) { return m.get_method("forward").graph()->toString(); }

const char* const kLinearWays[] = {"aten", "aten_transposed", "onednn", "onednn_m1", "onednn_rows", ""};
// Sibling linears joined into one call also run as separate GEMMs again.
const char* const kJoinedLinearWays[] = {"aten", "aten_transposed", "aten_pieces", "onednn", "onednn_m1", "onednn_rows", ""};
const char* const kConvWays[] = {"aten", "onednn", "onednn_channels_last", ""};

struct EpilogueCase {
  const char* expression;  // of y = linear(x, w, b) and r, the residual
  const char* epilogue;    // what the fuser writes
};

const EpilogueCase kLinearEpilogues[] = {
    {"y", ""},
    {"torch.relu(y)", "relu"},
    {"torch.gelu(y)", "gelu"},
    {"torch.gelu(y, approximate='tanh')", "gelu_tanh"},
    {"torch.tanh(y)", "tanh"},
    {"torch.sigmoid(y)", "sigmoid"},
    {"torch.silu(y)", "silu"},
    {"torch.hardswish(y)", "hardswish"},
    {"y + r", "add"},
    {"r + y", "add"},
    {"torch.relu(y + r)", "add+relu"},
    {"torch.gelu(y + r)", "add+gelu"},
};

TEST(LibraryCalls, LinearEpiloguesMatchEagerEveryWayInFp32AndBf16) {
  torch::NoGradGuard no_grad;
  int index = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (const EpilogueCase& c : kLinearEpilogues) {
      const std::string body = std::string("def forward(self, x, r):\n  y = torch.linear(x, self.w, self.b)\n  return ") +
                               c.expression + "\n";
      torch::jit::Module eager = linearModule("LinearEpilogue" + std::to_string(index++), body, 48, 40, dtype);
      torch::jit::Module fused = optimize(eager);
      const std::string text = graphText(fused);
      torch::jit::testing::FileCheck()
          .check("kiln::linear")
          ->check_not("aten::linear")
          ->run(text);
      EXPECT_NE(text.find(std::string("value=\"") + c.epilogue + "\""), std::string::npos) << c.expression << "\n" << text;
      for (const char* way : kLinearWays) {
        ForcedChoice forced(way);
        for (std::vector<int64_t> rows : {std::vector<int64_t>{3, 5}, std::vector<int64_t>{1, 64}}) {
          std::vector<int64_t> in_sizes = rows, out_sizes = rows;
          in_sizes.push_back(48);
          out_sizes.push_back(40);
          at::Tensor x = torch::randn(in_sizes).to(dtype), r = torch::randn(out_sizes).to(dtype);
          at::Tensor expected = forward(eager, {x, r});
          expectClose(forward(fused, {x, r}), expected, 4, std::string(c.expression) + " " + c10::toString(dtype) + " way '" + way + "'");
        }
        Report rep = report(fused.get_method("forward").graph());
        ASSERT_EQ(rep.groups.size(), 1u);
        EXPECT_EQ(rep.groups[0].kind, "linear");
        if (*way != '\0') {
          EXPECT_EQ(rep.groups[0].choice, testing::wayRun(way, dtype)) << c.expression << " " << c10::toString(dtype);
        }
      }
    }
  }
}

TEST(LibraryCalls, LinearAddKeepsEagerPromotionAndBroadcasting) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = linearModule(
      "LinearPromotion", "def forward(self, x, r, s):\n  y = torch.linear(x, self.w, self.b)\n  z = y + r\n  return z + s\n",
      16, 8);
  torch::jit::Module fused = optimize(eager);
  for (const char* way : kLinearWays) {
    ForcedChoice forced(way);
    // A float64 residual promotes; a [4, 3, 8] one broadcasts the [3, 8] result.
    at::Tensor x = torch::randn({3, 16});
    at::Tensor r = torch::randn({3, 8}, at::kDouble), s = torch::randn({4, 3, 8}, at::kDouble);
    at::Tensor expected = forward(eager, {x, r, s});
    at::Tensor actual = forward(fused, {x, r, s});
    EXPECT_EQ(actual.scalar_type(), at::kDouble);
    expectClose(actual.to(at::kFloat), expected.to(at::kFloat), 4, way);
    // The GEMM's float32 sums in another order, seen at float32's precision.
    at::Tensor rb = torch::randn({2, 3, 8}), sb = torch::randn({2, 3, 8}, at::kDouble);
    at::Tensor promoted = forward(fused, {x, rb, sb});
    EXPECT_EQ(promoted.scalar_type(), at::kDouble);
    expectClose(promoted.to(at::kFloat), forward(eager, {x, rb, sb}).to(at::kFloat), 4, way);
  }
}

torch::jit::Module convModule(const std::string& name, const std::string& body, int64_t channels, int64_t out,
                              at::ScalarType dtype = at::kFloat) {
  torch::jit::Module m(name);
  m.register_parameter("w", (torch::randn({out, channels, 3, 3}) / std::sqrt(9.0 * channels)).to(dtype), false);
  m.register_parameter("b", torch::randn({out}).to(dtype), false);
  m.register_buffer("mean", torch::randn({out}).to(dtype));
  m.register_buffer("var", (torch::rand({out}) + 0.5).to(dtype));
  m.register_parameter("gamma", torch::randn({out}).to(dtype), false);
  m.register_parameter("beta", torch::randn({out}).to(dtype), false);
  m.register_parameter("w2", (torch::randn({out, out, 3, 3}) / std::sqrt(9.0 * out)).to(dtype), false);
  m.define(body);
  m.eval();
  return m;
}

TEST(LibraryCalls, ConvBatchNormReluAndResidualMatchEagerEveryWay) {
  torch::NoGradGuard no_grad;
  // conv + relu; conv + batch_norm (folded) + relu; then a third conv whose residual add_ + relu_
  // are fused and accumulate into the first conv's result, which no one reads afterwards (as in a
  // ResNet block, whose input is the residual).
  const std::string body = R"(
def forward(self, x):
  h = torch.relu(torch.conv2d(x, self.w2, self.b, 1, 1))
  y = torch.conv2d(h, self.w, self.b, 1, 1)
  y = torch.batch_norm(y, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False)
  y = torch.relu(y)
  z = torch.conv2d(y, self.w2, None, 1, 1)
  z += h
  return torch.relu_(z)
)";
  int index = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    torch::jit::Module eager = convModule("ConvResidual" + std::to_string(index++), body, 8, 8, dtype);
    torch::jit::Module fused = optimize(eager);
    const std::string text = graphText(fused);
    torch::jit::testing::FileCheck().check_count("kiln::conv2d(", 2, /*exactly=*/true)->run(text);
    torch::jit::testing::FileCheck().check_count("kiln::conv2d_into_other(", 1, /*exactly=*/true)->run(text);
    EXPECT_NE(text.find("value=\"add_@other+relu\""), std::string::npos) << text;
    EXPECT_EQ(text.find("aten::batch_norm"), std::string::npos) << text;
    // The channels-last result is returned with eager's strides.
    EXPECT_NE(text.find("kiln::eager_layout"), std::string::npos) << text;
    for (const char* way : kConvWays) {
      ForcedChoice forced(way);
      for (int64_t batch : {1, 3}) {
        at::Tensor x = torch::randn({batch, 8, 10, 9}).to(dtype);
        at::Tensor expected = forward(eager, {x});
        at::Tensor actual = forward(fused, {x});
        expectClose(actual, expected, dtype == at::kBFloat16 ? 16 : 8, std::string("way '") + way + "' " + c10::toString(dtype));
        EXPECT_TRUE(actual.is_contiguous()) << way;
      }
      // Every convolution can run these two ways: none fell back.
      if (std::string(way) == "aten" || std::string(way) == "onednn") {
        for (const GroupReport& group : report(fused.get_method("forward").graph()).groups)
          EXPECT_EQ(group.choice, testing::wayRun(way, dtype)) << c10::toString(dtype);
      }
    }
  }
}

TEST(LibraryCalls, StridedConvAndChannelsLastInputsMatchEager) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = convModule("ConvStrided", R"(
def forward(self, x):
  y = torch.conv2d(x, self.w, self.b, [2, 1], [0, 2], [1, 2], 1)
  return torch.hardswish(y)
)", 6, 10);
  torch::jit::Module fused = optimize(eager);
  for (const char* way : kConvWays) {
    ForcedChoice forced(way);
    for (bool channels_last : {false, true}) {
      at::Tensor x = torch::randn({2, 6, 11, 13});
      if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast);
      expectClose(forward(fused, {x}), forward(eager, {x}), 8, way);
    }
  }
}

// A patch embedding (kernel == stride, no padding): ViT's stem, Swin's and ConvNeXt's
// downsamplers. The "aten_patches" way copies the patches into rows and runs one addmm; sizes the
// kernel does not divide leave their last rows and columns out, as the convolution does. The
// result keeps eager's values and, where strides are seen (ViT's flatten + transpose), eager's
// strides. A convolution that is not a patch embedding never runs this way.
TEST(LibraryCalls, PatchEmbeddingsRunAsOneGemm) {
  torch::NoGradGuard no_grad;
  int index = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    torch::jit::Module eager("PatchEmbedding" + std::to_string(index++));
    eager.register_parameter("w", (torch::randn({24, 3, 4, 4}) / 7.0).to(dtype), false);
    eager.register_parameter("b", torch::randn({24}).to(dtype), false);
    eager.register_parameter("w2", (torch::randn({16, 24, 2, 2}) / 10.0).to(dtype), false);
    eager.define(R"(
def forward(self, x, r):
  y = torch.conv2d(x, self.w, self.b, 4)
  tokens = y.flatten(2).transpose(1, 2)
  z = torch.gelu(torch.conv2d(y, self.w2, None, 2) + r)
  return tokens, z
)");
    eager.eval();
    torch::jit::Module fused = optimize(eager);
    torch::jit::testing::FileCheck().check_count("kiln::conv2d", 2, /*exactly=*/true)->run(graphText(fused));
    for (const char* way : {"aten_patches", "aten", ""}) {
      ForcedChoice forced(way);
      for (const auto& [batch, h, w] : {std::tuple<int64_t, int64_t, int64_t>{2, 16, 16}, {1, 19, 18}}) {
        at::Tensor x = torch::randn({batch, 3, h, w}).to(dtype);
        at::Tensor r = torch::randn({batch, 16, h / 8, w / 8}).to(dtype);
        auto expected = eager.forward({x, r}).toTuple()->elements();
        auto actual = fused.forward({x, r}).toTuple()->elements();
        const std::string what = std::string("way '") + way + "' " + c10::toString(dtype) + " " + std::to_string(h);
        for (size_t i = 0; i < 2; ++i) {
          expectClose(actual[i].toTensor(), expected[i].toTensor(), dtype == at::kBFloat16 ? 16 : 8, what);
          EXPECT_EQ(actual[i].toTensor().strides(), expected[i].toTensor().strides()) << what << " output " << i;
        }
      }
      if (std::string(way) == "aten_patches") {
        for (const GroupReport& group : report(fused.get_method("forward").graph()).groups) EXPECT_EQ(group.choice, way);
      }
    }
  }
  // Not a patch embedding: a padded one, an overlapping one.
  torch::jit::Module other("NotPatches");
  other.register_parameter("w", torch::randn({8, 3, 4, 4}), false);
  other.define(R"(
def forward(self, x):
  return torch.conv2d(x, self.w, None, 4, 1) + torch.conv2d(x, self.w, None, 2)[:, :, ::2, ::2][:, :, :5, :5]
)");
  other.eval();
  torch::jit::Module fused = optimize(other);
  ForcedChoice forced("aten_patches");
  at::Tensor x = torch::randn({1, 3, 20, 20});
  expectClose(fused.forward({x}).toTensor(), other.forward({x}).toTensor(), 8, "not patches");
  for (const GroupReport& group : report(fused.get_method("forward").graph()).groups) EXPECT_NE(group.choice, "aten_patches");
}

TEST(LibraryCalls, ResidualIsNotOverwrittenWhereSomeoneReadsIt) {
  torch::NoGradGuard no_grad;
  // The residual is the module's input (the caller's tensor) in one, and is read again after the
  // add in the other: neither may be written in place.
  torch::jit::Module from_input = convModule("ResidualInput", R"(
def forward(self, x):
  y = torch.conv2d(x, self.w, self.b, 1, 1)
  return torch.relu(y + x)
)", 4, 4);
  torch::jit::Module read_later = convModule("ResidualReadLater", R"(
def forward(self, x):
  r = torch.relu(x)
  y = torch.conv2d(x, self.w, self.b, 1, 1)
  y += r
  return y * r
)", 4, 4);
  for (torch::jit::Module* eager : {&from_input, &read_later}) {
    torch::jit::Module fused = optimize(*eager);
    const std::string text = graphText(fused);
    EXPECT_NE(text.find("kiln::conv2d"), std::string::npos) << text;
    EXPECT_EQ(text.find("@other"), std::string::npos) << text;
    for (const char* way : kConvWays) {
      ForcedChoice forced(way);
      at::Tensor x = torch::randn({2, 4, 7, 7});
      at::Tensor before = x.clone();
      at::Tensor expected = forward(*eager, {x});
      expectClose(forward(fused, {x}), expected, 8, way);
      EXPECT_TRUE(x.equal(before)) << "the caller's input changed, way " << way;
    }
  }
}

TEST(LibraryCalls, ViewsOfConvolutionResultsSeeEagerStrides) {
  torch::NoGradGuard no_grad;
  // view() needs the strides eager gives; oneDNN's results are channels-last until a
  // contiguous() the pass puts in front of the view.
  torch::jit::Module eager = convModule("ConvView", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w, self.b, 1, 1))
  p = torch.max_pool2d(y, [2, 2])
  return p.view(p.size(0), -1)
)", 3, 5);
  torch::jit::Module fused = optimize(eager);
  torch::jit::testing::FileCheck().check("kiln::conv2d")->check("aten::max_pool2d")->check("kiln::eager_layout")->check("aten::view")->run(graphText(fused));
  for (const char* way : kConvWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 3, 8, 8});
    expectClose(forward(fused, {x}), forward(eager, {x}), 8, way);
  }
}

// Graphs where moving the call to its chain's end, writing into the residual, or copying a
// channels-last result would change what eager computes.
TEST(LibraryCalls, WritesAndAliasesSeeWhatEagerSees) {
  torch::NoGradGuard no_grad;
  const std::vector<std::pair<std::string, std::string>> bodies = {
      // The residual is a slice of a constant (not foldable: its end depends on the input).
      {"ResidualSliceOfConstant", R"(
def forward(self, x):
  return torch.relu(torch.conv2d(x, self.w, self.b, 1, 1) + self.mean.view(1, 4, 1, 1).expand(1, 4, 9, 9)[:, :, :x.size(2), :x.size(3)].contiguous())
)"},
      // A write into the convolution's result after it: every reader sees the one tensor.
      {"WriteAfterConvolution", R"(
def forward(self, x):
  y = torch.conv2d(x, self.w, self.b, 1, 1)
  y.div_(2.0)
  z = y.view(y.size(0), -1)
  return y, z
)"},
      // The input written between the convolution and its activation.
      {"InputWrittenBeforeActivation", R"(
def forward(self, x):
  x = x * 1.0
  y = torch.conv2d(x, self.w, self.b, 1, 1)
  x.add_(1.0)
  return torch.relu(y), x
)"},
      // A broadcast first operand leaves the layout to the convolution's result.
      {"BroadcastFirstOperand", R"(
def forward(self, x):
  s = torch.sigmoid(x.mean([2, 3], True))
  out = s * torch.conv2d(x, self.w, self.b, 1, 1)
  return out.view(out.size(0), -1)
)"},
  };
  for (const auto& [name, body] : bodies) {
    torch::jit::Module eager = convModule(name, body, 4, 4);
    torch::jit::Module fused = optimize(eager);
    EXPECT_NE(graphText(fused).find("kiln::conv2d"), std::string::npos) << name;
    for (const char* way : kConvWays) {
      ForcedChoice forced(way);
      for (int call = 0; call < 2; ++call) {
        at::Tensor x = torch::randn({2, 4, 9, 9});
        std::vector<at::Tensor> expected, actual;
        c10::IValue e = eager.forward({x.clone()}), a = fused.forward({x.clone()});
        for (const c10::IValue& v : e.isTuple() ? e.toTupleRef().elements().vec() : std::vector<c10::IValue>{e}) expected.push_back(v.toTensor());
        for (const c10::IValue& v : a.isTuple() ? a.toTupleRef().elements().vec() : std::vector<c10::IValue>{a}) actual.push_back(v.toTensor());
        ASSERT_EQ(expected.size(), actual.size()) << name;
        for (size_t i = 0; i < expected.size(); ++i) {
          expectClose(actual[i], expected[i], 8, name + " output " + std::to_string(i) + " way '" + way + "' call " + std::to_string(call));
        }
      }
    }
  }
}

TEST(LibraryCalls, AutogradRecordsThroughAtenOps) {
  torch::jit::Module eager = linearModule("LinearGrad", "def forward(self, x):\n  return torch.relu(torch.linear(x, self.w, self.b))\n", 12, 6);
  torch::jit::Module fused = optimize(eager);
  at::Tensor x = torch::randn({4, 12}, torch::requires_grad());
  at::Tensor y = forward(fused, {x});
  ASSERT_TRUE(y.requires_grad());
  y.sum().backward();
  at::Tensor x2 = x.detach().clone().requires_grad_(true);
  forward(eager, {x2}).sum().backward();
  expectClose(x.grad(), x2.grad(), 4, "input gradient");
}

TEST(LibraryCalls, SavedModuleRunsAfterLoad) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = convModule("ConvSaved", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w, self.b, 1, 1))
  return torch.adaptive_avg_pool2d(y, [1, 1]).flatten(1)
)", 3, 6);
  torch::jit::Module fused = optimize(eager);
  const std::string path = ::testing::TempDir() + "kiln_library_calls.pt";
  fused.save(path);
  torch::jit::Module loaded = torch::jit::load(path);
  EXPECT_NE(graphText(loaded).find("kiln::conv2d"), std::string::npos);
  at::Tensor x = torch::randn({2, 3, 9, 9});
  expectClose(forward(loaded, {x}), forward(eager, {x}), 8, "loaded");
  std::filesystem::remove(path);
}

TEST(LibraryCalls, FailingLibraryCallRunsAtenOps) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = linearModule("LinearFault", "def forward(self, x):\n  return torch.gelu(torch.linear(x, self.w, self.b))\n", 20, 12);
  torch::jit::Module fused = optimize(eager);
  InjectedFault fault("library");
  for (const char* way : kLinearWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({5, 20});
    expectClose(forward(fused, {x}), forward(eager, {x}), 4, way);
    EXPECT_EQ(report(fused.get_method("forward").graph()).groups[0].choice, "aten") << way;
  }
}

TEST(LibraryCalls, BadInputRaisesEagersError) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = linearModule("LinearBadInput", "def forward(self, x):\n  return torch.relu(torch.linear(x, self.w, self.b))\n", 8, 4);
  torch::jit::Module fused = optimize(eager);
  at::Tensor wrong = torch::randn({3, 7});
  auto message = [](torch::jit::Module& m, const at::Tensor& x) -> std::string {
    try {
      forward(m, {x});
    } catch (const std::exception& error) {
      return error.what();
    }
    return "no error";
  };
  const std::string eager_error = message(eager, wrong), fused_error = message(fused, wrong);
  EXPECT_NE(eager_error.find("cannot be multiplied"), std::string::npos) << eager_error;
  EXPECT_NE(fused_error.find("cannot be multiplied"), std::string::npos) << fused_error;
  at::Tensor empty = torch::randn({0, 8});
  EXPECT_EQ(forward(fused, {empty}).sizes(), forward(eager, {empty}).sizes());
}

int64_t occurrences(const std::string& text, const std::string& what) {
  int64_t count = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++count;
  return count;
}

// A module of sibling linears over x [.., 24]: wq, wk, wu, wg1, wg2 with biases, wv without.
torch::jit::Module siblingsModule(const std::string& name, const std::string& body, at::ScalarType dtype) {
  torch::jit::Module m(name);
  for (const char* weight : {"wq", "wk", "wv", "wu", "wg1", "wg2"}) {
    m.register_parameter(weight, (torch::randn({32, 24}) / std::sqrt(24.0)).to(dtype), false);
    if (std::string(weight) != "wv") m.register_parameter(std::string("b") + (weight + 1), torch::randn({32}).to(dtype), false);
  }
  m.define(body);
  m.eval();
  return m;
}

void expectEachWayMatchesEager(torch::jit::Module& eager, torch::jit::Module& fused, at::ScalarType dtype,
                               const std::string& what) {
  for (const char* way : kJoinedLinearWays) {
    ForcedChoice forced(way);
    for (int64_t batch : {1, 3}) {
      at::Tensor x = torch::randn({batch, 5, 24}).to(dtype);
      // The tuples are held here: the loops below read their elements.
      const c10::IValue eager_result = eager.forward({x.clone()}), fused_result = fused.forward({x.clone()});
      std::vector<at::Tensor> expected, actual;
      for (const c10::IValue& value : eager_result.toTupleRef().elements()) expected.push_back(value.toTensor());
      for (const c10::IValue& value : fused_result.toTupleRef().elements()) actual.push_back(value.toTensor());
      ASSERT_EQ(actual.size(), expected.size());
      for (size_t i = 0; i < actual.size(); ++i)
        expectClose(actual[i], expected[i], dtype == at::kBFloat16 ? 16 : 4, what + " output " + std::to_string(i) + " way '" + way + "'");
    }
  }
}

TEST(LibraryCalls, SiblingLinearsBecomeOneCallSlicedApart) {
  torch::NoGradGuard no_grad;
  // Query, key and value projections split into heads, as BERT's; the value has no bias.
  const std::string body = R"(
def forward(self, x):
  q = torch.linear(x, self.wq, self.bq).view(x.size(0), x.size(1), 4, 8).permute(0, 2, 1, 3)
  k = torch.linear(x, self.wk, self.bk).view(x.size(0), x.size(1), 4, 8).permute(0, 2, 3, 1)
  v = torch.linear(x, self.wv).view(x.size(0), x.size(1), 4, 8).permute(0, 2, 1, 3)
  g = torch.gelu(torch.linear(x, self.wg1, self.bg1)) * torch.gelu(torch.linear(x, self.wg2, self.bg2))
  return (torch.matmul(torch.softmax(torch.matmul(q, k), -1), v), g)
)";
  int index = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    torch::jit::Module eager = siblingsModule("Siblings" + std::to_string(index++), body, dtype);
    torch::jit::Module fused = optimize(eager);
    const std::string text = graphText(fused);
    // q, k, v: one call of 96 rows; the two gelu linears another; nothing else.
    EXPECT_EQ(occurrences(text, "kiln::linear("), 2) << text;
    EXPECT_EQ(occurrences(text, "aten::slice("), 5) << text;
    EXPECT_EQ(occurrences(text, "aten::linear("), 0) << text;
    EXPECT_NE(text.find("value=\";pieces=32,32,32\""), std::string::npos) << text;
    EXPECT_NE(text.find("value=\"gelu;pieces=32,32\""), std::string::npos) << text;
    expectEachWayMatchesEager(eager, fused, dtype, c10::toString(dtype));
    ForcedChoice forced("aten_pieces");
    fused.forward({torch::randn({2, 5, 24}).to(dtype)});
    for (const GroupReport& group : report(fused.get_method("forward").graph()).groups) {
      if (group.kind == "linear") {
        EXPECT_EQ(group.choice, "aten_pieces");
      }
    }
  }
}

TEST(LibraryCalls, SiblingsThatNeedTheirOwnMemoryStayApart) {
  torch::NoGradGuard no_grad;
  // q is viewed flat (a slice cannot be), k is written in place, v is returned: each keeps its
  // own call. u and g1 (no epilogue) join; g2 has another epilogue (relu) and stays alone.
  const std::string body = R"(
def forward(self, x):
  q = torch.linear(x, self.wq, self.bq)
  k = torch.linear(x, self.wk, self.bk)
  v = torch.linear(x, self.wv)
  u = torch.linear(x, self.wu, self.bu)
  g1 = torch.linear(x, self.wg1, self.bg1)
  g2 = torch.relu(torch.linear(x, self.wg2, self.bg2))
  k.add_(1.0)
  return (q.view(-1), k, v, u * g1, g2)
)";
  torch::jit::Module eager = siblingsModule("SiblingsApart", body, at::kFloat);
  torch::jit::Module fused = optimize(eager);
  const std::string text = graphText(fused);
  EXPECT_EQ(occurrences(text, "kiln::linear("), 5) << text;
  EXPECT_EQ(occurrences(text, "aten::slice("), 2) << text;
  EXPECT_NE(text.find("value=\";pieces=32,32\""), std::string::npos) << text;
  expectEachWayMatchesEager(eager, fused, at::kFloat, "apart");

  // An in-place write to the shared input between two siblings: the second reads the new values,
  // so they stay apart (joined, both would read the old ones); the two after the write join.
  const std::string written = R"(
def forward(self, x):
  q = torch.linear(x, self.wq, self.bq)
  x.mul_(2.0)
  k = torch.linear(x, self.wk, self.bk)
  v = torch.linear(x, self.wv)
  return (q * 1.0, k * 1.0, v * 1.0)
)";
  torch::jit::Module eager_written = siblingsModule("SiblingsAroundAWrite", written, at::kFloat);
  torch::jit::Module fused_written = optimize(eager_written);
  const std::string written_text = graphText(fused_written);
  EXPECT_EQ(occurrences(written_text, "kiln::linear("), 2) << written_text;
  EXPECT_NE(written_text.find("value=\";pieces=32,32\""), std::string::npos) << written_text;
  expectEachWayMatchesEager(eager_written, fused_written, at::kFloat, "around a write");
}

TEST(LibraryCalls, MatrixProductsByConstantsRunAsLinears) {
  torch::NoGradGuard no_grad;
  // GPT-2's Conv1D (addmm over a [K, N] weight), mm and matmul by a constant matrix become
  // library calls; addmm with beta 0.5 and a product of two activations stay as they are.
  const std::string body = R"(
def forward(self, x):
  flat = x.view(-1, 24)
  conv1d = torch.addmm(self.b, flat, self.w).view(x.size(0), x.size(1), 32)
  product = torch.mm(flat, self.w) * 2.0
  biased = torch.relu(torch.matmul(x, self.w) + self.b)
  scaled = torch.addmm(self.b, flat, self.w, beta=0.5)
  return (conv1d, product, biased, scaled, torch.matmul(x, x.transpose(1, 2)))
)";
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    torch::jit::Module eager(std::string("MatrixProducts") + c10::toString(dtype));
    eager.register_parameter("w", (torch::randn({24, 32}) / std::sqrt(24.0)).to(dtype), false);
    eager.register_parameter("b", torch::randn({32}).to(dtype), false);
    eager.define(body);
    eager.eval();
    torch::jit::Module fused = optimize(eager);
    const std::string text = graphText(fused);
    EXPECT_EQ(occurrences(text, "aten::addmm("), 1) << text;
    EXPECT_EQ(occurrences(text, "aten::mm("), 0) << text;
    EXPECT_EQ(occurrences(text, "aten::matmul("), 1) << text;
    EXPECT_GE(occurrences(text, "kiln::linear("), 2) << text;
    EXPECT_NE(text.find("value=\"add+relu\""), std::string::npos) << text;
    expectEachWayMatchesEager(eager, fused, dtype, std::string("products ") + c10::toString(dtype));
  }
}

TEST(LibraryCalls, PiecesAreReadBackAndChecked) {
  std::optional<Epilogue> epilogue = Epilogue::parse("gelu;pieces=8,16");
  ASSERT_TRUE(epilogue.has_value());
  EXPECT_EQ(epilogue->activation, Activation::kGelu);
  EXPECT_EQ(epilogue->pieces, (std::vector<int64_t>{8, 16}));
  EXPECT_EQ(epilogue->text(), "gelu;pieces=8,16");
  for (const char* bad : {"gelu;pieces=8", "gelu;pieces=8,x", ";widths=8,8", "relu;pieces=", "add;pieces=-1,2"})
    EXPECT_FALSE(Epilogue::parse(bad).has_value()) << bad;
  // Pieces that do not cover the weight's rows are a clear error, not a wrong answer.
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::linear", "");
  torch::jit::Stack stack{torch::randn({2, 4}), torch::randn({8, 4}), c10::IValue(), c10::IValue(), std::string("relu;pieces=3,3")};
  try {
    op.callBoxed(&stack);
    ADD_FAILURE() << "no error";
  } catch (const std::exception& error) {
    EXPECT_NE(std::string(error.what()).find("add up to 6 rows"), std::string::npos) << error.what();
  }
}

TEST(LibraryCalls, ThreadsShareOneModuleWhileItMeasures) {
  // A shape class no other test uses: the first calls of eight threads race to measure it; one
  // measures, the others run ATen's ops meanwhile, and every result is eager's.
  torch::jit::Module eager = convModule("ConvThreads", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w, self.b, 1, 1))
  return torch.sigmoid(torch.conv2d(y, self.w2, None, 1, 1) + y)
)", 5, 5);
  torch::jit::Module fused = optimize(eager);
  std::vector<at::Tensor> inputs, expected;
  {
    torch::NoGradGuard no_grad;
    for (int t = 0; t < 8; ++t) {
      inputs.push_back(torch::randn({3, 5, 13, 11}));
      expected.push_back(forward(eager, {inputs.back()}));
    }
  }
  std::vector<int> mismatches(8, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      torch::NoGradGuard no_grad;
      for (int call = 0; call < 5; ++call) {
        at::Tensor actual = forward(fused, {inputs[static_cast<size_t>(t)]});
        if (!closeTo(actual, expected[static_cast<size_t>(t)], 8).all().item<bool>()) mismatches[static_cast<size_t>(t)]++;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(mismatches[static_cast<size_t>(t)], 0) << "thread " << t;
}

}  // namespace
}  // namespace kiln
