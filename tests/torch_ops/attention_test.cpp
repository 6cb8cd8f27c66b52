// kiln::attention on the CPU against a float64 math reference (matmul, masked softmax, matmul in
// double on the same inputs), called through the dispatcher and through a TorchScript graph.
// Fresh random inputs every run; every instruction-set build of the kernel this CPU runs.
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "support/attention_ops.h"
#include "torch_ops/measured_choice.h"
#include "support/graph_testing.h"
#include "torch_ops/attention_cpu.h"

namespace {

using kiln::testing::attention;
using kiln::testing::attentionExplicit;
using kiln::testing::attentionReference;  // SDPA's conventions, in float64

double tolerance(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble:
      return 1e-10;
    case at::kFloat:
      return 1e-5;
    case at::kHalf:
      return 2e-3;
    default:
      return 2e-2;  // bfloat16: 8 bits of mantissa in the output
  }
}

// |actual - expected| <= tol * (1 + |expected|) * magnitude, everywhere; same dtype and shape.
::testing::AssertionResult close(const at::Tensor& actual, const at::Tensor& expected,
                                 at::ScalarType dtype, double magnitude = 1.0) {
  if (actual.scalar_type() != dtype)
    return ::testing::AssertionFailure()
           << "dtype " << actual.scalar_type() << ", expected " << dtype;
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << ", expected " << expected.sizes();
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const at::Tensor a = actual.to(at::kDouble);
  const at::Tensor e = expected.to(at::kDouble);
  const at::Tensor bound = tolerance(dtype) * magnitude * (1.0 + e.abs());
  const at::Tensor ok = (a - e).abs() <= bound;
  if (ok.all().item<bool>()) return ::testing::AssertionSuccess();
  const int64_t first = ok.logical_not().flatten().nonzero()[0][0].item<int64_t>();
  return ::testing::AssertionFailure()
         << ok.logical_not().sum().item<int64_t>() << " of " << ok.numel()
         << " elements differ, max error " << (a - e).abs().max().item<double>() << "; first at "
         << first << ": kiln " << a.flatten()[first].item<double>() << ", reference "
         << e.flatten()[first].item<double>();
}

at::Tensor randn(at::IntArrayRef shape, at::ScalarType dtype) {
  return torch::randn(shape, torch::dtype(at::kFloat)).to(dtype);
}

// Runs each test body once per instruction-set build this CPU supports, always on kiln's kernel
// (in bf16 and fp16 kiln::attention may otherwise run ATen's where it measured faster).
class AttentionKernel : public ::testing::TestWithParam<kiln::cpu::CpuIsa> {
 protected:
  void SetUp() override {
    if (!kiln::cpu::cpuIsaSupported(GetParam())) GTEST_SKIP() << "CPU lacks this instruction set";
    kiln::cpu::overrideCpuIsa(GetParam());
    kiln::forceChoice("kiln");
  }
  void TearDown() override {
    kiln::forceChoice("");
    kiln::cpu::overrideCpuIsa(std::nullopt);
  }
};

std::string isaName(const ::testing::TestParamInfo<kiln::cpu::CpuIsa>& info) {
  return kiln::cpu::cpuIsaName(info.param);
}

INSTANTIATE_TEST_SUITE_P(Attention, AttentionKernel,
                         ::testing::Values(kiln::cpu::CpuIsa::kDefault, kiln::cpu::CpuIsa::kAvx2,
                                           kiln::cpu::CpuIsa::kAvx512, kiln::cpu::CpuIsa::kAmx),
                         isaName);

TEST_P(AttentionKernel, HeadDimsAndSequenceLengths) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (int64_t head_dim : {32, 40, 64, 96, 128}) {
      for (int64_t seq : {1, 7, 64, 127, 129, 1000}) {
        // Small batch x heads for long sequences keeps the file fast on two cores.
        const int64_t batch = seq >= 1000 ? 1 : 2;
        const int64_t heads = seq >= 1000 ? 1 : 3;
        SCOPED_TRACE(::testing::Message() << dtype << " D=" << head_dim << " S=" << seq);
        at::Tensor q = randn({batch, heads, seq, head_dim}, dtype);
        at::Tensor k = randn({batch, heads, seq, head_dim}, dtype);
        at::Tensor v = randn({batch, heads, seq, head_dim}, dtype);
        EXPECT_TRUE(close(attention(q, k, v), attentionReference(q, k, v), dtype));
      }
    }
  }
}

TEST_P(AttentionKernel, CrossAttentionLengthsAndValueDim) {
  struct Case {
    int64_t query_len, key_len, head_dim, value_dim;
  };
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    for (Case c : {Case{7, 129, 64, 64}, Case{129, 7, 64, 40}, Case{64, 1000, 40, 96},
                   Case{1, 127, 128, 32}, Case{1000, 64, 64, 128}, Case{33, 300, 96, 17}}) {
      SCOPED_TRACE(::testing::Message() << dtype << " Sq=" << c.query_len << " Skv=" << c.key_len
                                        << " D=" << c.head_dim << " Dv=" << c.value_dim);
      at::Tensor q = randn({2, 2, c.query_len, c.head_dim}, dtype);
      at::Tensor k = randn({2, 2, c.key_len, c.head_dim}, dtype);
      at::Tensor v = randn({2, 2, c.key_len, c.value_dim}, dtype);
      EXPECT_TRUE(close(attention(q, k, v), attentionReference(q, k, v), dtype));
      EXPECT_TRUE(close(attention(q, k, v, std::nullopt, 0.3),
                        attentionReference(q, k, v, std::nullopt, 0.3), dtype));
    }
  }
}

TEST_P(AttentionKernel, EveryMaskForm) {
  const int64_t batch = 2, heads = 3, query_len = 70, key_len = 150, head_dim = 64;
  const std::vector<std::vector<int64_t>> shapes = {{query_len, key_len},
                                                    {batch, 1, 1, key_len},
                                                    {batch, heads, query_len, key_len},
                                                    {heads, 1, key_len}};
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    at::Tensor q = randn({batch, heads, query_len, head_dim}, dtype);
    at::Tensor k = randn({batch, heads, key_len, head_dim}, dtype);
    at::Tensor v = randn({batch, heads, key_len, head_dim}, dtype);
    for (const auto& shape : shapes) {
      for (bool causal : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << dtype << " mask " << at::IntArrayRef(shape) << " causal " << causal);
        // Additive masks of float32 and of the inputs' dtype; boolean masks keeping ~70%.
        at::Tensor additive = torch::randn(shape) * 3.0;
        at::Tensor additive_same = additive.to(dtype);
        at::Tensor keep = torch::rand(shape) < 0.7;
        EXPECT_TRUE(close(attention(q, k, v, additive, std::nullopt, causal),
                          attentionReference(q, k, v, additive, std::nullopt, causal), dtype));
        EXPECT_TRUE(close(attention(q, k, v, additive_same, std::nullopt, causal),
                          attentionReference(q, k, v, additive_same, std::nullopt, causal), dtype));
        EXPECT_TRUE(close(attention(q, k, v, keep, std::nullopt, causal),
                          attentionReference(q, k, v, keep, std::nullopt, causal), dtype));
      }
    }
  }
}

TEST_P(AttentionKernel, CausalIsTopLeftAlignedLikeEager) {
  for (auto [query_len, key_len] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {64, 64}, {129, 129}, {300, 300}, {7, 200}, {200, 7}, {65, 130}}) {
    SCOPED_TRACE(::testing::Message() << "Sq=" << query_len << " Skv=" << key_len);
    at::Tensor q = randn({2, 2, query_len, 64}, at::kFloat);
    at::Tensor k = randn({2, 2, key_len, 64}, at::kFloat);
    at::Tensor v = randn({2, 2, key_len, 64}, at::kFloat);
    at::Tensor actual = attention(q, k, v, std::nullopt, std::nullopt, true);
    EXPECT_TRUE(close(actual, attentionReference(q, k, v, std::nullopt, std::nullopt, true), at::kFloat));
    // Eager's own choice for Sq != Skv (top-left in 2.11), not only the reference's reading of it.
    at::Tensor eager = at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true);
    EXPECT_TRUE(close(actual, eager, at::kFloat));
  }
}

TEST_P(AttentionKernel, MaskAndCausalTogetherCombineLikeEager) {
  // torch 2.11's default CPU path keeps a score only where both the mask and causality keep it
  // (its math backend rejects the pair); kiln follows the default path.
  at::Tensor q = randn({2, 2, 40, 32}, at::kFloat);
  at::Tensor k = randn({2, 2, 90, 32}, at::kFloat);
  at::Tensor v = randn({2, 2, 90, 32}, at::kFloat);
  at::Tensor additive = torch::randn({40, 90});
  at::Tensor keep = torch::rand({2, 1, 40, 90}) < 0.6;
  for (const at::Tensor& mask : {additive, keep}) {
    at::Tensor eager = at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/true);
    EXPECT_TRUE(close(attention(q, k, v, mask, std::nullopt, true), eager, at::kFloat));
  }
}

TEST_P(AttentionKernel, LargeLogitsStayFinite) {
  // Logits of order 1e3-1e4: any exp taken before subtracting the running max overflows.
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(dtype);
    at::Tensor q = (randn({2, 2, 150, 64}, at::kFloat) * 1000.0).to(dtype);
    at::Tensor k = randn({2, 2, 300, 64}, dtype);
    at::Tensor v = randn({2, 2, 300, 64}, dtype);
    at::Tensor actual = attention(q, k, v);
    EXPECT_TRUE(actual.isfinite().all().item<bool>());
    // A score's rounding error grows with its magnitude: the tolerance scales with the logits.
    EXPECT_TRUE(close(actual, attentionReference(q, k, v), dtype, dtype == at::kFloat ? 1000.0 : 1.0));
  }
}

TEST_P(AttentionKernel, FullyMaskedRowsAreZeroLikeEager) {
  // scaled_dot_product_attention (2.11, default and math paths) returns 0 for a query whose
  // every key is masked; the plain softmax formula would give NaN.
  at::Tensor q = randn({2, 2, 20, 64}, at::kFloat);
  at::Tensor k = randn({2, 2, 150, 64}, at::kFloat);
  at::Tensor v = randn({2, 2, 150, 64}, at::kFloat);
  at::Tensor keep = torch::rand({2, 2, 20, 150}) < 0.5;
  keep.index_put_({torch::indexing::Slice(), torch::indexing::Slice(), 3}, false);
  keep.index_put_({0, 1, 17}, false);
  at::Tensor additive = torch::zeros({20, 150}).masked_fill(
      torch::rand({20, 150}) < 0.5, -std::numeric_limits<float>::infinity());
  additive.index_put_({5}, -std::numeric_limits<float>::infinity());
  for (const at::Tensor& mask : {keep, additive}) {
    at::Tensor actual = attention(q, k, v, mask);
    at::Tensor eager = at::scaled_dot_product_attention(q, k, v, mask);
    EXPECT_TRUE(close(actual, eager, at::kFloat));
    EXPECT_TRUE(close(actual, attentionReference(q, k, v, mask), at::kFloat));
  }
  at::Tensor fully_masked = attention(q, k, v, keep).select(2, 3);
  EXPECT_TRUE(fully_masked.eq(0).all().item<bool>());
  // A mask that drops key 0 leaves causal query 0 with nothing: 0 there as well.
  at::Tensor drop_first = torch::ones({20, 150}, at::kBool);
  drop_first.index_put_({torch::indexing::Slice(), 0}, false);
  at::Tensor causal = attention(q, k, v, drop_first, std::nullopt, true);
  EXPECT_TRUE(causal.select(2, 0).eq(0).all().item<bool>());
  EXPECT_TRUE(
      close(causal, at::scaled_dot_product_attention(q, k, v, drop_first, 0.0, true), at::kFloat));
}

TEST_P(AttentionKernel, StridedInputsAreReadInPlace) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(dtype);
    const int64_t batch = 2, heads = 3, query_len = 77, key_len = 140, head_dim = 64;
    // [B, S, H, D] as produced by a projection, viewed as [B, H, S, D].
    at::Tensor q = randn({batch, query_len, heads, head_dim}, dtype).transpose(1, 2);
    // Every other key, and the first head_dim columns of a wider projection.
    at::Tensor k = randn({batch, heads, 2 * key_len, head_dim + 16}, dtype)
                       .slice(2, 0, 2 * key_len, 2)
                       .slice(3, 0, head_dim);
    // Values stored column-major: unit stride along the sequence, not the head dim.
    at::Tensor v = randn({batch, heads, 48, key_len}, dtype).transpose(2, 3);
    ASSERT_FALSE(q.is_contiguous() || k.is_contiguous() || v.is_contiguous());
    at::Tensor mask = torch::randn({batch, heads, key_len, query_len}).transpose(2, 3);
    EXPECT_TRUE(close(attention(q, k, v), attentionReference(q, k, v), dtype));
    EXPECT_TRUE(close(attention(q, k, v, mask, std::nullopt, true),
                      attentionReference(q, k, v, mask, std::nullopt, true), dtype));
  }
}

TEST_P(AttentionKernel, LeadingDimsBroadcast) {
  // No batch dims, one, and three; keys and values shared by every head (multi-query).
  at::Tensor q2 = randn({33, 40}, at::kFloat);
  at::Tensor k2 = randn({65, 40}, at::kFloat);
  at::Tensor v2 = randn({65, 24}, at::kFloat);
  EXPECT_TRUE(close(attention(q2, k2, v2), attentionReference(q2, k2, v2), at::kFloat));
  at::Tensor q3 = randn({3, 33, 40}, at::kFloat);
  EXPECT_TRUE(close(attention(q3, k2, v2), attentionReference(q3, k2, v2), at::kFloat));
  at::Tensor q5 = randn({2, 2, 4, 17, 32}, at::kFloat);
  at::Tensor k5 = randn({2, 1, 1, 50, 32}, at::kFloat);
  at::Tensor v5 = randn({1, 2, 1, 50, 32}, at::kFloat);
  at::Tensor mask = torch::randn({2, 1, 4, 1, 50});
  EXPECT_TRUE(close(attention(q5, k5, v5, mask), attentionReference(q5, k5, v5, mask), at::kFloat));
}

TEST_P(AttentionKernel, HalfAndDouble) {
  for (at::ScalarType dtype : {at::kHalf, at::kDouble}) {
    SCOPED_TRACE(dtype);
    at::Tensor q = randn({2, 3, 100, 64}, dtype);
    at::Tensor k = randn({2, 3, 170, 64}, dtype);
    at::Tensor v = randn({2, 3, 170, 48}, dtype);
    at::Tensor mask = torch::rand({100, 170}) < 0.8;
    EXPECT_TRUE(close(attention(q, k, v), attentionReference(q, k, v), dtype));
    EXPECT_TRUE(
        close(attention(q, k, v, mask, 0.2, true), attentionReference(q, k, v, mask, 0.2, true), dtype));
  }
}

// The explicit form in float16 and bfloat16 holds its scores in that dtype: a query whose every
// key is masked by a large negative number (finfo.min in float16, -10000 in bfloat16) sees scores
// that all round to that number, so eager averages V there; kiln must too, not attend by the
// float32 scores underneath.
TEST_P(AttentionKernel, ExplicitFormMaskedRowsTieAsInEager) {
  for (auto [dtype, lowest] : {std::pair<at::ScalarType, double>{at::kHalf, -65504.0}, {at::kBFloat16, -10000.0}}) {
    SCOPED_TRACE(dtype);
    const int64_t s = 80, d = 64;
    at::Tensor q = randn({2, 2, s, d}, dtype), k = randn({2, 2, s, d}, dtype), v = randn({2, 2, s, d}, dtype);
    at::Tensor mask = torch::zeros({2, 1, s, s}, dtype);
    mask.index_put_({1, 0, at::indexing::Slice(0, 10)}, lowest);  // batch 1: queries 0-9 see no key
    at::Tensor eager = at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * 0.125 + mask, -1), v);
    at::Tensor out = attentionExplicit(q, k, v, mask, std::nullopt, 0.125, 0.0, false);
    EXPECT_TRUE(close(out, eager, dtype, 2.0));
    // Those queries average V, as eager's ties give.
    at::Tensor average = v.select(0, 1).mean(1, true).expand({2, 10, d});
    EXPECT_TRUE(close(out.select(0, 1).narrow(1, 0, 10), average.to(at::kDouble), dtype, 2.0));
  }
}

TEST_P(AttentionKernel, EmptySequences) {
  at::Tensor q = randn({2, 3, 5, 16}, at::kFloat);
  at::Tensor k = randn({2, 3, 9, 16}, at::kFloat);
  at::Tensor v = randn({2, 3, 9, 8}, at::kFloat);
  at::Tensor no_queries = attention(q.slice(2, 0, 0), k, v);
  EXPECT_EQ(no_queries.sizes(), (std::vector<int64_t>{2, 3, 0, 8}));
  // No keys: eager gives zeros, and so does kiln.
  at::Tensor no_keys = attention(q, k.slice(2, 0, 0), v.slice(2, 0, 0));
  EXPECT_TRUE(close(no_keys,
                    at::scaled_dot_product_attention(q, k.slice(2, 0, 0), v.slice(2, 0, 0)),
                    at::kFloat));
  EXPECT_TRUE(no_keys.eq(0).all().item<bool>());
}

TEST(AttentionOp, RunsInAScriptedGraph) {
  auto graph = kiln::testing::parseGraph(R"IR(
    graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor):
      %scale : float = prim::Constant[value=0.125]()
      %causal : bool = prim::Constant[value=1]()
      %heads_last : bool = prim::Constant[value=1]()
      %out : Tensor = kiln::attention(%q, %k, %v, %mask, %scale, %causal, %heads_last)
      return (%out))IR");
  at::Tensor q = randn({2, 4, 50, 64}, at::kFloat);
  at::Tensor k = randn({2, 4, 80, 64}, at::kFloat);
  at::Tensor v = randn({2, 4, 80, 64}, at::kFloat);
  at::Tensor mask = torch::rand({2, 1, 1, 80}) < 0.9;
  auto outputs = kiln::testing::runGraph(graph, {q, k, v, mask});
  ASSERT_EQ(outputs.size(), 1u);
  at::Tensor out = outputs[0].toTensor();
  EXPECT_TRUE(close(out, attentionReference(q, k, v, mask, 0.125, true), at::kFloat));
  // Stored heads-last: [B, S, H, D] in memory, so its transpose(1, 2) is contiguous.
  EXPECT_TRUE(out.transpose(1, 2).is_contiguous());
}

// In bfloat16 and float16 the op measures ATen's SDPA against its own kernel; either way gives
// the reference's values, and an input ATen cannot take (a float32 mask on bfloat16 queries)
// runs kiln's kernel even when ATen's way is forced.
TEST(AttentionOp, ReducedPrecisionRunsTheFasterWayWithTheSameValues) {
  for (const char* way : {"kiln", "aten_sdpa", ""}) {
    kiln::forceChoice(way);
    for (at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
      at::Tensor q = randn({2, 3, 40, 32}, dtype), k = randn({2, 3, 56, 32}, dtype), v = randn({2, 3, 56, 32}, dtype);
      at::Tensor keep = torch::rand({2, 1, 1, 56}) < 0.8;
      EXPECT_TRUE(close(attention(q, k, v, keep), attentionReference(q, k, v, keep), dtype)) << way;
      at::Tensor additive = torch::randn({2, 1, 40, 56});
      EXPECT_TRUE(close(attention(q, k, v, additive), attentionReference(q, k, v, additive), dtype)) << way;
      EXPECT_TRUE(close(attention(q, k, v, additive.to(dtype)), attentionReference(q, k, v, additive.to(dtype)), dtype))
          << way;
      EXPECT_TRUE(close(attention(q, k, v, std::nullopt, 0.3, true), attentionReference(q, k, v, std::nullopt, 0.3, true),
                        dtype))
          << way;
    }
  }
  kiln::forceChoice("");
}

TEST(AttentionOp, HeadsLastKeepsValuesForEveryDtypeAndRank) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    at::Tensor q = randn({2, 3, 37, 32}, dtype), k = randn({2, 3, 41, 32}, dtype), v = randn({2, 3, 41, 16}, dtype);
    at::Tensor usual = attention(q, k, v, std::nullopt, std::nullopt, false, false);
    at::Tensor heads_last = attention(q, k, v, std::nullopt, std::nullopt, false, true);
    EXPECT_TRUE(usual.is_contiguous());
    EXPECT_TRUE(heads_last.transpose(1, 2).is_contiguous()) << dtype;
    EXPECT_TRUE(at::equal(usual, heads_last)) << dtype;
    at::Tensor scale_keep = torch::rand({2, 1, 37, 41}) < 0.8;
    EXPECT_TRUE(at::equal(attentionExplicit(q, k, v, std::nullopt, scale_keep, 0.2, -1e4, false, true),
                          attentionExplicit(q, k, v, std::nullopt, scale_keep, 0.2, -1e4, false, false)))
        << dtype;
  }
  // Other ranks keep the usual layout.
  at::Tensor q3 = randn({3, 20, 16}, at::kFloat);
  EXPECT_TRUE(attention(q3, q3, q3, std::nullopt, std::nullopt, false, true).is_contiguous());
}

TEST(AttentionOp, SchemaDefaults) {
  const auto& schema =
      c10::Dispatcher::singleton().findSchemaOrThrow("kiln::attention", "").schema();
  ASSERT_EQ(schema.arguments().size(), 7u);
  EXPECT_TRUE(schema.arguments()[3].default_value()->isNone());
  EXPECT_TRUE(schema.arguments()[4].default_value()->isNone());
  EXPECT_FALSE(schema.arguments()[5].default_value()->toBool());
  EXPECT_FALSE(schema.arguments()[6].default_value()->toBool());  // heads_last
}

void expectError(const std::function<void()>& call, const std::string& expected) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one containing \"" << expected << "\"";
  } catch (const c10::Error& error) {
    const std::string message = error.what_without_backtrace();
    EXPECT_NE(message.find("kiln::attention"), std::string::npos) << message;
    EXPECT_NE(message.find(expected), std::string::npos) << message;
  }
}

TEST(AttentionOp, BadInputsRaiseClearErrors) {
  at::Tensor q = randn({2, 3, 10, 32}, at::kFloat);
  at::Tensor k = randn({2, 3, 12, 32}, at::kFloat);
  at::Tensor v = randn({2, 3, 12, 16}, at::kFloat);
  expectError([&] { attention(randn({32}, at::kFloat), k, v); }, "query must have at least 2 dims");
  expectError([&] { attention(q, randn({32}, at::kFloat), v); }, "key must have at least 2 dims");
  expectError(
      [&] {
        attention(q, randn({2, 3, 12, 31}, at::kFloat), v);
      },
      "key's last dim (head_dim) must equal query's");
  expectError(
      [&] {
        attention(q, k, randn({2, 3, 11, 16}, at::kFloat));
      },
      "value's sequence dim (-2) must equal key's");
  expectError([&] { attention(q, k.to(at::kDouble), v); }, "must have the same dtype");
  expectError([&] { attention(q.to(at::kInt), k.to(at::kInt), v.to(at::kInt)); },
              "query must be float32, float64, float16 or bfloat16");
  expectError(
      [&] {
        attention(q, randn({4, 3, 12, 32}, at::kFloat), v);
      },
      "batch dims (all but the last two) of query, key and value must broadcast");
  expectError(
      [&] {
        attention(q, k, v, torch::zeros({10, 13}));
      },
      "does not broadcast to the scores' shape");
  expectError(
      [&] {
        attention(q, k, v, torch::zeros({10, 12}, at::kDouble));
      },
      "mask must be bool (true keeps a score), float32 or the query's dtype");
  expectError([&] { attention(q, k, v, torch::zeros({10, 12}, at::kInt)); }, "mask must be bool");
}

}  // namespace
