// The operators a fused graph calls: kiln::fusion_guard decides, per call, whether the fused
// kernel can run these inputs; kiln::fusion_group runs it. Boxed kernels registered for every
// backend (CatchAll): they take the fallback on devices kiln has no backend for.
#include <torch/library.h>

#include "codegen/fault_injection.h"
#include "torch_ops/fusion_runtime.h"

namespace kiln {
namespace {

struct Arguments {
  std::vector<at::Tensor> tensors;
  std::vector<double> floats;
  std::vector<int64_t> ints;
  c10::intrusive_ptr<c10::ivalue::ConstantString> code;
};

Arguments popArguments(torch::jit::Stack* stack) {
  Arguments args;
  args.code = stack->back().toString();
  args.ints = (*stack)[stack->size() - 2].toIntVector();
  args.floats = (*stack)[stack->size() - 3].toDoubleVector();
  args.tensors = (*stack)[stack->size() - 4].toTensorVector();
  torch::jit::drop(*stack, 4);
  return args;
}

// What the guard prepared, handed to the fusion_group that runs next on this thread.
thread_local std::shared_ptr<PreparedLaunch> last_prepared;
thread_local std::vector<const c10::TensorImpl*> last_inputs;

std::vector<const c10::TensorImpl*> identities(const std::vector<at::Tensor>& tensors) {
  std::vector<const c10::TensorImpl*> ids;
  for (const at::Tensor& tensor : tensors) ids.push_back(tensor.unsafeGetTensorImpl());
  return ids;
}

void fusionGuard(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  Arguments args = popArguments(stack);
  std::string why;
  // prepare() contains every failure inside kiln; programFor() only allocates.
  last_prepared = prepare(programFor(args.code), args.tensors, args.floats, args.ints, &why);
  last_inputs = identities(args.tensors);
  torch::jit::push(*stack, last_prepared != nullptr);
}

// Runs the kernel the guard prepared; when called without one (or its launch fails), the group's
// original ops instead, so the caller never sees a failure of kiln's.
void fusionGroup(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  Arguments args = popArguments(stack);
  std::shared_ptr<FusionProgram> program = programFor(args.code);
  std::shared_ptr<PreparedLaunch> prepared = std::move(last_prepared);
  if (prepared && last_inputs != identities(args.tensors)) prepared = nullptr;
  if (!prepared) {
    std::string why;
    prepared = prepare(program, args.tensors, args.floats, args.ints, &why);
  }
  last_inputs.clear();
  torch::jit::push(*stack, c10::List<at::Tensor>(launchOrFallback(prepared, program, args.tensors, args.floats, args.ints)));
}

// The fault-injection test switch (codegen/fault_injection.h) of this library's own copy of
// codegen: tests and the tools set it through the dispatcher.
void injectFaultOp(const std::string& stage) {
  std::optional<FaultStage> parsed = parseFaultStage(stage);
  TORCH_CHECK(parsed, "kiln::_inject_fault: unknown stage '", stage,
              "' (none, decode, lower, guard, compile, load, launch or library)");
  injectFault(*parsed);
}

}  // namespace

TORCH_LIBRARY(kiln, m) {
  m.def("fusion_guard(Tensor[] tensors, float[] floats, int[] ints, str code) -> bool",
        torch::CppFunction::makeFromBoxedFunction<&fusionGuard>());
  m.def("fusion_group(Tensor[] tensors, float[] floats, int[] ints, str code) -> Tensor[]",
        torch::CppFunction::makeFromBoxedFunction<&fusionGroup>());
  // Tests only: makes one stage of every group's work fail from now on ("none" to stop).
  m.def("_inject_fault(str stage) -> ()", &injectFaultOp);
}

}  // namespace kiln
