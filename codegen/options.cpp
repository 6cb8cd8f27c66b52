// Fills kiln::Options from the environment (KILN_*), once per process.
#include "kiln/options.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace kiln {
namespace {

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return (value && *value) ? value : nullptr;
}

bool envFlag(const char* name) {
  const char* value = env(name);
  return value && std::strcmp(value, "0") != 0 && std::strcmp(value, "false") != 0;
}

}  // namespace

Options Options::fromEnvironment() {
  Options options;
  options.disabled = envFlag("KILN_DISABLE");
  options.fast_math = envFlag("KILN_FAST_MATH");
  if (const char* dir = env("KILN_CACHE_DIR")) {
    options.cache_dir = dir;
  } else if (const char* xdg = env("XDG_CACHE_HOME")) {
    options.cache_dir = std::string(xdg) + "/kiln";
  } else if (const char* home = env("HOME")) {
    options.cache_dir = std::string(home) + "/.cache/kiln";
  } else {
    options.cache_dir = "/tmp/kiln-cache";
  }
  if (const char* dump = env("KILN_DUMP")) options.dump_dir = dump;
  if (const char* level = env("KILN_LOG")) {
    if (std::strcmp(level, "debug") == 0) options.log_level = LogLevel::kDebug;
    else if (std::strcmp(level, "info") == 0) options.log_level = LogLevel::kInfo;
  }
  if (const char* mb = env("KILN_CACHE_MAX_MB")) {
    char* end = nullptr;
    long long value = std::strtoll(mb, &end, 10);
    if (end && *end == '\0' && value > 0) options.cache_max_mb = value;
  }
  return options;
}

const Options& Options::global() {
  static const Options options = fromEnvironment();
  return options;
}

void log(LogLevel level, const std::string& message) {
  if (static_cast<int>(level) > static_cast<int>(Options::global().log_level)) return;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  static const char* names[] = {"warning", "info", "debug"};
  std::fprintf(stderr, "kiln %s: %s\n", names[static_cast<int>(level)], message.c_str());
}

}  // namespace kiln
