// KILN_DUMP's writer: files land under their predictable names; a symlink or FIFO planted at one
// is left alone (never written through, never blocking) and the other files are still written.
#include "codegen/kernel_dump.h"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include "tests/codegen/temp_dir.h"

namespace kiln {
namespace {

TEST(KernelDump, WritesEachFileAndMakesTheDirectory) {
  TempDir temp;
  const std::string dir = temp.path() + "/dump";
  EXPECT_TRUE(
      writeKernelDump(dir, "kiln_add-0123", {{"cu", "__global__ void k() {}"}, {"log", ""}}));
  EXPECT_EQ(readFile(dir + "/kiln_add-0123.cu"), "__global__ void k() {}");
  struct stat st;
  ASSERT_EQ(stat((dir + "/kiln_add-0123.log").c_str(), &st), 0);
  EXPECT_EQ(st.st_size, 0);
}

TEST(KernelDump, SymlinkAtADumpNameIsNotFollowed) {
  TempDir temp;
  const std::string victim = temp.path() + "/victim";
  {
    std::ofstream out(victim);
    out << "precious";
  }
  const std::string dumped = temp.path() + "/kiln_add-0123.cu";
  ASSERT_EQ(symlink(victim.c_str(), dumped.c_str()), 0);
  testing::internal::CaptureStderr();
  const bool written =
      writeKernelDump(temp.path(), "kiln_add-0123", {{"cu", "generated"}, {"log", "ok"}});
  testing::internal::GetCapturedStderr();
  EXPECT_FALSE(written);
  EXPECT_EQ(readFile(victim), "precious");
  struct stat st;
  ASSERT_EQ(lstat(dumped.c_str(), &st), 0);
  EXPECT_TRUE(S_ISLNK(st.st_mode));
  EXPECT_EQ(readFile(temp.path() + "/kiln_add-0123.log"), "ok");
}

TEST(KernelDump, FifoAtADumpNameIsSkipped) {
  TempDir temp;
  ASSERT_EQ(mkfifo((temp.path() + "/k.cu").c_str(), 0600), 0);
  testing::internal::CaptureStderr();
  const bool written =
      writeKernelDump(temp.path(), "k", {{"cu", "generated"}, {"log", "compiled"}});
  testing::internal::GetCapturedStderr();
  EXPECT_FALSE(written);
  EXPECT_EQ(readFile(temp.path() + "/k.log"), "compiled");
}

}  // namespace
}  // namespace kiln
