#include "tools/cli_args.h"

#include <sstream>

namespace kiln::cli {

std::string Args::value(const std::string& flag, const std::string& fallback) const {
  auto found = values.find(flag);
  return found == values.end() ? fallback : found->second.back();
}

std::vector<std::string> Args::all(const std::string& flag) const {
  auto found = values.find(flag);
  return found == values.end() ? std::vector<std::string>{} : found->second;
}

Args parse(int argc, char** argv, int first, const std::set<std::string>& value_flags,
           const std::set<std::string>& switch_flags) {
  Args args;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      args.positional.push_back(arg);
      continue;
    }
    std::string flag = arg;
    std::string inline_value;
    bool has_inline = false;
    if (size_t eq = arg.find('='); eq != std::string::npos) {
      flag = arg.substr(0, eq);
      inline_value = arg.substr(eq + 1);
      has_inline = true;
    }
    if (value_flags.count(flag)) {
      if (!has_inline) {
        if (i + 1 >= argc) throw UsageError(flag + " needs a value");
        inline_value = argv[++i];
      }
      args.values[flag].push_back(inline_value);
    } else if (switch_flags.count(flag) && !has_inline) {
      args.switches.insert(flag);
    } else {
      throw UsageError("unknown option " + arg);
    }
  }
  return args;
}

int64_t Args::intValue(const std::string& flag, int64_t fallback, int64_t min, int64_t max) const {
  if (!values.count(flag)) return fallback;
  const std::string text = value(flag, "");
  int64_t number = 0;
  bool ok = !text.empty() && text.size() <= 18;
  for (char c : text) {
    ok = ok && c >= '0' && c <= '9';
    if (ok) number = number * 10 + (c - '0');
  }
  if (!ok || number < min || number > max) {
    throw UsageError(flag + " '" + text + "': expected a whole number from " + std::to_string(min) + " to " +
                     std::to_string(max));
  }
  return number;
}

}  // namespace kiln::cli
