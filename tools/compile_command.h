// `kiln compile`'s compiling (the model's run, which records the kernels, is kiln_cli.cpp's).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "codegen/pipeline.h"

namespace kiln::cli {

// Obtains every `wanted` kernel for `arch` ("host", or a GPU's, e.g. "sm_90") from the disk cache
// or compiles it there, on `jobs` threads, and prints one line per kernel and a summary (or one
// JSON object); `skipped` are the groups that have no kernel for a GPU, with why. Returns the exit
// code: 1 when a kernel failed to compile.
int compileKernels(const std::vector<RecordedKernel>& wanted, const std::vector<std::string>& skipped,
                   const std::string& arch, int64_t jobs, bool json);

}  // namespace kiln::cli
