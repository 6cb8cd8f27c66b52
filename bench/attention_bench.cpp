// Scaled dot-product attention on the CPU, B=8 x H=12 heads x head_dim 64: ATen's fused SDPA
// (Baseline_Aten_SDPA), the unfused matmul -> softmax -> matmul chain (Baseline_Unfused) and
// kiln::attention through the dispatcher (Kiln_Attention).
// Args: S (query and key length), bf16 (0: float32, 1: bfloat16), causal.
// Counter: FLOP/s of the full product, 4*B*H*S*S*D, causal or not, so causal rows show the
// time saved as a higher rate.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "bench/kiln_attention.h"

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

void runAttention(benchmark::State& state, Implementation implementation) {
  torch::NoGradGuard no_grad;
  const int64_t batch = 8, heads = 12, head_dim = 64;
  const int64_t seq = state.range(0);
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
  for (int i = 0; i < 2; ++i) run();
  for (auto _ : state) benchmark::DoNotOptimize(run());
  const double flops = 4.0 * batch * heads * seq * seq * head_dim;
  state.counters["FLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

void Baseline_Aten_SDPA(benchmark::State& s) { runAttention(s, Implementation::kAtenSdpa); }
void Baseline_Unfused(benchmark::State& s) { runAttention(s, Implementation::kUnfused); }
void Kiln_Attention(benchmark::State& s) { runAttention(s, Implementation::kKiln); }

#define KILN_ATTENTION_BENCH(name)                \
  BENCHMARK(name)                                 \
      ->ArgsProduct({{128, 512}, {0, 1}, {0, 1}}) \
      ->ArgNames({"S", "bf16", "causal"})         \
      ->Unit(benchmark::kMillisecond)             \
      ->UseRealTime();

KILN_ATTENTION_BENCH(Baseline_Aten_SDPA)
KILN_ATTENTION_BENCH(Baseline_Unfused)
KILN_ATTENTION_BENCH(Kiln_Attention)

}  // namespace
