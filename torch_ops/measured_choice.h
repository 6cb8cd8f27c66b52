// Which of several ways to run one library call is fastest (ATen's GEMM over the weight as given
// or transposed, oneDNN with fused post-ops on a prepacked weight, ...) depends on the shapes and
// the machine; kiln times them, as TensorRT's builder does, once per shape class and machine, and
// remembers the answer in memory and in the kernel cache on disk.
#pragma once

#include <optional>
#include <string>

namespace kiln {

// The machine a choice was measured on: CPU model and the thread count torch uses.
std::string hostSignature();

// The remembered choice for `key` (a shape class), from memory, else from the disk cache.
std::optional<std::string> rememberedChoice(const std::string& key);
void rememberChoice(const std::string& key, const std::string& choice);

// One thread measures a key at a time: claimMeasurement is true for the caller that should
// measure (and must then call endMeasurement); others run the default way meanwhile.
bool claimMeasurement(const std::string& key);
void endMeasurement(const std::string& key);

// Tests: makes every library call run `choice` where it can ("" measures again).
void forceChoice(const std::string& choice);
std::string forcedChoice();

}  // namespace kiln
