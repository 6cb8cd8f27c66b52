#include "codegen/kernel_dump.h"

#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>

#include "kiln/options.h"

namespace kiln {

bool dumpEnabled() { return !Options::global().dump_dir.empty(); }

void dumpKernelFiles(const std::string& stem, const std::vector<std::pair<std::string, std::string>>& files) {
  const std::string& dir = Options::global().dump_dir;
  if (dir.empty()) return;
  static std::atomic<bool> warned{false};
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    if (!warned.exchange(true)) log(LogLevel::kWarning, "KILN_DUMP: cannot create " + dir + ": " + std::strerror(errno));
    return;
  }
  for (const auto& [extension, contents] : files) {
    const std::string path = dir + "/" + stem + "." + extension;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << contents;
    if (!out && !warned.exchange(true)) log(LogLevel::kWarning, "KILN_DUMP: cannot write " + path);
  }
}

}  // namespace kiln
