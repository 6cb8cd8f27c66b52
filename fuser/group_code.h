// A fusion group's stored form ("group code"): the subgraph a kiln::fusion_group node computes,
// kept in the graph as a string constant so a fused module saves and reloads like any other.
//
// Note: the code is written and read by kiln alone, never by torch's IR printer and parser, so
// it round-trips every graph torch makes: scope and source-range notes are not part of it, and
// every constant is stored exactly (doubles as their bit pattern: nan, ±inf, -0.0, subnormals;
// int64 in full; strings as hex bytes). The code is the group's identity: statistics and
// compiled kernels are keyed by it.
#pragma once

#include <torch/csrc/jit/ir/ir.h>

#include "kiln/options.h"

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

// The first line of every group code; a code without it (an older kiln's) is not decoded.
constexpr const char* kGroupCodeHeader = "kiln.group 1";

// Encodes `subgraph` (inputs of Tensor, float, int or bool type; single-output nodes without
// blocks; constants of the kinds above) and the options its kernels follow, which so travel with
// the group into every process that loads it. nullopt with *why when something has no encoding.
// `number_inputs` (per subgraph input, may be empty) marks the tensor inputs that stand for Python
// numbers (0-dim wrapped numbers: a traced `x * 0.5` freezes 0.5 as one), written `in %N : Tensor
// number`: torch.jit.save keeps no such mark on a tensor constant, the code does.
std::optional<std::string> encodeGroupCode(const torch::jit::Graph& subgraph, const KernelOptions& options,
                                           std::string* why, const std::vector<bool>& number_inputs = {});

// Per subgraph input of `code`: whether it stands for a Python number (see encodeGroupCode).
std::vector<bool> groupCodeNumberInputs(const std::string& code);

// The options a code carries; nullopt for a code without them (an older kiln's). Throws
// c10::Error on a malformed options line.
std::optional<KernelOptions> groupCodeOptions(const std::string& code);

// Builds the subgraph back. Throws c10::Error naming the line on malformed code.
std::shared_ptr<torch::jit::Graph> decodeGroupCode(const std::string& code);

}  // namespace kiln
