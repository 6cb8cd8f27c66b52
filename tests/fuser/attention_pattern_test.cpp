// The attention pattern, text in / text out: each form the pass recognises, parsed from IR, is
// replaced by a guarded kiln attention op (FileCheck), and the fused graph's output matches the
// original graph's on fresh random inputs. Forms the pass must leave alone stay unchanged.
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>

#include <limits>

#include "fuser/fusion_pass.h"
#include "support/attention_ops.h"
#include "support/graph_testing.h"
#include "tools/demo_model.h"

namespace kiln {
namespace {

using torch::jit::testing::FileCheck;
using namespace kiln::testing;

std::shared_ptr<torch::jit::Graph> fused(const std::string& text) {
  auto graph = parseGraph(text);
  fuse(graph, testOptions());
  graph->lint();
  return graph;
}

int attentionGroups(const std::shared_ptr<torch::jit::Graph>& graph) {
  int count = 0;
  for (const GroupReport& group : report(graph).groups) count += group.kind == "attention";
  return count;
}

// The inputs with every floating tensor in float64: the original graph run on them is the
// reference that reduced-precision results are measured against.
std::vector<c10::IValue> inFloat64(const std::vector<c10::IValue>& inputs) {
  std::vector<c10::IValue> converted;
  for (const c10::IValue& input : inputs) {
    converted.push_back(input.isTensor() && input.toTensor().is_floating_point()
                            ? c10::IValue(input.toTensor().to(at::kDouble))
                            : input);
  }
  return converted;
}

// In float16 and bfloat16 eager itself rounds the scores before the softmax, so kiln (which
// keeps them in float32) is not compared with eager elementwise: both are measured against the
// float64 run of the same graph, and kiln's largest error may be at most twice eager's plus one
// unit of the dtype's tolerance. NaN must appear exactly where eager has it.
::testing::AssertionResult noWorseThanEager(const at::Tensor& actual, const at::Tensor& expected,
                                            const at::Tensor& reference) {
  if (actual.scalar_type() != expected.scalar_type() || actual.sizes() != expected.sizes())
    return sameTensor(actual, expected);
  at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  if (!at::equal(a.isnan(), e.isnan())) return ::testing::AssertionFailure() << "NaN where eager has none, or the reverse";
  at::Tensor finite = ~e.isnan();
  const double kiln_error = (a - reference).abs().masked_select(finite).max().item<double>();
  const double eager_error = (e - reference).abs().masked_select(finite).max().item<double>();
  const double bound = 2 * eager_error + tolerances(actual.scalar_type()).second;
  if (kiln_error <= bound) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "largest error against float64: kiln " << kiln_error << ", eager "
                                       << eager_error << " (bound " << bound << ")";
}

// Runs the original and the fused graph on the same inputs; the attention must have been fused.
void expectFusedMatches(const std::string& text, const std::vector<c10::IValue>& inputs,
                        double tolerance_scale = 1.0) {
  auto graph = fused(text);
  ASSERT_EQ(attentionGroups(graph), 1) << *graph;
  std::vector<c10::IValue> expected = runGraph(parseGraph(text), inputs);
  std::vector<c10::IValue> actual = runGraph(graph, inputs);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    const at::Tensor& result = actual[i].toTensor();
    if (result.scalar_type() == at::kHalf || result.scalar_type() == at::kBFloat16) {
      std::vector<c10::IValue> reference = runGraph(parseGraph(text), inFloat64(inputs));
      EXPECT_TRUE(noWorseThanEager(result, expected[i].toTensor(), reference[i].toTensor().to(at::kDouble)))
          << "output " << i;
    } else {
      EXPECT_TRUE(sameTensor(result, expected[i].toTensor(), tolerance_scale)) << "output " << i;
    }
  }
}

// A [B, S, H·D] projection viewed as [B, H, S, D] (strided, as models produce it).
at::Tensor heads(int64_t batch, int64_t heads, int64_t seq, int64_t dim,
                 at::ScalarType dtype = at::kFloat) {
  return torch::randn({batch, seq, heads * dim}).to(dtype).view({batch, seq, heads, dim}).permute({0, 2, 1, 3});
}

// BERT: scores / sqrt(d) + extended mask, softmax, dropout (eval), @ V; K^T by transpose.
const char* kBertStyle = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor, %scale : float):
  %none : NoneType = prim::Constant()
  %false : bool = prim::Constant[value=0]()
  %p : float = prim::Constant[value=0.1]()
  %one : int = prim::Constant[value=1]()
  %m1 : int = prim::Constant[value=-1]()
  %m2 : int = prim::Constant[value=-2]()
  %kt : Tensor = aten::transpose(%k, %m1, %m2)
  %s : Tensor = aten::matmul(%q, %kt)
  %s2 : Tensor = aten::div(%s, %scale)
  %s3 : Tensor = aten::add(%s2, %mask, %one)
  %probs : Tensor = aten::softmax(%s3, %m1, %none)
  %dropped : Tensor = aten::dropout(%probs, %p, %false)
  %out : Tensor = aten::matmul(%dropped, %v)
  return (%out))IR";

at::Tensor paddingMask(int64_t batch, int64_t seq, double masked, at::ScalarType dtype = at::kFloat) {
  at::Tensor mask = torch::zeros({batch, 1, 1, seq});
  for (int64_t b = 0; b < batch; ++b) mask.index_put_({b, 0, 0, at::indexing::Slice(seq - 3 * b, at::indexing::None)}, masked);
  return mask.to(dtype);
}

TEST(AttentionPattern, BertStyleExplicitFormIsReplacedUnderAGuard) {
  auto graph = fused(kBertStyle);
  FileCheck()
      .check("kiln::attention_guard(%q, %k, %v, %mask")  // K itself, not K^T
      
      ->check("prim::If")
      ->check("kiln::attention_explicit")
      ->check("aten::matmul")  // the fallback block: the original ops
      ->check("aten::div")
      ->check("aten::add")
      ->check("aten::softmax")
      ->check("aten::dropout")
      ->check("aten::matmul")
      ->run(*graph);
  Report r = report(graph);
  ASSERT_EQ(r.groups.size(), 1u);
  EXPECT_EQ(r.groups[0].kind, "attention");
  EXPECT_EQ(r.groups[0].ops, (std::vector<std::string>{"aten::matmul", "aten::div", "aten::add", "aten::softmax",
                                                         "aten::dropout", "aten::matmul"}));
  EXPECT_EQ(r.groups[0].num_inputs, 4);  // q, k, v, mask
}

TEST(AttentionPattern, BertStyleMatchesEagerAcrossShapesAndDtypes) {
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16, at::kHalf}) {
    for (auto [seq, dim] : {std::pair<int64_t, int64_t>{1, 32}, {7, 64}, {129, 64}, {64, 96}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " seq " + std::to_string(seq) + " dim " + std::to_string(dim));
      at::Tensor q = heads(3, 2, seq, dim, dtype), k = heads(3, 2, seq, dim, dtype), v = heads(3, 2, seq, dim, dtype);
      expectFusedMatches(kBertStyle, {q, k, v, paddingMask(3, seq, -10000.0, dtype), std::sqrt(static_cast<double>(dim))},
                         dtype == at::kFloat || dtype == at::kDouble ? 1.0 : 2.0);
    }
  }
}

// The fused graph is the one that ran: its output differs from eager in rounding only, but the
// fused op's result is what comes back (checked by making the fallback impossible to tell apart
// otherwise: the guard's verdict is read directly).
TEST(AttentionPattern, GuardAcceptsTheFusedCaseAndRejectsWhatKilnCannotProve) {
  auto guard = [](std::vector<c10::IValue> args) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::attention_guard", "");
    torch::jit::Stack stack(args.begin(), args.end());
    op.callBoxed(&stack);
    return stack.back().toBool();
  };
  at::Tensor q = heads(2, 3, 10, 16), k = heads(2, 3, 12, 16), v = heads(2, 3, 12, 8);
  at::Tensor mask = torch::randn({2, 1, 1, 12});
  const c10::IValue none;
  auto args = [&](c10::IValue m, c10::IValue keep, double fill, int64_t dim, c10::IValue dtype, double p, bool train,
                  bool sdpa) {
    return std::vector<c10::IValue>{q, k, v, m, keep, fill, dim, dtype, c10::List<double>({p}), c10::List<bool>({train}),
                                    sdpa};
  };
  EXPECT_TRUE(guard(args(mask, none, 0.0, -1, none, 0.1, false, false)));
  EXPECT_TRUE(guard(args(mask, none, 0.0, 3, static_cast<int64_t>(at::kFloat), 0.0, true, false)));
  EXPECT_FALSE(guard(args(mask, none, 0.0, 2, none, 0.0, false, false)));                       // softmax dim
  EXPECT_FALSE(guard(args(mask, none, 0.0, -1, static_cast<int64_t>(at::kHalf), 0.0, false, false)));  // cast
  EXPECT_FALSE(guard(args(mask, none, 0.0, -1, none, 0.1, true, false)));                        // dropout on
  EXPECT_FALSE(guard(args(mask.to(at::kDouble), none, 0.0, -1, none, 0.0, false, false)));      // promotes
  EXPECT_FALSE(guard(args(torch::randn({3, 1, 1, 12}), none, 0.0, -1, none, 0.0, false, false)));  // shape
  at::Tensor keep = torch::rand({10, 12}) > 0.5;
  EXPECT_TRUE(guard(args(none, keep, -1e9, -1, none, 0.0, false, false)));
  EXPECT_FALSE(guard(args(none, keep, -1e9, -1, none, 0.0, false, true)));  // sdpa has no fill
  EXPECT_TRUE(guard(args(keep, none, 0.0, -1, none, 0.0, true, true)));    // sdpa's bool mask
  // A fill float16 cannot hold: eager raises (masked_fill) or overflows (where); leave it to eager.
  q = q.to(at::kHalf), k = k.to(at::kHalf), v = v.to(at::kHalf);
  EXPECT_FALSE(guard(args(none, keep, -1e9, -1, none, 0.0, false, false)));
  EXPECT_TRUE(guard(args(none, keep, -65504.0, -1, none, 0.0, false, false)));
  // Batch dims that matmul would broadcast are left to eager.
  q = heads(2, 3, 10, 16), k = heads(1, 3, 12, 16), v = heads(2, 3, 12, 8);
  EXPECT_FALSE(guard(args(none, none, 0.0, -1, none, 0.0, false, false)));
  // Anything autograd would track stays unfused.
  k = heads(2, 3, 12, 16).requires_grad_();
  EXPECT_FALSE(guard(args(none, none, 0.0, -1, none, 0.0, false, false)));
  {
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(guard(args(none, none, 0.0, -1, none, 0.0, false, false)));
  }
}

// GPT-2 (Hugging Face, eager attention): the divisor and the mask value are 0-dim tensors made
// with full([]) of the scores' dtype; a bool causal mask keeps scores (where), the padding mask
// is added after it, and the probabilities are cast back to V's dtype.
const char* kGpt2Style = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %causal : Tensor, %padding : Tensor):
  %none : NoneType = prim::Constant()
  %false : bool = prim::Constant[value=0]()
  %p : float = prim::Constant[value=0.1]()
  %one : int = prim::Constant[value=1]()
  %m1 : int = prim::Constant[value=-1]()
  %m2 : int = prim::Constant[value=-2]()
  %empty : int[] = prim::ListConstruct()
  %min : float = prim::Constant[value=-3.4028234663852886e+38]()
  %kt : Tensor = aten::transpose(%k, %m1, %m2)
  %w : Tensor = aten::matmul(%q, %kt)
  %d : int = aten::size(%v, %m1)
  %half : float = prim::Constant[value=0.5]()
  %root : float = aten::pow(%d, %half)
  %wdtype : int = prim::dtype(%w)
  %wdevice : Device = prim::device(%w)
  %divisor : Tensor = aten::full(%empty, %root, %wdtype, %none, %wdevice, %false)
  %w2 : Tensor = aten::div(%w, %divisor)
  %fill : Tensor = aten::full(%empty, %min, %wdtype, %none, %wdevice, %false)
  %w3 : Tensor = aten::where(%causal, %w2, %fill)
  %w4 : Tensor = aten::add(%w3, %padding, %one)
  %w5 : Tensor = aten::softmax(%w4, %m1, %none)
  %vdtype : int = prim::dtype(%v)
  %w6 : Tensor = aten::to(%w5, %vdtype, %false, %false, %none)
  %w7 : Tensor = aten::dropout(%w6, %p, %false)
  %out : Tensor = aten::matmul(%w7, %v)
  return (%out))IR";

TEST(AttentionPattern, Gpt2StyleCausalWhereWithPaddingMatchesEager) {
  auto graph = fused(kGpt2Style);
  FileCheck()
      .check("kiln::attention_guard")
      ->check("kiln::attention_explicit")
      ->check("aten::where")  // fallback
      ->run(*graph);
  // The scores' dtype and device are read from Q, so the mask value's full() stays valid.
  FileCheck().check("prim::dtype(%q)")->run(*graph);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const int64_t seq = 37;
    at::Tensor causal = torch::ones({seq, seq}, at::kBool).tril().view({1, 1, seq, seq});
    // Batch 1's first three keys are padding: its early queries see no key but padding, which
    // eager computes as (finfo.min + finfo.min) and kiln must reproduce.
    at::Tensor padding = torch::zeros({2, 1, 1, seq});
    padding.index_put_({1, 0, 0, at::indexing::Slice(0, 3)}, std::numeric_limits<float>::lowest());
    SCOPED_TRACE(c10::toString(dtype));
    expectFusedMatches(kGpt2Style,
                       {heads(2, 4, seq, 32, dtype), heads(2, 4, seq, 32, dtype), heads(2, 4, seq, 32, dtype),
                        causal, padding.to(dtype)},
                       dtype == at::kFloat ? 1.0 : 2.0);
  }
}

// nanoGPT: q @ k^T * (1/sqrt(d)), masked_fill(bias == 0, -inf), softmax, dropout, @ v.
const char* kNanoGptStyle = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %bias : Tensor):
  %none : NoneType = prim::Constant()
  %false : bool = prim::Constant[value=0]()
  %p : float = prim::Constant[value=0.2]()
  %zero : int = prim::Constant[value=0]()
  %m1 : int = prim::Constant[value=-1]()
  %m2 : int = prim::Constant[value=-2]()
  %scale : float = prim::Constant[value=0.125]()
  %inf : float = prim::Constant[value=-inf]()
  %kt : Tensor = aten::transpose(%k, %m2, %m1)
  %att : Tensor = aten::matmul(%q, %kt)
  %att2 : Tensor = aten::mul(%att, %scale)
  %dropmask : Tensor = aten::eq(%bias, %zero)
  %att3 : Tensor = aten::masked_fill(%att2, %dropmask, %inf)
  %att4 : Tensor = aten::softmax(%att3, %m1, %none)
  %att5 : Tensor = aten::dropout(%att4, %p, %false)
  %y : Tensor = aten::matmul(%att5, %v)
  return (%y))IR";

TEST(AttentionPattern, NanoGptMaskedFillMinusInfinityMatchesEagerIncludingEmptyRows) {
  auto graph = fused(kNanoGptStyle);
  FileCheck().check("kiln::attention_guard")->check("aten::logical_not")->check("kiln::attention_explicit")->run(*graph);
  const int64_t seq = 70;
  at::Tensor bias = torch::ones({seq, seq}).tril().view({1, 1, seq, seq});
  expectFusedMatches(kNanoGptStyle, {heads(2, 3, seq, 64), heads(2, 3, seq, 64), heads(2, 3, seq, 64), bias});
  // A query with no key left: eager's softmax gives NaN, and so must the fused graph.
  bias.index_put_({0, 0, 5}, 0.0);
  std::vector<c10::IValue> inputs = {heads(2, 3, seq, 64), heads(2, 3, seq, 64), heads(2, 3, seq, 64), bias};
  at::Tensor expected = runGraph(parseGraph(kNanoGptStyle), inputs)[0].toTensor();
  at::Tensor actual = runGraph(graph, inputs)[0].toTensor();
  ASSERT_TRUE(expected.select(2, 5).isnan().all().item<bool>());
  EXPECT_TRUE(sameTensor(actual, expected));
}

// A finite fill keeps taking part in the softmax: a fully masked row averages V, as in eager.
const char* kMaskedFillFinite = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %pad : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %i0 : int = prim::Constant[value=0]()
  %i1 : int = prim::Constant[value=1]()
  %i2 : int = prim::Constant[value=2]()
  %i3 : int = prim::Constant[value=3]()
  %perm : int[] = prim::ListConstruct(%i0, %i2, %i3, %i1)
  %big : float = prim::Constant[value=-1000000000.]()
  %scale : float = prim::Constant[value=8.]()
  %kt : Tensor = aten::permute(%k, %perm)
  %s : Tensor = aten::matmul(%q, %kt)
  %s1 : Tensor = aten::masked_fill(%s, %pad, %big)
  %s2 : Tensor = aten::div(%s1, %scale)
  %probs : Tensor = aten::softmax(%s2, %m1, %none)
  %out : Tensor = aten::matmul(%probs, %v)
  return (%out))IR";

TEST(AttentionPattern, FiniteFillScaledAfterwardsMatchesEagerOnFullyMaskedRows) {
  const int64_t seq = 20;
  // K comes from a [B, S, H, D] projection: permute(0, 2, 3, 1) gives K^T directly.
  at::Tensor k_projection = torch::randn({2, seq, 4, 16});
  at::Tensor pad = torch::zeros({2, 1, 1, seq}, at::kBool);
  pad.index_put_({1}, true);  // batch 1: every key masked
  expectFusedMatches(kMaskedFillFinite, {heads(2, 4, seq, 16), k_projection, heads(2, 4, seq, 16), pad});
}

// timm's ViT: q * scale before the matmul, K^T by transpose(-2, -1), plain softmax.
TEST(AttentionPattern, ScaledQueryAndNoMask) {
  const char* text = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %m2 : int = prim::Constant[value=-2]()
  %scale : float = prim::Constant[value=0.17677669529663687]()
  %qs : Tensor = aten::mul(%q, %scale)
  %kt : Tensor = aten::transpose(%k, %m2, %m1)
  %attn : Tensor = aten::matmul(%qs, %kt)
  %attn2 : Tensor = aten::softmax(%attn, %m1, %none)
  %x : Tensor = aten::matmul(%attn2, %v)
  return (%x))IR";
  auto graph = fused(text);
  FileCheck().check("aten::mul(%q")->check("kiln::attention_explicit")->run(*graph);
  expectFusedMatches(text, {heads(2, 6, 50, 32), heads(2, 6, 50, 32), heads(2, 6, 50, 32)});
}

// softmax(dtype=float32) then .to(q's dtype), as Hugging Face's newer eager attention writes it,
// with the scaling as a multiply by a 0-dim constant tensor and bmm on [B·H, S, D].
TEST(AttentionPattern, SoftmaxInFloat32CastBackAndBmm) {
  const char* text = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor):
  %false : bool = prim::Constant[value=0]()
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %one : int = prim::Constant[value=1]()
  %f32 : int = prim::Constant[value=6]()
  %c : Float(requires_grad=0, device=cpu) = prim::Constant[value={0.125}]()
  %kt : Tensor = aten::transpose(%k, %one, %m1)
  %s : Tensor = aten::bmm(%q, %kt)
  %s1 : Tensor = aten::mul(%c, %s)
  %s2 : Tensor = aten::add(%mask, %s1, %one)
  %p : Tensor = aten::softmax(%s2, %m1, %f32)
  %qdtype : int = prim::dtype(%q)
  %p2 : Tensor = aten::to(%p, %qdtype, %false, %false, %none)
  %o : Tensor = aten::bmm(%p2, %v)
  return (%o))IR";
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    SCOPED_TRACE(c10::toString(dtype));
    expectFusedMatches(text,
                       {torch::randn({6, 33, 64}).to(dtype), torch::randn({6, 33, 64}).to(dtype),
                        torch::randn({6, 33, 64}).to(dtype), (torch::randn({33, 33}) * 3).to(dtype)},
                       dtype == at::kFloat ? 1.0 : 2.0);
  }
}

const char* kSdpa = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor?, %causal : bool):
  %none : NoneType = prim::Constant()
  %zero : float = prim::Constant[value=0.]()
  %false : bool = prim::Constant[value=0]()
  %out : Tensor = aten::scaled_dot_product_attention(%q, %k, %v, %mask, %zero, %causal, %none, %false)
  return (%out))IR";

TEST(AttentionPattern, ScaledDotProductAttentionBecomesKilnAttention) {
  auto graph = fused(kSdpa);
  FileCheck()
      .check("kiln::attention_guard")
      ->check("prim::If")
      ->check("kiln::attention(")
      ->check("aten::scaled_dot_product_attention")
      ->run(*graph);
  const c10::IValue none;
  at::Tensor bool_mask = torch::rand({1, 1, 40, 40}) > 0.3;
  expectFusedMatches(kSdpa, {heads(2, 4, 40, 64), heads(2, 4, 40, 64), heads(2, 4, 40, 64), none, true});
  expectFusedMatches(kSdpa, {heads(2, 4, 40, 64), heads(2, 4, 40, 64), heads(2, 4, 40, 64), bool_mask, false});
  expectFusedMatches(kSdpa, {heads(2, 4, 40, 64), heads(2, 4, 40, 64), heads(2, 4, 40, 64),
                             torch::randn({2, 1, 40, 40}), false});
}

// Hugging Face's SDPA integration copies Q, K and V with .contiguous() before the call. kiln's op
// reads any strides, so the copies run only in the fallback; a copy something else reads stays.
TEST(AttentionPattern, ContiguousCopiesOfTheInputsRunOnlyInTheFallback) {
  const std::string copied = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor?):
  %none : NoneType = prim::Constant()
  %zero : float = prim::Constant[value=0.]()
  %false : bool = prim::Constant[value=0]()
  %format : int = prim::Constant[value=0]()
  %qc : Tensor = aten::contiguous(%q, %format)
  %kc : Tensor = aten::contiguous(%k, %format)
  %vc : Tensor = aten::contiguous(%v, %format)
  %out : Tensor = aten::scaled_dot_product_attention(%qc, %kc, %vc, %mask, %zero, %false, %none, %false)
  return (%out))IR";
  auto graph = fused(copied);
  FileCheck()
      .check_not("aten::contiguous")
      ->check("kiln::attention_guard(%q, %k, %v")
      ->check("kiln::attention(%q, %k, %v")
      ->check_count("aten::contiguous", 3, /*exactly=*/true)
      ->check("aten::scaled_dot_product_attention")
      ->run(*graph);
  expectFusedMatches(copied, {heads(2, 4, 17, 16), heads(2, 4, 17, 16), heads(2, 4, 17, 16), c10::IValue()});
  expectFusedMatches(copied, {heads(2, 4, 17, 16), heads(2, 4, 9, 16), heads(2, 4, 9, 16), torch::randn({2, 1, 1, 9})});
  // Q, K and V sliced from one joined projection [B, S, 3·H·D], as kiln's sibling linears leave
  // them: rows three times as far apart as the heads span, in every dtype the CPU kernels take.
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    at::Tensor joined = torch::randn({2, 33, 3 * 4 * 32}).to(dtype);
    std::vector<at::Tensor> qkv;
    for (int64_t i = 0; i < 3; ++i) qkv.push_back(joined.narrow(2, i * 128, 128).view({2, 33, 4, 32}).permute({0, 2, 1, 3}));
    expectFusedMatches(copied, {qkv[0], qkv[1], qkv[2], (torch::rand({2, 1, 33, 33}) > 0.2)});
  }

  // The key's copy is returned too: it stays where it was, the fused op reads it.
  std::string shared = copied;
  shared.replace(shared.find("return (%out)"), std::string("return (%out)").size(), "return (%out, %kc)");
  auto kept = fused(shared);
  FileCheck()
      .check_count("aten::contiguous(%k", 1, /*exactly=*/true)
      ->check("kiln::attention(%q, %")
      ->check("aten::contiguous(%q")
      ->check("aten::contiguous(%v")
      ->run(*kept);
  expectFusedMatches(shared, {heads(2, 4, 17, 16), heads(2, 4, 17, 16), heads(2, 4, 17, 16), c10::IValue()});
}

// BERT's context layer: the attention result goes through transpose(1, 2) and a reshape to
// [B, S, H*D]; the op is told to store it heads-last, so the reshape copies nothing. A result used
// any other way keeps the usual layout.
TEST(AttentionPattern, ResultReadThroughTransposeIsStoredHeadsLast) {
  const std::string merged = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor, %scale : float):
  %none : NoneType = prim::Constant()
  %false : bool = prim::Constant[value=0]()
  %one : int = prim::Constant[value=1]()
  %two : int = prim::Constant[value=2]()
  %zero : float = prim::Constant[value=0.]()
  %out : Tensor = aten::scaled_dot_product_attention(%q, %k, %v, %mask, %zero, %false, %none, %false)
  %t : Tensor = aten::transpose(%out, %one, %two)
  %seq : int = prim::Constant[value=24]()
  %m : int = prim::Constant[value=-1]()
  %sizes : int[] = prim::ListConstruct(%two, %seq, %m)
  %merged : Tensor = aten::reshape(%t, %sizes)
  return (%merged))IR";
  auto graph = fused(merged);
  FileCheck().check("kiln::attention(")->run(*graph);
  bool heads_last = false;
  for (torch::jit::Node* node : graph->nodes()) {
    if (!isKilnFallback(node)) continue;
    for (torch::jit::Node* inner : node->blocks()[0]->nodes()) {
      if (inner->kind().toQualString() == std::string(kAttentionOp)) heads_last = torch::jit::toIValue(inner->inputs().back())->toBool();
    }
  }
  EXPECT_TRUE(heads_last) << *graph;
  at::Tensor mask = torch::randn({2, 1, 1, 24});
  expectFusedMatches(merged, {heads(2, 3, 24, 16), heads(2, 3, 24, 16), heads(2, 3, 24, 16), mask, 0.25});
  // The plain SDPA graph returns the result itself: usual layout.
  auto plain = fused(kSdpa);
  for (torch::jit::Node* node : plain->nodes()) {
    if (!isKilnFallback(node)) continue;
    for (torch::jit::Node* inner : node->blocks()[0]->nodes()) {
      if (inner->kind().toQualString() == std::string(kAttentionOp)) {
        EXPECT_FALSE(torch::jit::toIValue(inner->inputs().back())->toBool());
      }
    }
  }
}

// Forms the pass must leave alone: the graph comes out as it went in.
void expectLeftAlone(const std::string& text) {
  auto graph = fused(text);
  EXPECT_EQ(attentionGroups(graph), 0) << *graph;
  FileCheck().check_not("kiln::attention")->run(*graph);
}

TEST(AttentionPattern, LeavesAloneWhatItCannotProve) {
  // The probabilities are returned too (output_attentions): the S×S matrix is needed.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %s : Tensor = aten::matmul(%q, %kt)
  %p : Tensor = aten::softmax(%s, %m1, %none)
  %o : Tensor = aten::matmul(%p, %v)
  return (%o, %p))IR");
  // Scaling after the mask would scale the mask too.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor, %mask : Tensor):
  %none : NoneType = prim::Constant()
  %one : int = prim::Constant[value=1]()
  %m1 : int = prim::Constant[value=-1]()
  %c : float = prim::Constant[value=0.5]()
  %s : Tensor = aten::matmul(%q, %kt)
  %s1 : Tensor = aten::add(%s, %mask, %one)
  %s2 : Tensor = aten::mul(%s1, %c)
  %p : Tensor = aten::softmax(%s2, %m1, %none)
  %o : Tensor = aten::matmul(%p, %v)
  return (%o))IR");
  // A tensor multiplier that may not be 0-dim.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor, %c : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %s : Tensor = aten::matmul(%q, %kt)
  %s1 : Tensor = aten::mul(%s, %c)
  %p : Tensor = aten::softmax(%s1, %m1, %none)
  %o : Tensor = aten::matmul(%p, %v)
  return (%o))IR");
  // Something other than softmax between the matmuls, and the probabilities on the right.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %s : Tensor = aten::matmul(%q, %kt)
  %s1 : Tensor = aten::sigmoid(%s)
  %o : Tensor = aten::matmul(%s1, %v)
  %p : Tensor = aten::softmax(%s, %m1, %none)
  %o2 : Tensor = aten::matmul(%v, %p)
  return (%o, %o2))IR");
  // An input written in place: moving its readers past the write would change them.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %one : int = prim::Constant[value=1]()
  %s : Tensor = aten::matmul(%q, %kt)
  %p : Tensor = aten::softmax(%s, %m1, %none)
  %w : Tensor = aten::add_(%v, %one, %one)
  %o : Tensor = aten::matmul(%p, %v)
  return (%o))IR");
  // Dropout that is always on, and scaled_dot_product_attention with dropout or GQA.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %true : bool = prim::Constant[value=1]()
  %p : float = prim::Constant[value=0.1]()
  %s : Tensor = aten::matmul(%q, %kt)
  %a : Tensor = aten::softmax(%s, %m1, %none)
  %d : Tensor = aten::dropout(%a, %p, %true)
  %o : Tensor = aten::matmul(%d, %v)
  return (%o))IR");
  expectLeftAlone(R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %p : float = prim::Constant[value=0.1]()
  %false : bool = prim::Constant[value=0]()
  %out : Tensor = aten::scaled_dot_product_attention(%q, %k, %v, %none, %p, %false, %none, %false)
  return (%out))IR");
  expectLeftAlone(R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %zero : float = prim::Constant[value=0.]()
  %false : bool = prim::Constant[value=0]()
  %true : bool = prim::Constant[value=1]()
  %out : Tensor = aten::scaled_dot_product_attention(%q, %k, %v, %none, %zero, %false, %none, %true)
  return (%out))IR");
}

// A mask made in place before the attention (Hugging Face's OPT and BART scale and fill theirs)
// is written before the pattern's first op reads it: the fused op, reading it where the pattern
// ends, sees what the pattern saw. A write between a read and the pattern's end still refuses.
TEST(AttentionPattern, InputsWrittenBeforeThePatternAreFused) {
  const std::string before = R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor, %mask : Tensor):
  %none : NoneType = prim::Constant()
  %zero : float = prim::Constant[value=0.]()
  %half : float = prim::Constant[value=0.5]()
  %false : bool = prim::Constant[value=0]()
  %format : int = prim::Constant[value=0]()
  %scaled : Tensor = aten::mul_(%mask, %half)
  %qc : Tensor = aten::contiguous(%q, %format)
  %out : Tensor = aten::scaled_dot_product_attention(%qc, %k, %v, %mask, %zero, %false, %none, %false)
  return (%out))IR";
  auto graph = fused(before);
  FileCheck().check("aten::mul_")->check("kiln::attention_guard")->check("kiln::attention(%q")->run(*graph);
  // Each graph gets its own mask: it scales it in place.
  for (int run = 0; run < 2; ++run) {
    at::Tensor q = heads(2, 4, 17, 16), k = heads(2, 4, 17, 16), v = heads(2, 4, 17, 16);
    at::Tensor mask = torch::randn({2, 1, 17, 17});
    std::vector<c10::IValue> expected = runGraph(parseGraph(before), {q, k, v, mask.clone()});
    std::vector<c10::IValue> actual = runGraph(graph, {q, k, v, mask.clone()});
    EXPECT_TRUE(sameTensor(actual[0].toTensor(), expected[0].toTensor())) << "run " << run;
  }
  // Q written after its copy was made and before the attention reads the copy: the fused op
  // would read the written Q.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %k : Tensor, %v : Tensor):
  %none : NoneType = prim::Constant()
  %zero : float = prim::Constant[value=0.]()
  %false : bool = prim::Constant[value=0]()
  %format : int = prim::Constant[value=0]()
  %one : int = prim::Constant[value=1]()
  %qc : Tensor = aten::contiguous(%q, %format)
  %w : Tensor = aten::add_(%q, %one, %one)
  %out : Tensor = aten::scaled_dot_product_attention(%qc, %k, %v, %none, %zero, %false, %none, %false)
  return (%out))IR");
  // The explicit form, its mask written in place between the scores and the add that reads it.
  expectLeftAlone(R"IR(
graph(%q : Tensor, %kt : Tensor, %v : Tensor, %mask : Tensor):
  %none : NoneType = prim::Constant()
  %m1 : int = prim::Constant[value=-1]()
  %one : int = prim::Constant[value=1]()
  %s : Tensor = aten::matmul(%q, %kt)
  %w : Tensor = aten::add_(%mask, %one, %one)
  %a : Tensor = aten::add(%s, %mask, %one)
  %p : Tensor = aten::softmax(%a, %m1, %none)
  %o : Tensor = aten::matmul(%p, %v)
  return (%o))IR");
}

TEST(AttentionPattern, GuardMissRunsTheOriginalOps) {
  // Softmax over dim 2 of a 4-d tensor: matched (the dim is only known at run time here) and sent
  // to the fallback by the guard, which gives eager's result exactly.
  std::string text = kBertStyle;
  text.replace(text.find("%probs : Tensor = aten::softmax(%s3, %m1, %none)"),
               std::string("%probs : Tensor = aten::softmax(%s3, %m1, %none)").size(),
               "%probs : Tensor = aten::softmax(%s3, %dim, %none)");
  text.replace(text.find("%scale : float):"), std::string("%scale : float):").size(), "%scale : float, %dim : int):");
  auto graph = fused(text);
  ASSERT_EQ(attentionGroups(graph), 1);
  std::vector<c10::IValue> inputs = {heads(2, 2, 9, 16), heads(2, 2, 9, 16), heads(2, 2, 9, 16), paddingMask(2, 9, -1e4),
                                     4.0, int64_t{2}};
  at::Tensor expected = runGraph(parseGraph(text), inputs)[0].toTensor();
  at::Tensor actual = runGraph(graph, inputs)[0].toTensor();
  EXPECT_TRUE(actual.equal(expected));
}

// No key at all: eager's empty softmax and matmul give zeros, in both forms.
TEST(AttentionPattern, NoKeysGivesZeros) {
  at::Tensor q = heads(1, 2, 5, 16), k = heads(1, 2, 0, 16), v = heads(1, 2, 0, 16);
  at::Tensor expected = at::matmul(at::softmax(at::matmul(q, k.transpose(-1, -2)) * 0.25, -1), v);
  EXPECT_TRUE(attentionExplicit(q, k, v, std::nullopt, std::nullopt, 0.25, 0.0, false).equal(expected));
  EXPECT_TRUE(expected.eq(0).all().item<bool>());
}

TEST(AttentionPattern, FusingTwiceChangesNothing) {
  auto graph = fused(kBertStyle);
  const std::string once = graph->toString();
  fuse(graph, testOptions());
  EXPECT_EQ(graph->toString(), once);
}

// The demo's encoder layer, frozen and fused as kiln::optimize does: its attention is one group.
TEST(AttentionPattern, DemoEncoderLayerAttentionIsFused) {
  demo::EncoderConfig config;
  config.batch = 2;
  config.sequence = 24;
  torch::jit::Module layer = demo::encoderLayer(config, torch::kCPU, torch::kFloat, 1);
  torch::jit::Module optimized = optimize(layer, testOptions());
  auto graph = optimized.get_method("forward").graph();
  EXPECT_EQ(attentionGroups(graph), 1) << *graph;
  std::vector<c10::IValue> inputs = demo::encoderInputs(config, torch::kCPU, torch::kFloat, 2);
  at::Tensor expected = layer.forward(inputs).toTensor();
  at::Tensor actual = optimized.forward(inputs).toTensor();
  EXPECT_TRUE(sameTensor(actual, expected, 10.0));
}

}  // namespace
}  // namespace kiln
