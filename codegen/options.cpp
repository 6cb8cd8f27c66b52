// Fills kiln::Options from the environment (KILN_*), once per process.
#include "kiln/options.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace kiln {
namespace {

const char* env(const char* name) {
  const char* value = std::getenv(name);
  return (value && *value) ? value : nullptr;
}

// Decimal digits only, no sign, unit or spaces, within [min, max]; nullopt otherwise.
std::optional<int64_t> parseWholeNumber(const char* text, int64_t min, int64_t max) {
  if (*text == '\0') return std::nullopt;
  int64_t value = 0;
  for (const char* c = text; *c; ++c) {
    if (*c < '0' || *c > '9') return std::nullopt;
    value = value * 10 + (*c - '0');
    // Checked on every digit, so it never overflows: max is far below INT64_MAX / 10.
    if (value > max) return std::nullopt;
  }
  if (value < min) return std::nullopt;
  return value;
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
  options.background_compile = envFlag("KILN_BACKGROUND_COMPILE");
  if (const char* regions = env("KILN_CONV_REGIONS"))
    options.conv_regions = std::strcmp(regions, "0") != 0 && std::strcmp(regions, "false") != 0;
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
    if (std::optional<int64_t> value = parseWholeNumber(mb, 1, kMaxCacheMb)) {
      options.cache_max_mb = *value;
    } else {
      options.problems.push_back("KILN_CACHE_MAX_MB='" + std::string(mb) +
                                 "': expected a whole number of MiB from 1 to " +
                                 std::to_string(kMaxCacheMb) + " (1 TiB)");
    }
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

std::string errorLine(const std::string& message) {
  std::vector<std::string> lines;
  std::istringstream stream(message);
  for (std::string line; std::getline(stream, line);) {
    const size_t start = line.find_first_not_of(" \t\r");
    if (start != std::string::npos) lines.push_back(line.substr(start));
  }
  if (lines.empty()) return "unknown error";
  const bool traceback = message.find("Traceback of TorchScript") != std::string::npos;
  return traceback ? lines.back() : lines.front();
}

const char* precisionName(Precision precision) {
  switch (precision) {
    case Precision::kFloat32: return "fp32";
    case Precision::kBFloat16: return "bf16";
    case Precision::kFloat16: return "fp16";
  }
  return "fp32";
}

bool parsePrecision(const std::string& text, Precision* out) {
  if (text == "fp32" || text == "float32") {
    *out = Precision::kFloat32;
  } else if (text == "bf16" || text == "bfloat16") {
    *out = Precision::kBFloat16;
  } else if (text == "fp16" || text == "float16") {
    *out = Precision::kFloat16;
  } else {
    return false;
  }
  return true;
}

}  // namespace kiln
