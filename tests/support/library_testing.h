// Test scopes for library calls and convolution regions (torch_ops/measured_choice.h): a way
// forced for every call, and a stage of kiln's work made to fail, while the scope lives.
#pragma once

#include <torch/script.h>

#include <string>

#include "torch_ops/measured_choice.h"
#include "torch_ops/onednn_dtypes.h"

namespace kiln::testing {

// Forces every library call and region to run one way while alive ("" measures).
struct ForcedChoice {
  explicit ForcedChoice(const std::string& choice) { forceChoice(choice); }
  ~ForcedChoice() { forceChoice(""); }
};

// Makes one stage of kiln's work fail while alive (kiln::_inject_fault: "library", "compile", ...).
struct InjectedFault {
  explicit InjectedFault(const std::string& stage) { call(stage); }
  ~InjectedFault() { call("none"); }
  static void call(const std::string& stage) {
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("kiln::_inject_fault", "");
    torch::jit::Stack stack{stage};
    op.callBoxed(&stack);
  }
};

// The way a call forced to run `way` in `dtype` reports: that way where this machine offers it,
// else ATen's ops.
inline std::string wayRun(const std::string& way, at::ScalarType dtype) {
  const bool offered = dtype != at::kBFloat16 || way.rfind("onednn", 0) != 0 || onednnTakesDtype(at::kBFloat16);
  return offered ? way : "aten";
}

}  // namespace kiln::testing
