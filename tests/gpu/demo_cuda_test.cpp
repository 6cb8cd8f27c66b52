// The embedded encoder layer on CUDA, kiln on and off (label gpu; skipped without a device).
#include <gtest/gtest.h>
#include <torch/cuda.h>

#include "kiln/kiln.h"
#include "tools/demo_model.h"

namespace kiln {
namespace {

TEST(GpuDemo, EncoderHalfMatchesWithKilnOnAndOff) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  torch::NoGradGuard no_grad;
  demo::EncoderConfig config;
  torch::jit::Module layer = demo::encoderLayer(config, torch::kCUDA, torch::kHalf);
  auto inputs = demo::encoderInputs(config, torch::kCUDA, torch::kHalf);
  disable();
  torch::jit::Module plain = layer.clone();
  at::Tensor expected;
  for (int i = 0; i < 3; ++i) expected = plain.forward(inputs).toTensor();
  enable();
  torch::jit::Module fused = layer.clone();
  at::Tensor actual;
  for (int i = 0; i < 3; ++i) actual = fused.forward(inputs).toTensor();
  EXPECT_TRUE(torch::allclose(actual.to(torch::kFloat), expected.to(torch::kFloat), 2e-2, 2e-2));
}

}  // namespace
}  // namespace kiln
