// nn.MultiheadAttention's fast path (fuser/native_attention.cpp): kiln::optimize turns
// aten::_native_multi_head_attention of self-attention into its linears and attention, which run
// as kiln::linear and kiln::attention; the module's results match the op's own on fresh inputs of
// other batch sizes and lengths, in every way the linears can run. What the pass must leave alone
// (a mask, cross-attention, the attention weights read) keeps the op, and a query of the wrong
// rank still raises.
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>
#include <torch/script.h>

#include <functional>

#include "kiln/kiln.h"
#include "support/library_testing.h"

namespace kiln {
namespace {

using torch::jit::testing::FileCheck;
using testing::ForcedChoice;

// A module whose forward is `body`, with nn.MultiheadAttention's parameters for width `embed`.
torch::jit::Module attentionModule(const std::string& name, const std::string& body, int64_t embed,
                                   at::ScalarType dtype = at::kFloat,
                                   const std::function<void(torch::jit::Module&)>& more_parameters = {}) {
  torch::jit::Module m(name);
  const double scale = 1.0 / std::sqrt(static_cast<double>(embed));
  m.register_parameter("w_qkv", (torch::randn({3 * embed, embed}) * scale).to(dtype), false);
  m.register_parameter("b_qkv", (torch::randn({3 * embed}) * 0.1).to(dtype), false);
  m.register_parameter("w_o", (torch::randn({embed, embed}) * scale).to(dtype), false);
  m.register_parameter("b_o", (torch::randn({embed}) * 0.1).to(dtype), false);
  if (more_parameters) more_parameters(m);
  m.define(body);
  m.eval();
  return m;
}

// torchvision's ViT encoder block's attention: x + MHA(x), the weights not asked for.
const char* kSelfAttention = R"(
def forward(self, x):
  y, w = torch._native_multi_head_attention(x, x, x, 48, 4, self.w_qkv, self.b_qkv, self.w_o, self.b_o, None, False, True, None)
  return x + y
)";

std::string graphText(torch::jit::Module& m) { return m.get_method("forward").graph()->toString(); }

void expectClose(const at::Tensor& actual, const at::Tensor& expected, double tolerance, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  const double scale = expected.abs().max().item<double>() + 1e-6;
  const double error = (actual.to(at::kDouble) - expected.to(at::kDouble)).abs().max().item<double>();
  EXPECT_LE(error, tolerance * scale) << what;
}

TEST(NativeAttention, SelfAttentionBecomesLibraryCallsAndKilnAttention) {
  torch::NoGradGuard no_grad;
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    torch::jit::Module eager = attentionModule(std::string("NativeSelf") + c10::toString(dtype), kSelfAttention, 48, dtype);
    torch::jit::Module fused = kiln::optimize(eager);
    const std::string text = graphText(fused);
    FileCheck()
        .check_not("aten::_native_multi_head_attention")
        ->check("kiln::linear")
        ->check("kiln::attention(")
        ->check("kiln::linear")
        ->run(text);
    for (const char* way : {"", "aten", "aten_transposed", "onednn"}) {
      ForcedChoice forced(way);
      for (const auto& [batch, sequence] : {std::pair<int64_t, int64_t>{1, 17}, {3, 5}, {2, 64}}) {
        at::Tensor x = torch::randn({batch, sequence, 48}).to(dtype);
        expectClose(fused.forward({x}).toTensor(), eager.forward({x}).toTensor(), dtype == at::kFloat ? 1e-5 : 3e-2,
                    std::string("way '") + way + "' " + c10::toString(dtype) + " " + std::to_string(batch) + "x" +
                        std::to_string(sequence));
      }
    }
  }
}

// nn.TransformerEncoderLayer's fast path: the whole layer (attention, two norms, feed-forward with
// relu or gelu, before or after the norms) as its ops; the results match the op's own.
TEST(NativeAttention, EncoderLayerBecomesItsOps) {
  torch::NoGradGuard no_grad;
  int index = 0;
  for (const char* gelu : {"False", "True"}) {
    for (const char* norm_first : {"False", "True"}) {
      torch::jit::Module eager = attentionModule("NativeLayer" + std::to_string(index++), std::string(R"(
def forward(self, x):
  return torch._transformer_encoder_layer_fwd(x, 48, 4, self.w_qkv, self.b_qkv, self.w_o, self.b_o, )") +
                                                     gelu + ", " + norm_first + R"(, 1e-5,
      self.n1w, self.n1b, self.n2w, self.n2b, self.f1w, self.f1b, self.f2w, self.f2b, None, None)
)",
                                                 48, at::kFloat, [](torch::jit::Module& m) {
        for (const char* name : {"n1w", "n2w"}) m.register_parameter(name, torch::rand({48}) + 0.5, false);
        for (const char* name : {"n1b", "n2b", "f2b"}) m.register_parameter(name, torch::randn({48}) * 0.1, false);
        m.register_parameter("f1w", torch::randn({96, 48}) / 7.0, false);
        m.register_parameter("f1b", torch::randn({96}) * 0.1, false);
        m.register_parameter("f2w", torch::randn({48, 96}) / 10.0, false);
      });
      const std::string what = std::string("gelu ") + gelu + ", norm_first " + norm_first;
      torch::jit::Module fused = kiln::optimize(eager);
      // After attention, the output projection, norms and feed-forward are one region (its three
      // linears; fuser/conv_regions.cpp).
      FileCheck()
          .check_not("aten::_transformer_encoder_layer_fwd")
          ->check("kiln::attention(")
          ->check_count("kiln::conv_region(", 1, /*exactly=*/true)
          ->check_not("aten::linear")
          ->run(graphText(fused));
      for (const char* way : {"", "aten", "kiln", "onednn_graph_as_given"}) {
        ForcedChoice forced(way);
        for (const auto& [batch, sequence] : {std::pair<int64_t, int64_t>{1, 17}, {3, 5}}) {
          at::Tensor x = torch::randn({batch, sequence, 48});
          expectClose(fused.forward({x}).toTensor(), eager.forward({x}).toTensor(), 1e-5,
                      what + ", way '" + way + "'");
        }
      }
    }
  }
}

TEST(NativeAttention, WhatItCannotProveKeepsTheOp) {
  torch::NoGradGuard no_grad;
  const char* bodies[] = {
      // A key padding mask.
      R"(
def forward(self, x, mask):
  y, w = torch._native_multi_head_attention(x, x, x, 48, 4, self.w_qkv, self.b_qkv, self.w_o, self.b_o, mask, False, True, 1)
  return y
)",
      // Cross-attention.
      R"(
def forward(self, x, memory):
  y, w = torch._native_multi_head_attention(x, memory, memory, 48, 4, self.w_qkv, self.b_qkv, self.w_o, self.b_o, None, False, True, None)
  return y
)",
      // The attention weights read.
      R"(
def forward(self, x, unused):
  y, w = torch._native_multi_head_attention(x, x, x, 48, 4, self.w_qkv, self.b_qkv, self.w_o, self.b_o, None, True, True, None)
  return y, w
)"};
  int index = 0;
  for (const char* body : bodies) {
    torch::jit::Module eager = attentionModule("NativeKept" + std::to_string(index++), body, 48);
    torch::jit::Module fused = kiln::optimize(eager);
    FileCheck().check("aten::_native_multi_head_attention")->check_not("kiln::attention(")->run(graphText(fused));
  }
}

TEST(NativeAttention, AQueryOfAnotherRankRaises) {
  torch::NoGradGuard no_grad;
  torch::jit::Module eager = attentionModule("NativeRank", kSelfAttention, 48);
  torch::jit::Module fused = kiln::optimize(eager);
  at::Tensor unbatched = torch::randn({7, 48});
  EXPECT_ANY_THROW(eager.forward({unbatched}));
  EXPECT_ANY_THROW(fused.forward({unbatched}));
  at::Tensor wide = torch::randn({2, 7, 32});
  EXPECT_ANY_THROW(eager.forward({wide}));
  EXPECT_ANY_THROW(fused.forward({wide}));
}

}  // namespace
}  // namespace kiln
