// The public C++ API as torch operators, so that any frontend that loads libkiln.so reaches it
// through the dispatcher: the Python package `kiln` (python/kiln) calls these and needs no
// extension module of its own. A ScriptModule travels as `Any` (its object), and comes back as one.
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/library.h>
#include <torch/script.h>

#include "kiln/kiln.h"

namespace kiln {
namespace {

torch::jit::Module moduleArgument(const c10::IValue& value, const char* op) {
  TORCH_CHECK(value.isObject() && value.toObjectRef().type()->is_module(), "kiln::", op,
              ": expected a TorchScript module (torch.jit.ScriptModule), got ", value.tagKind());
  return torch::jit::Module(value.toObject());
}

Options optionsFrom(int64_t min_group_size, bool fast_math, int64_t cpu_parallel_grain, const std::string& precision) {
  TORCH_CHECK(min_group_size >= 1, "kiln::_optimize: min_group_size must be at least 1, got ", min_group_size);
  TORCH_CHECK(cpu_parallel_grain >= 1, "kiln::_optimize: cpu_parallel_grain must be at least 1, got ",
              cpu_parallel_grain);
  Options options = Options::global();
  options.min_group_size = static_cast<int>(min_group_size);
  options.fast_math = fast_math;
  options.cpu_parallel_grain = cpu_parallel_grain;
  TORCH_CHECK(parsePrecision(precision, &options.precision), "kiln::_optimize: precision must be fp32, bf16 or fp16, got '",
              precision, "'");
  return options;
}

c10::IValue optimizeOp(const c10::IValue& module, int64_t min_group_size, bool fast_math, int64_t cpu_parallel_grain,
                       const std::string& precision) {
  return optimize(moduleArgument(module, "_optimize"), optionsFrom(min_group_size, fast_math, cpu_parallel_grain, precision))
      ._ivalue();
}

// kiln::optimize with example inputs (a tuple or list of the forward's arguments) and a
// min_cosine: the module, and the plan of what kept float32 as JSON.
std::tuple<c10::IValue, std::string> optimizeForOp(const c10::IValue& module, const c10::IValue& inputs,
                                                   int64_t min_group_size, bool fast_math, int64_t cpu_parallel_grain,
                                                   const std::string& precision, double min_cosine) {
  Options options = optionsFrom(min_group_size, fast_math, cpu_parallel_grain, precision);
  TORCH_CHECK(min_cosine >= 0 && min_cosine < 1, "kiln::_optimize_for: min_cosine must be at least 0 and below 1, got ",
              min_cosine);
  options.min_cosine = min_cosine;
  std::vector<c10::IValue> arguments;
  if (inputs.isTuple()) {
    for (const c10::IValue& item : inputs.toTupleRef().elements()) arguments.push_back(item);
  } else if (inputs.isList()) {
    for (const c10::IValue& item : inputs.toListRef()) arguments.push_back(item);
  } else {
    TORCH_CHECK(false, "kiln::_optimize_for: inputs must be a tuple or list of the forward's arguments, got ", inputs.tagKind());
  }
  PrecisionPlan plan;
  torch::jit::Module fused = optimize(moduleArgument(module, "_optimize_for"), options, arguments, &plan);
  return {fused._ivalue(), options.min_cosine > 0 && options.precision != Precision::kFloat32 ? plan.toJson() : ""};
}

// The report of a module's forward: its own graph when kiln fused it ahead of time (optimize, a
// saved fused file), else the graph the executor last optimized for it (kiln enabled, the module
// run at least once), else its unfused graph (no groups).
std::string reportOp(const c10::IValue& value) {
  torch::jit::Module module = moduleArgument(value, "_report");
  TORCH_CHECK(module.find_method("forward"), "kiln::_report: the module has no forward method");
  torch::jit::Method forward = module.get_method("forward");
  Report own = report(forward.graph());
  if (!own.groups.empty()) return own.toJson();
  torch::jit::GraphExecutorState state;
  try {
    state = forward.get_executor().getDebugState();
  } catch (const c10::Error&) {
    return own.toJson();  // the profiling executor has not optimized this method yet
  }
  for (const auto& entry : state.execution_plans) {
    if (entry.second.graph) return report(entry.second.graph).toJson();
  }
  return own.toJson();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("_optimize(Any module, int min_group_size, bool fast_math, int cpu_parallel_grain, str precision=\"fp32\") -> Any",
        &optimizeOp);
  m.def("_optimize_for(Any module, Any inputs, int min_group_size, bool fast_math, int cpu_parallel_grain, str precision, "
        "float min_cosine) -> (Any, str)",
        &optimizeForOp);
  m.def("_report(Any module) -> str", &reportOp);
  m.def("_enable() -> ()", [] { enable(); });
  m.def("_disable() -> ()", [] { disable(); });
  m.def("_enabled() -> bool", [] { return enabled(); });
  m.def("_version() -> str", [] { return version(); });
}

}  // namespace kiln
