// Scaled dot-product attention on the CPU: ATen's fused SDPA (Baseline_Aten_SDPA), the unfused
// matmul -> softmax -> matmul chain (Baseline_Unfused) and kiln::attention through the
// dispatcher (Kiln_Attention), pinned to kiln's kernel (in bf16 kiln::attention otherwise runs
// whichever of its kernel and ATen's measured faster; on AMX CPUs its bf16 kernel is the tile one).
// Args: shape (0: B=8 H=12 S=128 D=64, BERT-base; 1: the same at S=512; 2: B=2 H=16 S=2048
// D=128, long context), bf16 (0: float32, 1: bfloat16), causal.
// Counter: FLOP/s of the full product, 4*B*H*S*S*D, causal or not, so causal rows show the
// time saved as a higher rate.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "bench/kiln_attention.h"
#include "torch_ops/measured_choice.h"

namespace {

enum class Implementation { kAtenSdpa, kUnfused, kKiln };

using kiln::bench::kilnAttention;

at::Tensor unfusedAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            bool causal) {
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(q.size(-1)));
  if (causal) {
    at::Tensor future = at::ones({q.size(-2), k.size(-2)}, at::kBool).triu(1);
    scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
  }
  return at::matmul(at::softmax(scores, -1), v);
}

struct Shape {
  int64_t batch, heads, seq, head_dim;
};
constexpr Shape kShapes[] = {{8, 12, 128, 64}, {8, 12, 512, 64}, {2, 16, 2048, 128}};

void runAttention(benchmark::State& state, Implementation implementation) {
  torch::NoGradGuard no_grad;
  const auto [batch, heads, seq, head_dim] = kShapes[state.range(0)];
  const at::ScalarType dtype = state.range(1) != 0 ? at::kBFloat16 : at::kFloat;
  const bool causal = state.range(2) != 0;
  at::Tensor q = torch::randn({batch, heads, seq, head_dim}).to(dtype);
  at::Tensor k = torch::randn({batch, heads, seq, head_dim}).to(dtype);
  at::Tensor v = torch::randn({batch, heads, seq, head_dim}).to(dtype);
  const auto run = [&] {
    switch (implementation) {
      case Implementation::kAtenSdpa:
        return at::scaled_dot_product_attention(q, k, v, {}, 0.0, causal);
      case Implementation::kUnfused:
        return unfusedAttention(q, k, v, causal);
      default:
        return kilnAttention(q, k, v, causal);
    }
  };
  kiln::forceChoice(implementation == Implementation::kKiln ? "kiln" : "");
  for (int i = 0; i < 2; ++i) run();
  for (auto _ : state) benchmark::DoNotOptimize(run());
  kiln::forceChoice("");
  const double flops = 4.0 * batch * heads * seq * seq * head_dim;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

void Baseline_Aten_SDPA(benchmark::State& s) { runAttention(s, Implementation::kAtenSdpa); }
void Baseline_Unfused(benchmark::State& s) { runAttention(s, Implementation::kUnfused); }
void Kiln_Attention(benchmark::State& s) { runAttention(s, Implementation::kKiln); }

#define KILN_ATTENTION_BENCH(name)                \
  BENCHMARK(name)                                 \
      ->ArgsProduct({{0, 1, 2}, {0, 1}, {0, 1}})  \
      ->ArgNames({"shape", "bf16", "causal"})     \
      ->Unit(benchmark::kMillisecond)             \
      ->UseRealTime();

KILN_ATTENTION_BENCH(Baseline_Aten_SDPA)
KILN_ATTENTION_BENCH(Baseline_Unfused)
KILN_ATTENTION_BENCH(Kiln_Attention)

}  // namespace
