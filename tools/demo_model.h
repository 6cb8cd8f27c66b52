// The embedded default model of `kiln demo` and the benchmarks: a BERT-base-style encoder layer
// (hidden 768, 12 heads, FFN 3072, GELU, LayerNorm, attention with an additive padding mask),
// written as TorchScript source, with random weights.
#pragma once

#include <torch/script.h>

#include <vector>

namespace kiln::demo {

struct EncoderConfig {
  int64_t hidden = 768;
  int64_t heads = 12;
  int64_t ffn = 3072;
  int64_t batch = 8;
  int64_t sequence = 128;
};

// A scripted, eval-mode encoder layer with seeded random weights on `device` in `dtype`.
torch::jit::Module encoderLayer(const EncoderConfig& config, torch::Device device,
                                torch::ScalarType dtype, uint64_t seed = 0);

// Inputs (hidden states, additive padding mask with a few padded positions per sequence).
std::vector<torch::jit::IValue> encoderInputs(const EncoderConfig& config, torch::Device device,
                                              torch::ScalarType dtype, uint64_t seed = 1);

}  // namespace kiln::demo
