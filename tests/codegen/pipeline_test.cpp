// The pipeline from a lowered kernel to a launchable one (codegen/pipeline.h): dimension merging
// and operand access (one vocabulary for both targets), the CUDA schedule and its argument block
// checked against the emitter's layout, the CPU object code through the disk cache, and one make
// per key across threads.
#include "codegen/pipeline.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>

#include "codegen/compile_pool.h"
#include "codegen/kernel_cache.h"
#include "tests/codegen/temp_dir.h"

namespace kiln {
namespace {

using ir::DType;
using ir::Op;

// z = x * y + c, float32 (c makes the kernel's key new to a cache when it is fresh per run).
ir::Kernel mulAddKernel(double c, const std::string& name = "mul_add") {
  ir::Kernel k;
  k.name = name;
  k.tensor_inputs = {DType::kFloat32, DType::kFloat32};
  k.outputs = {k.binary(Op::kAdd, k.binary(Op::kMul, k.load(0), k.load(1)), k.constant(DType::kFloat32, c))};
  return k;
}

// A fresh constant per run, so the disk cache has never seen the kernel.
double freshConstant() {
  std::random_device device;
  return 1.0 + std::uniform_real_distribution<double>(0, 1)(device);
}

// Row-major byte strides of `shape` for elements of `element` bytes.
std::vector<int64_t> dense(const std::vector<int64_t>& shape, int64_t element) {
  std::vector<int64_t> strides(shape.size());
  int64_t stride = element;
  for (size_t d = shape.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= shape[d];
  }
  return strides;
}

struct AccessCase {
  std::vector<int64_t> shape;
  std::vector<std::vector<int64_t>> strides;  // bytes; float32 operands
  std::vector<int64_t> merged_sizes;
  std::string access;
  std::string cpu_layout;
};

TEST(Access, MergesDimensionsAndClassifiesEachOperandOnce) {
  const std::vector<AccessCase> cases = {
      // Two dense operands: one dimension.
      {{4, 8}, {dense({4, 8}, 4), dense({4, 8}, 4)}, {32}, "cc", "cc"},
      // A bias broadcast over rows; a per-row value; a scalar.
      {{4, 8}, {{0, 4}, dense({4, 8}, 4)}, {4, 8}, "rc", "cc"},
      {{4, 8}, {{4, 0}, dense({4, 8}, 4)}, {4, 8}, "oc", "bc"},
      {{4, 8}, {{0, 0}, dense({4, 8}, 4)}, {32}, "bc", "bc"},
      // A transposed input: strided inside.
      {{4, 8}, {{4, 16}, dense({4, 8}, 4)}, {4, 8}, "sc", "sc"},
      // Size-1 dimensions go; a broadcast middle dimension keeps three.
      {{2, 1, 3, 4}, {{48, 0, 0, 4}, dense({2, 1, 3, 4}, 4)}, {2, 3, 4}, "ii", "cc"},
      {{2, 3, 4}, {{0, 4, 0}, dense({2, 3, 4}, 4)}, {2, 3, 4}, "zi", "bc"},
      // No dimension at all: one element.
      {{}, {{}, {}}, {1}, "bb", "bb"},
  };
  for (const AccessCase& c : cases) {
    Geometry geometry = mergeDimensions(c.shape, c.strides);
    EXPECT_EQ(geometry.sizes, c.merged_sizes) << c.access;
    int64_t numel = 1;
    for (int64_t size : c.shape) numel *= size;
    EXPECT_EQ(geometry.numel, numel);
    const std::vector<Access> access = classifyOperands(geometry, {4, 4});
    EXPECT_EQ(accessText(access), c.access);
    EXPECT_EQ(cpuLayoutFor(access).toString(), c.cpu_layout);
  }
}

TEST(Access, InnerAccessIsWhatAnInnerLoopSees) {
  const std::string all = "cbroizs";
  std::string inner;
  for (char c : all) inner += static_cast<char>(innerAccess(static_cast<Access>(c)));
  EXPECT_EQ(inner, "cbcbcbs");
  std::string linear;
  for (char c : all) linear += isLinearAccess(static_cast<Access>(c)) ? c : '-';
  EXPECT_EQ(linear, "cbro---");
}

std::optional<CudaSpecialization> scheduleFor(const ir::Kernel& kernel, const std::vector<int64_t>& shape,
                                              const std::vector<std::vector<int64_t>>& strides,
                                              const std::vector<uintptr_t>& addresses, std::string* why = nullptr) {
  Geometry geometry = mergeDimensions(shape, strides);
  return chooseCudaSpecialization(kernel, geometry, classifyOperands(geometry, {4, 4, 4}), addresses, why);
}

TEST(Pipeline, CudaScheduleFollowsAccessAndAlignment) {
  const ir::Kernel kernel = mulAddKernel(2.0);
  const std::vector<int64_t> out = dense({64, 32}, 4);
  // Dense and 16-byte aligned: vectorized; an input 4 bytes off: linear.
  EXPECT_EQ(scheduleFor(kernel, {64, 32}, {out, out, out}, {0, 512})->toString(), "linear_vec:ccc:i32");
  EXPECT_EQ(scheduleFor(kernel, {64, 32}, {out, out, out}, {0, 4})->toString(), "linear:ccc:i32");
  // A bias row: vectorized while a vector never straddles two rows (32 % 4 == 0); 30 does not.
  EXPECT_EQ(scheduleFor(kernel, {64, 32}, {out, {0, 4}, out}, {0, 0})->toString(), "linear_vec:crc:i32");
  EXPECT_EQ(scheduleFor(kernel, {64, 30}, {dense({64, 30}, 4), {0, 4}, dense({64, 30}, 4)}, {0, 0})->toString(),
            "linear:crc:i32");
  // A transposed input: strided over two dimensions.
  EXPECT_EQ(scheduleFor(kernel, {64, 32}, {out, {4, 256}, out}, {0, 0})->toString(), "strided2:i32");
  // Offsets past 2^31 elements need 64-bit indices.
  EXPECT_EQ(scheduleFor(kernel, {int64_t{1} << 31}, {{4}, {0}, {4}}, {0, 0})->toString(), "linear_vec:cbc:i64");
  // Strides that are not whole elements fit no schedule.
  std::string why;
  EXPECT_FALSE(scheduleFor(kernel, {8, 8, 8}, {{6, 0, 4}, dense({8, 8, 8}, 4), dense({8, 8, 8}, 4)}, {0, 0}, &why));
  EXPECT_NE(why.find("whole number of elements"), std::string::npos) << why;
}

// The argument block the runtime packs has exactly the size and order cudaArgumentLayout (and so
// the emitted kernel's parameter struct) says.
TEST(Pipeline, CudaArgumentsMatchTheEmittersLayout) {
  ir::Kernel kernel = mulAddKernel(2.0);
  kernel.scalar_inputs = {DType::kFloat64};
  kernel.outputs = {kernel.binary(Op::kMul, kernel.outputs[0], kernel.cast(kernel.scalar(0), DType::kFloat32))};
  const std::vector<const void*> pointers = {reinterpret_cast<const void*>(0x1000), reinterpret_cast<const void*>(0x2000),
                                             reinterpret_cast<const void*>(0x3000)};
  const double scale = 0.5;
  int64_t scale_bits = 0;
  std::memcpy(&scale_bits, &scale, sizeof scale_bits);

  Geometry rows = mergeDimensions({64, 32}, {dense({64, 32}, 4), {0, 4}, dense({64, 32}, 4)});
  CudaSpecialization linear = *chooseCudaSpecialization(kernel, rows, classifyOperands(rows, {4, 4, 4}), {0, 0}, nullptr);
  std::vector<int64_t> block = packCudaArguments(kernel, linear, rows, pointers, {scale}, {0});
  EXPECT_EQ(block.size() * 8, cudaArgumentLayout(kernel, linear).bytes());
  EXPECT_EQ(block, (std::vector<int64_t>{0x1000, 0x2000, 0x3000, 32, 64 * 32, scale_bits, 0}));
  EXPECT_EQ(cudaWorkItems(kernel, linear, rows), 64 * 32 / 4);

  Geometry strided = mergeDimensions({64, 32}, {dense({64, 32}, 4), {4, 256}, dense({64, 32}, 4)});
  CudaSpecialization general = *chooseCudaSpecialization(kernel, strided, classifyOperands(strided, {4, 4, 4}), {0, 0}, nullptr);
  ASSERT_EQ(general.schedule, CudaSchedule::kStrided);
  block = packCudaArguments(kernel, general, strided, pointers, {scale}, {0});
  EXPECT_EQ(block.size() * 8, cudaArgumentLayout(kernel, general).bytes());
  EXPECT_EQ(block, (std::vector<int64_t>{0x1000, 0x2000, 0x3000, 64, 32, 32, 1, 1, 64, 32, 1, 64 * 32, scale_bits, 0}));
  EXPECT_EQ(cudaWorkItems(kernel, general, strided), 64 * 32);

  EXPECT_THROW(packCudaArguments(kernel, linear, rows, {pointers[0]}, {scale}, {0}), std::runtime_error);
  EXPECT_THROW(packCudaArguments(kernel, linear, rows, pointers, {}, {}), std::runtime_error);
}

// Runs a CPU kernel for z = x * y + c over n contiguous floats.
std::vector<float> runMulAdd(const CpuKernel& kernel, const std::vector<float>& x, const std::vector<float>& y) {
  std::vector<float> z(x.size(), -1.0f);
  char* data[] = {const_cast<char*>(reinterpret_cast<const char*>(x.data())),
                  const_cast<char*>(reinterpret_cast<const char*>(y.data())), reinterpret_cast<char*>(z.data())};
  const int64_t strides[] = {4, 4, 4, 0, 0, 0};
  kernel.function()(data, strides, static_cast<int64_t>(x.size()), 1, nullptr, nullptr);
  return z;
}

// A CPU kernel's object code goes to the disk cache; the next obtain links it without compiling
// and computes the same bits; a corrupt file is compiled again.
TEST(Pipeline, CpuObjectCodeComesBackFromTheDiskCache) {
  const double c = freshConstant();
  const ir::Kernel kernel = mulAddKernel(c);
  const CpuLayout layout{{Access::kContiguous, Access::kContiguous, Access::kContiguous}};
  std::vector<float> x(1000), y(1000);
  std::mt19937 random(std::random_device{}());
  std::normal_distribution<float> normal;
  for (size_t i = 0; i < x.size(); ++i) x[i] = normal(random), y[i] = normal(random);
  std::vector<float> expected(x.size());
  for (size_t i = 0; i < x.size(); ++i) expected[i] = x[i] * y[i] + static_cast<float>(c);

  const KernelCache::Stats before = KernelCache::global().stats();
  CpuKernelResult cold = obtainCpuKernel(kernel, layout);
  EXPECT_FALSE(cold.from_cache);
  EXPECT_EQ(KernelCache::global().stats().stores, before.stores + 1);
  CpuKernelResult warm = obtainCpuKernel(kernel, layout);
  EXPECT_TRUE(warm.from_cache);
  EXPECT_EQ(warm.cache_key, cold.cache_key);
  EXPECT_EQ(runMulAdd(*cold.kernel, x, y), expected);
  EXPECT_EQ(runMulAdd(*warm.kernel, x, y), expected);

  // Another layout is another key; so is another kernel.
  EXPECT_NE(obtainCpuKernel(kernel, {{Access::kContiguous, Access::kBroadcast, Access::kContiguous}}).cache_key, cold.cache_key);
  EXPECT_NE(obtainCpuKernel(mulAddKernel(c + 1), layout).cache_key, cold.cache_key);

  const std::string path = KernelCache::global().dir() + "/" + cold.cache_key + KernelCache::kFileExtension;
  std::string bytes = readFile(path);
  ASSERT_FALSE(bytes.empty()) << path;
  bytes[bytes.size() - 5] ^= 0x5a;
  {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << bytes;
  }
  CpuKernelResult repaired = obtainCpuKernel(kernel, layout);
  EXPECT_FALSE(repaired.from_cache);
  EXPECT_EQ(runMulAdd(*repaired.kernel, x, y), expected);
  EXPECT_TRUE(obtainCpuKernel(kernel, layout).from_cache);
}

TEST(Pipeline, OneMakePerKeyAcrossThreads) {
  KernelFamily family(mulAddKernel(2.0), KernelOptions{});
  std::atomic<int> makes{0};
  std::vector<std::thread> threads;
  std::vector<std::shared_ptr<CompiledKernel>> seen(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      seen[static_cast<size_t>(t)] = family.obtain("cpu ccc", {}, [&](CompiledKernel&) {
        makes++;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      });
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(makes.load(), 1);
  for (const auto& kernel : seen) EXPECT_EQ(kernel, seen[0]);
  // A key not yet made is not made while compiling is not allowed (a CUDA graph capture)...
  auto never = [] { return false; };
  EXPECT_EQ(family.obtain("cpu cbc", never, [&](CompiledKernel&) { makes++; }), nullptr);
  EXPECT_EQ(makes.load(), 1);
  // ...but one in memory is served.
  EXPECT_EQ(family.obtain("cpu ccc", never, [&](CompiledKernel&) { makes++; }), seen[0]);
  // A make that throws leaves its error in the kernel, once.
  std::shared_ptr<CompiledKernel> failed =
      family.obtain("cpu sss", {}, [](CompiledKernel&) { throw std::runtime_error("no registers left"); });
  EXPECT_EQ(failed->error, "no registers left");
  EXPECT_EQ(family.obtain("cpu sss", {}, [&](CompiledKernel&) { makes++; }), failed);
  EXPECT_EQ(makes.load(), 1);
}

KernelCall contiguousCall(const std::vector<int64_t>& shape) {
  KernelCall call;
  call.shape = shape;
  call.strides = {dense(shape, 4), dense(shape, 4), dense(shape, 4)};
  call.element_sizes = {4, 4, 4};
  call.addresses = {0, 0};
  return call;
}

TEST(Pipeline, PlansACpuCallAndReusesItsKernelForAnySize) {
  KernelFamily family(mulAddKernel(freshConstant()), KernelOptions{});
  const int64_t made = kernelsMade();
  LaunchPlan plan;
  std::string why;
  ASSERT_TRUE(planLaunch(family, contiguousCall({3, 5}), nullptr, &plan, &why)) << why;
  EXPECT_EQ(plan.geometry.sizes, std::vector<int64_t>{15});
  EXPECT_EQ(accessText(plan.access), "ccc");
  ASSERT_TRUE(plan.compiled && plan.compiled->cpu);
  LaunchPlan again;
  ASSERT_TRUE(planLaunch(family, contiguousCall({7, 9, 11}), nullptr, &again, &why)) << why;
  EXPECT_EQ(again.compiled, plan.compiled);
  EXPECT_EQ(kernelsMade() - made, 1);
  // An empty space needs no kernel.
  LaunchPlan empty;
  ASSERT_TRUE(planLaunch(family, contiguousCall({0, 5}), nullptr, &empty, &why));
  EXPECT_EQ(empty.compiled, nullptr);
  // A kernel that failed to launch is not planned again.
  plan.compiled->launch_failed = true;
  EXPECT_FALSE(planLaunch(family, contiguousCall({3, 5}), nullptr, &again, &why));
  EXPECT_EQ(why, "its kernel failed to launch");
}

// KILN_BACKGROUND_COMPILE: the first calls are told to run their fallback while a worker thread
// makes the kernel (once, however many calls ask); later calls get it.
TEST(Pipeline, BackgroundCompileLetsCallsRunTheirFallbackMeanwhile) {
  KernelFamily family(mulAddKernel(freshConstant()), KernelOptions{});
  KernelCall call = contiguousCall({3, 5});
  call.background_compile = true;
  const int64_t made = kernelsMade();
  LaunchPlan plan;
  std::string why;
  bool planned = planLaunch(family, call, nullptr, &plan, &why);
  if (!planned) {
    EXPECT_EQ(why, "its kernel is compiling in the background");
  }
  for (int i = 0; i < 5 && !planned; ++i) planned = planLaunch(family, call, nullptr, &plan, &why);
  waitForBackgroundCompiles();
  ASSERT_TRUE(planLaunch(family, call, nullptr, &plan, &why)) << why;
  ASSERT_TRUE(plan.compiled && plan.compiled->cpu);
  EXPECT_EQ(kernelsMade() - made, 1);

  // A make that throws in the background is recorded like one on the calling thread.
  KernelFamily broken(mulAddKernel(2.0), KernelOptions{});
  auto fail = [](CompiledKernel&) { throw std::runtime_error("out of memory"); };
  // Null while the worker runs; a make this quick may also have finished already.
  std::shared_ptr<CompiledKernel> first = broken.obtain("cpu ccc", {}, fail, /*background=*/true);
  if (first) {
    EXPECT_EQ(first->error, "out of memory");
  }
  waitForBackgroundCompiles();
  std::shared_ptr<CompiledKernel> failed = broken.obtain("cpu ccc", {}, fail, true);
  ASSERT_NE(failed, nullptr);
  EXPECT_EQ(failed->error, "out of memory");
}

TEST(Pipeline, ARecorderTakesKernelsDownInsteadOfMakingThem) {
  KernelFamily family(mulAddKernel(freshConstant()), KernelOptions{true, 1000});
  KernelRecorder recorder;
  const int64_t made = kernelsMade();
  for (const std::vector<int64_t>& shape : {std::vector<int64_t>{64, 32}, std::vector<int64_t>{8, 8}}) {
    KernelCall call = contiguousCall(shape);
    call.recorder = &recorder;
    LaunchPlan plan;
    std::string why;
    EXPECT_FALSE(planLaunch(family, call, nullptr, &plan, &why));
    EXPECT_EQ(why, "recorded for kiln compile");
  }
  // Both shapes need the same kernel: recorded once, with the family's options.
  ASSERT_EQ(recorder.kernels.size(), 1u);
  EXPECT_EQ(kernelsMade(), made);
  const RecordedKernel& recorded = recorder.kernels[0];
  EXPECT_EQ(recorded.cpu_layout.toString(), "ccc");
  ASSERT_TRUE(recorded.cuda);
  EXPECT_EQ(recorded.cuda->toString(), "linear_vec:ccc:i32");
  EXPECT_TRUE(recorded.options.fast_math);
}

}  // namespace
}  // namespace kiln
