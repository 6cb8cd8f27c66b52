// Attention on the GPU: kiln's FlashAttention-2 kernel (Kiln_Attention) against
// scaled_dot_product_attention with each backend forced (Baseline_Sdpa_{Flash,Cudnn,Efficient,Math})
// and the unfused matmul -> softmax -> matmul graph (Baseline_Unfused), timed with CUDA events.
// Shapes as FlashAttention's own benchmark: B*S = 16k tokens, hidden 2048 (H = 2048 / D).
// Args: S, D, dtype (0: float16, 1: bfloat16), causal.
// Counters: TFLOP/s = 4*B*H*S*S*D (halved when causal) / time; peak_MiB = peak device memory one
// call allocated beyond its inputs. Only registered when a CUDA device is present.
#include <benchmark/benchmark.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/cuda.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "bench/kiln_attention.h"

namespace {

enum class Implementation { kKiln, kFlash, kCudnn, kEfficient, kMath, kUnfused };

using kiln::bench::kilnAttention;

at::Tensor run(Implementation implementation, const at::Tensor& q, const at::Tensor& k,
               const at::Tensor& v, bool causal) {
  switch (implementation) {
    case Implementation::kKiln:
      return kilnAttention(q, k, v, causal);
    case Implementation::kFlash:
      return std::get<0>(at::_scaled_dot_product_flash_attention(q, k, v, 0.0, causal));
    case Implementation::kCudnn:
      return std::get<0>(at::_scaled_dot_product_cudnn_attention(q, k, v, {}, false, 0.0, causal));
    case Implementation::kEfficient:
      return std::get<0>(at::_scaled_dot_product_efficient_attention(q, k, v, {}, false, 0.0, causal));
    case Implementation::kMath:
      return std::get<0>(at::_scaled_dot_product_attention_math(q, k, v, {}, 0.0, causal));
    default: {
      at::Tensor scores = at::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(q.size(-1)));
      if (causal) {
        at::Tensor future = at::ones({q.size(-2), k.size(-2)}, q.options().dtype(at::kBool)).triu(1);
        scores = scores.masked_fill(future, -std::numeric_limits<float>::infinity());
      }
      return at::matmul(at::softmax(scores, -1), v);
    }
  }
}

void benchAttention(benchmark::State& state, Implementation implementation) {
  torch::NoGradGuard no_grad;
  const int64_t seq = state.range(0), head_dim = state.range(1);
  const at::ScalarType dtype = state.range(2) != 0 ? at::kBFloat16 : at::kHalf;
  const bool causal = state.range(3) != 0;
  const int64_t batch = std::max<int64_t>(1, 16384 / seq), heads = 2048 / head_dim;
  const auto options = torch::dtype(dtype).device(at::kCUDA);
  at::Tensor q = torch::randn({batch, heads, seq, head_dim}, options);
  at::Tensor k = torch::randn({batch, heads, seq, head_dim}, options);
  at::Tensor v = torch::randn({batch, heads, seq, head_dim}, options);
  const int device = q.get_device();
  try {
    for (int i = 0; i < 3; ++i) run(implementation, q, k, v, causal);
    torch::cuda::synchronize();
  } catch (const std::exception& error) {
    state.SkipWithError(error.what());  // a backend that does not take this shape (or OOM)
    return;
  }
  namespace allocator = c10::cuda::CUDACachingAllocator;
  allocator::resetPeakStats(device);
  const int64_t before = allocator::getDeviceStats(device).allocated_bytes[0].current;
  run(implementation, q, k, v, causal);
  torch::cuda::synchronize();
  const int64_t peak = allocator::getDeviceStats(device).allocated_bytes[0].peak - before;

  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    benchmark::DoNotOptimize(run(implementation, q, k, v, causal));
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float milliseconds = 0.0f;
    cudaEventElapsedTime(&milliseconds, start, stop);
    state.SetIterationTime(milliseconds / 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  const double flops = 4.0 * batch * heads * seq * seq * head_dim / (causal ? 2.0 : 1.0);
  state.counters["TFLOP/s"] = benchmark::Counter(flops * 1e-12, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["peak_MiB"] = static_cast<double>(peak) / (1 << 20);
}

void shapes(benchmark::internal::Benchmark* bench) {
  for (int64_t causal : {0, 1})
    for (int64_t dtype : {0, 1})
      for (int64_t head_dim : {64, 128})
        for (int64_t seq : {512, 1024, 2048, 4096, 8192, 16384}) bench->Args({seq, head_dim, dtype, causal});
  bench->ArgNames({"S", "D", "bf16", "causal"})->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(0.2);
}

// Registered at start-up only where a device exists, so the CPU machine's runs stay clean.
const bool registered = [] {
  if (!torch::cuda::is_available()) return false;
  const std::pair<const char*, Implementation> variants[] = {
      {"Kiln_Attention_Cuda", Implementation::kKiln},
      {"Baseline_Sdpa_Flash_Cuda", Implementation::kFlash},
      {"Baseline_Sdpa_Cudnn_Cuda", Implementation::kCudnn},
      {"Baseline_Sdpa_Efficient_Cuda", Implementation::kEfficient},
      {"Baseline_Sdpa_Math_Cuda", Implementation::kMath},
      {"Baseline_Unfused_Cuda", Implementation::kUnfused}};
  for (const auto& [name, implementation] : variants)
    shapes(benchmark::RegisterBenchmark(name, [implementation = implementation](benchmark::State& state) {
      benchAttention(state, implementation);
    }));
  return true;
}();

}  // namespace
