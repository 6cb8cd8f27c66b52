// A fresh directory under /tmp for one test, removed with everything in it when the test ends,
// whatever modes the test left on the directories inside; and a file reader for the tests using it.
#pragma once

#include <ftw.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace kiln {

// The whole of a file's bytes ("" if it cannot be read).
inline std::string readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

class TempDir {
 public:
  TempDir() {
    char name[] = "/tmp/kiln-test-XXXXXX";
    if (!mkdtemp(name)) std::abort();
    path_ = name;
  }
  ~TempDir() {
    nftw(path_.c_str(), makeDirectoryWritable, 16, FTW_PHYS);
    nftw(path_.c_str(), removeEntry, 16, FTW_DEPTH | FTW_PHYS);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  static int makeDirectoryWritable(const char* path, const struct stat*, int type, FTW*) {
    if (type == FTW_D) chmod(path, 0700);
    return 0;
  }
  static int removeEntry(const char* path, const struct stat*, int, FTW*) { return remove(path); }

  std::string path_;
};

}  // namespace kiln
