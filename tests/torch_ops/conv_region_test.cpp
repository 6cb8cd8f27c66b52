// Convolution regions (fuser/conv_regions.cpp, torch_ops/conv_region_op.cpp): which runs of
// convolutions kiln::optimize hands to one kiln::conv_region op, where a region must end, and that
// every way the op runs (ATen's ops, kiln's library calls, oneDNN Graph) gives eager's results on
// fresh random inputs, saved and loaded, with autograd, and when a way fails.
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>
#include <torch/script.h>

#include <algorithm>
#include <filesystem>

#include "fuser/fusion_pass.h"
#include "support/graph_testing.h"
#include "support/library_testing.h"
#include "torch_ops/measured_choice.h"

namespace kiln {
namespace {

using testing::closeTo;
using testing::ForcedChoice;
using testing::InjectedFault;

const char* const kRegionWays[] = {"aten", "kiln", "onednn_graph", "onednn_graph_as_given", ""};

// Weights for the bodies below: w1 [c, c, 3, 3], w2 the same, w3 [2c, c, 1, 1] (a strided
// downsample), biases, and batch-norm statistics that freezing folds into the convolutions.
torch::jit::Module regionModule(const std::string& name, const std::string& body, int64_t c) {
  torch::jit::Module m(name);
  const double scale = 1.0 / std::sqrt(9.0 * static_cast<double>(c));
  m.register_parameter("w1", torch::randn({c, c, 3, 3}) * scale, false);
  m.register_parameter("w2", torch::randn({c, c, 3, 3}) * scale, false);
  m.register_parameter("w3", torch::randn({2 * c, c, 1, 1}) / std::sqrt(static_cast<double>(c)), false);
  m.register_parameter("b", torch::randn({c}), false);
  m.register_parameter("gamma", torch::rand({c}) + 0.5, false);
  m.register_parameter("beta", torch::randn({c}), false);
  m.register_buffer("mean", torch::randn({c}) * 0.1);
  m.register_buffer("var", torch::rand({c}) + 0.5);
  // A ConvNeXt block's: linears c -> 2c -> c, a per-channel scale; a squeeze-excite's over c / 2.
  m.register_parameter("fc_up", torch::randn({2 * c, c}) / std::sqrt(static_cast<double>(c)), false);
  m.register_parameter("fc_up_b", torch::randn({2 * c}), false);
  m.register_parameter("fc_down", torch::randn({c, 2 * c}) / std::sqrt(2.0 * static_cast<double>(c)), false);
  m.register_parameter("scale", torch::rand({c, 1, 1}), false);
  m.register_parameter("se1", torch::randn({c / 2, c / 2}), false);
  m.register_parameter("se2", torch::randn({c / 2, c / 2}), false);
  m.register_parameter("se_b", torch::randn({c / 2}), false);
  m.define(body);
  m.eval();
  return m;
}

std::string graphText(torch::jit::Module& m) { return m.get_method("forward").graph()->toString(); }

c10::IValue run(torch::jit::Module& m, std::vector<c10::IValue> inputs) { return m.forward(std::move(inputs)); }

// What eager gives, strides included: a fresh copy of `m` run with kiln's executor pass off (its
// elementwise groups write contiguous results where eager's ops may follow a permuted or
// channels-last operand).
c10::IValue runEager(const torch::jit::Module& m, std::vector<c10::IValue> inputs) {
  const bool was_enabled = enabled();
  disable();
  torch::jit::Module copy = m.clone();
  c10::IValue result = copy.forward(std::move(inputs));
  if (was_enabled) enable();
  return result;
}

void expectSame(const c10::IValue& actual, const c10::IValue& expected, const std::string& what) {
  std::vector<at::Tensor> a, e;
  appendTensors(actual, a);
  appendTensors(expected, e);
  ASSERT_EQ(a.size(), e.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].sizes(), e[i].sizes()) << what;
    EXPECT_TRUE(closeTo(a[i], e[i], 8).all().item<bool>())
        << what << " output " << i << ": max diff " << (a[i] - e[i]).abs().max().item<double>();
    // What the module returns has eager's strides.
    EXPECT_EQ(a[i].strides(), e[i].strides()) << what << " output " << i;
  }
}

// Every way (and measuring) gives eager's results, strides included, on fresh inputs of each shape.
void expectEveryWayMatchesEager(torch::jit::Module& fused, const torch::jit::Module& eager,
                                const std::vector<std::vector<int64_t>>& shapes) {
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    for (const std::vector<int64_t>& shape : shapes) {
      at::Tensor x = torch::randn(shape);
      expectSame(run(fused, {x}), runEager(eager, {x}), std::string("way '") + way + "'");
    }
  }
}

// A ResNet-style stem and block with a strided downsample: conv + batch_norm + relu, max_pool,
// conv, relu_, conv, residual add_, relu_, then a 1x1 stride-2 convolution with hardswish.
const char* const kResNetBody = R"(
def forward(self, x):
  y = torch.conv2d(x, self.w1, self.b, 1, 1)
  y = torch.batch_norm(y, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False)
  y = torch.max_pool2d(torch.relu(y), [3, 3], [2, 2], [1, 1])
  h = torch.relu_(torch.conv2d(y, self.w2, self.b, 1, 1))
  z = torch.conv2d(h, self.w1, None, 1, 1)
  z += y
  z = torch.relu_(z)
  return torch.hardswish(torch.conv2d(z, self.w3, None, 2, 0))
)";

TEST(ConvRegions, ResNetBlockIsOneRegionMatchingEagerEveryWay) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = regionModule("RegionResNet", kResNetBody, 8);
  torch::jit::Module fused = optimize(eager);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check("prim::ListUnpack")
      ->check_not("kiln::conv2d")
      ->check_not("aten::_convolution")
      ->run(text);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    for (std::vector<int64_t> shape : {std::vector<int64_t>{1, 8, 16, 16}, std::vector<int64_t>{3, 8, 9, 13}}) {
      at::Tensor x = torch::randn(shape);
      expectSame(run(fused, {x}), runEager(eager, {x}), std::string("way '") + way + "'");
      // A channels-last input (another signature) too.
      at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
      expectSame(run(fused, {xc}), runEager(eager, {xc}), std::string("channels-last, way '") + way + "'");
    }
    Report rep = report(fused.get_method("forward").graph());
    ASSERT_EQ(rep.groups.size(), 1u);
    EXPECT_EQ(rep.groups[0].kind, "conv_region");
    EXPECT_EQ(rep.groups[0].ops.size(), 10u);  // 4 convolutions, 6 other ops (the batch_norm folded)
    if (*way != '\0') {
      EXPECT_EQ(rep.groups[0].choice, way);
    }
  }
}

TEST(ConvRegions, RegionEndsWhereAnOutsideOpReadsOrWrites) {
  torch::NoGradGuard no_grad;
  // A sum reads the second convolution's result between the convolutions: the region must not
  // move those convolutions past it, so the first region ends there. The second takes the rest,
  // the branch that does not read it (q, from the module's input and the sum) included. A lone
  // convolution is no region.
  torch::jit::Module split = regionModule("RegionSplit", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
  y = torch.relu(torch.conv2d(y, self.w2, self.b, 1, 1))
  s = y.sum()
  z = torch.conv2d(y, self.w1, self.b, 1, 1)
  z = torch.relu(torch.conv2d(z, self.w2, self.b, 1, 1))
  q = torch.sigmoid(torch.conv2d(x, self.w2, None, 1, 1)) * s
  return z, q
)", 6);
  torch::jit::Module fused = optimize(split);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check("kiln::conv_region(")
      ->check("aten::sum")
      ->check("kiln::conv_region(")
      ->check_count("kiln::conv_region(", 0, /*exactly=*/true)
      ->run(text);
  EXPECT_EQ(text.find("kiln::conv2d("), std::string::npos) << text;
  Report rep = report(fused.get_method("forward").graph());
  ASSERT_EQ(rep.groups.size(), 2u);
  EXPECT_EQ(std::count(rep.groups[1].ops.begin(), rep.groups[1].ops.end(), "aten::sigmoid"), 1) << text;
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 6, 10, 10});
    expectSame(run(fused, {x}), runEager(split, {x}), std::string("way '") + way + "'");
  }
  torch::jit::Module lone = regionModule("RegionLone", R"(
def forward(self, x):
  return torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1)) + 1
)", 6);
  torch::jit::Module lone_fused = optimize(lone);
  const std::string lone_text = graphText(lone_fused);
  EXPECT_EQ(lone_text.find("kiln::conv_region("), std::string::npos) << lone_text;
  EXPECT_NE(lone_text.find("kiln::conv2d("), std::string::npos) << lone_text;
}

TEST(ConvRegions, InceptionBranchesAndTheirConcatenationAreOneRegion) {
  torch::NoGradGuard no_grad;
  // Four branches from one input, concatenated (GoogLeNet's block), a batch_norm that cannot fold
  // (it precedes its convolution, as DenseNet's), and a second concatenation whose list is built
  // before a branch is computed.
  torch::jit::Module inception = regionModule("RegionInception", R"(
def forward(self, x):
  a = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
  b = torch.relu(torch.conv2d(torch.conv2d(x, self.w2, None, 1, 1), self.w1, self.b, 1, 1))
  c = torch.conv2d(torch.max_pool2d(x, [3, 3], [1, 1], [1, 1]), self.w2, self.b, 1, 1)
  y = torch.cat([a, b, c, x], 1)
  n = torch.batch_norm(x, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False)
  z = torch.conv2d(torch.relu(n), self.w1, None, 1, 1)
  return torch.cat([y, z], 1)
)", 4);
  torch::jit::Module fused = optimize(inception);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check_not("aten::cat")
      ->check_not("aten::batch_norm")
      ->run(text);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 4, 9, 11});
    expectSame(run(fused, {x}), runEager(inception, {x}), std::string("way '") + way + "'");
  }
}

TEST(ConvRegions, ChannelShuffleAndSqueezeExciteAreOneRegion) {
  torch::NoGradGuard no_grad;
  // ShuffleNet's channel shuffle (views whose sizes come from the input's) and chunk, a
  // squeeze-excite through linears over a pooled, flattened half, the halves concatenated and
  // convolved; one size is also returned, so it is computed again outside the region.
  torch::jit::Module shuffle = regionModule("RegionShuffle", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
  n, c, h, w = y.size()
  y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
  p, q = y.chunk(2, 1)
  s = torch.adaptive_avg_pool2d(q, [1, 1]).flatten(1)
  s = torch.sigmoid(torch.linear(torch.relu(torch.linear(s, self.se1, None)), self.se2, self.se_b))
  z = torch.cat([p, q * s.view(n, c // 2, 1, 1)], 1)
  return torch.conv2d(z, self.w2, self.b, 1, 1), c // 2 + h
)", 8);
  torch::jit::Module fused = optimize(shuffle);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check("prim::ListUnpack")
      ->check("aten::size")  // the returned size, from the region's result
      ->check_not("aten::view")
      ->check_not("aten::linear")
      ->check_not("kiln::linear")
      ->check_not("aten::adaptive_avg_pool2d")
      ->run(text);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    for (std::vector<int64_t> shape : {std::vector<int64_t>{1, 8, 10, 10}, std::vector<int64_t>{3, 8, 7, 5}}) {
      at::Tensor x = torch::randn(shape);
      const c10::IValue actual = run(fused, {x}), expected = runEager(shuffle, {x});
      expectSame(actual, expected, std::string("way '") + way + "'");
      EXPECT_EQ(actual.toTupleRef().elements()[1].toInt(), expected.toTupleRef().elements()[1].toInt());
    }
  }
}

TEST(ConvRegions, ArgumentChecksJoinTheRegion) {
  torch::NoGradGuard no_grad;
  // What scripting F.adaptive_avg_pool2d leaves between the convolutions: a check of the input's
  // rank that raises, over sizes read from a region value. It does not split the region; it runs
  // right after it, on the region's result.
  torch::jit::Module checked = regionModule("RegionChecked", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
  assert len(y.size()) > 2, "y must have more than 2 dimensions"
  s = torch.sigmoid(torch.adaptive_avg_pool2d(y, [1, 1]))
  return torch.conv2d(y * s, self.w2, self.b, 1, 1)
)", 4);
  torch::jit::Module fused = optimize(checked);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check("aten::size")
      ->check("prim::If")
      ->check("prim::RaiseException")
      ->check_not("kiln::conv2d")
      ->run(text);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 4, 6, 5});
    expectSame(run(fused, {x}), runEager(checked, {x}), std::string("way '") + way + "'");
  }
}

TEST(ConvRegions, ConvNeXtBlockIsOneRegion) {
  torch::NoGradGuard no_grad;
  // Depthwise-style convolution, channels-last permute, layer_norm, linear + gelu + linear,
  // permute back, a per-channel scale and the residual, twice.
  torch::jit::Module block = regionModule("RegionConvNeXt", R"(
def forward(self, x):
  for i in range(2):
    y = torch.conv2d(x, self.w1, self.b, 1, 1).permute(0, 2, 3, 1)
    y = torch.layer_norm(y, [8], self.gamma, self.beta, 1e-6)
    y = torch.linear(torch.gelu(torch.linear(y, self.fc_up, self.fc_up_b)), self.fc_down, None)
    x = self.scale * y.permute(0, 3, 1, 2) + x
  return x
)", 8);
  torch::jit::Module fused = optimize(block);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check_not("aten::layer_norm")
      ->check_not("linear")
      ->run(text);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 8, 6, 7});
    const c10::IValue expected = runEager(block, {x});
    // The permute leaves the result channels-last in eager: the region returns it so.
    EXPECT_TRUE(expected.toTensor().is_contiguous(at::MemoryFormat::ChannelsLast));
    expectSame(run(fused, {x}), expected, std::string("way '") + way + "'");
  }
}

// A ViT's encoder: between two attentions, the output projection, residual, layer_norm, MLP and
// the next query/key/value projection are one region, and so are the stem's patch embedding,
// class token (a constant expanded to the batch and concatenated), position embedding and first
// projection:
// linears pass oneDNN's blocked layouts to each other through oneDNN Graph as convolutions do.
// Attention stays outside, as kiln::attention. Sequence length and batch change between calls.
TEST(ConvRegions, TransformerLayersBetweenAttentionsAreRegions) {
  torch::NoGradGuard no_grad;
  const int64_t c = 16;
  torch::jit::Module vit("RegionViT");
  auto param = [&](const char* name, std::vector<int64_t> shape, double scale) {
    vit.register_parameter(name, torch::randn(shape) * scale, false);
  };
  param("embed_w", {c, 24}, 1.0 / std::sqrt(24.0));
  param("embed_b", {c}, 0.1);
  param("cls", {1, 1, c}, 1.0);
  param("pos", {1, 1, c}, 0.1);
  for (const char* prefix : {"a_", "b_"}) {
    const std::string p(prefix);
    param((p + "ln1_w").c_str(), {c}, 1.0);
    param((p + "ln1_b").c_str(), {c}, 0.1);
    param((p + "qkv_w").c_str(), {3 * c, c}, 1.0 / std::sqrt(c));
    param((p + "qkv_b").c_str(), {3 * c}, 0.1);
    param((p + "proj_w").c_str(), {c, c}, 1.0 / std::sqrt(c));
    param((p + "proj_b").c_str(), {c}, 0.1);
    param((p + "ln2_w").c_str(), {c}, 1.0);
    param((p + "ln2_b").c_str(), {c}, 0.1);
    param((p + "fc1_w").c_str(), {4 * c, c}, 1.0 / std::sqrt(c));
    param((p + "fc1_b").c_str(), {4 * c}, 0.1);
    param((p + "fc2_w").c_str(), {c, 4 * c}, 1.0 / std::sqrt(4 * c));
    param((p + "fc2_b").c_str(), {c}, 0.1);
  }
  std::string body = R"(
def forward(self, patches):
  e = torch.linear(patches, self.embed_w, self.embed_b)
  x = torch.cat([self.cls.expand(e.size(0), -1, -1), e], 1) + self.pos
)";
  for (const char* p : {"a_", "b_"}) {
    std::string layer = R"(
  n, s, c = x.size()
  qkv = torch.linear(torch.layer_norm(x, [16], self.P_ln1_w, self.P_ln1_b, 1e-6), self.P_qkv_w, self.P_qkv_b)
  q, k, v = qkv.reshape(n, s, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
  a = torch.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, c)
  x = x + torch.linear(a, self.P_proj_w, self.P_proj_b)
  h = torch.linear(torch.layer_norm(x, [16], self.P_ln2_w, self.P_ln2_b, 1e-6), self.P_fc1_w, self.P_fc1_b)
  x = x + torch.linear(torch.gelu(h), self.P_fc2_w, self.P_fc2_b)
)";
    for (size_t at = layer.find("P_"); at != std::string::npos; at = layer.find("P_", at)) layer.replace(at, 2, p);
    body += layer;
  }
  body += "  return x\n";
  vit.define(body);
  vit.eval();
  torch::jit::Module fused = optimize(vit);
  const std::string text = graphText(fused);
  // Stem to the first projection; the first layer's output projection and MLP to the second's
  // projection; the second's output projection and MLP.
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 3, /*exactly=*/true)
      ->check_not("aten::linear")
      ->check_not("kiln::linear")
      ->check_not("aten::expand")
      ->run(text);
  torch::jit::testing::FileCheck().check_count("kiln::attention(", 2, /*exactly=*/true)->run(text);
  expectEveryWayMatchesEager(fused, vit, {{1, 9, 24}, {3, 16, 24}});
}

// timm's LeViT: each linear's result flattened for a batch norm and the normalized rows reshaped
// back with reshape_as, which reads the linear's result for its sizes only: the region takes
// the whole block, reshape_as included.
TEST(ConvRegions, LinearBatchNormReshapeAsJoinsTheRegion) {
  torch::NoGradGuard no_grad;
  torch::jit::Module block = regionModule("RegionLeViT", R"(
def forward(self, x):
  for i in range(2):
    h = torch.hardswish(torch.linear(x, self.fc_up, self.fc_up_b))
    y = torch.linear(h, self.fc_down, None)
    y = torch.batch_norm(y.flatten(0, 1), self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False).reshape_as(y)
    x = x + y
  return x
)", 8);
  torch::jit::Module fused = optimize(block);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check_not("linear")
      ->check_not("batch_norm")
      ->check_not("reshape_as")
      ->run(text);
  expectEveryWayMatchesEager(fused, block, {{2, 10, 8}, {1, 49, 8}});
}

// A region called with many input signatures (a transformer's sequence lengths) builds and
// measures oneDNN Graph for the first eight only; later ones run kiln's way or ATen's, and every
// one matches eager.
TEST(ConvRegions, OneDnnGraphIsBuiltForTheFirstEightSignatures) {
  torch::NoGradGuard no_grad;
  torch::jit::Module mlp = regionModule("RegionLengths", R"(
def forward(self, x):
  return x + torch.linear(torch.gelu(torch.linear(x, self.fc_up, self.fc_up_b)), self.fc_down, None)
)", 8);
  torch::jit::Module fused = optimize(mlp);
  torch::jit::testing::FileCheck().check_count("kiln::conv_region(", 1, /*exactly=*/true)->run(graphText(fused));
  for (int64_t length = 1; length <= 12; ++length) {
    at::Tensor x = torch::randn({1, length, 8});
    expectSame(run(fused, {x}), runEager(mlp, {x}), "length " + std::to_string(length));
    const std::string choice = report(fused.get_method("forward").graph()).groups.at(0).choice;
    if (length > 8) {
      EXPECT_TRUE(choice == "kiln" || choice == "aten") << "length " << length << ": " << choice;
    }
  }
}

// timm's RepViT: a block's input is read by two convolutions and added to their sum. oneDNN Graph
// makes the block one partition that reads its input twice, which torch's bridge mishandles once
// the input arrives in oneDNN's own layout and oneDNN offers to compute in place (the oneDNN Graph
// fuser crashes on such a model); those partitions run as ATen ops, and the partitions feeding
// them write eager's layout, which ATen's ops read.
TEST(ConvRegions, PartitionsReadingAnInputTwiceRunTheirOps) {
  torch::NoGradGuard no_grad;
  torch::jit::Module blocks = regionModule("RegionReadTwice", R"(
def forward(self, x):
  for i in range(3):
    x = torch.relu(torch.conv2d(x, self.w2, None, 1, 1))
    x = torch.conv2d(x, self.w1, None, 1, 1) + torch.conv2d(x, self.w2, self.b, 1, 1) + x
  return torch.relu(x)
)", 8);
  torch::jit::Module fused = optimize(blocks);
  torch::jit::testing::FileCheck().check_count("kiln::conv_region(", 1, /*exactly=*/true)->run(graphText(fused));
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    for (int call = 0; call < 3; ++call) {
      at::Tensor x = torch::randn({1, 8, 12, 12});
      expectSame(run(fused, {x}), runEager(blocks, {x}), std::string("way '") + way + "'");
    }
  }
}

// Swin V2's post-norm residual, x + norm(mlp(x)): torch's bridge computes a partition that
// returns an add of a layer_norm's result wrongly (the oneDNN Graph fuser gives such a block
// results off by the size of its values); those partitions run as ATen ops.
TEST(ConvRegions, PostNormResidualAddsRunTheirOps) {
  torch::NoGradGuard no_grad;
  torch::jit::Module blocks = regionModule("RegionPostNorm", R"(
def forward(self, x):
  for i in range(2):
    h = torch.linear(torch.gelu(torch.linear(x, self.fc_up, self.fc_up_b)), self.fc_down, None)
    x = x + torch.layer_norm(h, [8], self.gamma, self.beta, 1e-5)
  return x
)", 8);
  torch::jit::Module fused = optimize(blocks);
  torch::jit::testing::FileCheck().check_count("kiln::conv_region(", 1, /*exactly=*/true)->run(graphText(fused));
  expectEveryWayMatchesEager(fused, blocks, {{2, 10, 8}, {1, 4, 4, 8}});
}

// timm's NFNets scale activations by a float64 0-dim constant (a traced `x * 1.7`). Every way
// runs, oneDNN Graph's included (its bridge would convert x to float64 and fail at the next
// convolution).
TEST(ConvRegions, Float64ScalarConstantsKeepTheOperandsDtype) {
  torch::NoGradGuard no_grad;
  torch::jit::Module scaled = regionModule("RegionScaled", R"(
def forward(self, x):
  y = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
  y = y * torch.tensor(1.7, dtype=7)
  return torch.relu(torch.conv2d(y, self.w2, None, 1, 1)) + torch.tensor(0.5, dtype=7)
)", 8);
  torch::jit::Module fused = optimize(scaled);
  torch::jit::testing::FileCheck().check_count("kiln::conv_region(", 1, /*exactly=*/true)->run(graphText(fused));
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({1, 8, 10, 10});
    const c10::IValue expected = runEager(scaled, {x});
    EXPECT_EQ(expected.toTensor().scalar_type(), at::kFloat);
    expectSame(run(fused, {x}), expected, std::string("way '") + way + "'");
    if (*way != '\0') {
      EXPECT_EQ(report(fused.get_method("forward").graph()).groups[0].choice, way);
    }
  }
}

// GhostNet's module: a convolution and a cheap one of its result, concatenated and sliced back to
// the output width, the residual added in place into the slice; twice, in one region.
TEST(ConvRegions, GhostModuleSlicesJoinTheRegion) {
  torch::NoGradGuard no_grad;
  torch::jit::Module ghost = regionModule("RegionGhost", R"(
def forward(self, x):
  for i in range(2):
    y = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
    out = torch.cat([y, torch.conv2d(y, self.w2, None, 1, 1)], 1)
    out = out[:, :8, :, :]
    out += x
    x = out
  return x
)", 8);
  torch::jit::Module fused = optimize(ghost);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check_not("aten::slice")
      ->check_not("aten::add_")
      ->run(graphText(fused));
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({1, 8, 10, 10});
    const at::Tensor before = x.clone();
    expectSame(run(fused, {x}), runEager(ghost, {x}), std::string("way '") + way + "'");
    EXPECT_TRUE(x.equal(before)) << "way '" << way << "' wrote its input";
  }
}

// FastViT's RepMixer: x + mixer(x) - norm(x), a subtraction of two tensors, joins the region.
TEST(ConvRegions, RepMixerSubtractionJoinsTheRegion) {
  torch::NoGradGuard no_grad;
  torch::jit::Module mixer = regionModule("RegionRepMixer", R"(
def forward(self, x):
  for i in range(2):
    x = torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1))
    x = x + torch.conv2d(x, self.w2, None, 1, 1) - torch.batch_norm(x, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False)
  return x
)", 8);
  torch::jit::Module fused = optimize(mixer);
  torch::jit::testing::FileCheck()
      .check_count("kiln::conv_region(", 1, /*exactly=*/true)
      ->check_not("aten::sub")
      ->run(graphText(fused));
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({1, 8, 10, 10});
    expectSame(run(fused, {x}), runEager(mixer, {x}), std::string("way '") + way + "'");
  }
}

TEST(ConvRegions, ViewsJoinOnlyOverValuesNothingElseReads) {
  torch::NoGradGuard no_grad;
  // z is returned and flattened: the flatten stays outside, so the region returns no two values
  // that share memory.
  torch::jit::Module views = regionModule("RegionViews", R"(
def forward(self, x):
  z = torch.conv2d(torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1)), self.w2, self.b, 1, 1)
  f = z.flatten(1)
  return f, z
)", 4);
  torch::jit::Module fused = optimize(views);
  const std::string text = graphText(fused);
  torch::jit::testing::FileCheck().check("kiln::conv_region(")->check("aten::flatten")->run(text);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 4, 5, 6});
    expectSame(run(fused, {x}), runEager(views, {x}), std::string("way '") + way + "'");
  }
}

TEST(ConvRegions, RegionsNeverWriteWhatOthersRead) {
  torch::NoGradGuard no_grad;
  // relu_ on the module's input, and on a value the module returns as well: neither may join a
  // region (the caller's tensor, and a result read after the write). The caller's input must
  // come back as eager leaves it.
  torch::jit::Module writes = regionModule("RegionWrites", R"(
def forward(self, x):
  x = torch.relu_(x)
  y = torch.conv2d(x, self.w1, self.b, 1, 1)
  a = torch.conv2d(y, self.w2, self.b, 1, 1)
  b = torch.relu_(a)
  c = torch.conv2d(b, self.w1, None, 1, 1)
  return c, a
)", 4);
  torch::jit::Module fused = optimize(writes);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({1, 4, 8, 8});
    at::Tensor x_fused = x.clone(), x_eager = x.clone();
    c10::IValue expected = runEager(writes, {x_eager});
    expectSame(run(fused, {x_fused}), expected, std::string("way '") + way + "'");
    EXPECT_TRUE(x_fused.equal(x_eager)) << way;
  }
}

TEST(ConvRegions, SavedModuleRunsAfterLoad) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = regionModule("RegionSaved", kResNetBody, 4);
  torch::jit::Module fused = optimize(eager);
  const std::string path = ::testing::TempDir() + "kiln_conv_region.pt";
  fused.save(path);
  torch::jit::Module loaded = torch::jit::load(path);
  EXPECT_NE(graphText(loaded).find("kiln::conv_region("), std::string::npos);
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({2, 4, 12, 12});
    expectSame(run(loaded, {x}), runEager(eager, {x}), std::string("loaded, way '") + way + "'");
  }
  std::filesystem::remove(path);
}

TEST(ConvRegions, FailingWaysRunAtenOps) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = regionModule("RegionFault", kResNetBody, 4);
  torch::jit::Module fused = optimize(eager);
  InjectedFault fault("library");
  for (const char* way : kRegionWays) {
    ForcedChoice forced(way);
    at::Tensor x = torch::randn({1, 4, 10, 10});
    expectSame(run(fused, {x}), runEager(eager, {x}), std::string("way '") + way + "'");
    EXPECT_EQ(report(fused.get_method("forward").graph()).groups[0].choice, "aten") << way;
  }
}

TEST(ConvRegions, AutogradRecordsThroughAtenOps) {
  torch::jit::Module eager = regionModule("RegionGrad", kResNetBody, 4);
  torch::jit::Module fused = optimize(eager);
  at::Tensor x = torch::randn({1, 4, 8, 8}).requires_grad_();
  at::Tensor x2 = x.detach().clone().requires_grad_();
  run(fused, {x}).toTensor().sum().backward();
  run(eager, {x2}).toTensor().sum().backward();
  ASSERT_TRUE(x.grad().defined());
  EXPECT_TRUE(closeTo(x.grad(), x2.grad(), 8).all().item<bool>());
}

// The storages of the weights a fused module's regions read (constants of its graph).
std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> regionWeightStorages(torch::jit::Module& m) {
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  for (torch::jit::Node* node : m.get_method("forward").graph()->nodes()) {
    if (node->kind().toQualString() != std::string("kiln::conv_region")) continue;
    for (torch::jit::Value* weight : node->input(1)->node()->inputs())
      storages.emplace_back(torch::jit::toIValue(weight)->toTensor().storage().getWeakStorageImpl());
  }
  return storages;
}

TEST(ConvRegions, FreedModuleLeavesNoWeightsBehind) {
  torch::NoGradGuard no_grad;
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  {
    torch::jit::Module eager = regionModule("RegionFreed", kResNetBody, 4);
    torch::jit::Module fused = optimize(eager);
    storages = regionWeightStorages(fused);
    // A forced way keeps every build (a measured one would drop those measured slower).
    ForcedChoice forced("onednn_graph");
    for (int call = 0; call < 2; ++call) run(fused, {torch::randn({1, 4, 8, 8})});
  }
  ASSERT_FALSE(storages.empty());
  // The next module kiln meets (another region: its own program) clears what freed modules left.
  torch::jit::Module next_eager = regionModule("RegionFreedNext", R"(
def forward(self, x):
  return torch.relu(torch.conv2d(torch.relu(torch.conv2d(x, self.w1, self.b, 1, 1)), self.w2, None, 1, 1))
)", 4);
  torch::jit::Module next = optimize(next_eager);
  run(next, {torch::randn({1, 4, 8, 8})});
  for (const auto& storage : storages) EXPECT_TRUE(storage.expired());
}

TEST(ConvRegions, OffWhereAskedAndInReducedPrecision) {
  torch::jit::Module eager = regionModule("RegionOff", kResNetBody, 4);
  Options options = Options::global();
  options.conv_regions = false;
  torch::jit::Module fused = optimize(eager, options);
  EXPECT_EQ(graphText(fused).find("kiln::conv_region"), std::string::npos);
  EXPECT_NE(graphText(fused).find("kiln::conv2d"), std::string::npos);
  options.conv_regions = true;
  options.precision = Precision::kBFloat16;
  torch::jit::Module low = optimize(eager, options);
  EXPECT_EQ(graphText(low).find("kiln::conv_region"), std::string::npos);
  // A model whose weights are not float32 CPU tensors (float64 here; float16 or CUDA alike) makes
  // no region: there it could only run ATen's ops in place of kiln's own fusions.
  options.precision = Precision::kFloat32;
  torch::jit::Module wide = eager.clone();
  wide.to(at::kDouble);
  torch::jit::Module fused_wide = optimize(wide, options);
  EXPECT_EQ(graphText(fused_wide).find("kiln::conv_region"), std::string::npos);
  at::Tensor x = torch::randn({2, 4, 9, 9}, at::kDouble);
  EXPECT_TRUE(fused_wide.forward({x}).toTensor().allclose(wide.forward({x}).toTensor(), 1e-10, 1e-10));
}

}  // namespace
}  // namespace kiln

namespace kiln {
namespace {

// kiln::optimize with example inputs times the model with regions and without
// (pass_registration.cpp). The comparison itself picks the faster module whichever goes first.
TEST(ConvRegions, WholeModelTimingPicksTheFasterModule) {
  torch::jit::Module slow("SlowModule");
  slow.define(R"(
def forward(self, x):
  y = x
  for _ in range(200):
    y = torch.mm(y, x) * 0.01
  return y
)");
  torch::jit::Module quick("QuickModule");
  quick.define(R"(
def forward(self, x):
  return x + 1.0
)");
  const std::vector<c10::IValue> inputs = {torch::randn({96, 96})};
  double slow_ms = 0, quick_ms = 0;
  EXPECT_FALSE(firstRunsFaster(slow, quick, inputs, 3, 0.0, &slow_ms, &quick_ms));
  EXPECT_GT(slow_ms, quick_ms);
  EXPECT_TRUE(firstRunsFaster(quick, slow, inputs, 3, 0.0, &quick_ms, &slow_ms));
  // A module that rejects the inputs loses; both rejecting them is the caller's error.
  torch::jit::Module rejects("RejectsModule");
  rejects.define(R"(
def forward(self, x):
  return torch.mm(x, torch.ones(3, 3))
)");
  EXPECT_FALSE(firstRunsFaster(rejects, quick, inputs, 3, 0.0));
  EXPECT_TRUE(firstRunsFaster(quick, rejects, inputs, 3, 0.0));
  EXPECT_THROW(firstRunsFaster(rejects, rejects, inputs, 3, 0.0), std::runtime_error);
}

// With example inputs the result is the model with regions or the same without, whichever ran
// them faster; either way it matches eager on fresh inputs, and without inputs regions are kept.
TEST(ConvRegions, ExampleInputsDecideBetweenRegionsAndNone) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = regionModule("RegionDecided", kResNetBody, 8);
  const std::vector<c10::IValue> example = {torch::randn({1, 8, 12, 12})};
  torch::jit::Module decided = optimize(eager, Options::global(), example);
  const std::string text = graphText(decided);
  const bool regions = text.find("kiln::conv_region") != std::string::npos;
  // Without regions its convolutions are library calls.
  EXPECT_TRUE(regions || text.find("kiln::conv2d") != std::string::npos) << text;
  for (int call = 0; call < 3; ++call) {
    at::Tensor x = torch::randn({1, 8, 12, 12});
    expectSame(run(decided, {x}), runEager(eager, {x}), "call " + std::to_string(call));
  }
  torch::jit::Module undecided = optimize(eager);
  EXPECT_NE(graphText(undecided).find("kiln::conv_region"), std::string::npos);
}

}  // namespace
}  // namespace kiln
