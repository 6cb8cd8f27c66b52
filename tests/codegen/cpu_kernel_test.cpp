// The LLVM CPU backend against the reference interpreter, on random kernels and fresh random data
// (outputs poisoned first), for every stride class; and a look at the code it emits.
#include "codegen/cpu_kernel.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>

#include "codegen/float_bits.h"
#include "codegen/ir_interpreter.h"

namespace kiln {
namespace {

using ir::DType;
using ir::Op;

struct Buffer {
  DType type;
  std::vector<uint8_t> bytes;
  void* data() { return bytes.data(); }
};

Buffer randomBuffer(DType type, int64_t n, std::mt19937_64& rng) {
  Buffer b{type, std::vector<uint8_t>(static_cast<size_t>(n * ir::dtypeSize(type)))};
  std::normal_distribution<double> normal(0.0, 2.0);
  for (int64_t i = 0; i < n; ++i) {
    double v = normal(rng);
    switch (type) {
      case DType::kBool: reinterpret_cast<bool*>(b.data())[i] = v > 0; break;
      case DType::kInt32: reinterpret_cast<int32_t*>(b.data())[i] = static_cast<int32_t>(std::lround(v * 10)); break;
      case DType::kInt64: reinterpret_cast<int64_t*>(b.data())[i] = std::lround(v * 10); break;
      case DType::kFloat16: reinterpret_cast<uint16_t*>(b.data())[i] = floatToHalf(static_cast<float>(v)); break;
      case DType::kBFloat16: reinterpret_cast<uint16_t*>(b.data())[i] = floatToBFloat16(static_cast<float>(v)); break;
      case DType::kFloat32: reinterpret_cast<float*>(b.data())[i] = static_cast<float>(v); break;
      case DType::kFloat64: reinterpret_cast<double*>(b.data())[i] = v; break;
    }
  }
  return b;
}

double element(const Buffer& b, int64_t i) {
  const void* p = b.bytes.data();
  switch (b.type) {
    case DType::kBool: return static_cast<const uint8_t*>(p)[i];  // raw byte: gaps hold poison
    case DType::kInt32: return static_cast<const int32_t*>(p)[i];
    case DType::kInt64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    case DType::kFloat16: return halfToFloat(static_cast<const uint16_t*>(p)[i]);
    case DType::kBFloat16: return bfloat16ToFloat(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat32: return static_cast<const float*>(p)[i];
    case DType::kFloat64: return static_cast<const double*>(p)[i];
  }
  return 0;
}

// Runs the compiled kernel over a [rows, cols] space; each input is contiguous, broadcast (one
// element per row... no: one element in total along the inner dim) or strided (every 3rd).
void runCompiled(const CpuKernel& compiled, const ir::Kernel& kernel, const CpuLayout& layout,
                 std::vector<Buffer>& inputs, std::vector<Buffer>& outputs, int64_t rows,
                 int64_t cols, const std::vector<double>& scalars) {
  std::vector<char*> data;
  std::vector<int64_t> inner, outer;
  size_t k = 0;
  for (auto* list : {&inputs, &outputs}) {
    for (Buffer& b : *list) {
      int64_t size = ir::dtypeSize(b.type);
      data.push_back(static_cast<char*>(b.data()));
      switch (layout.operands[k++]) {
        case Access::kContiguous: inner.push_back(size); outer.push_back(size * cols); break;
        case Access::kBroadcast: inner.push_back(0); outer.push_back(size); break;
        case Access::kStrided: inner.push_back(3 * size); outer.push_back(3 * size * cols); break;
        default: FAIL() << "a CPU layout holds only inner accesses";
      }
    }
  }
  std::vector<int64_t> strides = inner;
  strides.insert(strides.end(), outer.begin(), outer.end());
  // A reduction kernel's scratch rows, after the operands.
  std::vector<std::vector<char>> scratch;
  for (int64_t bytes : planCpuStash(kernel).scratch_element_bytes) {
    scratch.emplace_back(static_cast<size_t>(bytes * cols));
    data.push_back(scratch.back().data());
  }
  std::vector<int64_t> int_scalars;
  for (double s : scalars) int_scalars.push_back(static_cast<int64_t>(s));
  compiled.function()(data.data(), strides.data(), cols, rows, scalars.data(), int_scalars.data());
}

// The interpreter on the same layout, one row at a time.
void runReference(const ir::Kernel& kernel, const CpuLayout& layout, std::vector<Buffer>& inputs,
                  std::vector<Buffer>& outputs, int64_t rows, int64_t cols, const std::vector<double>& scalars) {
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<ir::Operand1D> in, out;
    size_t k = 0;
    for (auto* list : {&inputs, &outputs}) {
      for (Buffer& b : *list) {
        int64_t size = ir::dtypeSize(b.type);
        ir::Operand1D operand;
        switch (layout.operands[k++]) {
          case Access::kContiguous: operand = {static_cast<char*>(b.data()) + r * cols * size, 1}; break;
          case Access::kBroadcast: operand = {static_cast<char*>(b.data()) + r * size, 0}; break;
          case Access::kStrided: operand = {static_cast<char*>(b.data()) + 3 * r * cols * size, 3}; break;
          default: FAIL() << "a CPU layout holds only inner accesses";
        }
        (list == &inputs ? in : out).push_back(operand);
      }
    }
    ir::interpret(kernel, in, scalars, out, cols);
  }
}

int64_t elementsFor(Access c, int64_t rows, int64_t cols) {
  return c == Access::kBroadcast ? rows : c == Access::kStrided ? 3 * rows * cols : rows * cols;
}

void expectMatches(const ir::Kernel& kernel, const CpuLayout& layout, uint64_t seed, int64_t rows = 5,
                   int64_t cols = 37, std::vector<double> scalars = {}, double tolerance_scale = 1) {
  std::mt19937_64 rng(seed);
  std::unique_ptr<CpuKernel> compiled = CpuKernel::compile(kernel, layout);
  std::vector<Buffer> inputs;
  for (size_t i = 0; i < kernel.tensor_inputs.size(); ++i) {
    inputs.push_back(randomBuffer(kernel.tensor_inputs[i], elementsFor(layout.operands[i], rows, cols), rng));
  }
  std::vector<Buffer> outputs, expected;
  for (size_t o = 0; o < kernel.outputs.size(); ++o) {
    DType t = kernel.outputType(o);
    int64_t n = elementsFor(layout.operands[inputs.size() + o], rows, cols);
    Buffer poison{t, std::vector<uint8_t>(static_cast<size_t>(n * ir::dtypeSize(t)), 0xA5)};
    outputs.push_back(poison);
    expected.push_back(poison);
  }
  runCompiled(*compiled, kernel, layout, inputs, outputs, rows, cols, scalars);
  runReference(kernel, layout, inputs, expected, rows, cols, scalars);
  for (size_t o = 0; o < outputs.size(); ++o) {
    DType t = kernel.outputType(o);
    double tolerance = tolerance_scale *
                       (t == DType::kFloat16 ? 2e-3 : t == DType::kBFloat16 ? 1e-2 : t == DType::kFloat32 ? 2e-6 : 1e-13);
    for (int64_t i = 0; i < static_cast<int64_t>(outputs[o].bytes.size()) / ir::dtypeSize(t); ++i) {
      double got = element(outputs[o], i);
      double want = element(expected[o], i);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got)) << "output " << o << " element " << i << "\n" << ir::print(kernel);
        continue;
      }
      ASSERT_NEAR(got, want, tolerance * (1 + std::fabs(want)))
          << "output " << o << " element " << i << " layout " << layout.toString() << "\n" << ir::print(kernel);
    }
  }
}

// A random well-typed kernel over float32 inputs using every float op.
ir::Kernel randomFloatKernel(std::mt19937_64& rng, DType storage, int inputs, int ops) {
  ir::Kernel k;
  k.name = "random";
  k.tensor_inputs.assign(static_cast<size_t>(inputs), storage);
  std::vector<int> pool;
  for (int i = 0; i < inputs; ++i) pool.push_back(k.cast(k.load(i), DType::kFloat32));
  const Op unary[] = {Op::kNeg, Op::kAbs, Op::kSqrt, Op::kExp, Op::kExpm1, Op::kLog1p, Op::kSin, Op::kCos,
                      Op::kTanh, Op::kSigmoid, Op::kErf, Op::kErfc, Op::kFloor, Op::kCeil, Op::kRound, Op::kTrunc};
  const Op binary[] = {Op::kAdd, Op::kSub, Op::kMul, Op::kDiv, Op::kMax, Op::kMin, Op::kFmod};
  for (int i = 0; i < ops; ++i) {
    auto pick = [&] { return pool[rng() % pool.size()]; };
    int v;
    switch (rng() % 4) {
      case 0: {
        Op op = unary[rng() % std::size(unary)];
        int x = pick();
        // Keep arguments of sqrt/log1p in their domain and exp bounded.
        if (op == Op::kSqrt || op == Op::kLog1p) x = k.unary(Op::kAbs, x);
        if (op == Op::kExp || op == Op::kExpm1) x = k.unary(Op::kTanh, x);
        v = k.unary(op, x);
        break;
      }
      case 1: v = k.binary(binary[rng() % std::size(binary)], pick(), pick()); break;
      case 2: v = k.select(k.binary(Op::kLt, pick(), pick()), pick(), pick()); break;
      default: v = k.binary(Op::kMul, pick(), k.constant(DType::kFloat32, 0.75)); break;
    }
    pool.push_back(v);
  }
  k.outputs = {k.cast(pool.back(), storage), k.binary(Op::kGt, pool[pool.size() / 2], pool.back())};
  return k;
}

TEST(CpuKernel, RandomFloatKernelsMatchInterpreterInEveryLayout) {
  std::mt19937_64 rng(20261121);
  const Access classes[] = {Access::kContiguous, Access::kBroadcast, Access::kStrided};
  for (DType storage : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
    for (int trial = 0; trial < 8; ++trial) {
      ir::Kernel k = randomFloatKernel(rng, storage, 3, 12);
      CpuLayout layout;
      for (int i = 0; i < 3; ++i) layout.operands.push_back(classes[rng() % 3]);
      layout.operands.push_back(Access::kContiguous);
      layout.operands.push_back(trial % 2 ? Access::kStrided : Access::kContiguous);
      SCOPED_TRACE(ir::print(k));
      expectMatches(k, layout, rng(), 1 + static_cast<int64_t>(rng() % 4), 1 + static_cast<int64_t>(rng() % 70));
    }
  }
}

// ---- row reductions ----

// softmax, layer_norm (Welford variance), a per-row max and a sum as row outputs: three stages
// and both kinds of output, from `storage` inputs.
ir::Kernel rowKernel(DType storage, DType compute) {
  ir::Kernel k;
  k.name = "rows";
  k.tensor_inputs = {storage, storage};
  int x = k.cast(k.binary(Op::kAdd, k.cast(k.load(0), compute), k.cast(k.load(1), compute)), compute);
  int max = k.reduce(Op::kReduceMax, x);
  int e = k.unary(Op::kExp, k.binary(Op::kSub, x, max));
  int softmax = k.binary(Op::kMul, e, k.binary(Op::kDiv, k.constant(compute, 1), k.reduce(Op::kReduceSum, e)));
  int n = k.rowSize(compute);
  int mean = k.binary(Op::kDiv, k.reduce(Op::kReduceSum, x), n);
  int var = k.reduce(Op::kReduceVar, x);
  int norm = k.binary(Op::kMul, k.binary(Op::kSub, x, mean),
                      k.unary(Op::kRsqrt, k.binary(Op::kAdd, var, k.constant(compute, 1e-5))));
  int min = k.reduce(Op::kReduceMin, k.binary(Op::kMul, x, softmax));  // a stage after the sum
  k.outputs = {k.cast(softmax, storage), k.cast(norm, storage), max, k.binary(Op::kMul, var, min)};
  k.row_outputs = {false, false, true, true};
  return k;
}

TEST(CpuReduction, RowKernelsMatchInterpreterForEveryRowLength) {
  std::mt19937_64 rng(20261202);
  for (DType storage : {DType::kFloat32, DType::kBFloat16, DType::kFloat64}) {
    const DType compute = storage == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
    ir::Kernel k = rowKernel(storage, compute);
    ASSERT_EQ(ir::verify(k), "");
    // Lengths below one vector, around the interleaved block, and long rows.
    for (int64_t cols : {1, 3, 16, 63, 64, 65, 200, 768, 4099}) {
      for (Access x : {Access::kContiguous, Access::kStrided}) {
        SCOPED_TRACE("cols " + std::to_string(cols) + " " + ir::dtypeName(storage));
        CpuLayout layout{{x, Access::kContiguous, Access::kContiguous, Access::kContiguous, Access::kBroadcast,
                          Access::kBroadcast}};
        expectMatches(k, layout, rng(), 3, cols, {}, 40);
      }
    }
  }
}

TEST(CpuKernel, FmaRoundsOnceAsEagersAddWithAlpha) {
  // a + alpha·b where alpha·b overflows but the fused result does not: inf + (-huge) stays inf.
  ir::Kernel k = ir::parse(R"(kernel add_alpha {
  in0: f32
  in1: f32
  %0 = load in0 : f32
  %1 = load in1 : f32
  %2 = const -3.4028234663852886e+38 : f32
  %3 = fma %1, %2, %0 : f32
  out0 = %3
})");
  std::unique_ptr<CpuKernel> compiled = CpuKernel::compile(k, CpuLayout{{Access::kContiguous, Access::kContiguous, Access::kContiguous}});
  const int64_t n = 37;
  std::vector<float> a(n, INFINITY), b(n, 3e38f), out(n, 0.f), want(n, 0.f);
  a[3] = 1.f;  // finite a: the product's overflow decides
  b[5] = 0.5f;
  std::vector<char*> data = {reinterpret_cast<char*>(a.data()), reinterpret_cast<char*>(b.data()),
                             reinterpret_cast<char*>(out.data())};
  std::vector<int64_t> strides = {4, 4, 4, 0, 0, 0};
  compiled->function()(data.data(), strides.data(), n, 1, nullptr, nullptr);
  ir::interpret(k, {{a.data(), 1}, {b.data(), 1}}, {}, {{want.data(), 1}}, n);
  for (int64_t i = 0; i < n; ++i) {
    const float expected = std::fma(b[static_cast<size_t>(i)], -3.4028234663852886e+38f, a[static_cast<size_t>(i)]);
    EXPECT_EQ(out[static_cast<size_t>(i)], expected) << i;
    EXPECT_EQ(want[static_cast<size_t>(i)], expected) << i;
  }
  EXPECT_EQ(out[0], INFINITY);
}

TEST(CpuReduction, ValuesOfEarlierReadsAreKeptNotComputedAgain) {
  // float32: softmax's exp(x - max) goes to its own output (same type); x = in0 + in1 is kept by
  // the first read for the later ones, in the norm's output. bfloat16 outputs cannot hold float32
  // values: scratch rows.
  for (DType storage : {DType::kFloat32, DType::kBFloat16}) {
    ir::Kernel k = rowKernel(storage, DType::kFloat32);
    CpuStashPlan plan = planCpuStash(k);
    ASSERT_GE(plan.values.size(), 2u) << ir::print(k);
    size_t in_outputs = 0, in_scratch = 0;
    for (const CpuStash& kept : plan.values) {
      EXPECT_NE(k.body[static_cast<size_t>(kept.value)].op, Op::kLoad);
      EXPECT_GE(kept.stage, 1);
      EXPECT_NE(kept.output >= 0, kept.scratch >= 0);
      in_outputs += kept.output >= 0;
      in_scratch += kept.scratch >= 0;
    }
    // float32: both element outputs hold a kept value; bfloat16: none can.
    EXPECT_EQ(in_outputs, storage == DType::kFloat32 ? 2u : 0u);
    EXPECT_EQ(plan.scratch_element_bytes.size(), in_scratch);
  }
  // A kernel without reductions keeps nothing.
  ir::Kernel plain = ir::parse("kernel k {\n  in0: f32\n  %0 = load in0 : f32\n  %1 = exp %0 : f32\n  out0 = %1\n}\n");
  EXPECT_TRUE(planCpuStash(plain).values.empty());
}

TEST(CpuReduction, NanPropagatesThroughMaxAndMinAndEmptyStagesAreSkipped) {
  ir::Kernel k = ir::parse(R"(kernel nan_rows {
  in0: f32
  %0 = load in0 : f32
  %1 = reduce_max %0 : f32
  %2 = reduce_min %0 : f32
  %3 = reduce_sum %0 : f32
  %4 = rowsize : f32
  %5 = div %3, %4 : f32
  out0 = row %1
  out1 = row %2
  out2 = row %5
})");
  std::unique_ptr<CpuKernel> compiled = CpuKernel::compile(k, CpuLayout{{Access::kContiguous, Access::kBroadcast,
                                                                         Access::kBroadcast, Access::kBroadcast}});
  for (int64_t cols : {5, 100}) {
    std::vector<float> x(static_cast<size_t>(2 * cols), 1.5f);
    x[static_cast<size_t>(cols / 3)] = NAN;  // row 0 holds a NaN (in the vector loop for 100), row 1 none
    x[static_cast<size_t>(cols + 1)] = -7.f;
    std::vector<float> max(2), min(2), mean(2);
    std::vector<char*> data = {reinterpret_cast<char*>(x.data()), reinterpret_cast<char*>(max.data()),
                               reinterpret_cast<char*>(min.data()), reinterpret_cast<char*>(mean.data())};
    std::vector<int64_t> strides = {4, 0, 0, 0, 4 * cols, 4, 4, 4};
    compiled->function()(data.data(), strides.data(), cols, 2, nullptr, nullptr);
    EXPECT_TRUE(std::isnan(max[0]) && std::isnan(min[0]) && std::isnan(mean[0])) << cols;
    EXPECT_EQ(max[1], 1.5f);
    EXPECT_EQ(min[1], -7.f);
    EXPECT_NEAR(mean[1], (1.5 * static_cast<double>(cols - 1) - 7) / static_cast<double>(cols), 1e-6);
  }
}

TEST(CpuReduction, WelfordVarianceStaysAccurateFarFromZero) {
  // Values around 1e4 with spread 1: a naive E[x²] - E[x]² in float32 loses every digit.
  ir::Kernel k = ir::parse(R"(kernel var {
  in0: f32
  %0 = load in0 : f32
  %1 = reduce_var %0 : f32
  out0 = row %1
})");
  std::unique_ptr<CpuKernel> compiled = CpuKernel::compile(k, CpuLayout{{Access::kContiguous, Access::kBroadcast}});
  const int64_t cols = 4096 + 37;
  std::vector<float> x(static_cast<size_t>(cols));
  double mean = 0, m2 = 0;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal(1e4, 1.0);
  for (float& v : x) v = static_cast<float>(normal(rng));
  for (float v : x) mean += v;
  mean /= static_cast<double>(cols);
  for (float v : x) m2 += (v - mean) * (v - mean);
  float var = 0;
  std::vector<char*> data = {reinterpret_cast<char*>(x.data()), reinterpret_cast<char*>(&var)};
  std::vector<int64_t> strides = {4, 0, 4 * cols, 4};
  compiled->function()(data.data(), strides.data(), cols, 1, nullptr, nullptr);
  EXPECT_NEAR(var, m2 / static_cast<double>(cols), 1e-3);
}

TEST(CpuKernel, IntegerBoolAndCastsMatchInterpreter) {
  ir::Kernel k;
  k.name = "ints";
  k.tensor_inputs = {DType::kInt32, DType::kInt64, DType::kBool, DType::kFloat64};
  k.scalar_inputs = {DType::kInt64, DType::kFloat64};
  int a = k.cast(k.load(0), DType::kInt64);
  int b = k.load(1);
  int c = k.load(2);
  int d = k.load(3);
  int sum = k.binary(Op::kAdd, k.binary(Op::kMul, a, b), k.scalar(0));
  int m = k.binary(Op::kMax, k.unary(Op::kAbs, sum), k.unary(Op::kNeg, b));
  int pick = k.select(k.binary(Op::kAnd, c, k.binary(Op::kGe, a, b)), m, b);
  int f = k.binary(Op::kMul, k.cast(pick, DType::kFloat64), k.scalar(1));
  int g = k.binary(Op::kPow, k.unary(Op::kAbs, d), k.constant(DType::kFloat64, 1.5));
  k.outputs = {k.cast(f, DType::kInt32), k.binary(Op::kOr, k.unary(Op::kNot, c), k.unary(Op::kIsNan, g)),
               k.binary(Op::kAdd, f, g), k.cast(d, DType::kBool)};
  for (Access c0 : {Access::kContiguous, Access::kStrided}) {
    CpuLayout layout{{c0, Access::kContiguous, Access::kBroadcast, Access::kContiguous,
                      Access::kContiguous, Access::kContiguous, Access::kContiguous,
                      Access::kContiguous}};
    expectMatches(k, layout, 7, 3, 45, {5, -0.5});
  }
}

TEST(CpuKernel, ContiguousLoopIsVectorizedWithSleef) {
  ir::Kernel k;
  k.name = "vectorized";
  k.tensor_inputs = {DType::kFloat32, DType::kFloat32};
  k.outputs = {k.unary(Op::kSin, k.unary(Op::kTanh, k.binary(Op::kAdd, k.load(0), k.load(1))))};
  CpuLayout layout{{Access::kContiguous, Access::kBroadcast, Access::kContiguous}};
  auto compiled = CpuKernel::compile(k, layout, /*keep_text=*/true);
  const int lanes = CpuTarget::host().vector_bits / 32;
  const std::string vector_type = "<" + std::to_string(lanes) + " x float>";
  EXPECT_NE(compiled->llvmIr().find("load " + vector_type), std::string::npos) << compiled->llvmIr();
  EXPECT_NE(compiled->llvmIr().find("Sleef_sinf" + std::to_string(lanes) + "_u35"), std::string::npos);
  // float32 tanh is kiln's own inline code, not a call.
  EXPECT_EQ(compiled->llvmIr().find("Sleef_tanh"), std::string::npos);
  EXPECT_NE(compiled->assembly().find(lanes == 16 ? "zmm" : lanes == 8 ? "ymm" : "xmm"), std::string::npos);
  EXPECT_LT(compiled->compileMilliseconds(), 5000);
}

// A batch_norm's per-channel scale over an NCHW row: the sqrt and the division read only
// operands broadcast along the row, so they run once per row (scalar), not on every vector.
TEST(CpuKernel, RowInvariantValuesAreComputedOncePerRow) {
  ir::Kernel k = ir::parse(R"(kernel scale_rows {
  in0: f32
  in1: f32
  in2: f32
  %0 = load in0 : f32
  %1 = load in1 : f32
  %2 = load in2 : f32
  %3 = const 0.001 : f32
  %4 = add %2, %3 : f32
  %5 = sqrt %4 : f32
  %6 = div %1, %5 : f32
  %7 = mul %0, %6 : f32
  out0 = %7
})");
  CpuLayout layout{{Access::kContiguous, Access::kBroadcast, Access::kBroadcast, Access::kContiguous}};
  auto compiled = CpuKernel::compile(k, layout, /*keep_text=*/true);
  const std::string& ir = compiled->llvmIr();
  EXPECT_NE(ir.find("llvm.sqrt.f32"), std::string::npos) << ir;
  EXPECT_EQ(ir.find("llvm.sqrt.v"), std::string::npos) << "a vector sqrt: the row's scale is computed per element\n" << ir;
  for (int64_t cols : {1, 7, 37, 200}) expectMatches(k, layout, 11, 4, cols);
  // In a reduction kernel: exp of a broadcast operand, read by the reduced values and by an
  // output, is computed per row and never taken from the row's stash.
  ir::Kernel rows = ir::parse(R"(kernel scaled_softmax {
  in0: f32
  in1: f32
  %0 = load in0 : f32
  %1 = load in1 : f32
  %2 = exp %1 : f32
  %3 = mul %0, %2 : f32
  %4 = reduce_max %3 : f32
  %5 = sub %3, %4 : f32
  %6 = exp %5 : f32
  %7 = reduce_sum %6 : f32
  %8 = div %6, %7 : f32
  %9 = mul %8, %2 : f32
  out0 = %8
  out1 = %9
})");
  CpuLayout row_layout{{Access::kContiguous, Access::kBroadcast, Access::kContiguous, Access::kContiguous}};
  for (int64_t cols : {1, 5, 100}) expectMatches(rows, row_layout, 12, 3, cols);
}

TEST(CpuKernel, StridedOperandFallsBackToScalarLoop) {
  ir::Kernel k;
  k.name = "strided";
  k.tensor_inputs = {DType::kFloat32};
  k.outputs = {k.unary(Op::kLog, k.load(0))};
  CpuLayout layout{{Access::kStrided, Access::kContiguous}};
  auto compiled = CpuKernel::compile(k, layout, true);
  EXPECT_NE(compiled->llvmIr().find("Sleef_logf_u35"), std::string::npos);
  expectMatches(k, layout, 3);
}

// float32 exp/tanh/sigmoid/erf (SLEEF calls and kiln's own polynomials) against libm in double over the whole useful range,
// the range ends, and NaN/Inf, vectorized (contiguous) and scalar (strided).
TEST(CpuKernel, InlineFloatMathIsAccurateEverywhere) {
  std::vector<float> xs;
  for (float x = -100.0f; x <= 100.0f; x += 0.01337f) xs.push_back(x);
  for (float x = -2.0f; x <= 2.0f; x += 1.7e-4f) xs.push_back(x);
  for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 1e-7f, 0.625f, -0.625f, 0.62499f, 88.7f, 88.72283f, 88.8f,
                  -87.3f, -87.4f, -103.0f, -110.0f, INFINITY, -INFINITY, NAN, 3.4e38f, -3.4e38f}) {
    xs.push_back(x);
  }
  const auto n = static_cast<int64_t>(xs.size());
  struct Case {
    Op op;
    double (*reference)(double);
    double ulps;  // tolerated error, in units of float32 epsilon relative to |reference|
  };
  const Case cases[] = {
      {Op::kExp, [](double x) { return std::exp(x); }, 3},
      {Op::kTanh, [](double x) { return std::tanh(x); }, 4},
      {Op::kSigmoid, [](double x) { return 1.0 / (1.0 + std::exp(-x)); }, 4},
      {Op::kErf, [](double x) { return std::erf(x); }, 4},
  };
  for (const Case& c : cases) {
    ir::Kernel k;
    k.name = ir::opName(c.op);
    k.tensor_inputs = {DType::kFloat32};
    k.outputs = {k.unary(c.op, k.load(0))};
    for (Access input_class : {Access::kContiguous, Access::kStrided}) {
      CpuLayout layout{{input_class, Access::kContiguous}};
      auto compiled = CpuKernel::compile(k, layout);
      std::vector<float> in(static_cast<size_t>(input_class == Access::kStrided ? 3 * n : n), NAN);
      for (int64_t i = 0; i < n; ++i) in[static_cast<size_t>(input_class == Access::kStrided ? 3 * i : i)] = xs[static_cast<size_t>(i)];
      std::vector<float> out(static_cast<size_t>(n), -12345.0f);
      char* data[] = {reinterpret_cast<char*>(in.data()), reinterpret_cast<char*>(out.data())};
      const int64_t strides[] = {input_class == Access::kStrided ? 12 : 4, 4, 0, 0};
      compiled->function()(data, strides, n, 1, nullptr, nullptr);
      for (int64_t i = 0; i < n; ++i) {
        const float x = xs[static_cast<size_t>(i)];
        const double expected = c.reference(static_cast<double>(x));
        const float got = out[static_cast<size_t>(i)];
        if (x == 0.0f && (c.op == Op::kTanh || c.op == Op::kErf)) {
          // Odd functions keep the sign of zero, as libm (and eager) do.
          EXPECT_EQ(std::signbit(got), std::signbit(x)) << k.name << "(" << x << ") = " << got;
        }
        if (std::isnan(expected)) {
          EXPECT_TRUE(std::isnan(got)) << k.name << "(" << x << ") = " << got;
        } else if (std::fabs(expected) > static_cast<double>(FLT_MAX)) {
          EXPECT_EQ(static_cast<double>(got), expected > 0 ? INFINITY : -INFINITY) << k.name << "(" << x << ")";
        } else {
          // Below float's normal range the inline exp flushes to zero (eager: a denormal).
          const double tolerance = std::max(c.ulps * 1.1920929e-7 * std::fabs(expected), 1.2e-38);
          EXPECT_NEAR(got, expected, tolerance) << k.name << "(" << x << ")";
        }
      }
    }
  }
}

TEST(CpuKernel, RejectsInvalidIrWithReason) {
  ir::Kernel k;
  k.tensor_inputs = {DType::kFloat16};
  k.outputs = {k.unary(Op::kExp, k.load(0))};
  try {
    CpuKernel::compile(k, CpuLayout{{Access::kContiguous, Access::kContiguous}});
    FAIL() << "expected an error";
  } catch (const std::runtime_error& error) {
    EXPECT_NE(std::string(error.what()).find("storage-only"), std::string::npos) << error.what();
  }
}

}  // namespace
}  // namespace kiln
