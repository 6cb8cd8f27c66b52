// libkiln.so's registration: the pass is on after load, enable/disable are idempotent, and the
// embedded demo model gives the same output through the executor with kiln on and off.
#include <gtest/gtest.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include "kiln/kiln.h"
#include "tools/demo_model.h"

namespace kiln {
namespace {

TEST(Library, PassRegisteredOnLoadAndIdempotent) {
  EXPECT_TRUE(enabled());
  enable();
  enable();
  EXPECT_TRUE(enabled());
  disable();
  disable();
  EXPECT_FALSE(enabled());
  enable();
  EXPECT_TRUE(enabled());
}

TEST(Library, DemoEncoderMatchesWithKilnOnAndOff) {
  torch::NoGradGuard no_grad;
  demo::EncoderConfig config;
  config.batch = 2;
  config.sequence = 16;
  torch::jit::Module layer = demo::encoderLayer(config, torch::kCPU, torch::kFloat);
  auto inputs = demo::encoderInputs(config, torch::kCPU, torch::kFloat);
  disable();
  torch::jit::Module plain = layer.clone();
  at::Tensor expected;
  for (int i = 0; i < 3; ++i) expected = plain.forward(inputs).toTensor();
  enable();
  torch::jit::Module fused = layer.clone();
  at::Tensor actual;
  for (int i = 0; i < 3; ++i) actual = fused.forward(inputs).toTensor();
  ASSERT_EQ(actual.sizes(), expected.sizes());
  EXPECT_TRUE(torch::allclose(actual, expected, 1e-4, 1e-5));
}

}  // namespace
}  // namespace kiln
