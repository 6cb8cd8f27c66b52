// Command-line parsing for the kiln CLI: `kiln VERB [POSITIONAL...] [--flag [VALUE]]...`.
// Unknown flags and missing values are usage errors (exit code 2 with one line).
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "kiln/options.h"

namespace kiln::cli {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> values;  // --flag VALUE (repeatable)
  std::set<std::string> switches;                          // --flag

  bool has(const std::string& flag) const { return switches.count(flag) > 0; }
  std::string value(const std::string& flag, const std::string& fallback) const;
  std::vector<std::string> all(const std::string& flag) const;
  // A whole number in [min, max], or `fallback` when the flag is absent. Throws UsageError.
  int64_t intValue(const std::string& flag, int64_t fallback, int64_t min, int64_t max) const;
};

// `value_flags` take a value; `switch_flags` take none. Throws UsageError.
Args parse(int argc, char** argv, int first, const std::set<std::string>& value_flags,
           const std::set<std::string>& switch_flags);

// The one line of a torch error worth printing (kiln/options.h).
using kiln::errorLine;

}  // namespace kiln::cli
