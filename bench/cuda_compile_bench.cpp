// CUDA code generation measured on any machine (no GPU needed): NVRTC compile time of a 6-op
// pointwise group for sm_90, and the time to obtain the same kernel from the warm disk cache.
// Counter: none; the time per iteration is the figure.
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <string>

#include "codegen/cuda_driver.h"
#include "codegen/cuda_kernel_builder.h"
#include "codegen/nvrtc_compiler.h"

namespace {

using kiln::ir::DType;
using kiln::ir::Op;

// gelu-tanh(x * w + b) as 6 ops on bfloat16 storage; `salt` makes each IR distinct (no cache hit).
kiln::ir::Kernel sixOpGroup(double salt) {
  kiln::ir::Kernel k;
  k.name = "six_op";
  k.tensor_inputs = {DType::kBFloat16, DType::kBFloat16, DType::kBFloat16};
  auto f = [&](int v) { return k.cast(v, DType::kFloat32); };
  int x = k.binary(Op::kAdd, k.binary(Op::kMul, f(k.load(0)), f(k.load(1))), f(k.load(2)));
  int inner = k.binary(Op::kMul, x, k.constant(DType::kFloat32, 0.7978845608 + salt * 1e-9));
  int t = k.unary(Op::kTanh, inner);
  int y = k.binary(Op::kMul, k.binary(Op::kMul, x, k.constant(DType::kFloat32, 0.5)),
                   k.binary(Op::kAdd, t, k.constant(DType::kFloat32, 1.0)));
  k.outputs = {k.cast(y, DType::kBFloat16)};
  return k;
}

const kiln::CudaSpecialization kVectorized{kiln::CudaSchedule::kLinearVectorized, 1, {kiln::Access::kContiguous, kiln::Access::kContiguous, kiln::Access::kContiguous, kiln::Access::kContiguous}, false};

bool haveNvrtc(benchmark::State& state) {
  std::string why;
  if (kiln::cuda::nvrtc(&why)) return true;
  state.SkipWithError(("NVRTC unavailable: " + why).c_str());
  return false;
}

void Kiln_NvrtcCompileSixOpGroup(benchmark::State& state) {
  if (!haveNvrtc(state)) return;
  double salt = 0;
  for (auto _ : state) {
    kiln::CudaSource source = kiln::emitCuda(sixOpGroup(salt += 1), kVectorized);
    kiln::NvrtcResult result = kiln::compileCuda(source.source, source.name, "sm_90", false);
    if (!result.ok) state.SkipWithError(result.log.c_str());
    benchmark::DoNotOptimize(result.binary.data());
  }
}
BENCHMARK(Kiln_NvrtcCompileSixOpGroup)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

void Kiln_WarmCacheFetchSixOpGroup(benchmark::State& state) {
  if (!haveNvrtc(state)) return;
  // Whatever KILN_CACHE_DIR says (default ~/.cache/kiln): the first call fills it.
  kiln::ir::Kernel kernel = sixOpGroup(-1);
  kiln::obtainCudaKernel(kernel, kVectorized, "sm_90", false);
  for (auto _ : state) {
    kiln::CudaKernelBinary binary = kiln::obtainCudaKernel(kernel, kVectorized, "sm_90", false);
    if (!binary.from_cache) state.SkipWithError("not served from the cache");
    benchmark::DoNotOptimize(binary.binary.data());
  }
}
BENCHMARK(Kiln_WarmCacheFetchSixOpGroup)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
