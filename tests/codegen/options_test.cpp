// Options::fromEnvironment on numeric values: KILN_CACHE_MAX_MB takes whole numbers from 1 to
// 1 TiB in MiB; anything else keeps the default, is recorded as one problem line, and is warned
// about once by the library when the disk cache starts.
#include "kiln/options.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

#include "codegen/kernel_cache.h"
#include "tests/codegen/temp_dir.h"

namespace kiln {
namespace {

// Sets a variable for one scope, restoring what was there before.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    setenv(name, value, 1);
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(Options, CacheMaxMbAcceptsWholeNumbersInRange) {
  for (const auto& [text, value] : {std::pair<const char*, int64_t>{"1", 1},
                                    {"2048", 2048},
                                    {"1048576", Options::kMaxCacheMb},
                                    {"0064", 64}}) {
    ScopedEnv env("KILN_CACHE_MAX_MB", text);
    const Options options = Options::fromEnvironment();
    EXPECT_EQ(options.cache_max_mb, value) << text;
    EXPECT_TRUE(options.problems.empty()) << text;
  }
  ScopedEnv empty("KILN_CACHE_MAX_MB", "");  // set but empty: as if unset
  EXPECT_EQ(Options::fromEnvironment().cache_max_mb, 1024);
  EXPECT_TRUE(Options::fromEnvironment().problems.empty());
}

TEST(Options, CacheMaxMbRejectsAnythingElseWithOneLine) {
  for (const char* text : {"0", "-1", "abc", "1.5", "5MB", " 5", "5 ", "+5", "0x10", "1e3",
                           "1048577", "9223372036854775807", "99999999999999999999999999"}) {
    ScopedEnv env("KILN_CACHE_MAX_MB", text);
    const Options options = Options::fromEnvironment();
    EXPECT_EQ(options.cache_max_mb, 1024) << text;
    ASSERT_EQ(options.problems.size(), 1u) << text;
    EXPECT_EQ(options.problems[0],
              "KILN_CACHE_MAX_MB='" + std::string(text) +
                  "': expected a whole number of MiB from 1 to 1048576 (1 TiB)");
  }
}

TEST(Options, LargestCacheDoesNotOverflowBytes) {
  ScopedEnv env("KILN_CACHE_MAX_MB", "1048576");
  EXPECT_EQ(Options::fromEnvironment().cache_max_mb << 20, int64_t{1} << 40);
}

// Options::global() is read once per process, so this runs the test binary again with the
// variable set; the child half of the test runs only there.
TEST(Options, RejectedValueIsWarnedOnceWhenTheCacheStarts) {
  if (std::getenv("KILN_OPTIONS_TEST_CHILD")) {
    for (int i = 0; i < 3; ++i) KernelCache::global();
    std::printf("max_bytes=%lld\n", static_cast<long long>(KernelCache::global().maxBytes()));
    return;
  }
  TempDir temp;
  char self[4096] = {};
  ASSERT_GT(readlink("/proc/self/exe", self, sizeof(self) - 1), 0);
  const std::string command =
      "KILN_OPTIONS_TEST_CHILD=1 KILN_CACHE_MAX_MB=5MB KILN_CACHE_DIR=" + temp.path() + " " + self +
      " --gtest_filter=Options.RejectedValueIsWarnedOnceWhenTheCacheStarts 2>&1";
  FILE* child = popen(command.c_str(), "r");
  ASSERT_NE(child, nullptr);
  std::string output;
  char buffer[4096];
  while (size_t n = fread(buffer, 1, sizeof(buffer), child)) output.append(buffer, n);
  ASSERT_EQ(pclose(child), 0) << output;
  const std::string warning =
      "kiln warning: ignoring KILN_CACHE_MAX_MB='5MB': expected a whole number of MiB from 1 to "
      "1048576 (1 TiB); the default applies\n";
  const size_t at = output.find(warning);
  EXPECT_NE(at, std::string::npos) << output;
  EXPECT_EQ(output.find("kiln warning", at + 1), std::string::npos) << output;
  EXPECT_NE(output.find("max_bytes=1073741824\n"), std::string::npos) << output;
}

}  // namespace
}  // namespace kiln
