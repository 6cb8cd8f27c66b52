// kiln::attention and kiln::attention_explicit on CUDA against a float64 reference computed on
// the same device, and the attention pattern end to end on CUDA (label gpu; skipped without a
// device).
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <limits>
#include <thread>

#include "kiln/kiln.h"
#include "support/attention_ops.h"

namespace kiln {
namespace {

#define KILN_REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

using kiln::testing::attention;
using kiln::testing::attentionExplicit;
using kiln::testing::attentionReference;

::testing::AssertionResult close(const at::Tensor& actual, const at::Tensor& expected, at::ScalarType dtype) {
  if (actual.scalar_type() != dtype) return ::testing::AssertionFailure() << "dtype " << actual.scalar_type();
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " vs " << expected.sizes();
  const double tolerance = dtype == at::kHalf ? 4e-3 : 3e-2;
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  const at::Tensor ok = ((a - e).abs() <= tolerance * (1.0 + e.abs())) | (a.isnan() & e.isnan());
  if (ok.all().item<bool>()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << ok.logical_not().sum().item<int64_t>() << " of " << ok.numel()
                                       << " differ, max error " << (a - e).abs().nan_to_num(1e9).max().item<double>();
}

at::Tensor randn(at::IntArrayRef shape, at::ScalarType dtype) {
  return torch::randn(shape, torch::dtype(at::kFloat).device(at::kCUDA)).to(dtype);
}

TEST(GpuAttention, HeadDimsSequenceLengthsAndDtypes) {
  KILN_REQUIRE_CUDA();
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16})
    for (int64_t dim : {32, 64, 96, 128})
      for (auto [sq, skv] : {std::pair<int64_t, int64_t>{1, 1}, {7, 7}, {64, 64}, {127, 127}, {129, 129},
                             {1000, 1000}, {5, 300}, {300, 17}}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + " D=" + std::to_string(dim) + " Sq=" +
                     std::to_string(sq) + " Skv=" + std::to_string(skv));
        at::Tensor q = randn({2, 3, sq, dim}, dtype), k = randn({2, 3, skv, dim}, dtype), v = randn({2, 3, skv, dim}, dtype);
        EXPECT_TRUE(close(attention(q, k, v), attentionReference(q, k, v), dtype));
        EXPECT_TRUE(close(attention(q, k, v, std::nullopt, std::nullopt, true),
                          attentionReference(q, k, v, std::nullopt, std::nullopt, true), dtype));
      }
}

TEST(GpuAttention, MasksBroadcastAndStrides) {
  KILN_REQUIRE_CUDA();
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    const int64_t s = 150, d = 64;
    // [B, S, H, D] projections viewed as [B, H, S, D]: no copy, any batch/row strides.
    auto heads = [&](int64_t seq) { return randn({2, seq, 4, d}, dtype).permute({0, 2, 1, 3}); };
    at::Tensor q = heads(s), k = heads(s), v = heads(s);
    at::Tensor keep = torch::rand({2, 1, s, s}, torch::device(at::kCUDA)) > 0.3;
    at::Tensor padding = torch::zeros({2, 1, 1, s}, torch::device(at::kCUDA));
    padding.index_put_({1, 0, 0, at::indexing::Slice(100, at::indexing::None)}, -1e4);
    for (bool causal : {false, true}) {
      EXPECT_TRUE(close(attention(q, k, v, keep, std::nullopt, causal), attentionReference(q, k, v, keep, std::nullopt, causal), dtype));
      EXPECT_TRUE(close(attention(q, k, v, padding, 0.2, causal), attentionReference(q, k, v, padding, 0.2, causal), dtype));
      EXPECT_TRUE(close(attention(q, k, v, padding.to(dtype), std::nullopt, causal),
                        attentionReference(q, k, v, padding.to(dtype), std::nullopt, causal), dtype));
    }
    // Keys and values shared by every head (stride 0), and large logits.
    at::Tensor k1 = randn({2, 1, s, d}, dtype).expand({2, 4, s, d}), v1 = randn({2, 1, s, d}, dtype).expand({2, 4, s, d});
    EXPECT_TRUE(close(attention(q, k1, v1), attentionReference(q, k1, v1), dtype));
    at::Tensor big = (randn({2, 4, s, d}, at::kFloat) * 30).to(dtype);
    EXPECT_TRUE(close(attention(big, k, v), attentionReference(big, k, v), dtype));
    // A fully masked query gives 0, as scaled_dot_product_attention does.
    at::Tensor none_kept = keep.clone();
    none_kept.index_put_({at::indexing::Slice(), at::indexing::Slice(), 3}, false);
    at::Tensor out = attention(q, k, v, none_kept);
    EXPECT_TRUE(out.select(2, 3).eq(0).all().item<bool>());
  }
}

TEST(GpuAttention, ExplicitFormFillAndNanRows) {
  KILN_REQUIRE_CUDA();
  const int64_t s = 90, d = 64;
  at::Tensor q = randn({2, 4, s, d}, at::kHalf), k = randn({2, 4, s, d}, at::kHalf), v = randn({2, 4, s, d}, at::kHalf);
  at::Tensor causal = torch::ones({s, s}, torch::device(at::kCUDA).dtype(at::kBool)).tril();
  at::Tensor padding = torch::zeros({2, 1, 1, s}, torch::device(at::kCUDA).dtype(at::kHalf));
  padding.index_put_({1, 0, 0, at::indexing::Slice(0, 3)}, -65504.0);
  // GPT-2: where(causal, scores * scale, finfo.min) + padding, in eager half precision.
  const double scale = 0.125;
  at::Tensor eager = at::matmul(at::softmax(at::where(causal, at::matmul(q, k.transpose(-1, -2)) * scale,
                                                      at::full({}, -65504.0, q.options())) + padding, -1), v);
  EXPECT_TRUE(close(attentionExplicit(q, k, v, padding, causal, scale, -65504.0, true), eager, at::kHalf));
  // masked_fill(-inf): a row with no key left is NaN, as softmax gives.
  at::Tensor keep = causal.clone();
  keep.index_put_({5}, false);
  at::Tensor out = attentionExplicit(q, k, v, std::nullopt, keep, scale, -std::numeric_limits<double>::infinity(), false);
  EXPECT_TRUE(out.select(2, 5).isnan().all().item<bool>());
  at::Tensor rest = at::cat({out.narrow(2, 0, 5), out.narrow(2, 6, s - 6)}, 2);
  at::Tensor expected = attentionReference(q, k, v, keep, scale);
  EXPECT_TRUE(close(rest, at::cat({expected.narrow(2, 0, 5), expected.narrow(2, 6, s - 6)}, 2), at::kHalf));
}

// Hugging Face's additive masks are finfo.min: a fully padded row must average V (as eager's
// softmax of equal scores does), not overflow into NaN.
TEST(GpuAttention, FinfoMinMasksOnFullyPaddedRows) {
  KILN_REQUIRE_CUDA();
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    const int64_t s = 80, d = 64;
    at::Tensor q = randn({2, 2, s, d}, dtype), k = randn({2, 2, s, d}, dtype), v = randn({2, 2, s, d}, dtype);
    const double lowest = dtype == at::kHalf ? -65504.0 : -3.3895313892515355e38;
    at::Tensor mask = torch::zeros({2, 1, s, s}, torch::device(at::kCUDA).dtype(dtype));
    mask.index_put_({1, 0, at::indexing::Slice(0, 10)}, lowest);  // batch 1: rows 0-9 see no key
    at::Tensor eager = at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * 0.125 + mask, -1), v);
    at::Tensor out = attentionExplicit(q, k, v, mask, std::nullopt, 0.125, 0.0, false);
    EXPECT_FALSE(out.isnan().any().item<bool>());
    EXPECT_TRUE(close(out, eager.to(at::kDouble), dtype));
  }
}

TEST(GpuAttention, EightThreadsOnTheirOwnStreams) {
  KILN_REQUIRE_CUDA();
  at::Tensor q = randn({4, 8, 256, 64}, at::kBFloat16), k = randn({4, 8, 256, 64}, at::kBFloat16),
             v = randn({4, 8, 256, 64}, at::kBFloat16);
  at::Tensor expected = attentionReference(q, k, v, std::nullopt, std::nullopt, true);
  std::vector<at::Tensor> results(8);
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      c10::cuda::CUDAStreamGuard stream(c10::cuda::getStreamFromPool());
      for (int i = 0; i < 20; ++i) results[t] = attention(q, k, v, std::nullopt, std::nullopt, true);
      c10::cuda::getCurrentCUDAStream().synchronize();
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const at::Tensor& result : results) EXPECT_TRUE(close(result, expected, at::kBFloat16));
}

TEST(GpuAttention, ClearErrorsForWhatTheKernelDoesNotTake) {
  KILN_REQUIRE_CUDA();
  at::Tensor q = randn({1, 2, 8, 48}, at::kHalf);
  EXPECT_THROW(attention(q, q, q), c10::Error);  // head dim 48
  at::Tensor f = randn({1, 2, 8, 64}, at::kFloat);
  EXPECT_THROW(attention(f, f, f), c10::Error);  // float32 has no CUDA kernel
  at::Tensor cpu = torch::randn({1, 2, 8, 64}).to(at::kHalf);
  EXPECT_THROW(attention(randn({1, 2, 8, 64}, at::kHalf), cpu, cpu), c10::Error);
}

// The explicit BERT-style graph, scripted and fused on CUDA half: the guard accepts, kiln runs.
TEST(GpuAttention, FusedScriptedAttentionMatchesEagerOnCuda) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  torch::jit::Module module("Attention");
  module.define(R"JIT(
def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) / 8.0
    probs = torch.softmax(scores + mask, -1)
    return torch.matmul(probs, v)
)JIT");
  module.eval();
  at::Tensor q = randn({2, 12, 128, 64}, at::kHalf), k = randn({2, 12, 128, 64}, at::kHalf),
             v = randn({2, 12, 128, 64}, at::kHalf);
  at::Tensor mask = torch::zeros({2, 1, 1, 128}, torch::device(at::kCUDA).dtype(at::kHalf));
  mask.index_put_({1, 0, 0, at::indexing::Slice(64, at::indexing::None)}, -10000.0);
  at::Tensor expected = module.forward({q, k, v, mask}).toTensor();
  torch::jit::Module fused = optimize(module);
  auto graph = fused.get_method("forward").graph();
  int attention_groups = 0;
  for (const GroupReport& group : report(graph).groups) attention_groups += group.kind == "attention";
  ASSERT_EQ(attention_groups, 1) << *graph;
  at::Tensor actual = fused.forward({q, k, v, mask}).toTensor();
  EXPECT_TRUE(close(actual, expected.to(at::kDouble), at::kHalf));
}

// scaled_dot_product_attention on CUDA: torch's backends beat kiln's kernel there, so the guard
// declines and the original op runs, bit for bit what eager gives.
TEST(GpuAttention, ScaledDotProductAttentionKeepsTorchsBackends) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  torch::jit::Module module("Sdpa");
  module.define(R"JIT(
def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return torch.scaled_dot_product_attention(q, k, v, is_causal=True)
)JIT");
  module.eval();
  at::Tensor q = randn({2, 8, 256, 64}, at::kHalf), k = randn({2, 8, 256, 64}, at::kHalf),
             v = randn({2, 8, 256, 64}, at::kHalf);
  at::Tensor expected = module.forward({q, k, v}).toTensor();
  torch::jit::Module fused = optimize(module);
  at::Tensor kiln_kernel = attention(q, k, v, std::nullopt, std::nullopt, true);
  ASSERT_FALSE(kiln_kernel.equal(expected)) << "kiln's kernel and torch's agree bit for bit: the check below proves nothing";
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(fused.forward({q, k, v}).toTensor().equal(expected));
}

}  // namespace
}  // namespace kiln
