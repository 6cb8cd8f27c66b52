// A test switch that makes one stage of kiln's work on a fusion group fail, so tests can prove
// that every failure inside kiln sends the group to its fallback and never reaches the caller.
// Off unless a test turns it on (or KILN_INJECT_FAULT=STAGE is set for a whole process).
#pragma once

#include <optional>
#include <string>

namespace kiln {

// The stages of a group's life, in order; each has one injection point.
// kLibrary: a library call of kiln::linear / kiln::conv2d (oneDNN, a transposed weight).
enum class FaultStage { kNone, kDecode, kLower, kGuard, kCompile, kLoad, kLaunch, kLibrary };

const char* faultStageName(FaultStage stage);  // "decode", "lower", ...
std::optional<FaultStage> parseFaultStage(const std::string& name);

// Sets the stage that fails from now on (kNone: none). Process-wide; tests only.
void injectFault(FaultStage stage);
FaultStage injectedFault();

// Throws std::runtime_error("kiln: injected fault at STAGE") when `stage` is the injected one.
void failIfInjected(FaultStage stage);

}  // namespace kiln
