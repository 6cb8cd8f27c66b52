// Generated elementwise kernels on CUDA tensors, against eager CUDA (label gpu; skipped without a
// device): every op × dtype × layout, 2,000 random graphs in 8 shards, the schedules (vectorized,
// unaligned, broadcast, strided, 64-bit indexing, row reductions), guards that send inputs to the fallback, the
// current stream (CUDA graph capture fails on any other), a kernel's first use inside a capture,
// and 8 threads on their own streams.
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/jit.h>
#include <torch/torch.h>

#include <memory>
#include <thread>
#include <utility>

#include "kiln/kiln.h"
#include "support/fuzz_graphs.h"
#include "support/graph_testing.h"
#include "support/op_cases.h"
#include "torch_ops/fusion_runtime.h"

namespace kiln {
namespace {

using namespace kiln::testing;

#define KILN_REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

const c10::Device kCuda(c10::kCUDA, 0);

class GpuOpCoverage : public ::testing::TestWithParam<OpCase> {};

TEST_P(GpuOpCoverage, MatchesEagerCudaForEveryDtypeAndLayout) {
  KILN_REQUIRE_CUDA();
  checkOpMatchesEager(GetParam(), kCuda);
}

INSTANTIATE_TEST_SUITE_P(Ops, GpuOpCoverage, ::testing::ValuesIn(kOps),
                         [](const ::testing::TestParamInfo<OpCase>& info) { return std::string(info.param.name); });

// 8 shards of 250 graphs (seeds 1..2000), so `ctest -j` spreads NVRTC's compiles over cores;
// KILN_GPU_QUICK=1 (the one-call GPU check, scripts/device-check.sh): 38 per shard, 304 in all.
class GpuFuzz : public ::testing::TestWithParam<int> {};

TEST_P(GpuFuzz, RandomGraphsMatchEagerCuda) {
  KILN_REQUIRE_CUDA();
  const int64_t graphs = envInt("KILN_GPU_QUICK", 0) ? 38 : 250;
  const int64_t kernel_calls = checkFuzzGraphsMatchEager(kCuda, graphs, graphs * GetParam());
  EXPECT_GT(kernel_calls, graphs / 2) << "most fused groups should have run kiln's CUDA kernel";
}

INSTANTIATE_TEST_SUITE_P(Shards, GpuFuzz, ::testing::Range(0, 8));

const char* kChain = "def f(x, b):\n    return torch.relu(torch.tanh(x * 0.5 + b) * 2 - 1)\n";

// Runs kChain fused and plain on (x, b); the kernel must have run, never the fallback.
void expectChainRanKiln(const at::Tensor& x, const at::Tensor& b) {
  auto graph = fusedFunction(kChain);
  const GroupCounts before = groupCounts(graph);
  std::vector<c10::IValue> actual = runGraph(graph, {x, b});
  std::vector<c10::IValue> expected = runGraph(plainFunction(kChain), {x, b});
  EXPECT_TRUE(sameTensor(actual[0].toTensor(), expected[0].toTensor(), 2.0));
  EXPECT_EQ(actual[0].toTensor().device(), x.device());
  const GroupCounts after = groupCounts(graph);
  EXPECT_EQ(after.fallbacks, before.fallbacks);
  EXPECT_EQ(after.calls, before.calls + 1);
}

TEST(GpuFusion, EverySchedule) {
  KILN_REQUIRE_CUDA();
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto options = at::TensorOptions().dtype(dtype).device(kCuda);
    at::Tensor x = torch::randn({8, 128, 768}, options);
    // Contiguous and aligned (vectorized), a 0-dim and a one-element operand, a tail.
    expectChainRanKiln(x, torch::randn({}, options));
    expectChainRanKiln(torch::randn({1000003}, options), torch::randn({1}, options));
    // Unaligned: a view starting one element in (the scalar schedule).
    expectChainRanKiln(torch::randn({1000004}, options).slice(0, 1), torch::randn({1000003}, options));
    // A bias along the last dim and a per-row scale (linear, read by row and by column), a
    // transposed and a sliced input (strided).
    expectChainRanKiln(x, torch::randn({768}, options));
    expectChainRanKiln(x, torch::randn({8, 128, 1}, options));
    expectChainRanKiln(x.transpose(1, 2), torch::randn({768, 1}, options));
    expectChainRanKiln(torch::randn({8, 128, 1536}, options).slice(2, 0, 1536, 2), x);
    // Empty.
    expectChainRanKiln(torch::randn({0, 768}, options), torch::randn({768}, options));
  }
}

// Row reductions (the rows schedule): residual add + layer_norm, scale + mask + softmax,
// rms_norm and per-row outputs, on short, long and one-element rows, strided and bf16/f16.
void expectRowsRanKiln(const std::string& source, const std::vector<c10::IValue>& inputs) {
  auto graph = fusedFunction(source);
  const GroupCounts before = groupCounts(graph);
  std::vector<c10::IValue> actual = runGraph(graph, inputs);
  std::vector<c10::IValue> expected = runGraph(plainFunction(source), inputs);
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].toTensor().sizes(), expected[i].toTensor().sizes());
    EXPECT_TRUE(sameTensor(actual[i].toTensor(), expected[i].toTensor(), 4.0)) << source;
  }
  const GroupCounts after = groupCounts(graph);
  EXPECT_EQ(after.fallbacks, before.fallbacks) << source;
  EXPECT_EQ(after.calls, before.calls + 1) << source;
}

TEST(GpuFusion, RowReductions) {
  KILN_REQUIRE_CUDA();
  const std::string layer_norm = "def f(x, y, w, b):\n    return torch.layer_norm(x + y, [N], w, b, 1e-5) * 2.0\n";
  const std::string softmax = "def f(x, m):\n    return torch.softmax(x * 0.125 + m, -1)\n";
  const std::string rms = "def f(x, w):\n    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w\n";
  const std::string moments = "def f(x):\n    y = x * 2.0\n    return y.var(-1, keepdim=True) + y.amax(-1, keepdim=True)\n";
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto options = at::TensorOptions().dtype(dtype).device(kCuda);
    for (int64_t n : {1, 33, 768, 4096, 65536}) {
      SCOPED_TRACE("row " + std::to_string(n));
      std::string source = layer_norm;
      source.replace(source.find("[N]"), 3, "[" + std::to_string(n) + "]");
      const int64_t rows = n >= 65536 ? 32 : 1024;
      expectRowsRanKiln(source, {torch::randn({rows, n}, options), torch::randn({rows, n}, options),
                                 torch::randn({n}, options), torch::randn({n}, options)});
      expectRowsRanKiln(softmax, {torch::randn({rows / 8, 8, n}, options) * 8, torch::randn({rows / 8, 1, n}, options)});
      expectRowsRanKiln(rms, {torch::randn({rows, n}, options), torch::randn({n}, options)});
      expectRowsRanKiln(moments, {torch::randn({rows, n}, options) + 100});
    }
    // A transposed input: strided along the row.
    expectRowsRanKiln(softmax, {torch::randn({4, 300, 96}, options).transpose(1, 2), torch::randn({300}, options)});
  }
}

TEST(GpuFusion, SixtyFourBitIndexing) {
  KILN_REQUIRE_CUDA();
  // 2^31 + 5 float16 elements (4 GiB): offsets past int32 must be computed in 64 bits.
  const int64_t n = (int64_t{1} << 31) + 5;
  auto options = at::TensorOptions().dtype(at::kHalf).device(kCuda);
  at::Tensor x = torch::randn({n}, options);
  at::Tensor b = torch::randn({}, options);
  auto graph = fusedFunction(kChain);
  const GroupCounts before = groupCounts(graph);
  at::Tensor actual = runGraph(graph, {x, b})[0].toTensor();
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks);
  at::Tensor expected = runGraph(plainFunction(kChain), {x, b})[0].toTensor();
  // Compare the head, the tail past 2^31, and a random sample in between.
  at::Tensor positions = torch::cat({torch::arange(0, 4096, at::TensorOptions().dtype(at::kLong).device(kCuda)),
                                     torch::arange(n - 4096, n, at::TensorOptions().dtype(at::kLong).device(kCuda)),
                                     torch::randint(0, n, {1 << 20}, at::TensorOptions().dtype(at::kLong).device(kCuda))});
  EXPECT_TRUE(sameTensor(actual.index_select(0, positions), expected.index_select(0, positions), 2.0));
}

TEST(GpuFusion, GuardsSendWhatKilnCannotRunToTheFallback) {
  KILN_REQUIRE_CUDA();
  auto options = at::TensorOptions().device(kCuda);
  auto graph = fusedFunction(kChain);
  auto plain = plainFunction(kChain);
  const GroupCounts before = groupCounts(graph);
  // A CPU 0-dim tensor beside a CUDA tensor: eager moves it; kiln takes the fallback.
  at::Tensor x = torch::randn({64, 64}, options);
  at::Tensor cpu_scalar = torch::randn({});
  EXPECT_TRUE(sameTensor(runGraph(graph, {x, cpu_scalar})[0].toTensor(), runGraph(plain, {x, cpu_scalar})[0].toTensor()));
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks + 1);
  // An input that needs its gradient: the fallback, so autograd sees the original ops.
  at::Tensor tracked = torch::randn({64, 64}, options).requires_grad_();
  at::Tensor out = runGraph(graph, {tracked, x})[0].toTensor();
  EXPECT_TRUE(out.requires_grad());
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks + 2);
  // Inputs that do not broadcast: the fallback raises eager's error.
  EXPECT_ANY_THROW(runGraph(graph, {torch::randn({3, 4}, options), torch::randn({5}, options)}));
}

// Runs `graph` once inside a CUDA graph capture on a side stream; returns the graph to replay
// and the output its replays write.
std::pair<std::unique_ptr<at::cuda::CUDAGraph>, at::Tensor> captureOnSideStream(
    const std::shared_ptr<torch::jit::Graph>& graph, const std::vector<c10::IValue>& inputs) {
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, 0);
  auto cuda_graph = std::make_unique<at::cuda::CUDAGraph>();
  at::Tensor out;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    cuda_graph->capture_begin();
    out = runGraph(graph, inputs)[0].toTensor();
    cuda_graph->capture_end();
  }
  return {std::move(cuda_graph), out};
}

// Captured into a CUDA graph on a side stream: a launch on any stream but the current one breaks
// the capture. Replaying it computes the new contents of the input.
TEST(GpuFusion, LaunchesOnTheCurrentStreamAndCapturesIntoACudaGraph) {
  KILN_REQUIRE_CUDA();
  auto options = at::TensorOptions().device(kCuda);
  auto graph = fusedFunction(kChain);
  auto plain = plainFunction(kChain);
  at::Tensor x = torch::randn({4096, 1024}, options);
  at::Tensor b = torch::randn({1024}, options);
  runGraph(graph, {x, b});  // compile and load outside the capture
  const GroupCounts before = groupCounts(graph);
  auto [cuda_graph, captured_out] = captureOnSideStream(graph, {x, b});
  x.copy_(torch::randn({4096, 1024}, options));
  cuda_graph->replay();
  torch::cuda::synchronize();
  EXPECT_TRUE(sameTensor(captured_out, runGraph(plain, {x, b})[0].toTensor()));
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks);
}

// A kernel whose first use falls inside a capture is not compiled or loaded there: that call
// takes the original ops (captured as usual), and the next call outside compiles it.
TEST(GpuFusion, FirstUseInsideACaptureTakesTheFallback) {
  KILN_REQUIRE_CUDA();
  const char* source = "def f(x):\n    return torch.sigmoid(x * 3.0 - 1.0) * x\n";
  auto graph = fusedFunction(source);
  auto plain = plainFunction(source);
  auto options = at::TensorOptions().device(kCuda);
  at::Tensor x = torch::randn({1000, 1000}, options);
  const GroupCounts before = groupCounts(graph);
  auto [cuda_graph, captured_out] = captureOnSideStream(graph, {x});
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks + 1);
  cuda_graph->replay();
  torch::cuda::synchronize();
  EXPECT_TRUE(sameTensor(captured_out, runGraph(plain, {x})[0].toTensor()));
  runGraph(graph, {x});
  EXPECT_EQ(groupCounts(graph).calls, before.calls + 1);
}

TEST(GpuFusion, EightThreadsOnTheirOwnStreamsShareOneCompile) {
  KILN_REQUIRE_CUDA();
  const char* source = "def f(x, y):\n    return torch.sigmoid(x * y + 0.25) * torch.erf(y - x)\n";
  auto graph = fusedFunction(source);
  auto plain = plainFunction(source);
  const GroupCounts before = groupCounts(graph);
  const int64_t compiles_before = kernelCompileCount();
  std::vector<std::thread> threads;
  std::vector<int> mismatches(8, 0);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      c10::cuda::CUDAStream stream = c10::cuda::getStreamFromPool(false, 0);
      c10::cuda::CUDAStreamGuard guard(stream);
      for (int i = 0; i < 20; ++i) {
        // Each thread's own sizes; a new size never compiles again.
        at::Tensor x = torch::randn({256 + t, 1024}, at::TensorOptions().device(kCuda));
        at::Tensor y = torch::randn({256 + t, 1024}, at::TensorOptions().device(kCuda));
        at::Tensor actual = runGraph(graph, {x, y})[0].toTensor();
        at::Tensor expected = runGraph(plain, {x, y})[0].toTensor();
        if (!sameTensor(actual, expected)) mismatches[static_cast<size_t>(t)]++;
      }
      stream.synchronize();
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < 8; ++t) EXPECT_EQ(mismatches[static_cast<size_t>(t)], 0) << "thread " << t;
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks);
  EXPECT_EQ(groupCounts(graph).calls, before.calls + 160);
  EXPECT_LE(kernelCompileCount() - compiles_before, 1) << "one kernel for every thread and size";
}

TEST(GpuFusion, EveryDeviceGetsItsOwnModule) {
  KILN_REQUIRE_CUDA();
  if (torch::cuda::device_count() < 2) GTEST_SKIP() << "one CUDA device";
  auto graph = fusedFunction(kChain);
  auto plain = plainFunction(kChain);
  const GroupCounts before = groupCounts(graph);
  for (int64_t d = 0; d < static_cast<int64_t>(torch::cuda::device_count()); ++d) {
    auto options = at::TensorOptions().device(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(d)));
    at::Tensor x = torch::randn({1000, 300}, options), b = torch::randn({300}, options);
    at::Tensor actual = runGraph(graph, {x, b})[0].toTensor();
    EXPECT_EQ(actual.device(), x.device());
    EXPECT_TRUE(sameTensor(actual, runGraph(plain, {x, b})[0].toTensor()));
  }
  EXPECT_EQ(groupCounts(graph).fallbacks, before.fallbacks);
}

}  // namespace
}  // namespace kiln
