// kiln::linear on CUDA tensors through cuBLASLt (torch_ops/cublaslt.h), against eager CUDA (label
// gpu; skipped without a device): every epilogue cuBLASLt fuses (bias, relu, tanh-GELU, a
// residual as C, none), float16 and bfloat16, one row to a thousand, BERT-base's shapes; exact
// GELU and float32 without TF32 run ATen's ops instead; a kiln::optimize'd module runs the same
// way; the call runs on torch's current stream (it captures into a CUDA graph).
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/script.h>
#include <torch/torch.h>

#include "kiln/kiln.h"
#include "support/graph_testing.h"
#include "torch_ops/cublaslt.h"

namespace kiln {
namespace {

#define KILN_REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

const c10::Device kCuda(c10::kCUDA, 0);

at::Tensor callLinear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                      const std::optional<at::Tensor>& other, const std::string& epilogue) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::linear", "");
  torch::jit::Stack stack{x, w, b ? c10::IValue(*b) : c10::IValue(), other ? c10::IValue(*other) : c10::IValue(), epilogue};
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

at::Tensor eagerLinear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b,
                       const std::optional<at::Tensor>& other, const std::string& epilogue) {
  at::Tensor y = at::linear(x, w, b);
  if (epilogue.rfind("add", 0) == 0) y = y + *other;
  if (epilogue.find("relu") != std::string::npos) y = at::relu(y);
  if (epilogue.find("gelu_tanh") != std::string::npos) {
    y = at::gelu(y, "tanh");
  } else if (epilogue.find("gelu") != std::string::npos) {
    y = at::gelu(y, "none");
  }
  return y;
}

void expectClose(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  ASSERT_EQ(actual.scalar_type(), expected.scalar_type()) << what;
  // Sums of K products in another order, rounded to the dtype once.
  const double scale = expected.abs().max().item<double>() + 1e-3;
  const double error = (actual.to(at::kFloat) - expected.to(at::kFloat)).abs().max().item<double>();
  EXPECT_LE(error, (expected.scalar_type() == at::kBFloat16 ? 2e-2 : 4e-3) * scale) << what;
}

TEST(CublasLtLinear, EveryFusedEpilogueMatchesEagerInHalfAndBfloat16) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  for (at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    for (const char* epilogue : {"", "relu", "gelu_tanh", "add", "add+relu", "add+gelu_tanh"}) {
      for (int64_t rows : {1, 7, 1000}) {
        const auto options = torch::TensorOptions().device(kCuda).dtype(dtype);
        at::Tensor x = torch::randn({rows, 96}, options), w = torch::randn({80, 96}, options) / 10;
        at::Tensor b = torch::randn({80}, options), r = torch::randn({rows, 80}, options);
        const bool add = std::string(epilogue).rfind("add", 0) == 0;
        const std::optional<at::Tensor> other = add ? std::optional<at::Tensor>(r) : std::nullopt;
        Epilogue parsed = *Epilogue::parse(epilogue);
        EXPECT_EQ(cublasLtRefusal(x, w, b, other, parsed), "") << epilogue;
        const std::string what = std::string(c10::toString(dtype)) + " '" + epilogue + "' rows " + std::to_string(rows);
        expectClose(callLinear(x, w, b, other, epilogue), eagerLinear(x, w, b, other, epilogue), what);
        expectClose(cublasLtLinear(x, w, std::nullopt, other, parsed), eagerLinear(x, w, std::nullopt, other, epilogue),
                    what + " without bias");
      }
    }
  }
}

TEST(CublasLtLinear, BertShapesAndBatchedInputs) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  const auto options = torch::TensorOptions().device(kCuda).dtype(at::kHalf);
  for (auto [k, n] : {std::pair<int64_t, int64_t>{768, 768}, {768, 2304}, {768, 3072}, {3072, 768}}) {
    at::Tensor x = torch::randn({8, 512, k}, options), w = torch::randn({n, k}, options) / std::sqrt(double(k));
    at::Tensor b = torch::randn({n}, options);
    expectClose(callLinear(x, w, b, std::nullopt, "gelu_tanh"), eagerLinear(x, w, b, std::nullopt, "gelu_tanh"),
                "8 x 512 x " + std::to_string(k) + " -> " + std::to_string(n));
  }
}

TEST(CublasLtLinear, RefusesWhatItCannotRunAndAtenRunsIt) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  const auto half = torch::TensorOptions().device(kCuda).dtype(at::kHalf);
  at::Tensor x = torch::randn({5, 32}, half), w = torch::randn({16, 32}, half), b = torch::randn({16}, half);
  EXPECT_NE(cublasLtRefusal(x, w, b, std::nullopt, *Epilogue::parse("gelu")), "");  // exact GELU
  EXPECT_NE(cublasLtRefusal(x.t().contiguous().t(), w, b, std::nullopt, Epilogue{}), "");  // not contiguous
  at::Tensor broadcast = torch::randn({16}, half);
  EXPECT_NE(cublasLtRefusal(x, w, b, broadcast, *Epilogue::parse("add")), "");  // residual of another shape
  expectClose(callLinear(x, w, b, std::nullopt, "gelu"), eagerLinear(x, w, b, std::nullopt, "gelu"), "exact gelu");
  expectClose(callLinear(x, w, b, broadcast, "add"), eagerLinear(x, w, b, broadcast, "add"), "broadcast residual");
  // float32: only with TF32 allowed.
  const auto single = torch::TensorOptions().device(kCuda).dtype(at::kFloat);
  at::Tensor xf = torch::randn({5, 32}, single), wf = torch::randn({16, 32}, single);
  const bool tf32 = at::globalContext().allowTF32CuBLAS();
  at::globalContext().setAllowTF32CuBLAS(false);
  EXPECT_NE(cublasLtRefusal(xf, wf, std::nullopt, std::nullopt, Epilogue{}), "");
  at::globalContext().setAllowTF32CuBLAS(true);
  EXPECT_EQ(cublasLtRefusal(xf, wf, std::nullopt, std::nullopt, Epilogue{}), "");
  at::globalContext().setAllowTF32CuBLAS(tf32);
}

TEST(CublasLtLinear, OptimizedModuleRunsCublasLt) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  torch::jit::Module m("CublasLtModule");
  m.register_parameter("w", torch::randn({64, 48}).div(7).to(kCuda).to(at::kHalf), false);
  m.register_parameter("b", torch::randn({64}).to(kCuda).to(at::kHalf), false);
  m.define("def forward(self, x):\n  return torch.relu(torch.linear(x, self.w, self.b))\n");
  m.eval();
  torch::jit::Module fused = optimize(m);
  at::Tensor x = torch::randn({3, 10, 48}).to(kCuda).to(at::kHalf);
  expectClose(fused.forward({x}).toTensor(), m.forward({x}).toTensor(), "optimized module");
  Report rep = report(fused.get_method("forward").graph());
  ASSERT_EQ(rep.groups.size(), 1u);
  EXPECT_EQ(rep.groups[0].choice, "cublaslt");
}

TEST(CublasLtLinear, RunsOnTheCurrentStreamAndCaptures) {
  KILN_REQUIRE_CUDA();
  torch::NoGradGuard no_grad;
  const auto options = torch::TensorOptions().device(kCuda).dtype(at::kBFloat16);
  at::Tensor x = torch::randn({64, 128}, options), w = torch::randn({256, 128}, options) / 11, b = torch::randn({256}, options);
  at::Tensor expected = eagerLinear(x, w, b, std::nullopt, "relu");
  callLinear(x, w, b, std::nullopt, "relu");  // the heuristic asked outside the capture
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  at::Tensor captured;
  {
    c10::cuda::CUDAStreamGuard on_side(side);
    at::cuda::CUDAGraph graph;
    graph.capture_begin();
    captured = callLinear(x, w, b, std::nullopt, "relu");
    graph.capture_end();
    graph.replay();
  }
  side.synchronize();
  expectClose(captured, expected, "captured and replayed");
}

}  // namespace
}  // namespace kiln
