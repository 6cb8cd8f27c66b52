// Row reductions fused with what surrounds them (residual add + layer_norm, scale + mask +
// softmax, rms_norm as T5 and LLaMA write it, log_softmax, var/std, sums and means), against
// eager on fresh random inputs: float32, float64 and bfloat16, rows shorter than a vector and
// longer than a block, non-contiguous inputs, and the shapes a group must hand to its fallback
// (a row that does not match normalized_shape, an operand that does not span the row).
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>
#include <torch/jit.h>

#include <thread>

#include "support/graph_testing.h"
#include "torch_ops/fusion_runtime.h"

namespace kiln {
namespace {

using namespace kiln::testing;

constexpr const char* kSource = R"JIT(
def add_layer_norm(x, y, w, b):
    return torch.layer_norm(x + y, [48], w, b, 1e-12) * 2.0

def layer_norm_plain(x, y):
    return torch.layer_norm(x - y, [48])

def layer_norm_runtime_shape(x, y, n: int):
    return torch.layer_norm(x + y, [n]) * 0.5

def two_rows(x, h):
    return torch.layer_norm(h.tanh(), [64]) * 2.0 + (x * 3.0).sum(-1, keepdim=True).relu()

def scale_mask_softmax(x, mask):
    return torch.softmax(x * 0.125 + mask, -1)

def rms_norm(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

def rms_norm_tensor_eps(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

def rms_norm_op(x, w):
    return torch.rms_norm(x * 1.5, [48], w, 1e-6)

def log_softmax(x):
    return torch.log_softmax(x.tanh() * 3.0, -1)

def moments(x):
    y = x * 2.0 + 1.0
    return y.var(-1, keepdim=True) + y.std(-1, unbiased=False, keepdim=True) + y.sum(-1, keepdim=True)

def mean_dropped(x, y):
    return (x * y).mean(-1)

def amax_amin(x):
    y = x.abs()
    return (y.amax(-1, keepdim=True) - y.amin(-1, keepdim=True)) + y

def softmax_of_column(m, y):
    return torch.softmax(m * 2.0, -1) + y
)JIT";

std::shared_ptr<torch::jit::Graph> graphOf(const std::string& name) {
  static auto unit = torch::jit::compile(kSource);
  return torch::jit::toGraphFunction(unit->get_function(name)).graph()->copy();
}

// Fuses `name`, runs it twice (profiling is not involved: the graph is fused directly) and
// compares with the unfused graph on the same inputs.
void expectFusedMatchesEager(const std::string& name, const std::vector<c10::IValue>& inputs, bool fallback = false,
                             double tolerance_scale = 4.0) {
  std::shared_ptr<torch::jit::Graph> original = graphOf(name);
  std::shared_ptr<torch::jit::Graph> graph = graphOf(name);
  fuse(graph, testOptions());
  Report fused = report(graph);
  ASSERT_EQ(fused.groups.size(), 1u) << *graph;
  auto expected = runGraph(original, inputs);
  auto actual = runGraph(graph, inputs);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    ASSERT_EQ(actual[i].toTensor().sizes(), expected[i].toTensor().sizes());
    ASSERT_TRUE(sameTensor(actual[i].toTensor(), expected[i].toTensor(), tolerance_scale)) << name;
  }
  Report after = report(graph);
  for (const GroupReport& group : after.groups) {
    if (fallback) {
      EXPECT_GT(group.fallbacks, 0) << name << " should have taken its fallback";
    } else {
      EXPECT_EQ(group.fallbacks, 0) << name << " took the fallback";
      EXPECT_GT(group.calls, 0);
    }
  }
}

// The fused `name` on inputs whose row is not normalized_shape raises eager's error (the
// fallback's).
void expectEagersNormalizedShapeError(const std::string& name, const std::vector<c10::IValue>& inputs) {
  std::shared_ptr<torch::jit::Graph> graph = graphOf(name);
  fuse(graph, testOptions());
  try {
    runGraph(graph, inputs);
    ADD_FAILURE() << name << ": no error for a row that is not normalized_shape";
  } catch (const std::exception& error) {
    EXPECT_NE(std::string(error.what()).find("normalized_shape"), std::string::npos) << error.what();
  }
}

at::Tensor randn(std::vector<int64_t> shape, at::ScalarType dtype = at::kFloat) {
  return torch::randn(shape, at::TensorOptions().dtype(dtype));
}

TEST(Reduction, ResidualAddLayerNormIsOneKernel) {
  std::shared_ptr<torch::jit::Graph> graph = graphOf("add_layer_norm");
  fuse(graph, testOptions());
  torch::jit::testing::FileCheck().check("kiln::fusion_guard")->check_not("aten::layer_norm")->check("kiln::fusion_group")
      ->run(*graph);
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kBFloat16}) {
    for (std::vector<int64_t> shape : std::vector<std::vector<int64_t>>{{48}, {3, 48}, {2, 7, 48}}) {
      SCOPED_TRACE(std::string(c10::toString(dtype)) + " rank " + std::to_string(shape.size()));
      expectFusedMatchesEager("add_layer_norm", {randn(shape, dtype), randn(shape, dtype) * 3, randn({48}, dtype),
                                                 randn({48}, dtype)});
      expectFusedMatchesEager("layer_norm_plain", {randn(shape, dtype) + 100, randn(shape, dtype)});
    }
  }
  // A broadcast residual and a transposed input are read in place.
  at::Tensor transposed = randn({48, 5}).t();
  expectFusedMatchesEager("add_layer_norm", {transposed, randn({48}), randn({48}), randn({48})});
}

TEST(Reduction, NormalizedShapeBuiltAtRunTimeIsCheckedAgainstTheRow) {
  // [self.hidden_size] in a scripted module: the int is a group input.
  expectFusedMatchesEager("layer_norm_runtime_shape", {randn({5, 40}), randn({40}), int64_t{40}});
  expectEagersNormalizedShapeError("layer_norm_runtime_shape", {randn({5, 40}), randn({40}), int64_t{39}});
}

TEST(Reduction, RowsOfDifferentLengthsGoToDifferentGroups) {
  // layer_norm over h's 64 and a sum over x's 32: the sum and what meets it cannot share the
  // layer_norm's group; each group runs its kernel.
  std::shared_ptr<torch::jit::Graph> graph = graphOf("two_rows");
  fuse(graph, testOptions());
  Report fused = report(graph);
  ASSERT_EQ(fused.groups.size(), 2u) << *graph;
  std::vector<c10::IValue> inputs = {randn({8, 32}), randn({8, 64})};
  ASSERT_TRUE(sameTensor(runGraph(graph, inputs)[0].toTensor(), runGraph(graphOf("two_rows"), inputs)[0].toTensor(), 4.0));
  for (const GroupReport& group : report(graph).groups) {
    EXPECT_EQ(group.fallbacks, 0);
    EXPECT_GT(group.calls, 0);
  }
}

TEST(Reduction, ScaleMaskSoftmaxAndLogSoftmax) {
  for (int64_t length : {1, 5, 64, 77, 1000}) {
    SCOPED_TRACE("row " + std::to_string(length));
    at::Tensor mask = torch::where(torch::rand({2, 1, 1, length}) > 0.3, 0.0, -10000.0).to(at::kFloat);
    expectFusedMatchesEager("scale_mask_softmax", {randn({2, 3, 4, length}) * 8, mask});
    expectFusedMatchesEager("log_softmax", {randn({6, length})});
  }
  expectFusedMatchesEager("scale_mask_softmax", {randn({2, 3, 9, 33}, at::kBFloat16), randn({2, 1, 1, 33}, at::kBFloat16)});
  // -inf in a row (a fully masked position) and a fully masked row, as eager gives them.
  at::Tensor mask = torch::zeros({1, 1, 1, 20});
  mask.index_put_({0, 0, 0, torch::indexing::Slice(0, 5)}, -INFINITY);
  expectFusedMatchesEager("scale_mask_softmax", {randn({1, 2, 3, 20}), mask});
  expectFusedMatchesEager("scale_mask_softmax", {randn({1, 2, 3, 20}), torch::full({1, 1, 1, 20}, -INFINITY)});
}

TEST(Reduction, RmsNormComposedAndAsOneOp) {
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    expectFusedMatchesEager("rms_norm", {randn({4, 9, 48}, dtype), randn({48}, dtype)});
    expectFusedMatchesEager("rms_norm_op", {randn({4, 9, 48}, dtype), randn({48}, dtype)});
  }
  // T5 frozen: its epsilon becomes a 0-dim tensor (here a graph input the profile says is 0-dim).
  std::shared_ptr<torch::jit::Graph> original = graphOf("rms_norm_tensor_eps");
  std::shared_ptr<torch::jit::Graph> graph = graphOf("rms_norm_tensor_eps");
  graph->inputs()[2]->setType(c10::TensorType::createContiguous(at::kFloat, at::kCPU, {}));
  fuse(graph, testOptions());
  ASSERT_EQ(report(graph).groups.size(), 1u) << *graph;
  std::vector<c10::IValue> inputs = {randn({4, 9, 48}), randn({48}), torch::tensor(1e-6)};
  ASSERT_TRUE(sameTensor(runGraph(graph, inputs)[0].toTensor(), runGraph(original, inputs)[0].toTensor(), 4.0));
  EXPECT_EQ(report(graph).groups[0].fallbacks, 0);
}

TEST(Reduction, VarianceStdSumMeanAmaxAmin) {
  for (int64_t length : {1, 2, 31, 300}) {
    SCOPED_TRACE("row " + std::to_string(length));
    expectFusedMatchesEager("moments", {randn({5, length}) + 50});
    expectFusedMatchesEager("amax_amin", {randn({3, 2, length})});
    expectFusedMatchesEager("mean_dropped", {randn({4, length}), randn({length})});
  }
  expectFusedMatchesEager("moments", {randn({3, 17}, at::kDouble)});
}

TEST(Reduction, GroupsKeepEagersShapesAndRunTheFallbackWhereTheRowDiffers) {
  // mean without keepdim is its group's last op; its output drops the row.
  std::shared_ptr<torch::jit::Graph> graph = graphOf("mean_dropped");
  fuse(graph, testOptions());
  auto out = runGraph(graph, {randn({4, 6}), randn({6})});
  EXPECT_EQ(out[0].toTensor().sizes(), (std::vector<int64_t>{4}));
  // softmax over a size-1 dim broadcast against a wider y: the kernel's row is y's, not m's.
  // (Statistics are per group code and add up: the fused case runs first.)
  expectFusedMatchesEager("softmax_of_column", {randn({4, 6}), randn({4, 6})});
  expectFusedMatchesEager("softmax_of_column", {randn({4, 1}), randn({4, 6})}, /*fallback=*/true);
  // A row that is not normalized_shape: eager's error, through the fallback.
  expectEagersNormalizedShapeError("layer_norm_plain", {randn({3, 40}), randn({3, 40})});
}

TEST(Reduction, EightThreadsShareOneKernelAndKeepTheirOwnScratchRows) {
  // bfloat16 softmax keeps exp(x - max) in a scratch row per task: threads must never share one.
  std::shared_ptr<torch::jit::Graph> graph = graphOf("scale_mask_softmax");
  fuse(graph, testOptions());
  std::shared_ptr<torch::jit::Graph> original = graphOf("scale_mask_softmax");
  std::vector<std::vector<c10::IValue>> inputs;
  std::vector<at::Tensor> expected;
  for (int t = 0; t < 8; ++t) {
    inputs.push_back({randn({4, 3, 16, 200 + 7 * t}, at::kBFloat16) * 4, randn({4, 1, 1, 200 + 7 * t}, at::kBFloat16)});
    expected.push_back(runGraph(original, inputs.back())[0].toTensor());
  }
  runGraph(graph, inputs[0]);  // compiled here, once
  const int64_t compiled = kernelCompileCount();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      torch::NoGradGuard guard;
      for (int i = 0; i < 20; ++i) {
        at::Tensor out = runGraph(graph, inputs[static_cast<size_t>(t)])[0].toTensor();
        if (!sameTensor(out, expected[static_cast<size_t>(t)], 4.0)) mismatches[static_cast<size_t>(t)]++;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(mismatches[static_cast<size_t>(t)], 0) << "thread " << t;
  EXPECT_EQ(kernelCompileCount(), compiled);
}

TEST(Reduction, NewBatchAndRowLengthsReuseTheKernel) {
  std::shared_ptr<torch::jit::Graph> graph = graphOf("scale_mask_softmax");
  fuse(graph, testOptions());
  runGraph(graph, {randn({2, 2, 3, 40}), randn({2, 1, 1, 40})});
  const int64_t compiled = kernelCompileCount();
  for (int64_t length : {17, 128, 333}) {
    auto original = graphOf("scale_mask_softmax");
    std::vector<c10::IValue> inputs = {randn({3, 2, 5, length}), randn({3, 1, 1, length})};
    ASSERT_TRUE(sameTensor(runGraph(graph, inputs)[0].toTensor(), runGraph(original, inputs)[0].toTensor(), 4.0));
  }
  EXPECT_EQ(kernelCompileCount(), compiled);
}

}  // namespace
}  // namespace kiln
