// Every kiln_tests test draws fresh random inputs: torch's generator is seeded anew at the start of
// each test (from KILN_TEST_SEED when set, else at random), and a failing test prints the seed
// that reproduces it.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <random>
#include <string>

namespace {

class SeedListener : public ::testing::EmptyTestEventListener {
 public:
  void OnTestStart(const ::testing::TestInfo&) override {
    const char* fixed = std::getenv("KILN_TEST_SEED");
    seed_ = (fixed && *fixed) ? std::stoull(fixed) : (std::random_device{}() & 0xffffffffffffULL);
    torch::manual_seed(seed_);
    reported_ = false;
  }
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed() || reported_) return;
    reported_ = true;
    std::cout << "[   SEED   ] reproduce with KILN_TEST_SEED=" << seed_ << std::endl;
  }

 private:
  uint64_t seed_ = 0;
  bool reported_ = false;
};

// Registered before gtest_main runs the tests.
[[maybe_unused]] const bool registered = [] {
  ::testing::UnitTest::GetInstance()->listeners().Append(new SeedListener);
  return true;
}();

}  // namespace
