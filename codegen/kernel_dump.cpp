// KILN_DUMP's files, written through writeFileAtomically (no fsync: they are for reading now).
#include "codegen/kernel_dump.h"

#include <sys/stat.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "codegen/atomic_file.h"
#include "kiln/options.h"

namespace kiln {

std::string dumpStem(const std::string& function_name, const std::string& cache_key_hex) {
  return function_name + "-" + cache_key_hex.substr(0, 16);
}

bool dumpEnabled() { return !Options::global().dump_dir.empty(); }

void dumpKernelFiles(const std::string& stem,
                     const std::vector<std::pair<std::string, std::string>>& files) {
  const std::string& dir = Options::global().dump_dir;
  if (!dir.empty()) writeKernelDump(dir, stem, files);
}

bool writeKernelDump(const std::string& dir, const std::string& stem,
                     const std::vector<std::pair<std::string, std::string>>& files) {
  static std::atomic<bool> warned{false};
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    if (!warned.exchange(true))
      log(LogLevel::kWarning, "KILN_DUMP: cannot create " + dir + ": " + std::strerror(errno));
    return false;
  }
  bool all_written = true;
  for (const auto& [extension, contents] : files) {
    const std::string error =
        writeFileAtomically(dir + "/" + stem + "." + extension, contents, /*sync=*/false);
    if (error.empty()) continue;
    all_written = false;
    if (!warned.exchange(true)) log(LogLevel::kWarning, "KILN_DUMP: " + error);
  }
  return all_written;
}

}  // namespace kiln
