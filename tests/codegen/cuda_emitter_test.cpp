// The CUDA emitter, checked without a GPU: every op on every dtype it accepts, in every schedule,
// is compiled by NVRTC for sm_80 and sm_90 with no error, no warning and no register spill; and
// the emitted code is the schedule it should be (16-byte vector accesses when vectorized, 64-bit
// index arithmetic when asked for).
#include "codegen/cuda_emitter.h"

#include <gtest/gtest.h>

#include <regex>

#include "codegen/cuda_driver.h"
#include "codegen/nvrtc_compiler.h"

namespace kiln {
namespace {

using ir::DType;
using ir::Op;

bool haveNvrtc() {
  std::string why;
  return cuda::nvrtc(&why) != nullptr;
}

const DType kAllTypes[] = {DType::kBool, DType::kInt32, DType::kInt64, DType::kFloat16, DType::kBFloat16,
                           DType::kFloat32, DType::kFloat64};

// The type an op computes in for a storage dtype (half and bfloat16 compute in float32).
DType computeType(DType type) { return ir::isStorageOnly(type) ? DType::kFloat32 : type; }

bool accepts(Op op, DType compute) {
  const bool floating = ir::isFloating(compute);
  if (ir::isComparison(op) || op == Op::kSelect) return true;
  switch (op) {
    case Op::kNot: case Op::kAnd: case Op::kOr: return compute == DType::kBool;
    case Op::kAdd: case Op::kMul: case Op::kMax: case Op::kMin: return true;
    case Op::kSub: case Op::kNeg: case Op::kAbs: case Op::kFloor: case Op::kCeil: case Op::kRound: case Op::kTrunc:
      return compute != DType::kBool;
    case Op::kIsNan: return true;
    default: return floating;
  }
}

// One kernel per (op, dtype): load, cast to the compute type, the op, cast back, store; with a
// scalar argument and a second input read each way a schedule can read it.
std::vector<ir::Kernel> everyOpKernel() {
  std::vector<ir::Kernel> kernels;
  for (int o = static_cast<int>(Op::kCast) + 1; o <= static_cast<int>(Op::kFma); ++o) {
    const Op op = static_cast<Op>(o);
    for (DType type : kAllTypes) {
      const DType compute = computeType(type);
      if (!accepts(op, compute)) continue;
      ir::Kernel k;
      k.name = std::string(ir::opName(op)) + "_" + ir::dtypeName(type);
      k.tensor_inputs = {type, type};
      k.scalar_inputs = {ir::isFloating(compute) ? DType::kFloat64 : compute == DType::kBool ? DType::kBool : DType::kInt64};
      int a = k.cast(k.load(0), compute);
      int b = k.binary(ir::isFloating(compute) || compute == DType::kBool ? Op::kMax : Op::kAdd,
                       k.cast(k.load(1), compute), k.cast(k.scalar(0), compute));
      int result;
      if (op == Op::kSelect) {
        result = k.select(k.binary(Op::kLt, a, b), a, b);
      } else if (op == Op::kFma) {
        result = k.fma(a, b, a);
      } else if (ir::opArity(op) == 1) {
        result = k.unary(op, a);
      } else {
        result = k.binary(op, a, b);
      }
      DType result_type = k.body[static_cast<size_t>(result)].type;
      k.outputs = {result_type == compute ? k.cast(result, type) : result};
      kernels.push_back(std::move(k));
    }
  }
  return kernels;
}

std::vector<CudaSpecialization> everySchedule(const ir::Kernel& kernel) {
  const size_t operands = kernel.tensor_inputs.size() + kernel.outputs.size();
  // The second operand (an input in every kernel here) read each way a linear schedule can.
  auto secondReadAs = [&](Access access) {
    std::vector<Access> accesses(operands, Access::kContiguous);
    accesses[1] = access;
    return accesses;
  };
  std::vector<CudaSpecialization> schedules;
  schedules.push_back({CudaSchedule::kLinear, 1, secondReadAs(Access::kColumn), false});
  schedules.push_back({CudaSchedule::kLinearVectorized, 1, secondReadAs(Access::kBroadcast), false});
  schedules.push_back({CudaSchedule::kLinearVectorized, 1, secondReadAs(Access::kRow), false});
  schedules.push_back({CudaSchedule::kStrided, 3, {}, true});
  return schedules;
}

// Compiles many kernels as one NVRTC program (one per arch), so thousands of kernels take seconds.
void expectCleanCompile(const std::vector<CudaSource>& sources, const std::string& arch) {
  std::string program = cudaDeviceHelpers();
  for (const CudaSource& source : sources) program += "\n" + source.kernel;
  NvrtcResult result = compileCuda(program, "every_op", arch, false);
  ASSERT_TRUE(result.ok) << result.log.substr(0, 4000);
  EXPECT_TRUE(result.is_cubin);
  EXPECT_GT(result.binary.size(), 1000u);
  EXPECT_EQ(result.log.find("warning"), std::string::npos) << result.log.substr(0, 4000);
  // ptxas reports each function ("Function properties for NAME", then its stack frame and
  // spills). No kernel may spill, with one exception that is not the schedule's doing: CUDA's
  // float64 math and division call out-of-line slow paths (Payne–Hanek reduction, exp/pow
  // range handling, ddiv/dsqrt fix-ups) whose calling convention saves a few registers on the
  // stack (16–48 bytes). Every float32, half and bfloat16 elementwise kernel must be spill-free.
  // A row-reduction kernel (`rows` in its name) divides and takes square roots in float32 around
  // its block reductions, and ptxas outlines those IEEE slow paths the same way there: up to 48
  // bytes, as for float64.
  std::regex properties("Function properties for ([A-Za-z0-9_]+)\\n[^\\n]*?([0-9]+) bytes spill stores, ([0-9]+) bytes spill loads");
  int reported = 0;
  for (auto it = std::sregex_iterator(result.log.begin(), result.log.end(), properties); it != std::sregex_iterator(); ++it) {
    const std::string name = (*it)[1];
    if (name.rfind("kiln_", 0) != 0) continue;
    reported++;
    const bool spills = (*it)[2].str() != "0" || (*it)[3].str() != "0";
    const bool slow_paths = name.find("_f64_") != std::string::npos || name.rfind("kiln_rows_", 0) == 0;
    EXPECT_TRUE(!spills || (slow_paths && std::stoi((*it)[2].str()) <= 48)) << name << " spills for " << arch << ": "
                                                                               << (*it)[0].str();
  }
  EXPECT_EQ(reported, static_cast<int>(sources.size())) << "ptxas did not report every kernel";
}

TEST(CudaEmitter, EveryOpDtypeAndScheduleCompilesCleanlyForSm80AndSm90) {
  if (!haveNvrtc()) GTEST_SKIP() << "NVRTC is not installed";
  std::vector<CudaSource> sources;
  for (ir::Kernel kernel : everyOpKernel()) {
    int variant = 0;
    const std::string base = kernel.name;
    for (const CudaSpecialization& specialization : everySchedule(kernel)) {
      kernel.name = base + "_" + std::to_string(variant++);
      sources.push_back(emitCuda(kernel, specialization));
    }
  }
  ASSERT_GT(sources.size(), 600u);
  for (const char* arch : {"sm_80", "sm_90"}) {
    SCOPED_TRACE(arch);
    expectCleanCompile(sources, arch);
  }
}

ir::Kernel addKernel(DType type) {
  ir::Kernel k;
  k.name = "add";
  k.tensor_inputs = {type, type};
  DType compute = computeType(type);
  k.outputs = {k.cast(k.binary(Op::kAdd, k.cast(k.load(0), compute), k.cast(k.load(1), compute)), type)};
  return k;
}

TEST(CudaEmitter, VectorizedScheduleMovesSixteenBytesPerAccess) {
  if (!haveNvrtc()) GTEST_SKIP() << "NVRTC is not installed";
  for (auto [type, width] : {std::pair{DType::kFloat32, 4}, std::pair{DType::kBFloat16, 8}, std::pair{DType::kFloat64, 2}}) {
    ir::Kernel k = addKernel(type);
    EXPECT_EQ(cudaVectorWidth(k), width);
    CudaSource source = emitCuda(k, {CudaSchedule::kLinearVectorized, 1, {Access::kContiguous, Access::kContiguous, Access::kContiguous}, false});
    EXPECT_NE(source.kernel.find("kiln_vec<" + std::string(type == DType::kBFloat16 ? "kiln_bf16" : type == DType::kFloat32 ? "float" : "double") +
                                 ", " + std::to_string(width) + ">"),
              std::string::npos)
        << source.kernel;
    NvrtcResult ptx = compileCuda(source.source, "vectorized", "compute_90", false);
    ASSERT_TRUE(ptx.ok) << ptx.log;
    // 128-bit global loads and stores in the main loop.
    EXPECT_TRUE(std::regex_search(ptx.binary, std::regex("ld\\.global(\\.nc)?\\.v(4\\.[bfu]32|2\\.[bfu]64)")))
        << ptx.binary;
    EXPECT_TRUE(std::regex_search(ptx.binary, std::regex("st\\.global\\.v(4\\.[bfu]32|2\\.[bfu]64)"))) << ptx.binary;
  }
  // The plain linear schedule has no vector access.
  CudaSource linear = emitCuda(addKernel(DType::kFloat32), {CudaSchedule::kLinear, 1, {Access::kContiguous, Access::kContiguous, Access::kContiguous}, false});
  EXPECT_EQ(linear.kernel.find("kiln_vec"), std::string::npos);
}

// A bias along the rows and a per-row scale: the vectorized schedule loads the bias row by
// vectors at the column within the row and the scale once per vector, with no per-element
// division; the argument block gains `inner`.
TEST(CudaEmitter, RowAndColumnBroadcastsReadByRowAndColumn) {
  ir::Kernel k;
  k.name = "bias_scale";
  k.tensor_inputs = {DType::kFloat32, DType::kFloat32, DType::kFloat32};
  k.outputs = {k.binary(Op::kMul, k.binary(Op::kAdd, k.load(0), k.load(1)), k.load(2))};
  const CudaSpecialization vectorized{CudaSchedule::kLinearVectorized, 1,
                                      {Access::kContiguous, Access::kRow, Access::kColumn, Access::kContiguous}, false};
  CudaSource source = emitCuda(k, vectorized);
  EXPECT_NE(source.kernel.find("long long inner;"), std::string::npos) << source.kernel;
  EXPECT_NE(source.kernel.find("const index_t row = (index_t)((unsigned int)(v * 4) / inner);"), std::string::npos)
      << source.kernel;
  EXPECT_NE(source.kernel.find("*)(d1 + column)"), std::string::npos) << source.kernel;
  EXPECT_NE(source.kernel.find("d2[row]"), std::string::npos) << source.kernel;
  EXPECT_NE(source.kernel.find("*)(d0 + v * 4)"), std::string::npos) << source.kernel;
  // The tail and the scalar schedule: row and column of each element.
  EXPECT_NE(source.kernel.find("const index_t row = (index_t)((unsigned int)e / inner);"), std::string::npos)
      << source.kernel;
  EXPECT_NE(source.kernel.find("d1[column]"), std::string::npos) << source.kernel;
  const CudaArgumentLayout layout = cudaArgumentLayout(k, vectorized);
  EXPECT_TRUE(layout.inner);
  EXPECT_EQ(layout.bytes(), 8u * (4 + 1 + 1 + 1 + 1));
  // A kernel with no row or column operand has no `inner`.
  EXPECT_EQ(emitCuda(addKernel(DType::kFloat32), {CudaSchedule::kLinear, 1, {Access::kContiguous, Access::kBroadcast, Access::kContiguous}, false})
                .kernel.find("inner"),
            std::string::npos);
  if (!haveNvrtc()) GTEST_SKIP() << "NVRTC is not installed";
  NvrtcResult result = compileCuda(source.source, "bias_scale", "sm_90", false);
  ASSERT_TRUE(result.ok) << result.log;
  EXPECT_EQ(result.log.find("warning"), std::string::npos) << result.log;
}

// softmax, layer_norm (Welford), a later-stage min and per-row outputs: every part of the rows
// schedule, as the fuser lowers them.
ir::Kernel rowsKernel(DType storage) {
  const DType compute = computeType(storage);
  ir::Kernel k;
  k.name = std::string("rows_") + ir::dtypeName(storage);
  k.tensor_inputs = {storage, storage};
  int x = k.binary(Op::kAdd, k.cast(k.load(0), compute), k.cast(k.load(1), compute));
  int e = k.unary(Op::kExp, k.binary(Op::kSub, x, k.reduce(Op::kReduceMax, x)));
  int softmax = k.binary(Op::kMul, e, k.binary(Op::kDiv, k.constant(compute, 1), k.reduce(Op::kReduceSum, e)));
  int mean = k.binary(Op::kDiv, k.reduce(Op::kReduceSum, x), k.rowSize(compute));
  int rstd = k.unary(Op::kRsqrt, k.binary(Op::kAdd, k.reduce(Op::kReduceVar, x), k.constant(compute, 1e-5)));
  int norm = k.binary(Op::kMul, k.binary(Op::kSub, x, mean), rstd);
  int min = k.reduce(Op::kReduceMin, k.binary(Op::kMul, x, softmax));
  k.outputs = {k.cast(softmax, storage), k.cast(norm, storage), k.binary(Op::kMul, mean, min)};
  k.row_outputs = {false, false, true};
  return k;
}

TEST(CudaEmitter, RowReductionsCompileCleanlyForSm80AndSm90) {
  std::vector<CudaSource> sources;
  for (DType storage : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64}) {
    ir::Kernel kernel = rowsKernel(storage);
    const std::string base = kernel.name;
    for (int rank : {2, 4}) {
      for (bool index64 : {false, true}) {
        for (bool warp : {false, true}) {
          kernel.name = base + "_" + std::to_string(rank) + (index64 ? "_i64" : "_i32") + (warp ? "_warp" : "");
          sources.push_back(emitCuda(kernel, {CudaSchedule::kRows, rank, {}, index64, warp}));
        }
      }
    }
  }
  // A reduction kernel takes the rows schedule, whatever its layout, and no other.
  ir::Kernel kernel = rowsKernel(DType::kFloat32);
  Geometry geometry = mergeDimensions({8, 4, 96}, {{384 * 4, 96 * 4, 4}, {0, 0, 4}, {384 * 4, 96 * 4, 4}, {384 * 4, 96 * 4, 4}, {16, 4, 0}}, true);
  ASSERT_EQ(geometry.sizes, (std::vector<int64_t>{32, 96}));
  std::string why;
  std::optional<CudaSpecialization> chosen =
      chooseCudaSpecialization(kernel, geometry, classifyOperands(geometry, {4, 4, 4, 4, 4}), {0, 0}, &why);
  ASSERT_TRUE(chosen) << why;
  EXPECT_EQ(chosen->toString(), "rows2w:i32");  // rows of 96: a warp each
  EXPECT_EQ(cudaWorkItems(kernel, *chosen, geometry), 32 * 32);
  Geometry long_rows = mergeDimensions({4, 4096}, {{4096 * 4, 4}, {0, 4}, {4096 * 4, 4}, {4096 * 4, 4}, {4, 0}}, true);
  chosen = chooseCudaSpecialization(kernel, long_rows, classifyOperands(long_rows, {4, 4, 4, 4, 4}), {0, 0}, &why);
  ASSERT_TRUE(chosen) << why;
  EXPECT_EQ(chosen->toString(), "rows2:i32");  // a block each
  EXPECT_EQ(cudaWorkItems(kernel, *chosen, long_rows), 4 * kCudaBlockSize);
  EXPECT_THROW(emitCuda(kernel, {CudaSchedule::kLinear, 1, std::vector<Access>(5, Access::kContiguous), false}),
               std::runtime_error);
  if (!haveNvrtc()) GTEST_SKIP() << "NVRTC is not installed";
  for (const char* arch : {"sm_80", "sm_90"}) {
    SCOPED_TRACE(arch);
    expectCleanCompile(sources, arch);
  }
}

TEST(CudaEmitter, IndexWidthFollowsTheSpecialization) {
  ir::Kernel k = addKernel(DType::kFloat32);
  CudaSource narrow = emitCuda(k, {CudaSchedule::kStrided, 4, {}, false});
  CudaSource wide = emitCuda(k, {CudaSchedule::kStrided, 4, {}, true});
  EXPECT_NE(narrow.kernel.find("typedef int index_t;"), std::string::npos);
  EXPECT_NE(wide.kernel.find("typedef long long index_t;"), std::string::npos);
  EXPECT_NE(wide.kernel.find("p.strides[2][3]"), std::string::npos) << wide.kernel;
  EXPECT_EQ(CudaSpecialization({CudaSchedule::kStrided, 4, {}, true}).toString(), "strided4:i64");
  EXPECT_EQ(CudaSpecialization({CudaSchedule::kLinearVectorized, 1, {Access::kContiguous, Access::kBroadcast, Access::kContiguous}, false}).toString(),
            "linear_vec:cbc:i32");
  EXPECT_EQ(CudaSpecialization({CudaSchedule::kLinear, 1, {Access::kRow, Access::kColumn, Access::kContiguous}, true}).toString(),
            "linear:roc:i64");
}

TEST(CudaEmitter, RejectsSpecializationsThatDoNotFit) {
  ir::Kernel k = addKernel(DType::kFloat32);
  EXPECT_THROW(emitCuda(k, {CudaSchedule::kLinear, 1, {Access::kContiguous, Access::kContiguous}, false}), std::runtime_error);
  EXPECT_THROW(emitCuda(k, {CudaSchedule::kLinear, 1, {Access::kContiguous, Access::kContiguous, Access::kBroadcast}, false}),
               std::runtime_error);
  EXPECT_THROW(emitCuda(k, {CudaSchedule::kLinear, 1, {Access::kContiguous, Access::kContiguous, Access::kRow}, false}),
               std::runtime_error);
  EXPECT_THROW(emitCuda(k, {CudaSchedule::kStrided, kMaxCudaRank + 1, {}, false}), std::runtime_error);
}

TEST(CudaEmitter, ArchitectureChoiceFallsBackToPtxForUnknownDevices) {
  if (!haveNvrtc()) GTEST_SKIP() << "NVRTC is not installed";
  bool as_ptx = true;
  EXPECT_EQ(archForDevice(9, 0, &as_ptx), "sm_90");
  EXPECT_FALSE(as_ptx);
  std::string future = archForDevice(99, 9, &as_ptx);
  EXPECT_TRUE(as_ptx);
  EXPECT_EQ(future, "sm_" + std::to_string(nvrtcSupportedArchs().back()));
}

}  // namespace
}  // namespace kiln
