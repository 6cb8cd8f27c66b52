#include "torch_ops/measured_choice.h"

#include <ATen/Parallel.h>
#include <torch/version.h>

#include <fstream>
#include <mutex>
#include <unordered_map>
#include <unordered_set>

#include "codegen/kernel_cache.h"

namespace kiln {
namespace {

std::mutex choices_mutex;
std::unordered_map<std::string, std::string>& choices() {
  static auto* table = new std::unordered_map<std::string, std::string>();
  return *table;
}
std::unordered_set<std::string>& measuring() {
  static auto* keys = new std::unordered_set<std::string>();
  return *keys;
}
std::string& forced() {
  static auto* choice = new std::string();
  return *choice;
}

std::string cpuModel() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      return colon == std::string::npos ? line : line.substr(colon + 2);
    }
  }
  return "unknown cpu";
}

KernelCacheKey diskKey(const std::string& key) {
  KernelCacheKey disk;
  disk.ir = "measured choice: " + key;
  disk.arch = hostSignature();
  disk.compiler = std::string("torch ") + TORCH_VERSION;
  return disk;
}

}  // namespace

std::string hostSignature() {
  static const std::string model = cpuModel();
  return model + ", " + std::to_string(at::get_num_threads()) + " threads";
}

std::optional<std::string> rememberedChoice(const std::string& key) {
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    auto found = choices().find(key);
    if (found != choices().end()) return found->second;
  }
  std::optional<std::string> stored = KernelCache::global().load(diskKey(key));
  if (!stored) return std::nullopt;
  std::lock_guard<std::mutex> lock(choices_mutex);
  choices()[key] = *stored;
  return stored;
}

void rememberChoice(const std::string& key, const std::string& choice) {
  {
    std::lock_guard<std::mutex> lock(choices_mutex);
    choices()[key] = choice;
  }
  KernelCache::global().store(diskKey(key), choice);
}

bool claimMeasurement(const std::string& key) {
  std::lock_guard<std::mutex> lock(choices_mutex);
  return measuring().insert(key).second;
}

void endMeasurement(const std::string& key) {
  std::lock_guard<std::mutex> lock(choices_mutex);
  measuring().erase(key);
}

void forceChoice(const std::string& choice) {
  std::lock_guard<std::mutex> lock(choices_mutex);
  forced() = choice;
}

std::string forcedChoice() {
  std::lock_guard<std::mutex> lock(choices_mutex);
  return forced();
}

}  // namespace kiln
