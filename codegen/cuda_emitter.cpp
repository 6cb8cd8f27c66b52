#include "codegen/cuda_emitter.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <functional>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "codegen/kiln_device_cuh.h"  // generated: kKilnDeviceCuh, the text of cuda/kiln_device.cuh

namespace kiln {
namespace {

using ir::DType;
using ir::Instr;
using ir::Op;

// Register type of a value of `type` (half and bfloat16 stay 16-bit patterns).
const char* cudaType(DType type) {
  switch (type) {
    case DType::kBool: return "bool";
    case DType::kInt32: return "int";
    case DType::kInt64: return "long long";
    case DType::kFloat16: return "kiln_f16";
    case DType::kBFloat16: return "kiln_bf16";
    case DType::kFloat32: return "float";
    case DType::kFloat64: return "double";
  }
  return "?";
}

// Memory type (bool is one byte, as in ATen).
const char* memoryType(DType type) { return type == DType::kBool ? "unsigned char" : cudaType(type); }

std::string floatLiteral(double value, DType type) {
  if (std::isnan(value)) return type == DType::kFloat64 ? "__longlong_as_double(0x7ff8000000000000LL)" : "__int_as_float(0x7fc00000)";
  if (std::isinf(value)) {
    const char* sign = value < 0 ? "-" : "";
    return std::string(sign) + (type == DType::kFloat64 ? "__longlong_as_double(0x7ff0000000000000LL)" : "__int_as_float(0x7f800000)");
  }
  char text[64];
  if (type == DType::kFloat64) {
    std::snprintf(text, sizeof text, "%.17g", value);
  } else {
    std::snprintf(text, sizeof text, "%.9gf", static_cast<double>(static_cast<float>(value)));
  }
  std::string literal = text;
  // "1f" is not a literal: give integral values a decimal point.
  if (literal.find_first_of(".eEn") == std::string::npos) {
    literal.insert(type == DType::kFloat64 ? literal.size() : literal.size() - 1, ".0");
  }
  return literal;
}

// C++ expression converting `x` of type `from` to `to`, with the IR's cast semantics.
std::string castExpression(const std::string& x, DType from, DType to) {
  if (from == to) return x;
  if (to == DType::kBool) {
    if (from == DType::kFloat16 || from == DType::kBFloat16) return "(" + castExpression(x, from, DType::kFloat32) + " != 0.0f)";
    return "(" + x + " != 0)";
  }
  if (from == DType::kFloat16) {
    if (to == DType::kFloat64) return "kiln_f16_to_f64(" + x + ")";
    return castExpression("kiln_f16_to_f32(" + x + ")", DType::kFloat32, to);
  }
  if (from == DType::kBFloat16) return castExpression("kiln_bf16_to_f32(" + x + ")", DType::kFloat32, to);
  if (to == DType::kFloat16) {
    if (from == DType::kFloat64) return "kiln_f64_to_f16(" + x + ")";
    return "kiln_f32_to_f16(" + castExpression(x, from, DType::kFloat32) + ")";
  }
  if (to == DType::kBFloat16) return "kiln_f32_to_bf16(" + castExpression(x, from, DType::kFloat32) + ")";
  // Plain C conversions: float → int is cvt.rzi (saturating, NaN → 0), the CPU backend's
  // fptosi.sat; bool → number is 0/1.
  return std::string("((") + cudaType(to) + ")" + x + ")";
}

std::string unaryExpression(Op op, DType type, const std::string& x) {
  const bool single = type == DType::kFloat32;
  const bool floating = ir::isFloating(type);
  auto fn = [&](const char* name) { return std::string(name) + (single ? "f(" : "(") + x + ")"; };
  switch (op) {
    case Op::kNot: return "(!" + x + ")";
    case Op::kIsNan: return floating ? "(" + x + " != " + x + ")" : "((void)" + x + ", false)";
    case Op::kNeg: return floating ? "(-" + x + ")" : "kiln_wrap_sub((" + std::string(cudaType(type)) + ")0, " + x + ")";
    case Op::kAbs:
      if (floating) return fn("fabs");
      return "(" + x + " < 0 ? kiln_wrap_sub((" + std::string(cudaType(type)) + ")0, " + x + ") : " + x + ")";
    case Op::kFloor: case Op::kCeil: case Op::kRound: case Op::kTrunc:
      if (!floating) return x;
      return fn(op == Op::kFloor ? "floor" : op == Op::kCeil ? "ceil" : op == Op::kRound ? "rint" : "trunc");
    default: break;
  }
  if (!floating) throw std::runtime_error(std::string("kiln cuda: ") + ir::opName(op) + " on integers");
  switch (op) {
    case Op::kReciprocal: return single ? "(1.0f / " + x + ")" : "(1.0 / " + x + ")";
    case Op::kSqrt: return fn("sqrt");
    case Op::kRsqrt: return "kiln_rsqrt(" + x + ")";
    case Op::kExp: return fn("exp");
    case Op::kExp2: return fn("exp2");
    case Op::kExpm1: return fn("expm1");
    case Op::kLog: return fn("log");
    case Op::kLog2: return fn("log2");
    case Op::kLog10: return fn("log10");
    case Op::kLog1p: return fn("log1p");
    case Op::kSin: return fn("sin");
    case Op::kCos: return fn("cos");
    case Op::kTan: return fn("tan");
    case Op::kTanh: return fn("tanh");
    case Op::kSigmoid: return "kiln_sigmoid(" + x + ")";
    case Op::kErf: return fn("erf");
    case Op::kErfc: return fn("erfc");
    default: throw std::runtime_error(std::string("kiln cuda: unknown unary op ") + ir::opName(op));
  }
}

std::string binaryExpression(Op op, DType operand_type, const std::string& a, const std::string& b) {
  const bool floating = ir::isFloating(operand_type);
  const bool boolean = operand_type == DType::kBool;
  auto infix = [&](const char* symbol) { return "(" + a + " " + symbol + " " + b + ")"; };
  switch (op) {
    case Op::kAnd: return infix("&&");
    case Op::kOr: return infix("||");
    case Op::kLt: return infix("<");
    case Op::kLe: return infix("<=");
    case Op::kGt: return infix(">");
    case Op::kGe: return infix(">=");
    case Op::kEq: return infix("==");
    case Op::kNe: return infix("!=");
    default: break;
  }
  if (boolean) {
    switch (op) {
      case Op::kAdd: case Op::kMax: return infix("||");
      case Op::kMul: case Op::kMin: return infix("&&");
      default: throw std::runtime_error(std::string("kiln cuda: ") + ir::opName(op) + " on bool");
    }
  }
  if (floating) {
    const bool single = operand_type == DType::kFloat32;
    switch (op) {
      case Op::kAdd: return infix("+");
      case Op::kSub: return infix("-");
      case Op::kMul: return infix("*");
      case Op::kDiv: return infix("/");
      case Op::kMax: return "kiln_max(" + a + ", " + b + ")";
      case Op::kMin: return "kiln_min(" + a + ", " + b + ")";
      case Op::kPow: return std::string(single ? "powf(" : "pow(") + a + ", " + b + ")";
      case Op::kFmod: return std::string(single ? "fmodf(" : "fmod(") + a + ", " + b + ")";
      default: break;
    }
  } else {
    switch (op) {
      case Op::kAdd: return "kiln_wrap_add(" + a + ", " + b + ")";
      case Op::kSub: return "kiln_wrap_sub(" + a + ", " + b + ")";
      case Op::kMul: return "kiln_wrap_mul(" + a + ", " + b + ")";
      case Op::kMax: return "kiln_max(" + a + ", " + b + ")";
      case Op::kMin: return "kiln_min(" + a + ", " + b + ")";
      default: break;
    }
  }
  throw std::runtime_error(std::string("kiln cuda: ") + ir::opName(op) + " on " + ir::dtypeName(operand_type));
}

// Which body values an output depends on: only those are emitted (NVRTC warns about unused
// variables, and CI wants its compiles warning-free).
std::vector<bool> liveValues(const ir::Kernel& kernel) {
  std::vector<bool> live(kernel.body.size(), false);
  for (int output : kernel.outputs) live[static_cast<size_t>(output)] = true;
  for (size_t k = kernel.body.size(); k-- > 0;) {
    if (!live[k]) continue;
    for (int operand : kernel.body[k].operands) live[static_cast<size_t>(operand)] = true;
  }
  return live;
}

// Statements computing the kernel body for one element. `load(k)` is the expression reading
// tensor input k; the outputs' values are returned in `outputs`.
std::string bodyStatements(const ir::Kernel& kernel, const std::vector<bool>& live,
                           const std::function<std::string(int)>& load, const std::string& indent,
                           std::vector<std::string>* outputs) {
  std::ostringstream out;
  auto name = [](size_t k) { return "v" + std::to_string(k); };
  for (size_t k = 0; k < kernel.body.size(); ++k) {
    if (!live[k]) continue;
    const Instr& instr = kernel.body[k];
    auto operand = [&](size_t j) { return name(static_cast<size_t>(instr.operands[j])); };
    auto operandType = [&](size_t j) { return kernel.body[static_cast<size_t>(instr.operands[j])].type; };
    std::string expression;
    switch (instr.op) {
      case Op::kLoad: {
        std::string raw = load(instr.param);
        expression = instr.type == DType::kBool ? "(" + raw + " != 0)" : raw;
        break;
      }
      case Op::kScalar:
        expression = ir::isFloating(instr.type)
                         ? castExpression("p.float_args[" + std::to_string(instr.param) + "]", DType::kFloat64, instr.type)
                         : castExpression("p.int_args[" + std::to_string(instr.param) + "]", DType::kInt64, instr.type);
        break;
      case Op::kConstant:
        if (ir::isFloating(instr.type)) {
          expression = floatLiteral(instr.float_value, instr.type == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32);
          if (ir::isStorageOnly(instr.type)) expression = castExpression(expression, DType::kFloat32, instr.type);
        } else if (instr.type == DType::kBool) {
          expression = instr.int_value ? "true" : "false";
        } else {
          // INT64_MIN has no literal: its magnitude does not fit a long long.
          const std::string literal = instr.int_value == std::numeric_limits<int64_t>::min()
                                          ? "(-9223372036854775807LL - 1)"
                                          : std::to_string(instr.int_value) + "LL";
          expression = "(" + std::string(cudaType(instr.type)) + ")" + literal;
        }
        break;
      case Op::kCast: expression = castExpression(operand(0), operandType(0), instr.type); break;
      case Op::kSelect: expression = "(" + operand(0) + " ? " + operand(1) + " : " + operand(2) + ")"; break;
      case Op::kFma:
        expression = std::string(instr.type == DType::kFloat64 ? "fma(" : "fmaf(") + operand(0) + ", " + operand(1) + ", " +
                     operand(2) + ")";
        break;
      case Op::kRowSize: expression = "(" + std::string(cudaType(instr.type)) + ")row_length"; break;
      default:
        expression = ir::opArity(instr.op) == 1 ? unaryExpression(instr.op, operandType(0), operand(0))
                                                : binaryExpression(instr.op, operandType(0), operand(0), operand(1));
    }
    out << indent << "const " << cudaType(instr.type) << " " << name(k) << " = " << expression << ";\n";
  }
  for (int output : kernel.outputs) outputs->push_back(name(static_cast<size_t>(output)));
  return out.str();
}

std::string storeValue(DType type, const std::string& value) {
  return type == DType::kBool ? "(unsigned char)" + value : value;
}

// The argument struct (cudaArgumentLayout's order) and the kernel's opening lines.
std::string kernelHead(const std::string& name, const CudaArgumentLayout& args, size_t operands,
                       const std::string& index_type) {
  std::ostringstream out;
  const std::string params = name + "_params";
  out << "struct " << params << " {\n  void* data[" << operands << "];\n";
  if (args.rank > 0) {
    out << "  long long sizes[" << args.rank << "];\n  long long strides[" << operands << "][" << args.rank << "];\n";
  }
  if (args.inner) out << "  long long inner;\n";
  out << "  long long numel;\n  double float_args[" << std::max(1, args.float_scalars) << "];\n  long long int_args["
      << std::max(1, args.int_scalars) << "];\n};\n\n";
  out << "extern \"C\" __global__ void __launch_bounds__(" << kCudaBlockSize << ") " << name
      << "(const " << params << " p) {\n"
      << "  typedef " << index_type << " index_t;\n";
  return out.str();
}

// Declares the typed pointer d<k> of each operand the kernel uses (inputs no output depends on,
// such as a tensor passed only for its dtype, are never read); returns which are used.
std::vector<bool> operandPointers(const ir::Kernel& kernel, const std::vector<bool>& live, std::ostream& out) {
  const size_t inputs = kernel.tensor_inputs.size();
  const size_t operands = inputs + kernel.outputs.size();
  std::vector<bool> used(operands, true);
  for (size_t k = 0; k < inputs; ++k) used[k] = false;
  for (size_t k = 0; k < kernel.body.size(); ++k) {
    if (live[k] && kernel.body[k].op == Op::kLoad) used[static_cast<size_t>(kernel.body[k].param)] = true;
  }
  for (size_t k = 0; k < operands; ++k) {
    if (!used[k]) continue;
    out << "  " << (k < inputs ? "const " : "") << memoryType(kernel.operandType(k)) << "* __restrict__ d" << k << " = ("
        << (k < inputs ? "const " : "") << memoryType(kernel.operandType(k)) << "*)p.data[" << k << "];\n";
  }
  return used;
}

// The values `roots` depend on, up to (and not through) the `known` ones.
std::vector<bool> neededValues(const ir::Kernel& kernel, const std::vector<int>& roots, const std::vector<bool>& known) {
  std::vector<bool> wanted = ir::dependencies(kernel, roots, known);
  for (size_t k = 0; k < kernel.body.size(); ++k) wanted[k] = wanted[k] && !known[k];
  return wanted;
}

// The kRows kernel: see CudaSchedule. Values computed at row scope (reductions, what follows
// from them, and whatever the row scope needed) are visible to the loops after them.
CudaSource emitRowsKernel(const ir::Kernel& kernel, const CudaSpecialization& specialization);

}  // namespace

std::string CudaSpecialization::toString() const {
  std::string text;
  switch (schedule) {
    case CudaSchedule::kLinear: text = "linear"; break;
    case CudaSchedule::kLinearVectorized: text = "linear_vec"; break;
    case CudaSchedule::kStrided: text = "strided" + std::to_string(rank); break;
    case CudaSchedule::kRows: text = "rows" + std::to_string(rank) + (warp_rows ? "w" : ""); break;
  }
  if (schedule == CudaSchedule::kLinear || schedule == CudaSchedule::kLinearVectorized) {
    text += ":";
    for (Access a : access) text += static_cast<char>(a);
  }
  return text + (index64 ? ":i64" : ":i32");
}

bool CudaSpecialization::usesInner() const {
  for (Access a : access) {
    if (a == Access::kRow || a == Access::kColumn) return true;
  }
  return false;
}

size_t CudaArgumentLayout::bytes() const {
  return 8 * static_cast<size_t>(operands * (1 + rank) + rank + (inner ? 1 : 0) + 1 + std::max(1, float_scalars) +
                                 std::max(1, int_scalars));
}

int cudaVectorWidth(const ir::Kernel& kernel) {
  int64_t widest = 1;
  for (DType type : kernel.tensor_inputs) widest = std::max(widest, ir::dtypeSize(type));
  for (size_t o = 0; o < kernel.outputs.size(); ++o) widest = std::max(widest, ir::dtypeSize(kernel.outputType(o)));
  return static_cast<int>(16 / widest);
}

CudaArgumentLayout cudaArgumentLayout(const ir::Kernel& kernel, const CudaSpecialization& specialization) {
  CudaArgumentLayout layout;
  layout.operands = static_cast<int>(kernel.tensor_inputs.size() + kernel.outputs.size());
  const bool strided = specialization.schedule == CudaSchedule::kStrided || specialization.schedule == CudaSchedule::kRows;
  layout.rank = strided ? specialization.rank : 0;
  layout.inner = !strided && specialization.usesInner();
  layout.float_scalars = static_cast<int>(kernel.scalar_inputs.size());
  layout.int_scalars = static_cast<int>(kernel.scalar_inputs.size());
  return layout;
}

std::vector<int64_t> packCudaArguments(const ir::Kernel& kernel, const CudaSpecialization& specialization,
                                       const Geometry& geometry, const std::vector<const void*>& pointers,
                                       const std::vector<double>& float_scalars,
                                       const std::vector<int64_t>& int_scalars) {
  const CudaArgumentLayout layout = cudaArgumentLayout(kernel, specialization);
  if (pointers.size() != static_cast<size_t>(layout.operands) || geometry.strides.size() != pointers.size() ||
      float_scalars.size() != kernel.scalar_inputs.size() || int_scalars.size() != kernel.scalar_inputs.size() ||
      (layout.rank > 0 && geometry.rank() != static_cast<size_t>(layout.rank))) {
    throw std::runtime_error("kiln cuda: the call does not match the kernel's argument layout");
  }
  std::vector<int64_t> arguments;
  arguments.reserve(layout.bytes() / 8);
  for (const void* pointer : pointers) arguments.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(pointer)));
  if (layout.rank > 0) {
    for (int64_t size : geometry.sizes) arguments.push_back(size);
    for (size_t k = 0; k < pointers.size(); ++k) {
      const int64_t element = ir::dtypeSize(kernel.operandType(k));
      for (int64_t stride : geometry.strides[k]) arguments.push_back(stride / element);
    }
  }
  if (layout.inner) arguments.push_back(geometry.sizes.back());
  arguments.push_back(geometry.numel);
  for (double value : float_scalars) {
    int64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    arguments.push_back(bits);
  }
  if (float_scalars.empty()) arguments.push_back(0);
  for (int64_t value : int_scalars) arguments.push_back(value);
  if (int_scalars.empty()) arguments.push_back(0);
  return arguments;
}

int64_t cudaWorkItems(const ir::Kernel& kernel, const CudaSpecialization& specialization, const Geometry& geometry) {
  const int64_t numel = geometry.numel;
  if (specialization.schedule == CudaSchedule::kRows) {
    const int64_t rows = std::max<int64_t>(1, numel / std::max<int64_t>(1, geometry.sizes.back()));
    return rows * (specialization.warp_rows ? 32 : kCudaBlockSize);
  }
  if (specialization.schedule != CudaSchedule::kLinearVectorized) return numel;
  return std::max<int64_t>(1, numel / cudaVectorWidth(kernel));
}

int64_t cudaGridBlocks(int64_t work, int64_t resident_blocks) {
  return std::clamp<int64_t>((work + kCudaBlockSize - 1) / kCudaBlockSize, 1, std::max<int64_t>(1, resident_blocks));
}

std::optional<CudaSpecialization> chooseCudaSpecialization(const ir::Kernel& kernel, const Geometry& geometry,
                                                           const std::vector<Access>& accesses,
                                                           const std::vector<uintptr_t>& addresses,
                                                           std::string* why) {
  const size_t inputs = kernel.tensor_inputs.size();
  const size_t operands = inputs + kernel.outputs.size();
  auto elementSize = [&](size_t k) { return ir::dtypeSize(kernel.operandType(k)); };
  const size_t rank = geometry.rank();
  const bool rows = kernel.hasReductions();
  CudaSpecialization specialization;
  // 32-bit indices while every element offset (and the grid-stride loop's step past the end)
  // stays below 2^31.
  const int64_t limit = (int64_t{1} << 31) - (int64_t{1} << 24);
  bool index64 = geometry.numel >= limit;
  for (size_t k = 0; k < operands; ++k) {
    int64_t largest = 0;
    for (size_t d = 0; d < rank; ++d) largest += (geometry.sizes[d] - 1) * std::abs(geometry.strides[k][d]) / elementSize(k);
    index64 |= largest >= limit;
  }
  specialization.index64 = index64;
  // Linear schedules: at most two dimensions, every operand read linearly (isLinearAccess).
  bool linear = rank <= 2 && !rows;
  for (size_t k = 0; linear && k < operands; ++k) linear = isLinearAccess(accesses[k]);
  if (linear) {
    specialization.schedule = CudaSchedule::kLinear;
    specialization.access = accesses;
    // One element (0-dim tensors): every operand reads as a broadcast; outputs are written as
    // the contiguous tensors they are.
    for (size_t k = inputs; k < operands; ++k) {
      if (specialization.access[k] == Access::kBroadcast && geometry.numel == 1) specialization.access[k] = Access::kContiguous;
    }
    // Vectorized: every operand read by vectors starts aligned to one, and a vector never
    // straddles two rows. Outputs come from torch's caching allocator (512-byte aligned).
    const int width = cudaVectorWidth(kernel);
    bool vectorize = geometry.numel >= width && (!specialization.usesInner() || geometry.sizes.back() % width == 0);
    for (size_t k = 0; vectorize && k < inputs; ++k) {
      if (accesses[k] != Access::kContiguous && accesses[k] != Access::kRow) continue;
      vectorize = addresses[k] % static_cast<uintptr_t>(width * elementSize(k)) == 0;
    }
    if (vectorize) specialization.schedule = CudaSchedule::kLinearVectorized;
    return specialization;
  }
  if (rank > static_cast<size_t>(kMaxCudaRank)) {
    if (why) *why = "rank " + std::to_string(rank) + " after merging exceeds " + std::to_string(kMaxCudaRank);
    return std::nullopt;
  }
  for (size_t k = 0; k < operands; ++k) {
    for (size_t d = 0; d < rank; ++d) {
      if (geometry.strides[k][d] % elementSize(k) != 0) {
        if (why) *why = "a stride that is not a whole number of elements";
        return std::nullopt;
      }
    }
  }
  specialization.schedule = rows ? CudaSchedule::kRows : CudaSchedule::kStrided;
  specialization.rank = static_cast<int>(rank);
  specialization.warp_rows = rows && geometry.sizes.back() <= kCudaWarpRowLength;
  return specialization;
}

CudaSource emitCuda(const ir::Kernel& kernel, const CudaSpecialization& specialization) {
  std::string problems = ir::verify(kernel);
  if (!problems.empty()) throw std::runtime_error("kiln cuda: invalid kernel IR: " + problems);
  const size_t inputs = kernel.tensor_inputs.size();
  const size_t operands = inputs + kernel.outputs.size();
  const bool linear =
      specialization.schedule == CudaSchedule::kLinear || specialization.schedule == CudaSchedule::kLinearVectorized;
  if (linear && specialization.access.size() != operands) {
    throw std::runtime_error("kiln cuda: the specialization names " + std::to_string(specialization.access.size()) +
                             " operands, the kernel has " + std::to_string(operands));
  }
  if (!linear && (specialization.rank < 1 || specialization.rank > kMaxCudaRank)) {
    throw std::runtime_error("kiln cuda: strided rank " + std::to_string(specialization.rank) + " outside 1.." +
                             std::to_string(kMaxCudaRank));
  }
  if (kernel.hasReductions() != (specialization.schedule == CudaSchedule::kRows)) {
    throw std::runtime_error("kiln cuda: row reductions take the rows schedule, and only they do");
  }
  if (specialization.schedule == CudaSchedule::kRows) return emitRowsKernel(kernel, specialization);
  for (size_t o = 0; linear && o < kernel.outputs.size(); ++o) {
    if (specialization.access[inputs + o] != Access::kContiguous) throw std::runtime_error("kiln cuda: a broadcast output");
  }
  const CudaArgumentLayout args = cudaArgumentLayout(kernel, specialization);

  CudaSource result;
  result.name = "kiln_" + kernel.name;
  std::ostringstream out;
  out << "// kernel " << kernel.name << ", schedule " << specialization.toString() << "\n";
  const std::string index_type = specialization.index64 ? "long long" : "int";
  const std::string unsigned_index = specialization.index64 ? "unsigned long long" : "unsigned int";
  out << kernelHead(result.name, args, operands, index_type);
  const std::vector<bool> live = liveValues(kernel);
  const std::vector<bool> used = operandPointers(kernel, live, out);
  out << "  const index_t n = (index_t)p.numel;\n"
      << "  const index_t step = (index_t)gridDim.x * blockDim.x;\n"
      << "  const index_t first = (index_t)blockIdx.x * blockDim.x + threadIdx.x;\n";
  auto accessOf = [&](size_t k) { return linear ? specialization.access[k] : Access::kContiguous; };
  // The row and column of e are computed only where an operand reads them.
  bool reads_row = false, reads_column = false;
  for (size_t k = 0; k < inputs; ++k) {
    reads_row |= used[k] && (accessOf(k) == Access::kRow || accessOf(k) == Access::kColumn);
    reads_column |= used[k] && accessOf(k) == Access::kRow;
  }
  // Unsigned division (indices are never negative): cheaper, and ptxas spills around the signed
  // 32-bit division's slow path on sm_90.
  if (reads_row) out << "  const " << unsigned_index << " inner = (" << unsigned_index << ")p.inner;\n";

  std::vector<std::string> values;
  if (specialization.schedule == CudaSchedule::kLinearVectorized) {
    const int width = cudaVectorWidth(kernel);
    out << "  const index_t vectors = n / " << width << ";\n";
    out << "  for (index_t v = first; v < vectors; v += step) {\n";
    if (reads_row) {
      // inner is a multiple of the vector: the whole vector lies in one row.
      out << "    const index_t row = (index_t)((" << unsigned_index << ")(v * " << width << ") / inner);\n";
      if (reads_column) out << "    const index_t column = v * " << width << " - row * (index_t)inner;\n";
    }
    for (size_t k = 0; k < inputs; ++k) {
      const Access access = accessOf(k);
      if (access == Access::kBroadcast || access == Access::kColumn || !used[k]) continue;
      out << "    const kiln_vec<" << memoryType(kernel.operandType(k)) << ", " << width << "> x" << k << " = *(const kiln_vec<"
          << memoryType(kernel.operandType(k)) << ", " << width << ">*)(d" << k
          << (access == Access::kRow ? " + column" : " + v * " + std::to_string(width)) << ");\n";
    }
    // Results go to scalars first and into the vector only for the store: a vector written
    // piecewise around a math slow path stays in local memory.
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      out << "    " << memoryType(kernel.outputType(o)) << " y" << o << "[" << width << "];\n";
    }
    // Unrolled here rather than by #pragma unroll: a body with a branch (a math slow path) may
    // stay a loop, and a vector indexed by a loop variable then lives in local memory.
    for (int j = 0; j < width; ++j) {
      const std::string lane = std::to_string(j);
      values.clear();
      out << "    {\n";
      out << bodyStatements(kernel, live, [&](int k) {
        switch (accessOf(static_cast<size_t>(k))) {
          case Access::kBroadcast: return "d" + std::to_string(k) + "[0]";
          case Access::kColumn: return "d" + std::to_string(k) + "[row]";
          default: return "x" + std::to_string(k) + ".v[" + lane + "]";
        }
      }, "      ", &values);
      for (size_t o = 0; o < kernel.outputs.size(); ++o) {
        out << "      y" << o << "[" << lane << "] = " << storeValue(kernel.outputType(o), values[o]) << ";\n";
      }
      out << "    }\n";
    }
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      const size_t k = inputs + o;
      const std::string vector = "kiln_vec<" + std::string(memoryType(kernel.operandType(k))) + ", " + std::to_string(width) + ">";
      out << "    {\n      " << vector << " x" << k << ";\n";
      for (int j = 0; j < width; ++j) out << "      x" << k << ".v[" << j << "] = y" << o << "[" << j << "];\n";
      out << "      *(" << vector << "*)(d" << k << " + v * " << width << ") = x" << k << ";\n    }\n";
    }
    out << "  }\n";
    // The tail: the last n % width elements, one per thread.
    out << "  for (index_t e = vectors * " << width << " + first; e < n; e += step) {\n";
  } else {
    out << "  for (index_t e = first; e < n; e += step) {\n";
  }
  values.clear();
  if (specialization.schedule == CudaSchedule::kStrided) {
    // Linear index → per-operand element offsets, innermost dimension last.
    out << "    index_t rest = e;\n";
    for (size_t k = 0; k < operands; ++k) out << "    index_t o" << k << " = 0;\n";
    for (int d = specialization.rank - 1; d >= 0; --d) {
      if (d > 0) {
        out << "    {\n      const index_t size = (index_t)p.sizes[" << d << "];\n"
            << "      const index_t i = rest % size;\n      rest /= size;\n";
      } else {
        out << "    {\n      const index_t i = rest;\n";
      }
      for (size_t k = 0; k < operands; ++k) out << "      o" << k << " += i * (index_t)p.strides[" << k << "][" << d << "];\n";
      out << "    }\n";
    }
    out << bodyStatements(kernel, live, [&](int k) { return "d" + std::to_string(k) + "[o" + std::to_string(k) + "]"; }, "    ", &values);
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      out << "    d" << inputs + o << "[o" << inputs + o << "] = " << storeValue(kernel.outputType(o), values[o]) << ";\n";
    }
  } else {
    if (reads_row) {
      out << "    const index_t row = (index_t)((" << unsigned_index << ")e / inner);\n";
      if (reads_column) out << "    const index_t column = e - row * (index_t)inner;\n";
    }
    out << bodyStatements(kernel, live, [&](int k) {
      switch (accessOf(static_cast<size_t>(k))) {
        case Access::kBroadcast: return "d" + std::to_string(k) + "[0]";
        case Access::kRow: return "d" + std::to_string(k) + "[column]";
        case Access::kColumn: return "d" + std::to_string(k) + "[row]";
        default: return "d" + std::to_string(k) + "[e]";
      }
    }, "    ", &values);
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      out << "    d" << inputs + o << "[e] = " << storeValue(kernel.outputType(o), values[o]) << ";\n";
    }
  }
  out << "  }\n}\n";
  result.kernel = out.str();
  result.source = std::string(kKilnDeviceCuh) + "\n" + result.kernel;
  return result;
}

const char* cudaDeviceHelpers() { return kKilnDeviceCuh; }

}  // namespace kiln

namespace kiln {
namespace {

CudaSource emitRowsKernel(const ir::Kernel& kernel, const CudaSpecialization& specialization) {
  const size_t inputs = kernel.tensor_inputs.size();
  const size_t operands = inputs + kernel.outputs.size();
  const int rank = specialization.rank;
  if (rank < 2) throw std::runtime_error("kiln cuda: the rows schedule needs rows and a row (rank 2 or more)");
  const ir::RowSchedule schedule = ir::rowSchedule(kernel);
  const std::vector<bool> live = liveValues(kernel);
  CudaSource result;
  result.name = "kiln_" + kernel.name;
  std::ostringstream out;
  out << "// kernel " << kernel.name << ", schedule " << specialization.toString() << "\n";
  out << kernelHead(result.name, cudaArgumentLayout(kernel, specialization), operands,
                    specialization.index64 ? "long long" : "int");
  const std::vector<bool> used = operandPointers(kernel, live, out);
  const bool warp = specialization.warp_rows;
  const std::string last = std::to_string(rank - 1);
  out << "  const index_t row_length = (index_t)p.sizes[" << last << "];\n"
      << "  const index_t rows = (index_t)(p.numel / p.sizes[" << last << "]);\n";
  // Where a thread starts along the row and how far it steps (read from special registers each
  // time: held in registers across the loops they cost spills).
  const std::string first = warp ? "(index_t)(threadIdx.x & 31)" : "(index_t)threadIdx.x";
  const std::string stride = warp ? "32" : "(index_t)blockDim.x";
  if (warp) {
    // A warp per row: lanes stride along it; the block's warps take consecutive rows.
    out << "  for (index_t row = (index_t)blockIdx.x * (index_t)(blockDim.x >> 5) + (index_t)(threadIdx.x >> 5); row < rows;\n"
        << "       row += (index_t)gridDim.x * (index_t)(blockDim.x >> 5)) {\n";
  } else {
    out << "  __shared__ double kiln_scratch[3 * 32 + 1];\n"
        << "  for (index_t row = blockIdx.x; row < rows; row += gridDim.x) {\n";
  }
  out << "    index_t rest = row;\n";
  for (size_t k = 0; k < operands; ++k) {
    if (used[k]) out << "    index_t b" << k << " = 0;\n";
  }
  // The row's first element, per operand: the row index over the outer dimensions.
  for (int d = rank - 2; d >= 0; --d) {
    const std::string dim = std::to_string(d);
    if (d > 0) {
      out << "    {\n      const index_t i = rest % (index_t)p.sizes[" << dim << "];\n      rest /= (index_t)p.sizes[" << dim << "];\n";
    } else {
      out << "    {\n      const index_t i = rest;\n";
    }
    for (size_t k = 0; k < operands; ++k) {
      if (used[k]) out << "      b" << k << " += i * (index_t)p.strides[" << k << "][" << dim << "];\n";
    }
    out << "    }\n";
  }
  for (size_t k = 0; k < operands; ++k) {
    const bool along_row = used[k] && !(k >= inputs && kernel.isRowOutput(k - inputs));
    if (along_row) out << "    const index_t s" << k << " = (index_t)p.strides[" << k << "][" << last << "];\n";
  }
  auto load = [](int k) {
    const std::string n = std::to_string(k);
    return "d" + n + "[b" + n + " + i * s" + n + "]";
  };
  std::vector<bool> known(kernel.body.size(), false);
  std::vector<std::string> unused;
  // Values at row scope: emitted once, visible to everything after.
  auto emitAtRowScope = [&](const std::vector<int>& roots) {
    const std::vector<bool> wanted = neededValues(kernel, roots, known);
    out << bodyStatements(kernel, wanted, load, "    ", &unused);
    for (size_t k = 0; k < known.size(); ++k) known[k] = known[k] || wanted[k];
  };
  for (int stage = 1; stage <= schedule.stages; ++stage) {
    std::vector<int> reductions, operands_read;
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      if (!live[k] || !ir::isReduction(kernel.body[k].op) || schedule.stage[k] != stage) continue;
      reductions.push_back(static_cast<int>(k));
      operands_read.push_back(kernel.body[k].operands[0]);
    }
    if (reductions.empty()) continue;
    for (int r : reductions) {
      const Instr& instr = kernel.body[static_cast<size_t>(r)];
      const std::string type = cudaType(instr.type), n = std::to_string(r);
      switch (instr.op) {
        case Op::kReduceMax: out << "    " << type << " a" << n << " = " << floatLiteral(-INFINITY, instr.type) << ";\n"; break;
        case Op::kReduceMin: out << "    " << type << " a" << n << " = " << floatLiteral(INFINITY, instr.type) << ";\n"; break;
        case Op::kReduceVar: out << "    " << type << " c" << n << " = 0, m" << n << " = 0, a" << n << " = 0;\n"; break;
        default: out << "    " << type << " a" << n << " = 0;\n";
      }
    }
    out << "    for (index_t i = " << first << "; i < row_length; i += " << stride << ") {\n"
        << bodyStatements(kernel, neededValues(kernel, operands_read, known), load, "      ", &unused);
    for (int r : reductions) {
      const Instr& instr = kernel.body[static_cast<size_t>(r)];
      const std::string n = std::to_string(r), x = "v" + std::to_string(instr.operands[0]);
      switch (instr.op) {
        case Op::kReduceMax: out << "      a" << n << " = kiln_max(a" << n << ", " << x << ");\n"; break;
        case Op::kReduceMin: out << "      a" << n << " = kiln_min(a" << n << ", " << x << ");\n"; break;
        case Op::kReduceVar: out << "      kiln_welford_add(c" << n << ", m" << n << ", a" << n << ", " << x << ");\n"; break;
        default: out << "      a" << n << " += " << x << ";\n";
      }
    }
    out << "    }\n";
    for (int r : reductions) {
      const Instr& instr = kernel.body[static_cast<size_t>(r)];
      const std::string n = std::to_string(r);
      out << "    const " << cudaType(instr.type) << " v" << n << " = ";
      const std::string scope = warp ? "kiln_warp_" : "kiln_block_";
      const std::string scratch = warp ? ")" : ", kiln_scratch)";
      switch (instr.op) {
        case Op::kReduceMax: out << scope << "max(a" << n << scratch << ";\n"; break;
        case Op::kReduceMin: out << scope << "min(a" << n << scratch << ";\n"; break;
        case Op::kReduceVar: out << scope << "var(c" << n << ", m" << n << ", a" << n << scratch << ";\n"; break;
        default: out << scope << "sum(a" << n << scratch << ";\n";
      }
      known[static_cast<size_t>(r)] = true;
    }
    // The per-row values that follow from this stage, when something needs them.
    std::vector<int> row_values;
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      if (live[k] && !known[k] && !schedule.per_element[k] && schedule.stage[k] == stage) row_values.push_back(static_cast<int>(k));
    }
    emitAtRowScope(row_values);
  }
  std::vector<int> row_outputs, element_outputs;
  for (size_t o = 0; o < kernel.outputs.size(); ++o) {
    (kernel.isRowOutput(o) ? row_outputs : element_outputs).push_back(kernel.outputs[o]);
  }
  if (!row_outputs.empty()) {
    emitAtRowScope(row_outputs);
    out << "    if (" << first << " == 0) {\n";
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      if (!kernel.isRowOutput(o)) continue;
      const std::string k = std::to_string(inputs + o);
      out << "      d" << k << "[b" << k << "] = " << storeValue(kernel.outputType(o), "v" + std::to_string(kernel.outputs[o])) << ";\n";
    }
    out << "    }\n";
  }
  if (!element_outputs.empty()) {
    out << "    for (index_t i = " << first << "; i < row_length; i += " << stride << ") {\n"
        << bodyStatements(kernel, neededValues(kernel, element_outputs, known), load, "      ", &unused);
    for (size_t o = 0; o < kernel.outputs.size(); ++o) {
      if (kernel.isRowOutput(o)) continue;
      const std::string k = std::to_string(inputs + o);
      out << "      d" << k << "[b" << k << " + i * s" << k << "] = "
          << storeValue(kernel.outputType(o), "v" + std::to_string(kernel.outputs[o])) << ";\n";
    }
    out << "    }\n";
  }
  out << "  }\n}\n";
  result.kernel = out.str();
  result.source = std::string(kKilnDeviceCuh) + "\n" + result.kernel;
  return result;
}

}  // namespace
}  // namespace kiln
