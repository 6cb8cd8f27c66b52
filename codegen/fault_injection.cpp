#include "codegen/fault_injection.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

#include "kiln/options.h"

namespace kiln {
namespace {

constexpr const char* kNames[] = {"none", "decode", "lower", "guard", "compile", "load", "launch", "library"};

std::atomic<FaultStage>& current() {
  static std::atomic<FaultStage> stage = [] {
    const char* name = std::getenv("KILN_INJECT_FAULT");
    if (!name || !*name) return FaultStage::kNone;
    std::optional<FaultStage> parsed = parseFaultStage(name);
    if (!parsed) log(LogLevel::kWarning, std::string("KILN_INJECT_FAULT: unknown stage '") + name + "', ignored");
    return parsed.value_or(FaultStage::kNone);
  }();
  return stage;
}

}  // namespace

const char* faultStageName(FaultStage stage) { return kNames[static_cast<int>(stage)]; }

std::optional<FaultStage> parseFaultStage(const std::string& name) {
  for (int i = 0; i < static_cast<int>(sizeof kNames / sizeof kNames[0]); ++i) {
    if (name == kNames[i]) return static_cast<FaultStage>(i);
  }
  return std::nullopt;
}

void injectFault(FaultStage stage) { current().store(stage); }

FaultStage injectedFault() { return current().load(std::memory_order_relaxed); }

void failIfInjected(FaultStage stage) {
  if (stage != FaultStage::kNone && injectedFault() == stage) {
    throw std::runtime_error(std::string("kiln: injected fault at ") + faultStageName(stage));
  }
}

}  // namespace kiln
