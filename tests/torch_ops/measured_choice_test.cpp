// The measured choice of a library call's way (torch_ops/measured_choice.h): remembered in memory
// and on disk, measured again until it settles, a choice from an older kiln measured again, the
// copies of a weight the slower ways made released, and large weights timed cold.
#include <gtest/gtest.h>
#include <torch/csrc/jit/testing/file_check.h>
#include <torch/script.h>
#include <torch/version.h>

#include <filesystem>
#include <random>
#include <thread>
#include <unistd.h>

#include "support/graph_testing.h"
#include "support/library_modules.h"
#include "support/library_testing.h"
#include "codegen/kernel_cache.h"
#include "fuser/library_calls.h"
#include "kiln/options.h"
#include "torch_ops/measured_choice.h"

namespace kiln {
namespace {

using testing::closeTo;
using testing::expectClose;
using testing::forward;
using testing::linearModule;
using testing::optimize;

TEST(LibraryCalls, MeasuredChoiceIsRemembered) {
  torch::NoGradGuard no_grad;
  // A shape class no other test uses: K = 72, N = 56.
  torch::jit::Module eager = linearModule("LinearMeasured", "def forward(self, x):\n  return torch.tanh(torch.linear(x, self.w, self.b))\n", 72, 56);
  torch::jit::Module fused = optimize(eager);
  at::Tensor x = torch::randn({9, 72});
  expectClose(forward(fused, {x}), forward(eager, {x}), 4, "measured");
  const std::string key = "linear Float rows<=16 K=72 N=56 bias epilogue=tanh input contiguous";
  std::optional<std::string> remembered = rememberedChoice(key);
  ASSERT_TRUE(remembered.has_value());
  EXPECT_EQ(report(fused.get_method("forward").graph()).groups[0].choice, *remembered);
  // Another shape in the class runs the remembered way without measuring again.
  at::Tensor x2 = torch::randn({13, 72});
  expectClose(forward(fused, {x2}), forward(eager, {x2}), 4, "remembered");
  EXPECT_EQ(report(fused.get_method("forward").graph()).groups[0].choice, *remembered);
}

// Two ways whose speed a test sets (sleeps), counting their runs.
struct SleepingWays {
  int reference_ms = 2, library_ms = 0;
  int reference_runs = 0, library_runs = 0;
  std::vector<MeasuredWay> ways() {
    auto way = [](const char* name, int* sleep_ms, int* runs) {
      return MeasuredWay{name, [=](const std::optional<at::Tensor>&) {
                           ++*runs;
                           std::this_thread::sleep_for(std::chrono::milliseconds(*sleep_ms));
                           return torch::ones({2});
                         }};
    };
    return {way("reference", &reference_ms, &reference_runs), way("library", &library_ms, &library_runs)};
  }
  std::string run(const std::string& key) {
    reference_runs = library_runs = 0;
    GroupCounters counters;
    runFastest(key, ways(), counters);
    return counters.choice.load();
  }
};

std::string uniqueKey(const std::string& what) {
  return what + " " + std::to_string(std::random_device()()) + " " + std::to_string(::getpid());
}

// A library call's result against eager's, within the tolerance of a GEMM's sums in another order.
void expect(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.sizes(), expected.sizes()) << what;
  EXPECT_TRUE(closeTo(actual, expected, 8).all().item<bool>())
      << what << ": max diff " << (actual - expected).abs().max().item<double>();
}

// Once a linear's shape class has settled, its call site runs the choice directly for calls with
// the signature it settled on (library_ops.cpp); any other call, a forced choice, a weight written
// in place or freed, a failing way, and a new process (choices forgotten) take the measured path.
TEST(LibraryCalls, SettledCallSiteFollowsItsSignature) {
  torch::NoGradGuard no_grad;
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::linear", "");
  auto call = [](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const char* epilogue) {
    torch::jit::Stack stack{x, w, b, c10::IValue(), std::string(epilogue)};
    op.callBoxed(&stack);
    return stack.front().toTensor();
  };
  // A shape class no other test uses: K = 44, N = 36.
  at::Tensor w = torch::randn({36, 44}), b = torch::randn({36});
  at::Tensor x = torch::randn({12, 44});
  for (int i = 0; i < 3; ++i) expect(call(x, w, b, "relu"), at::relu(at::linear(x, w, b)), "settled " + std::to_string(i));
  const std::string settled = libraryStats(w.unsafeGetTensorImpl()).choice;
  ASSERT_FALSE(settled.empty());
  // Other signatures: rows of another class, a 3-D input, a transposed input, another epilogue.
  at::Tensor wide = torch::randn({100, 44}), deep = torch::randn({2, 5, 44}), strided = torch::randn({44, 12}).t();
  expect(call(wide, w, b, "relu"), at::relu(at::linear(wide, w, b)), "other rows");
  expect(call(deep, w, b, "relu"), at::relu(at::linear(deep, w, b)), "3-D input");
  expect(call(strided, w, b, "relu"), at::relu(at::linear(strided, w, b)), "transposed input");
  expect(call(x, w, b, "tanh"), at::tanh(at::linear(x, w, b)), "other epilogue");
  expect(call(x, w, b, "relu"), at::relu(at::linear(x, w, b)), "settled again");
  // A weight written in place: the way's prepared copy of it is made again.
  w.mul_(-2);
  expect(call(x, w, b, "relu"), at::relu(at::linear(x, w, b)), "weight written");
  // A forced choice runs where it is forced.
  {
    testing::ForcedChoice forced("aten");
    expect(call(x, w, b, "relu"), at::relu(at::linear(x, w, b)), "forced");
    EXPECT_EQ(libraryStats(w.unsafeGetTensorImpl()).choice, "aten");
  }
  // A library way failing on the fast path: ATen's ops run from then on, with eager's result.
  {
    testing::InjectedFault fault("library");
    for (int i = 0; i < 2; ++i) expect(call(x, w, b, "relu"), at::relu(at::linear(x, w, b)), "failing way");
    EXPECT_EQ(libraryStats(w.unsafeGetTensorImpl()).choice, "aten");
  }
  // A new process: measured again, then settled again.
  forgetChoicesInMemory();
  for (int i = 0; i < 2; ++i) expect(call(x, w, b, "relu"), at::relu(at::linear(x, w, b)), "new process");
  // A freed weight's site does not serve the next weight (which may reuse its address).
  for (int i = 0; i < 4; ++i) {
    at::Tensor next = torch::randn({36, 44});
    for (int j = 0; j < 2; ++j) expect(call(x, next, b, "relu"), at::relu(at::linear(x, next, b)), "next weight");
  }
}

// The same for kiln::conv2d, whose sum may go into the residual: a residual that shares memory
// with the input (same sizes and strides as the settled call's) takes the measured path, which
// leaves it unwritten.
TEST(LibraryCalls, SettledConvolutionFollowsItsSignature) {
  torch::NoGradGuard no_grad;
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::conv2d", "");
  const std::vector<int64_t> ones = {1, 1};
  auto call = [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const c10::IValue& other,
                  const char* epilogue) {
    torch::jit::Stack stack{x, w, b, other, ones, ones, ones, int64_t{1}, std::string(epilogue)};
    op.callBoxed(&stack);
    return stack.front().toTensor();
  };
  // A shape class no other test uses: 7 channels, 11 x 11.
  at::Tensor w = torch::randn({7, 7, 3, 3}) / 8, b = torch::randn({7});
  at::Tensor x = torch::randn({1, 7, 11, 11});
  auto conv = [&](const at::Tensor& input) { return at::conv2d(input, w, b, 1, 1); };
  for (int i = 0; i < 3; ++i) expect(call(x, w, b, c10::IValue(), "relu"), at::relu(conv(x)), "settled " + std::to_string(i));
  ASSERT_FALSE(libraryStats(w.unsafeGetTensorImpl()).choice.empty());
  at::Tensor batch = torch::randn({3, 7, 11, 11}), last = x.contiguous(at::MemoryFormat::ChannelsLast);
  expect(call(batch, w, b, c10::IValue(), "relu"), at::relu(conv(batch)), "other batch");
  expect(call(last, w, b, c10::IValue(), "relu"), at::relu(conv(last)), "channels-last input");
  expect(call(x, w, b, c10::IValue(), "relu"), at::relu(conv(x)), "settled again");
  // The residual, added in place into `other`, settled; then a residual that is the input itself.
  const at::Tensor residual = torch::randn({1, 7, 11, 11});
  for (int i = 0; i < 3; ++i) {
    at::Tensor into = residual.clone();
    expect(call(x, w, b, into, "add_@other+relu"), at::relu(conv(x) + residual), "into other " + std::to_string(i));
  }
  at::Tensor input = x.clone();
  expect(call(input, w, b, input, "add_@other+relu"), at::relu(conv(x) + x), "residual is the input");
  EXPECT_TRUE(input.equal(x)) << "the input was written";
}

TEST(LibraryCalls, AChoiceIsMeasuredAgainUntilSettled) {
  const std::string key = uniqueKey("measured again");
  SleepingWays ways;
  // The first process measures while the library way is slow (as when something else loads the
  // machine): ATen's way is chosen.
  ways.library_ms = 8;
  EXPECT_EQ(ways.run(key), "reference");
  EXPECT_EQ(rememberedMeasurements(key), 1);
  // The same process does not measure again: one call, one run.
  EXPECT_EQ(ways.run(key), "reference");
  EXPECT_EQ(ways.reference_runs + ways.library_runs, 1);
  // The next process, on a quiet machine, measures again and chooses the library way.
  forgetChoicesInMemory();
  ways.library_ms = 0;
  EXPECT_EQ(ways.run(key), "library");
  EXPECT_GT(ways.reference_runs, 1);
  EXPECT_EQ(rememberedMeasurements(key), 2);
  // A third process on a loaded machine again: each way keeps its best time, so the library way
  // stays chosen; that is the third measurement.
  forgetChoicesInMemory();
  ways.library_ms = 8;
  EXPECT_EQ(ways.run(key), "library");
  EXPECT_EQ(rememberedMeasurements(key), 3);
  // Settled: later processes run the choice without measuring.
  forgetChoicesInMemory();
  EXPECT_EQ(ways.run(key), "library");
  EXPECT_EQ(ways.reference_runs, 0);
  EXPECT_EQ(ways.library_runs, 1);
  EXPECT_EQ(rememberedMeasurements(key), 3);
}

TEST(LibraryCalls, AChoiceFromAnOlderKilnIsMeasuredAgain) {
  // What kiln wrote before choices carried their times: the way's name alone, under the same key.
  const std::string key = uniqueKey("older choice");
  KernelCacheKey disk;
  disk.ir = "measured choice: " + key;
  disk.arch = hostSignature();
  disk.compiler = std::string("torch ") + TORCH_VERSION;
  KernelCache cache(Options::global().cache_dir, Options::global().cache_max_mb << 20);
  ASSERT_TRUE(cache.store(disk, "reference"));
  forgetChoicesInMemory();
  EXPECT_EQ(rememberedChoice(key), std::optional<std::string>("reference"));
  EXPECT_EQ(rememberedMeasurements(key), 1);
  SleepingWays ways;
  EXPECT_EQ(ways.run(key), "library");
  EXPECT_EQ(rememberedMeasurements(key), 2);
  // A file that is neither form is no choice: measured afresh.
  const std::string garbled = uniqueKey("garbled choice");
  disk.ir = "measured choice: " + garbled;
  ASSERT_TRUE(cache.store(disk, "kiln choice 2\nchoice library\nmeasurements x\n"));
  forgetChoicesInMemory();
  EXPECT_EQ(rememberedChoice(garbled), std::nullopt);
  EXPECT_EQ(ways.run(garbled), "library");
  EXPECT_EQ(rememberedMeasurements(garbled), 1);
}

TEST(LibraryCalls, MeasuringReleasesWhatTheSlowerWaysKeep) {
  torch::NoGradGuard no_grad;
  // A shape class no earlier run has measured (the choice is remembered on disk).
  const std::string key = "release test " + std::to_string(std::random_device()()) + std::to_string(::getpid());
  const at::Tensor weight = torch::randn({4, 4});
  auto way = [&](const char* name, const char* keeps, int sleep_ms) {
    return MeasuredWay{name, [=](const std::optional<at::Tensor>&) {
                         if (keeps != nullptr) preparedWeight(weight, keeps, [&] { return weight.t().contiguous(); });
                         std::this_thread::sleep_for(std::chrono::milliseconds(sleep_ms));
                         return torch::ones({2});
                       },
                       keeps};
  };
  std::vector<MeasuredWay> ways = {way("reference", nullptr, 3), way("slow", "copy a", 3), way("fast", "copy b", 0),
                                   way("fast_too", "copy b", 3)};
  GroupCounters counters;
  runFastest(key, ways, counters, std::nullopt, false, weight.unsafeGetTensorImpl());
  EXPECT_EQ(counters.choice, "fast");
  // The slow way's copy goes; the winner's, which another way shares, stays: asking for each
  // again makes only the released one anew.
  std::vector<std::string> released;
  for (const char* keeps : {"copy a", "copy b"}) {
    preparedWeight(weight, keeps, [&] {
      released.push_back(keeps);
      return weight.t().contiguous();
    });
  }
  EXPECT_EQ(released, std::vector<std::string>{"copy a"});

  // A real linear: measuring runs every way, and afterwards only the chosen way's copy of the
  // weight is kept.
  const int64_t k = 300 + static_cast<int64_t>(std::random_device()() % 5000);
  torch::jit::Module eager = linearModule("LinearReleases", "def forward(self, x):\n  return torch.linear(x, self.w, self.b)\n", k, 40);
  torch::jit::Module fused = optimize(eager);
  const int64_t before = preparedWeightCount();
  at::Tensor x = torch::randn({5, k});
  expectClose(forward(fused, {x}), forward(eager, {x}), 4, "measured");
  EXPECT_LE(preparedWeightCount() - before, 1);
}

// A weight of a megabyte or more is timed cold (in a model it has left the core's cache by the
// next call that reads it): before each timed run its memory and every copy prepared of it are
// evicted. What the eviction covers: the weight and the copies the ways made, and nothing else.
TEST(LibraryCalls, LargeWeightsAreTimedCold) {
  torch::NoGradGuard no_grad;
  const at::Tensor weight = torch::randn({512, 512});  // exactly kColdWeightBytes
  ASSERT_GE(weight.nbytes(), kColdWeightBytes);
  EXPECT_EQ(evictWeightFromCaches(weight.unsafeGetTensorImpl()), weight.nbytes());
  const at::Tensor transposed = preparedWeight(weight, "cold test copy", [&] { return weight.t().contiguous(); });
  EXPECT_EQ(evictWeightFromCaches(weight.unsafeGetTensorImpl()), weight.nbytes() + transposed.nbytes());
  // A view: its storage, the whole base (what a read of it may touch); the copies are the base's.
  EXPECT_EQ(evictWeightFromCaches(weight.narrow(0, 0, 8).unsafeGetTensorImpl()), weight.nbytes());
  forgetPreparedWeight(weight.unsafeGetTensorImpl(), "cold test copy");
  EXPECT_EQ(evictWeightFromCaches(weight.unsafeGetTensorImpl()), weight.nbytes());
  EXPECT_EQ(evictWeightFromCaches(nullptr), 0u);

  // Measuring a call over such a weight still chooses a way that agrees with ATen's.
  const int64_t k = 1024 + static_cast<int64_t>(std::random_device()() % 512);
  torch::jit::Module eager = linearModule("LinearCold", "def forward(self, x):\n  return torch.relu(torch.linear(x, self.w, self.b))\n", k, 300);
  torch::jit::Module fused = optimize(eager);
  at::Tensor x = torch::randn({7, k});
  expectClose(forward(fused, {x}), forward(eager, {x}), 4, "measured cold");
  expectClose(forward(fused, {x}), forward(eager, {x}), 4, "the choice");
}

}  // namespace
}  // namespace kiln
