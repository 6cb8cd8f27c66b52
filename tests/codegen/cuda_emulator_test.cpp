// The CUDA emulator itself (codegen/cuda_emulator.h): its portable half conversions against the
// host's reference, lockstep barriers and shuffles, a divergent barrier reported instead of run,
// and a compile error carrying the host compiler's message. The generated kernels it runs are
// checked against eager in tests/torch_ops/cuda_emulation_test.cpp.
#include "codegen/cuda_emulator.h"

#include <gtest/gtest.h>

#include <random>

#include "codegen/float_bits.h"

namespace kiln {
namespace {

// A hand-written kernel in the generated kernels' form: one parameter struct named <name>_params.
CudaSource handWritten(const std::string& name, const std::string& body) {
  CudaSource source;
  source.name = name;
  source.kernel = "struct " + name + "_params {\n  void* data[4];\n  long long numel;\n};\n"
                  "extern \"C\" __global__ void " + name + "(const " + name + "_params p) {\n" + body + "}\n";
  source.source = std::string(cudaDeviceHelpers()) + "\n" + source.kernel;
  return source;
}

std::vector<int64_t> arguments(std::vector<const void*> pointers, int64_t numel) {
  std::vector<int64_t> args;
  pointers.resize(4, nullptr);
  for (const void* pointer : pointers) args.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(pointer)));
  args.push_back(numel);
  return args;
}

TEST(CudaEmulator, HalfConversionsRoundAsTheHostReference) {
  // Every half to float; edge floats and a million random bit patterns to half.
  std::vector<uint16_t> halves(65536);
  for (size_t i = 0; i < halves.size(); ++i) halves[i] = static_cast<uint16_t>(i);
  std::vector<float> floats = {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e-8f, 2.98e-8f, 2.9802322e-8f, 5.96e-8f,
                               6.1e-5f, 6.097555e-5f, INFINITY, -INFINITY, 1.0f + 0x1p-11f, 1.0f + 0x1p-11f + 0x1p-23f};
  std::mt19937 rng(12345);
  for (int i = 0; i < 1000000; ++i) floats.push_back(bitsFloat(static_cast<uint32_t>(rng())));
  std::vector<float> widened(halves.size());
  std::vector<uint16_t> narrowed(floats.size());
  const CudaSource source = handWritten("kiln_convert", R"(
  const unsigned short* h = (const unsigned short*)p.data[0];
  const float* f = (const float*)p.data[1];
  float* wide = (float*)p.data[2];
  unsigned short* narrow = (unsigned short*)p.data[3];
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
  for (long long e = first; e < 65536; e += step) wide[e] = kiln_f16_to_f32(h[e]);
  for (long long e = first; e < p.numel; e += step) narrow[e] = kiln_f32_to_f16(f[e]);
)");
  launchEmulatedCuda(*compileEmulatedCuda(source), 7,
                     arguments({halves.data(), floats.data(), widened.data(), narrowed.data()},
                               static_cast<int64_t>(floats.size())));
  for (size_t i = 0; i < halves.size(); ++i) {
    const float expected = halfToFloat(halves[i]);
    ASSERT_TRUE(floatBits(widened[i]) == floatBits(expected) || (expected != expected && widened[i] != widened[i]))
        << "half 0x" << std::hex << i;
  }
  for (size_t i = 0; i < floats.size(); ++i) {
    const uint16_t expected = floatToHalf(floats[i]);
    const bool nan = (expected & 0x7c00u) == 0x7c00u && (expected & 0x3ffu);
    // NaN: the hardware's canonical NaN; the reference keeps the sign.
    ASSERT_TRUE(narrowed[i] == expected || (nan && narrowed[i] == 0x7fff)) << "float " << floats[i];
  }
}

// Warp shuffles see the other lanes' values; __syncthreads() orders shared memory: each thread
// publishes its index, the block sums by shuffles then through shared memory, every thread writes
// the total, and the grid's blocks each run the block alone.
TEST(CudaEmulator, ShufflesAndBarriersRunInLockstep) {
  const CudaSource source = handWritten("kiln_block_total", R"(
  __shared__ double kiln_scratch[3 * 32 + 1];
  double* out = (double*)p.data[0];
  const double total = kiln_block_sum((double)(threadIdx.x + 1000 * blockIdx.x), kiln_scratch);
  out[blockIdx.x * blockDim.x + threadIdx.x] = total;
)");
  std::vector<double> out(3 * kCudaBlockSize, -1.0);
  launchEmulatedCuda(*compileEmulatedCuda(source), 3, arguments({out.data()}, 0));
  for (int b = 0; b < 3; ++b) {
    const double expected = kCudaBlockSize * (kCudaBlockSize - 1) / 2.0 + 1000.0 * b * kCudaBlockSize;
    for (int t = 0; t < kCudaBlockSize; ++t) ASSERT_EQ(out[b * kCudaBlockSize + t], expected) << "block " << b << " thread " << t;
  }
}

// Half of warp 0 at a shuffle, the other half at __syncthreads(): no barrier can complete.
TEST(CudaEmulator, ADivergentBarrierIsReportedNotRun) {
  const CudaSource source = handWritten("kiln_divergent", R"(
  float* out = (float*)p.data[0];
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  else __syncthreads();
)");
  std::vector<float> out(32);
  try {
    launchEmulatedCuda(*compileEmulatedCuda(source), 1, arguments({out.data()}, 0));
    FAIL() << "a divergent barrier ran";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("divergent barrier"), std::string::npos) << error.what();
  }
}

TEST(CudaEmulator, ACompileErrorCarriesTheCompilersMessage) {
  const CudaSource source = handWritten("kiln_broken", "  undeclared_thing = 1;\n");
  try {
    compileEmulatedCuda(source);
    FAIL() << "a broken kernel compiled";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("undeclared_thing"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace kiln
