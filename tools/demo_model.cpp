#include "tools/demo_model.h"

namespace kiln::demo {
namespace {

// Written as Hugging Face's BERT layer computes it: linear projections as matmul + bias add,
// scaled dot-product attention with an additive mask, GELU FFN, post-LayerNorm residuals.
constexpr const char* kEncoderSource = R"JIT(
def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
    batch = hidden.size(0)
    seq = hidden.size(1)
    q = torch.matmul(hidden, self.wq) + self.bq
    k = torch.matmul(hidden, self.wk) + self.bk
    v = torch.matmul(hidden, self.wv) + self.bv
    q = q.view(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)
    k = k.view(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)
    v = v.view(batch, seq, self.heads, self.head_dim).permute(0, 2, 1, 3)
    scores = torch.matmul(q, k.transpose(-1, -2)) / self.scale
    scores = scores + mask
    probs = torch.softmax(scores, -1)
    context = torch.matmul(probs, v).permute(0, 2, 1, 3).contiguous()
    context = context.view(batch, seq, self.hidden_size)
    attn = torch.matmul(context, self.wo) + self.bo
    h = torch.layer_norm(attn + hidden, [self.hidden_size], self.ln1_w, self.ln1_b, 1e-12)
    f = torch.matmul(h, self.w1) + self.b1
    f = f * 0.5 * (1.0 + torch.erf(f / 1.4142135623730951))
    f = torch.matmul(f, self.w2) + self.b2
    return torch.layer_norm(f + h, [self.hidden_size], self.ln2_w, self.ln2_b, 1e-12)
)JIT";

}  // namespace

torch::jit::Module encoderLayer(const EncoderConfig& config, torch::Device device,
                                torch::ScalarType dtype, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto options = torch::TensorOptions().dtype(torch::kFloat32);
  auto weight = [&](std::vector<int64_t> shape, double scale) {
    return (at::randn(shape, generator, options) * scale).to(device, dtype);
  };
  const int64_t h = config.hidden;
  torch::jit::Module module("EncoderLayer");
  module.register_attribute("heads", c10::IntType::get(), config.heads);
  module.register_attribute("head_dim", c10::IntType::get(), h / config.heads);
  module.register_attribute("hidden_size", c10::IntType::get(), h);
  module.register_attribute("scale", c10::FloatType::get(),
                            std::sqrt(static_cast<double>(h / config.heads)));
  for (const char* name : {"wq", "wk", "wv", "wo"}) module.register_parameter(name, weight({h, h}, 0.03), false);
  for (const char* name : {"bq", "bk", "bv", "bo", "b2", "ln1_b", "ln2_b"}) {
    module.register_parameter(name, weight({h}, 0.02), false);
  }
  module.register_parameter("w1", weight({h, config.ffn}, 0.03), false);
  module.register_parameter("b1", weight({config.ffn}, 0.02), false);
  module.register_parameter("w2", weight({config.ffn, h}, 0.02), false);
  module.register_parameter("ln1_w", (weight({h}, 0.1) + 1.0), false);
  module.register_parameter("ln2_w", (weight({h}, 0.1) + 1.0), false);
  module.define(kEncoderSource);
  module.eval();
  return module;
}

std::vector<torch::jit::IValue> encoderInputs(const EncoderConfig& config, torch::Device device,
                                              torch::ScalarType dtype, uint64_t seed) {
  auto generator = at::make_generator<at::CPUGeneratorImpl>(seed);
  auto options = torch::TensorOptions().dtype(torch::kFloat32);
  at::Tensor hidden = at::randn({config.batch, config.sequence, config.hidden}, generator, options);
  // Sequence b keeps its first (sequence - 4*b) positions; the rest are padding (-10000, as BERT).
  at::Tensor mask = at::zeros({config.batch, 1, 1, config.sequence}, options);
  for (int64_t b = 0; b < config.batch; ++b) {
    int64_t keep = std::max<int64_t>(1, config.sequence - 4 * b);
    mask.index_put_({b, 0, 0, at::indexing::Slice(keep, at::indexing::None)}, -10000.0);
  }
  return {hidden.to(device, dtype), mask.to(device, dtype)};
}

}  // namespace kiln::demo
