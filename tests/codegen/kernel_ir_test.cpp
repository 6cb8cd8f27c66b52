// Kernel IR: the text form round-trips, the parser and verifier reject malformed kernels.
#include "codegen/kernel_ir.h"

#include <gtest/gtest.h>

#include <cmath>

namespace kiln::ir {
namespace {

Kernel sampleKernel() {
  Kernel k;
  k.name = "sample";
  k.tensor_inputs = {DType::kFloat32, DType::kFloat16};
  k.scalar_inputs = {DType::kFloat64};
  int a = k.load(0);
  int b = k.cast(k.load(1), DType::kFloat32);
  int s = k.cast(k.scalar(0), DType::kFloat32);
  int sum = k.binary(Op::kAdd, a, b);
  int scaled = k.binary(Op::kMul, sum, s);
  int c = k.constant(DType::kFloat32, -INFINITY);
  int m = k.binary(Op::kMax, scaled, c);
  k.outputs = {k.cast(m, DType::kFloat16), k.binary(Op::kLt, a, b)};
  return k;
}

TEST(KernelIr, PrintParseRoundTrip) {
  Kernel k = sampleKernel();
  EXPECT_EQ(verify(k), "");
  std::string text = print(k);
  EXPECT_NE(text.find("%2 = cast %1 : f32"), std::string::npos) << text;
  EXPECT_NE(text.find("const -inf : f32"), std::string::npos) << text;
  EXPECT_EQ(print(parse(text)), text);
}

TEST(KernelIr, ConstantsRoundTripExactly) {
  Kernel k;
  k.tensor_inputs = {DType::kFloat64};
  int x = k.load(0);
  k.outputs = {k.binary(Op::kMul, x, k.constant(DType::kFloat64, 0.1))};
  Kernel back = parse(print(k));
  EXPECT_EQ(back.body[1].float_value, 0.1);
}

TEST(KernelIr, ParserRejectsMalformedText) {
  EXPECT_THROW(parse("kernel k {\n  %0 = frobnicate : f32\n}\n"), std::invalid_argument);
  EXPECT_THROW(parse("kernel k {\n  in0: f32\n  %0 = load in0 : f32\n"), std::invalid_argument);
  EXPECT_THROW(parse("kernel k {\n  in0: f32\n  %1 = load in0 : f32\n  out0 = %1\n}\n"),
               std::invalid_argument);
  // Type mismatch is caught by the verifier the parser runs.
  EXPECT_THROW(parse("kernel k {\n  in0: f16\n  %0 = load in0 : f16\n  %1 = exp %0 : f16\n  out0 = %1\n}\n"),
               std::invalid_argument);
}

TEST(KernelIr, VerifierNamesEachProblem) {
  Kernel k;
  k.tensor_inputs = {DType::kFloat16, DType::kInt32};
  int h = k.load(0);
  int i = k.load(1);
  Instr bad;
  bad.op = Op::kAdd;
  bad.type = DType::kFloat16;
  bad.operands = {h, i};
  k.body.push_back(bad);
  k.outputs = {7};
  std::string problems = verify(k);
  EXPECT_NE(problems.find("arithmetic on a storage-only type"), std::string::npos) << problems;
  EXPECT_NE(problems.find("operand types differ"), std::string::npos) << problems;
  EXPECT_NE(problems.find("output names a missing value"), std::string::npos) << problems;
}

}  // namespace
}  // namespace kiln::ir
