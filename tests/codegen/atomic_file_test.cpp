// writeFileAtomically: new and existing files and their modes; symlinks, devices, FIFOs and
// directories refused and left as they are; and a full filesystem (a 64 KiB
// tmpfs, where the process may mount one) leaving the old file whole and no temp file behind.
#include "codegen/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tests/codegen/temp_dir.h"

namespace kiln {
namespace {

void writePlainFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  ASSERT_TRUE(out.good()) << path;
}

std::vector<std::string> fileNames(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* handle = opendir(dir.c_str())) {
    while (dirent* entry = readdir(handle)) {
      const std::string name = entry->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    closedir(handle);
  }
  std::sort(names.begin(), names.end());
  return names;
}

mode_t modeOf(const std::string& path) {
  struct stat st;
  EXPECT_EQ(lstat(path.c_str(), &st), 0) << path;
  return st.st_mode;
}

TEST(AtomicFile, WritesANewFileWithTheUmasksMode) {
  TempDir temp;
  const mode_t old_umask = umask(027);
  const std::string path = temp.path() + "/out.pt";
  const std::string error = writeFileAtomically(path, std::string("bytes\0with nul", 14));
  umask(old_umask);
  EXPECT_EQ(error, "");
  EXPECT_EQ(readFile(path), std::string("bytes\0with nul", 14));
  EXPECT_EQ(modeOf(path) & 07777, 0640u);
  EXPECT_EQ(fileNames(temp.path()), std::vector<std::string>{"out.pt"});
}

TEST(AtomicFile, ReplacesAFileKeepingItsMode) {
  TempDir temp;
  const std::string path = temp.path() + "/out.pt";
  writePlainFile(path, "old contents, longer than the new");
  ASSERT_EQ(chmod(path.c_str(), 0604), 0);
  EXPECT_EQ(writeFileAtomically(path, "new", /*sync=*/false), "");
  EXPECT_EQ(readFile(path), "new");
  EXPECT_EQ(modeOf(path) & 07777, 0604u);
  EXPECT_EQ(writeFileAtomically(path, ""), "");
  EXPECT_EQ(readFile(path), "");
}

TEST(AtomicFile, RelativePathAndLongName) {
  TempDir temp;
  char cwd[4096];
  ASSERT_NE(getcwd(cwd, sizeof(cwd)), nullptr);
  ASSERT_EQ(chdir(temp.path().c_str()), 0);
  const std::string long_name(250, 'n');
  const std::string relative_error = writeFileAtomically("relative.dot", "digraph {}");
  const std::string long_error = writeFileAtomically(long_name, "long");
  ASSERT_EQ(chdir(cwd), 0);
  EXPECT_EQ(relative_error, "");
  EXPECT_EQ(long_error, "");
  EXPECT_EQ(readFile(temp.path() + "/relative.dot"), "digraph {}");
  EXPECT_EQ(readFile(temp.path() + "/" + long_name), "long");
}

// A symlink at the name (planted, or a user's own) is refused: what it points at is never opened
// for writing, and the link itself stays (/dev/stdout is such a link, to /proc/self/fd/1, which
// resolves to a regular file when stdout is redirected to one; root could otherwise replace it).
TEST(AtomicFile, SymlinkAtTheNameIsRefusedNotFollowed) {
  TempDir temp;
  const std::string victim = temp.path() + "/victim";
  writePlainFile(victim, "precious");
  for (const std::string& target :
       {victim, temp.path() + "/would-be-created", std::string("/proc/self/fd/1")}) {
    const std::string path = temp.path() + "/out.pt";
    ASSERT_EQ(symlink(target.c_str(), path.c_str()), 0);
    EXPECT_EQ(writeFileAtomically(path, "new"),
              "cannot write " + path + ": a symbolic link, not followed (name its target)");
    EXPECT_TRUE(S_ISLNK(modeOf(path)));
    ASSERT_EQ(unlink(path.c_str()), 0);
  }
  EXPECT_EQ(readFile(victim), "precious");
  EXPECT_EQ(fileNames(temp.path()), std::vector<std::string>{"victim"});
}

// Not files to swap out: each is refused with one line, and left as it was.
TEST(AtomicFile, RefusesDevicesFifosAndDirectories) {
  TempDir temp;
  std::string error = writeFileAtomically("/dev/full", "data");
  EXPECT_EQ(error, "cannot write /dev/full: not a regular file (a device, FIFO or socket)");
  EXPECT_TRUE(S_ISCHR(modeOf("/dev/full")));

  const std::string fifo = temp.path() + "/fifo";
  ASSERT_EQ(mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_EQ(writeFileAtomically(fifo, "data"),
            "cannot write " + fifo + ": not a regular file (a device, FIFO or socket)");
  EXPECT_TRUE(S_ISFIFO(modeOf(fifo)));

  ASSERT_EQ(mkdir((temp.path() + "/dir").c_str(), 0700), 0);
  EXPECT_EQ(writeFileAtomically(temp.path() + "/dir", "data"),
            "cannot write " + temp.path() + "/dir: Is a directory");
  EXPECT_EQ(writeFileAtomically(temp.path() + "/dir/", "data"),
            "cannot write " + temp.path() + "/dir/: Is a directory");
  EXPECT_EQ(fileNames(temp.path()), (std::vector<std::string>{"dir", "fifo"}));
}

TEST(AtomicFile, MissingDirectoryIsOneLine) {
  TempDir temp;
  const std::string path = temp.path() + "/missing/out.pt";
  EXPECT_EQ(writeFileAtomically(path, "data"),
            "cannot write " + path + ": No such file or directory");
}

// A full filesystem: the write of the temp file fails, the old file keeps every byte, and no temp
// file is left. Needs a tmpfs small enough to fill; skipped where mount(2) is not allowed.
TEST(AtomicFile, FullFilesystemLeavesTheOldFileWhole) {
  TempDir temp;
  const std::string mount_point = temp.path() + "/small";
  ASSERT_EQ(mkdir(mount_point.c_str(), 0700), 0);
  if (mount("tmpfs", mount_point.c_str(), "tmpfs", 0, "size=64k") != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs here: " << std::strerror(errno);
  }
  const std::string path = mount_point + "/model.pt";
  writePlainFile(path, "the good model");
  {
    // Fill the rest of the filesystem.
    std::ofstream filler(mount_point + "/filler", std::ios::binary);
    const std::string block(4096, 'f');
    for (int i = 0; i < 64 && filler; ++i) filler.write(block.data(), block.size());
  }
  const std::string error = writeFileAtomically(path, std::string(32 * 1024, 'x'));
  const std::string contents = readFile(path);
  const std::vector<std::string> names = fileNames(mount_point);
  unlink((mount_point + "/filler").c_str());
  const std::string after_room = writeFileAtomically(path, "the new model");
  const std::string new_contents = readFile(path);
  umount2(mount_point.c_str(), MNT_DETACH);

  EXPECT_EQ(error, "cannot write " + path + ": No space left on device");
  EXPECT_EQ(contents, "the good model");
  EXPECT_EQ(names, (std::vector<std::string>{"filler", "model.pt"}));
  EXPECT_EQ(after_room, "");
  EXPECT_EQ(new_contents, "the new model");
}

}  // namespace
}  // namespace kiln
