// GEMMs and convolutions with their epilogues, run as one library call (see library_fusion.cpp
// for the pattern, torch_ops/library_ops.cpp for the run time). The fuser writes the epilogue as
// text on the kiln op; the run time reads it back.
//
//   %y = kiln::linear(%x, %W, %b, %other, "add+gelu")
//   %y = kiln::conv2d(%x, %W, %b, %other, %stride, %padding, %dilation, %groups, "add_+relu")
//
// means: the GEMM or convolution (weight and bias graph constants), then `other` added ("add":
// out of place, as aten::add, with its broadcasting and type promotion; "add_": in place into the
// result, as aten::add_; either with "@other": where shapes and dtypes allow, the sum may be
// written into `other`'s memory, which the fuser proved no one reads afterwards), then one
// activation. Either part may be absent; "" is none.
//
//   %y = kiln::linear(%x, %W, %b, None, "gelu;pieces=768,768,768")
//
// is sibling linears over one input concatenated (linear_siblings.cpp): W and b are theirs stacked
// by rows, y their results side by side, which the graph slices apart; the pieces let the run
// time still run them as separate GEMMs when that measures faster.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace kiln {

constexpr const char* kLinearOp = "kiln::linear";
constexpr const char* kConv2dOp = "kiln::conv2d";
// kiln::conv2d whose epilogue may write into `other` ("@other"); its schema says so.
constexpr const char* kConv2dIntoOtherOp = "kiln::conv2d_into_other";
constexpr const char* kEagerLayoutOp = "kiln::eager_layout";
// kiln::cast_floating(Tensor x, int from, int to): x converted to dtype `to` when its dtype is
// `from`, else x itself (reduced precision's casts, fuser/precision.cpp).
constexpr const char* kCastFloatingOp = "kiln::cast_floating";

enum class Activation { kNone, kRelu, kGelu, kGeluTanh, kTanh, kSigmoid, kSilu, kHardswish };

struct Epilogue {
  enum class Add { kNone, kOutOfPlace, kInPlace } add = Add::kNone;
  bool into_other = false;
  Activation activation = Activation::kNone;
  std::vector<int64_t> pieces;  // output columns of each concatenated linear; empty: one linear

  std::string text() const;
  // nullopt for text this kiln does not know (a newer kiln's).
  static std::optional<Epilogue> parse(const std::string& text);
};

// "relu", "gelu", "gelu_tanh", ...: the activation's name in epilogue text; "" for none.
const char* activationName(Activation activation);

}  // namespace kiln
