// The elementwise fusion pass: finds maximal groups of fusible ops in a TorchScript graph and
// replaces each with a guarded kiln::fusion_group node that keeps the original ops as fallback.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include <memory>

#include "kiln/options.h"

namespace kiln {

// Node kinds the pass inserts; fuser/ and torch_ops/ agree on these names.
constexpr const char* kFusionGroupOp = "kiln::fusion_group";
constexpr const char* kFusionGuardOp = "kiln::fusion_guard";

// Returns the number of groups created.
int fuseElementwise(std::shared_ptr<torch::jit::Graph>& graph, const Options& options);

}  // namespace kiln
