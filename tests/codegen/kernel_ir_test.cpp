// Kernel IR: the text form round-trips, the parser and verifier reject malformed kernels.
#include "codegen/kernel_ir.h"
#include "codegen/ir_interpreter.h"

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

TEST(KernelIr, ReductionsAndRowOutputsRoundTrip) {
  const std::string text = R"(kernel softmax_rows {
  in0: bf16
  %0 = load in0 : bf16
  %1 = cast %0 : f32
  %2 = reduce_max %1 : f32
  %3 = sub %1, %2 : f32
  %4 = exp %3 : f32
  %5 = reduce_sum %4 : f32
  %6 = div %4, %5 : f32
  %7 = cast %6 : bf16
  %8 = reduce_var %1 : f32
  %9 = rowsize : f32
  %10 = mul %8, %9 : f32
  out0 = %7
  out1 = row %10
}
)";
  Kernel k = parse(text);
  EXPECT_EQ(print(k), text);
  EXPECT_TRUE(k.hasReductions());
  EXPECT_FALSE(k.isRowOutput(0));
  EXPECT_TRUE(k.isRowOutput(1));
  RowSchedule schedule = rowSchedule(k);
  EXPECT_EQ(schedule.stages, 2);  // max, then the sum of exp(x - max)
  EXPECT_EQ(schedule.stage[5], 2);
  EXPECT_EQ(schedule.stage[8], 1);
  EXPECT_TRUE(schedule.per_element[4]);
  EXPECT_FALSE(schedule.per_element[10]);
  EXPECT_TRUE(schedule.per_element_outputs);
}

TEST(KernelIr, VerifierRejectsMisplacedReductions) {
  auto problems = [](const std::string& body) {
    try {
      parse("kernel k {\n  in0: f32\n  %0 = load in0 : f32\n" + body + "}\n");
      return std::string();
    } catch (const std::invalid_argument& error) {
      return std::string(error.what());
    }
  };
  EXPECT_NE(problems("  %1 = reduce_sum %0 : f32\n  %2 = reduce_sum %1 : f32\n  out0 = row %2\n")
                .find("must be a per-element value"), std::string::npos);
  EXPECT_NE(problems("  %1 = reduce_sum %0 : f32\n  out0 = row %0\n").find("names a per-element value"),
            std::string::npos);
  EXPECT_NE(problems("  %1 = neg %0 : f32\n  out0 = row %1\n").find("without reductions"), std::string::npos);
  EXPECT_NE(problems("  %1 = cast %0 : i64\n  %2 = reduce_sum %1 : i64\n  out0 = row %2\n")
                .find("reductions are on f32 or f64"), std::string::npos);
  EXPECT_NE(problems("  %1 = rowsize : bool\n  out0 = %1\n").find("rowsize must be"), std::string::npos);
  EXPECT_EQ(problems("  %1 = reduce_sum %0 : f32\n  %2 = div %0, %1 : f32\n  out0 = %2\n"), "");
}

TEST(KernelIr, InterpreterReducesEachRow) {
  Kernel k = parse(R"(kernel k {
  in0: f32
  %0 = load in0 : f32
  %1 = reduce_sum %0 : f32
  %2 = reduce_var %0 : f32
  %3 = div %0, %1 : f32
  out0 = %3
  out1 = row %2
})");
  std::vector<float> x = {1, 2, 3, 4, 10, 10, 10, 10};
  std::vector<float> share(8), var(2);
  interpret(k, {{x.data(), 1, 4}}, {}, {{share.data(), 1, 4}, {var.data(), 0, 1}}, 4, 2);
  EXPECT_FLOAT_EQ(share[0], 0.1f);
  EXPECT_FLOAT_EQ(share[3], 0.4f);
  EXPECT_FLOAT_EQ(share[5], 0.25f);
  EXPECT_FLOAT_EQ(var[0], 1.25f);
  EXPECT_FLOAT_EQ(var[1], 0.f);
}

}  // namespace
}  // namespace kiln::ir
