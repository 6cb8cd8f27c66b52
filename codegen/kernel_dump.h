// KILN_DUMP=DIR: every kernel kiln generates is written there as files named after the kernel
// and its cache key (the IR text, the generated .ll/.s or .cu/.ptx, the compile log), so a user
// can read what ran. Failures to write are logged once and never stop a compile.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace kiln {

// Writes each (extension, contents) as DIR/STEM.EXTENSION when Options::global().dump_dir is
// set; a no-op otherwise.
void dumpKernelFiles(const std::string& stem,
                     const std::vector<std::pair<std::string, std::string>>& files);

// The same into `dir` (made 0755 when missing). The names are predictable, so each file is
// written to a temp file and renamed over its name; a symlink or FIFO planted at a name is left
// alone and that file skipped. False when a file could not be written (logged once per process).
bool writeKernelDump(const std::string& dir, const std::string& stem,
                     const std::vector<std::pair<std::string, std::string>>& files);

// The stem every dumped file of one kernel shares: its function's name and the first 16 hex
// digits of its cache key, e.g. "kiln_fused_add_mul-0123456789abcdef".
std::string dumpStem(const std::string& function_name, const std::string& cache_key_hex);

// True when KILN_DUMP is set (a backend then keeps its generated text for dumpKernelFiles).
bool dumpEnabled();

}  // namespace kiln
