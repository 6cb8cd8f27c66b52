// The run-time half of a fusion group: from the subgraph text and the actual inputs to a launched
// kernel. kiln::fusion_guard asks prepare() whether kiln can run these inputs exactly as eager
// would; kiln::fusion_group runs what prepare() set up.
//
// Note: kernels are specialized on the signature (dtype and rank of each input) and on the layout
// (each operand's inner stride class after broadcasting and dimension collapsing), never on sizes:
// a new batch size or sequence length reuses the compiled kernel. Sizes and strides are arguments.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

struct FusionProgram;
struct PreparedLaunch;

// The program for a subgraph text (parsed once per process, shared by all threads).
std::shared_ptr<FusionProgram> programFor(const c10::intrusive_ptr<c10::ivalue::ConstantString>& code);

// Everything needed to run one call; nullptr (with *why) when the inputs must take the fallback,
// which is then counted in the group's statistics.
std::shared_ptr<PreparedLaunch> prepare(const std::shared_ptr<FusionProgram>& program,
                                        const std::vector<at::Tensor>& tensors,
                                        const std::vector<double>& floats,
                                        const std::vector<int64_t>& ints, std::string* why);

std::vector<at::Tensor> launch(const PreparedLaunch& prepared);

// Compiles done so far by this process (for tests: a new size must not add one).
int64_t kernelCompileCount();

}  // namespace kiln
