// The generated CUDA kernels, run on the CPU through the CUDA emulator (codegen/cuda_emulator.h)
// against eager: the same lowering, specialization, argument block and grid as on a GPU, the
// source compiled by the host compiler instead of NVRTC. Every op × dtype × layout, random graphs,
// every schedule (vectorized with its tail, unaligned, row and column broadcasts, strided, 64-bit
// indexing on a sparse view past 2^31 elements, both row-reduction schedules with their warp
// shuffles and block barriers run in lockstep). A check of the generator, not of the hardware:
// the GPU tests (tests/gpu, label gpu) stay the proof on a device.
#include <gtest/gtest.h>
#include <torch/jit.h>
#include <torch/torch.h>

#include "support/fuzz_graphs.h"
#include "support/graph_testing.h"
#include "support/op_cases.h"
#include "torch_ops/fusion_runtime.h"

namespace kiln {
namespace {

using namespace kiln::testing;

class EmulatedCudaOpCoverage : public ::testing::TestWithParam<OpCase> {};

TEST_P(EmulatedCudaOpCoverage, MatchesEagerForEveryDtypeAndLayout) {
  CudaEmulation emulate;
  checkOpMatchesEager(GetParam(), c10::kCPU, /*emulated_cuda=*/true);
}

INSTANTIATE_TEST_SUITE_P(Ops, EmulatedCudaOpCoverage, ::testing::ValuesIn(kOps),
                         [](const ::testing::TestParamInfo<OpCase>& info) { return std::string(info.param.name); });

// 2 shards of 60 random graphs (KILN_FUZZ_GRAPHS sets the count per shard).
class EmulatedCudaFuzz : public ::testing::TestWithParam<int> {};

TEST_P(EmulatedCudaFuzz, RandomGraphsMatchEager) {
  CudaEmulation emulate;
  const int64_t graphs = envInt("KILN_FUZZ_GRAPHS", 60);
  const int64_t kernel_calls = checkFuzzGraphsMatchEager(c10::kCPU, graphs, graphs * GetParam(), /*emulated_cuda=*/true);
  EXPECT_GT(kernel_calls, graphs / 4) << "most fused groups should have run the emulated CUDA kernel";
}

INSTANTIATE_TEST_SUITE_P(Shards, EmulatedCudaFuzz, ::testing::Range(0, 2));

// Runs `source` fused (under emulation) and plain; the emulated kernel must have run.
void expectEmulatedKernelRan(const std::string& source, const std::vector<c10::IValue>& inputs, double tolerance = 2.0) {
  auto graph = fusedFunction(source);
  const GroupCounts before = groupCounts(graph);
  std::vector<c10::IValue> actual;
  {
    CudaEmulation emulate;
    actual = runGraph(graph, inputs);
  }
  std::vector<c10::IValue> expected = runGraph(plainFunction(source), inputs);
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].toTensor().sizes(), expected[i].toTensor().sizes());
    EXPECT_TRUE(sameTensor(actual[i].toTensor(), expected[i].toTensor(), tolerance)) << source;
  }
  const GroupCounts after = groupCounts(graph);
  EXPECT_EQ(after.fallbacks, before.fallbacks) << source;
  EXPECT_EQ(after.calls, before.calls + 1) << source;
}

const char* kChain = "def f(x, b):\n    return torch.relu(torch.tanh(x * 0.5 + b) * 2 - 1)\n";

TEST(EmulatedCudaFusion, EverySchedule) {
  for (at::ScalarType dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto options = at::TensorOptions().dtype(dtype);
    at::Tensor x = torch::randn({4, 16, 96}, options);
    // Contiguous and aligned (vectorized) with a 0-dim operand; a tail past the last whole vector
    // with a one-element operand.
    expectEmulatedKernelRan(kChain, {x, torch::randn({}, options)});
    // 0-dim and one-element operands only: a one-element space, its output written as contiguous.
    expectEmulatedKernelRan(kChain, {torch::randn({}, options), torch::randn({}, options)});
    expectEmulatedKernelRan(kChain, {torch::randn({1, 1}, options), torch::randn({}, options)});
    expectEmulatedKernelRan(kChain, {torch::randn({10007}, options), torch::randn({1}, options)});
    // Unaligned: a view starting one element in (the scalar linear schedule).
    expectEmulatedKernelRan(kChain, {torch::randn({10008}, options).slice(0, 1), torch::randn({10007}, options)});
    // A bias along the last dim (read by row) and a per-row scale (read by column).
    expectEmulatedKernelRan(kChain, {x, torch::randn({96}, options)});
    expectEmulatedKernelRan(kChain, {x, torch::randn({4, 16, 1}, options)});
    // Transposed and sliced inputs (strided).
    expectEmulatedKernelRan(kChain, {x.transpose(1, 2), torch::randn({96, 1}, options)});
    expectEmulatedKernelRan(kChain, {torch::randn({4, 16, 192}, options).slice(2, 0, 192, 2), x});
    expectEmulatedKernelRan(kChain, {torch::randn({3, 5, 7, 11}, options).permute({2, 0, 3, 1}), torch::randn({11, 1}, options)});
  }
}

// Row reductions on both CUDA row schedules: a warp per row (rows up to 1,024) and a block per
// row with shared-memory partials and __syncthreads().
TEST(EmulatedCudaFusion, RowReductions) {
  const std::string layer_norm = "def f(x, y, w, b):\n    return torch.layer_norm(x + y, [N], w, b, 1e-5) * 2.0\n";
  const std::string softmax = "def f(x, m):\n    return torch.softmax(x * 0.125 + m, -1)\n";
  const std::string rms = "def f(x, w):\n    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w\n";
  const std::string moments = "def f(x):\n    y = x * 2.0\n    return y.var(-1, keepdim=True) + y.amax(-1, keepdim=True)\n";
  const std::string log_softmax = "def f(x):\n    return torch.log_softmax(x - 1.0, -1), x.amin(-1)\n";
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto options = at::TensorOptions().dtype(dtype);
    for (int64_t n : {1, 33, 768, 1025, 3000}) {
      SCOPED_TRACE("row " + std::to_string(n));
      std::string source = layer_norm;
      source.replace(source.find("[N]"), 3, "[" + std::to_string(n) + "]");
      const int64_t rows = n > 1024 ? 7 : 40;
      expectEmulatedKernelRan(source, {torch::randn({rows, n}, options), torch::randn({rows, n}, options),
                                       torch::randn({n}, options), torch::randn({n}, options)}, 4.0);
      expectEmulatedKernelRan(softmax, {torch::randn({rows, 2, n}, options) * 8, torch::randn({rows, 1, n}, options)}, 4.0);
      expectEmulatedKernelRan(rms, {torch::randn({rows, n}, options), torch::randn({n}, options)}, 4.0);
      expectEmulatedKernelRan(moments, {torch::randn({rows, n}, options) + 100}, 4.0);
      expectEmulatedKernelRan(log_softmax, {torch::randn({rows, n}, options)}, 4.0);
    }
    // A transposed input: strided along the row.
    expectEmulatedKernelRan(softmax, {torch::randn({4, 300, 96}, options).transpose(1, 2), torch::randn({300}, options)}, 4.0);
  }
}

// Element offsets past 2^31 force 64-bit index arithmetic: a 3 x 4 view whose rows lie 2^30
// elements apart in a float16 storage of 2^31 + 16 elements (4 GiB reserved, a few pages touched).
TEST(EmulatedCudaFusion, SixtyFourBitIndexingOnASparseView) {
  const int64_t storage = (int64_t{1} << 31) + 16;
  at::Tensor base = at::empty({storage}, at::TensorOptions().dtype(at::kHalf));
  at::Tensor x = base.as_strided({3, 4}, {int64_t{1} << 30, 2});
  x.copy_(torch::randn({3, 4}));
  at::Tensor far = base.as_strided({3, 4}, {int64_t{1} << 30, 1}, 5);
  far.copy_(torch::randn({3, 4}));
  expectEmulatedKernelRan(kChain, {x, torch::randn({}, at::TensorOptions().dtype(at::kHalf))});
  expectEmulatedKernelRan(kChain, {x, far});
}

// A double becomes a half through float, as eager converts: 1 + 2^-11 + 2^-40 rounds to float
// as the tie 1 + 2^-11, then to half as 1.0 (rounded once, it would be 1 + 2^-10). On the CPU
// backend and in the CUDA source alike.
TEST(EmulatedCudaFusion, DoubleToHalfRoundsTwiceAsEagerDoes) {
  const std::string source = "def f(x):\n    return (x * 1.0 + 0.0).to(5)\n";
  at::Tensor x = torch::randn({4096}, at::TensorOptions().dtype(at::kDouble));
  x.slice(0, 0, 64).fill_(1.0 + std::ldexp(1.0, -11) + std::ldexp(1.0, -40));
  x.slice(0, 64, 128).fill_(-(1.0 + std::ldexp(3.0, -11) + std::ldexp(1.0, -40)));
  const at::Tensor expected = runGraph(plainFunction(source), {x})[0].toTensor();
  ASSERT_EQ(expected[0].item<double>(), 1.0);
  auto graph = fusedFunction(source);
  EXPECT_TRUE(torch::equal(runGraph(graph, {x})[0].toTensor(), expected)) << "CPU backend";
  expectEmulatedKernelRan(source, {x}, 0.0);
}

}  // namespace
}  // namespace kiln
