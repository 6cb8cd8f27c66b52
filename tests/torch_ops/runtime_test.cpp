// The fused runtime through the TorchScript executor: guards (dtype / rank changes), no recompile
// for new sizes, 8 threads on one module, and kiln::optimize + save + load.
#include <gtest/gtest.h>
#include <torch/jit.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <sstream>
#include <thread>

#include "support/graph_testing.h"
#include "torch_ops/fusion_runtime.h"

namespace kiln {
namespace {

using namespace kiln::testing;

constexpr const char* kCell = R"JIT(
def forward(self, x, h):
    y = torch.tanh(torch.matmul(x, self.w) + self.b + h)
    if bool(y.sum() > 0):
        y = torch.sigmoid(y * 2.0) - 0.5
    else:
        y = torch.relu(y - 0.25) * 3.0
    for i in range(2):
        y = torch.tanh(y + h * 0.5)
    return y
)JIT";

torch::jit::Module makeCell() {
  torch::jit::Module m("Cell");
  m.register_parameter("w", torch::randn({16, 16}) * 0.3, false);
  m.register_parameter("b", torch::randn({16}) * 0.1, false);
  m.define(kCell);
  m.eval();
  return m;
}

at::Tensor runModule(torch::jit::Module& m, const at::Tensor& x, const at::Tensor& h) {
  return m.forward({x, h}).toTensor();
}

TEST(Runtime, NewSizesReuseKernelsAndDtypeChangesStayCorrect) {
  torch::NoGradGuard no_grad;
  enable();
  torch::jit::Module cell = makeCell();
  at::Tensor x = torch::randn({4, 16}), h = torch::randn({4, 16});
  at::Tensor reference;
  {
    disable();
    torch::jit::Module plain = cell.clone();
    for (int i = 0; i < 3; ++i) reference = runModule(plain, x, h);
    enable();
  }
  for (int i = 0; i < 3; ++i) EXPECT_TRUE(sameTensor(runModule(cell, x, h), reference));
  EXPECT_GT(report(torch::jit::lastExecutedOptimizedGraph()).groups.size(), 0u);
  for (int64_t batch : {1, 7, 33, 128}) {
    at::Tensor xb = torch::randn({batch, 16}), hb = torch::randn({batch, 16});
    disable();
    torch::jit::Module plain = cell.clone();
    at::Tensor expected;
    for (int i = 0; i < 2; ++i) expected = runModule(plain, xb, hb);
    enable();
    EXPECT_TRUE(sameTensor(runModule(cell, xb, hb), expected)) << "batch " << batch;
  }
  // A dtype change (float64) goes through the guard: correct results either way.
  at::Tensor xd = x.to(at::kDouble), hd = h.to(at::kDouble);
  cell.to(at::kDouble);
  at::Tensor got = runModule(cell, xd, hd);
  EXPECT_EQ(got.scalar_type(), at::kDouble);
  EXPECT_TRUE(sameTensor(got.to(at::kFloat), reference, 50.0));
}

TEST(Runtime, NewSizesDoNotRecompile) {
  auto graph = parseGraph(R"IR(
graph(%x : Tensor, %b : Tensor):
  %one : int = prim::Constant[value=1]()
  %a : Tensor = aten::add(%x, %b, %one)
  %c : Tensor = aten::tanh(%a)
  %d : Tensor = aten::mul(%c, %a)
  return (%d))IR");
  auto original = graph->copy();
  fuse(graph, testOptions());
  runGraph(graph, {torch::randn({3, 48}), torch::randn({48})});
  const int64_t compiles = kernelCompileCount();
  for (int64_t batch : {2, 7, 33, 1000}) {
    at::Tensor x = torch::randn({batch, 48}), b = torch::randn({48});
    EXPECT_TRUE(sameTensor(runGraph(graph, {x, b})[0].toTensor(), runGraph(original, {x, b})[0].toTensor()));
  }
  EXPECT_EQ(kernelCompileCount(), compiles) << "a new batch size recompiled";
}

TEST(Runtime, IntegerFloorDivisionTakesTheFallback) {
  auto graph = parseGraph(R"IR(
graph(%x : Tensor, %y : Tensor):
  %mode : str = prim::Constant[value="floor"]()
  %a : Tensor = aten::div(%x, %y, %mode)
  %b : Tensor = aten::abs(%a)
  return (%b))IR");
  auto original = graph->copy();
  fuse(graph, testOptions());
  at::Tensor x = torch::randint(-50, 50, {64}, at::kLong);
  at::Tensor y = torch::randint(1, 7, {64}, at::kLong);
  EXPECT_TRUE(sameTensor(runGraph(graph, {x, y})[0].toTensor(), runGraph(original, {x, y})[0].toTensor()));
  EXPECT_EQ(report(graph).groups[0].fallbacks, 1);
  at::Tensor xf = torch::randn({64}), yf = torch::randn({64});
  EXPECT_TRUE(sameTensor(runGraph(graph, {xf, yf})[0].toTensor(), runGraph(original, {xf, yf})[0].toTensor()));
  EXPECT_EQ(report(graph).groups[0].calls, 1);
}

TEST(Runtime, RankChangeGetsItsOwnKernel) {
  auto graph = parseGraph(R"IR(
graph(%x : Tensor, %y : Tensor):
  %a : Tensor = aten::mul(%x, %y)
  %b : Tensor = aten::sin(%a)
  return (%b))IR");
  auto original = graph->copy();
  fuse(graph, testOptions());
  for (auto shape : std::vector<std::vector<int64_t>>{{9}, {3, 5}, {2, 3, 4, 5}, {}}) {
    at::Tensor x = torch::randn(shape), y = torch::randn(shape);
    EXPECT_TRUE(sameTensor(runGraph(graph, {x, y})[0].toTensor(), runGraph(original, {x, y})[0].toTensor()));
  }
}

TEST(Runtime, EightThreadsShareOneModuleAndOneCompile) {
  torch::NoGradGuard no_grad;
  enable();
  // A unique constant makes this module's group (and its kernel key) new to this process.
  auto unit = torch::jit::compile(R"JIT(
def f(x, y):
    return torch.sigmoid(x * y + 0.123456789) * torch.exp(-y)
)JIT");
  auto& function = unit->get_function("f");
  at::Tensor x = torch::randn({1000}), y = torch::randn({1000});
  at::Tensor expected = torch::sigmoid(x * y + 0.123456789) * torch::exp(-y);
  const int64_t before = kernelCompileCount();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      torch::NoGradGuard guard;
      at::Tensor first;
      for (int i = 0; i < 100; ++i) {
        at::Tensor out = function({x, y}).toTensor();
        // The executor's first runs profile (unfused); compare fused runs with each other.
        if (i == 2) first = out;
        if (i < 2) first = out;
        if (!torch::equal(out, first) || !torch::allclose(out, expected, 1e-5, 1e-6)) mismatches[static_cast<size_t>(t)]++;
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(mismatches[static_cast<size_t>(t)], 0) << "thread " << t;
  EXPECT_EQ(kernelCompileCount() - before, 1);
}

TEST(Runtime, OptimizedModuleSurvivesSaveAndLoad) {
  torch::NoGradGuard no_grad;
  torch::jit::Module cell = makeCell();
  torch::jit::Module fused = optimize(cell);
  std::string text = fused.get_method("forward").graph()->toString();
  EXPECT_NE(text.find("kiln::fusion_group"), std::string::npos) << text;
  std::string path = ::testing::TempDir() + "kiln_cell.pt";
  fused.save(path);
  torch::jit::Module loaded = torch::jit::load(path);
  at::Tensor x = torch::randn({5, 16}), h = torch::randn({5, 16});
  at::Tensor expected = runModule(cell, x, h);
  EXPECT_TRUE(sameTensor(runModule(loaded, x, h), expected));
  EXPECT_NE(loaded.get_method("forward").graph()->toString().find("kiln::fusion_group"), std::string::npos);
}

// DeBERTa's attention splits its joined projection with chunk(3, dim=-1) and multiplies the parts.
// The executor's canonical form of that chunk cannot be saved, so an optimized module must not
// keep it.
TEST(Runtime, ChunksOutsideGroupsSurviveSaveAndLoad) {
  torch::NoGradGuard no_grad;
  torch::jit::Module m("Chunks");
  m.register_parameter("w", torch::randn({8, 24}) * 0.3, false);
  m.define(R"JIT(
def forward(self, x):
    q, k, v = torch.matmul(x, self.w).chunk(3, dim=-1)
    scores = torch.matmul(q, k.transpose(0, 1))
    return torch.matmul(torch.softmax(scores, dim=-1), v) + torch.tanh(v) * 0.5
)JIT");
  m.eval();
  torch::jit::Module fused = optimize(m);
  std::ostringstream saved;
  fused.save(saved);
  std::istringstream in(saved.str());
  torch::jit::Module loaded = torch::jit::load(in);
  at::Tensor x = torch::randn({6, 8});
  at::Tensor expected = m.forward({x}).toTensor();
  EXPECT_TRUE(torch::allclose(fused.forward({x}).toTensor(), expected, 1e-5, 1e-6));
  EXPECT_TRUE(torch::allclose(loaded.forward({x}).toTensor(), expected, 1e-5, 1e-6));
}

}  // namespace
}  // namespace kiln
