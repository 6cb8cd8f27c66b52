// The CPU backend's emitter (see cpu_emitter.h); cpu_kernel.h has the kernel's calling convention.
#include "codegen/cpu_emitter.h"

#include <llvm/ADT/StringMap.h>
#include <llvm/ExecutionEngine/Orc/JITTargetMachineBuilder.h>
#include <llvm/IR/IRBuilder.h>
#include <llvm/IR/Verifier.h>
#include <llvm/MC/TargetRegistry.h>
#include <llvm/Support/TargetSelect.h>
#include <llvm/Support/raw_ostream.h>
#include <llvm/TargetParser/Host.h>

#include <mutex>
#include <stdexcept>

#include "codegen/fault_injection.h"

namespace kiln {
namespace {

using ir::DType;
using ir::Instr;
using ir::Op;

// Names of the SLEEF functions for each math op. The 3.5-ULP variants are used where SLEEF has
// one: several times faster than the 1-ULP ones (tanh: 0.65 vs 2.3 ns per float on AVX-512) and
// far inside float32 comparison tolerances.
const char* sleefBase(Op op, const char** ulp) {
  *ulp = "_u10";
  switch (op) {
    case Op::kExp: return "exp";
    case Op::kExp2: return "exp2";
    case Op::kExpm1: return "expm1";
    case Op::kLog: *ulp = "_u35"; return "log";
    case Op::kLog2: *ulp = "_u35"; return "log2";
    case Op::kLog10: return "log10";
    case Op::kLog1p: return "log1p";
    case Op::kSin: *ulp = "_u35"; return "sin";
    case Op::kCos: *ulp = "_u35"; return "cos";
    case Op::kTan: *ulp = "_u35"; return "tan";
    case Op::kTanh: *ulp = "_u35"; return "tanh";
    case Op::kErf: return "erf";
    case Op::kErfc: *ulp = "_u15"; return "erfc";
    case Op::kPow: return "pow";
    case Op::kFmod: *ulp = ""; return "fmod";
    default: return nullptr;
  }
}

bool sleefHasWidth(bool is_double, int lanes, int vector_bits) {
  if (lanes == 1) return true;
  int bits = lanes * (is_double ? 64 : 32);
  return (bits == 128 || bits == 256 || bits == 512) && bits <= vector_bits;
}

struct Emitter {
  llvm::LLVMContext& context;
  llvm::Module& module;
  llvm::IRBuilder<> builder;
  const ir::Kernel& kernel;
  const CpuLayout& layout;
  int vector_bits;

  Emitter(llvm::LLVMContext& c, llvm::Module& m, const ir::Kernel& k, const CpuLayout& l, int bits)
      : context(c), module(m), builder(c), kernel(k), layout(l), vector_bits(bits) {}

  llvm::Type* scalarType(DType type) {
    switch (type) {
      case DType::kBool: return builder.getInt1Ty();
      case DType::kInt32: return builder.getInt32Ty();
      case DType::kInt64: return builder.getInt64Ty();
      case DType::kFloat16: return builder.getHalfTy();
      case DType::kBFloat16: return builder.getInt16Ty();
      case DType::kFloat32: return builder.getFloatTy();
      case DType::kFloat64: return builder.getDoubleTy();
    }
    return nullptr;
  }
  llvm::Type* memoryType(DType type) {
    return type == DType::kBool ? builder.getInt8Ty() : scalarType(type);
  }
  llvm::Type* valueType(DType type, int lanes) {
    llvm::Type* scalar = scalarType(type);
    return lanes == 1 ? scalar : llvm::FixedVectorType::get(scalar, static_cast<unsigned>(lanes));
  }
  llvm::Value* splat(llvm::Value* value, int lanes) {
    return lanes == 1 ? value : builder.CreateVectorSplat(static_cast<unsigned>(lanes), value);
  }
  llvm::Value* floatConstant(llvm::Type* type, double value) {
    return llvm::ConstantFP::get(type, value);
  }

  llvm::Value* load(DType type, llvm::Value* pointer, int lanes, bool broadcast) {
    llvm::Type* memory = memoryType(type);
    llvm::Value* value;
    auto align = llvm::Align(static_cast<uint64_t>(ir::dtypeSize(type)));
    if (lanes == 1 || broadcast) {
      value = builder.CreateAlignedLoad(memory, pointer, align);
      if (type == DType::kBool) value = builder.CreateICmpNE(value, llvm::ConstantInt::get(memory, 0));
      return splat(value, lanes);
    }
    llvm::Type* vector = llvm::FixedVectorType::get(memory, static_cast<unsigned>(lanes));
    value = builder.CreateAlignedLoad(vector, pointer, align);
    if (type == DType::kBool) value = builder.CreateICmpNE(value, llvm::Constant::getNullValue(vector));
    return value;
  }

  void store(DType type, llvm::Value* value, llvm::Value* pointer) {
    if (type == DType::kBool) {
      llvm::Type* byte = builder.getInt8Ty();
      if (auto* vector = llvm::dyn_cast<llvm::VectorType>(value->getType())) {
        byte = llvm::VectorType::get(byte, vector->getElementCount());
      }
      value = builder.CreateZExt(value, byte);
    }
    builder.CreateAlignedStore(value, pointer, llvm::Align(static_cast<uint64_t>(ir::dtypeSize(type))));
  }

  // bf16 (held as i16 bits) <-> f32.
  llvm::Value* bfloat16ToFloat(llvm::Value* bits, int lanes) {
    llvm::Value* wide = builder.CreateZExt(bits, valueType(DType::kInt32, lanes));
    wide = builder.CreateShl(wide, 16);
    return builder.CreateBitCast(wide, valueType(DType::kFloat32, lanes));
  }
  llvm::Value* floatToBFloat16(llvm::Value* value, int lanes) {
    llvm::Type* i32 = valueType(DType::kInt32, lanes);
    llvm::Value* bits = builder.CreateBitCast(value, i32);
    llvm::Value* lsb = builder.CreateAnd(builder.CreateLShr(bits, 16), splat(builder.getInt32(1), lanes));
    llvm::Value* rounded = builder.CreateAdd(builder.CreateAdd(bits, splat(builder.getInt32(0x7fff), lanes)), lsb);
    llvm::Value* truncated = builder.CreateTrunc(builder.CreateLShr(rounded, 16), valueType(DType::kBFloat16, lanes));
    llvm::Value* is_nan = builder.CreateFCmpUNO(value, value);
    return builder.CreateSelect(is_nan, splat(builder.getInt16(0x7fc0), lanes), truncated);
  }

  llvm::Value* cast(llvm::Value* value, DType from, DType to, int lanes) {
    if (from == to) return value;
    if (from == DType::kBFloat16) return cast(bfloat16ToFloat(value, lanes), DType::kFloat32, to, lanes);
    if (to == DType::kBFloat16) {
      if (from != DType::kFloat32) value = cast(value, from, DType::kFloat32, lanes);
      return floatToBFloat16(value, lanes);
    }
    if (from == DType::kFloat16 && !ir::isFloating(to)) {
      return cast(builder.CreateFPExt(value, valueType(DType::kFloat32, lanes)), DType::kFloat32, to, lanes);
    }
    if (to == DType::kFloat16 && !ir::isFloating(from)) {
      return cast(cast(value, from, DType::kFloat32, lanes), DType::kFloat32, to, lanes);
    }
    llvm::Type* target = valueType(to, lanes);
    if (ir::isFloating(from)) {
      if (ir::isFloating(to)) {
        return ir::dtypeSize(to) > ir::dtypeSize(from) ? builder.CreateFPExt(value, target)
                                                       : builder.CreateFPTrunc(value, target);
      }
      if (to == DType::kBool) return builder.CreateFCmpUNE(value, llvm::Constant::getNullValue(value->getType()));
      return builder.CreateIntrinsic(llvm::Intrinsic::fptosi_sat, {target, value->getType()}, {value});
    }
    if (from == DType::kBool) {
      return ir::isFloating(to) ? builder.CreateUIToFP(value, target) : builder.CreateZExt(value, target);
    }
    if (ir::isFloating(to)) return builder.CreateSIToFP(value, target);
    if (to == DType::kBool) return builder.CreateICmpNE(value, llvm::Constant::getNullValue(value->getType()));
    return builder.CreateSExtOrTrunc(value, target);
  }

  llvm::Value* callMath(Op op, DType type, int lanes, std::vector<llvm::Value*> args) {
    const char* ulp = nullptr;
    const char* base = sleefBase(op, &ulp);
    const bool is_double = type == DType::kFloat64;
    if (!sleefHasWidth(is_double, lanes, vector_bits)) {
      // No SLEEF variant of this width: call the scalar one lane by lane.
      llvm::Value* result = llvm::UndefValue::get(valueType(type, lanes));
      for (int lane = 0; lane < lanes; ++lane) {
        std::vector<llvm::Value*> lane_args;
        for (llvm::Value* arg : args) lane_args.push_back(builder.CreateExtractElement(arg, static_cast<uint64_t>(lane)));
        result = builder.CreateInsertElement(result, callMath(op, type, 1, lane_args), static_cast<uint64_t>(lane));
      }
      return result;
    }
    std::string name = std::string("Sleef_") + base + (is_double ? (lanes == 1 ? "" : "d") : "f") +
                       (lanes == 1 ? "" : std::to_string(lanes)) + ulp;
    llvm::Type* value_type = valueType(type, lanes);
    std::vector<llvm::Type*> params(args.size(), value_type);
    llvm::FunctionCallee callee = module.getOrInsertFunction(
        name, llvm::FunctionType::get(value_type, params, false));
    if (auto* function = llvm::dyn_cast<llvm::Function>(callee.getCallee())) {
      function->setDoesNotAccessMemory();
      function->setDoesNotThrow();
    }
    return builder.CreateCall(callee, args);
  }

  llvm::Value* nanPropagating(bool take_max, llvm::Value* a, llvm::Value* b) {
    llvm::Value* pick = take_max ? builder.CreateFCmpOGT(a, b) : builder.CreateFCmpOLT(a, b);
    llvm::Value* result = builder.CreateSelect(pick, a, b);
    result = builder.CreateSelect(builder.CreateFCmpUNO(b, b), b, result);
    return builder.CreateSelect(builder.CreateFCmpUNO(a, a), a, result);
  }

  // a·b + c, fused where the target has FMA (one rounding instead of two: never less accurate).
  llvm::Value* multiplyAdd(llvm::Value* a, llvm::Value* b, llvm::Value* c) {
    return builder.CreateIntrinsic(llvm::Intrinsic::fmuladd, {a->getType()}, {a, b, c});
  }

  // float32 exp inline: 2^n · p(r), r = x − n·ln2 in two parts, Cephes expf's degree-6
  // polynomial (under 2 ULP). 2^n is applied as two factors 2^(n/2), so overflow to Inf and
  // gradual underflow to denormals come out of the multiplies, as in eager. Inline, a chain of
  // math ops stays in registers: a call into SLEEF makes the whole vector register file
  // caller-saved, and those spills cost more than the math itself.
  llvm::Value* fastExp(llvm::Value* x) {
    llvm::Type* t = x->getType();
    auto c = [&](double v) { return floatConstant(t, v); };
    llvm::Type* int_type = builder.getInt32Ty();
    if (auto* vector = llvm::dyn_cast<llvm::VectorType>(t)) int_type = llvm::VectorType::get(int_type, vector->getElementCount());
    llvm::Value* clamped = builder.CreateMinNum(builder.CreateMaxNum(x, c(-104.0)), c(89.0));
    llvm::Value* n = builder.CreateUnaryIntrinsic(llvm::Intrinsic::roundeven,
                                                  builder.CreateFMul(clamped, c(1.44269504088896341)));
    llvm::Value* r = multiplyAdd(n, c(-0.693359375), clamped);
    r = multiplyAdd(n, c(2.12194440e-4), r);
    llvm::Value* p = c(1.9875691500E-4);
    for (double coefficient : {1.3981999507E-3, 8.3334519073E-3, 4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1}) {
      p = multiplyAdd(p, r, c(coefficient));
    }
    p = builder.CreateFAdd(multiplyAdd(p, builder.CreateFMul(r, r), r), c(1.0));
    llvm::Value* whole = builder.CreateFPToSI(n, int_type);  // in [-150, 128]
    llvm::Value* half = builder.CreateAShr(whole, 1);
    auto power_of_two = [&](llvm::Value* e) {
      return builder.CreateBitCast(builder.CreateShl(builder.CreateAdd(e, llvm::ConstantInt::get(int_type, 127)), 23), t);
    };
    llvm::Value* result = builder.CreateFMul(builder.CreateFMul(p, power_of_two(half)),
                                             power_of_two(builder.CreateSub(whole, half)));
    return builder.CreateSelect(builder.CreateFCmpUNO(x, x), x, result);
  }

  // float32 tanh inline (Cephes tanhf): an odd polynomial below 0.625, 1 − 2/(e^{2|x|} + 1) with
  // the sign restored above it.
  llvm::Value* fastTanh(llvm::Value* x) {
    llvm::Type* t = x->getType();
    auto c = [&](double v) { return floatConstant(t, v); };
    llvm::Value* ax = builder.CreateUnaryIntrinsic(llvm::Intrinsic::fabs, x);
    llvm::Value* s = builder.CreateFMul(x, x);
    llvm::Value* p = c(-5.70498872745E-3);
    for (double coefficient : {2.06390887954E-2, -5.37397155531E-2, 1.33314422036E-1, -3.33332819422E-1}) {
      p = multiplyAdd(p, s, c(coefficient));
    }
    // x + x·s·p rounds -0.0 to +0.0: tanh keeps the sign of its argument, zeros included.
    llvm::Value* small = builder.CreateBinaryIntrinsic(llvm::Intrinsic::copysign,
                                                       multiplyAdd(builder.CreateFMul(p, s), x, x), x);
    llvm::Value* e = fastExp(builder.CreateFMul(builder.CreateMinNum(ax, c(20.0)), c(2.0)));
    llvm::Value* large = builder.CreateFSub(c(1.0), builder.CreateFDiv(c(2.0), builder.CreateFAdd(e, c(1.0))));
    large = builder.CreateBinaryIntrinsic(llvm::Intrinsic::copysign, large, x);
    llvm::Value* result = builder.CreateSelect(builder.CreateFCmpOLT(ax, c(0.625)), small, large);
    return builder.CreateSelect(builder.CreateFCmpUNO(x, x), x, result);
  }

  // float32 erf: for |x| ≥ 1 Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula ATen's
  // vectorized CPU erf uses, several times faster than SLEEF's erf; below 1 a polynomial.
  llvm::Value* fastErf(llvm::Value* x) {
    llvm::Type* t = x->getType();
    auto c = [&](double v) { return floatConstant(t, v); };
    llvm::Value* one = c(1.0);
    llvm::Value* ax = builder.CreateUnaryIntrinsic(llvm::Intrinsic::fabs, x);
    llvm::Value* k = builder.CreateFDiv(one, builder.CreateFAdd(builder.CreateFMul(c(0.3275911), ax), one));
    llvm::Value* r = builder.CreateFAdd(builder.CreateFMul(c(1.061405429), k), c(-1.453152027));
    r = builder.CreateFAdd(builder.CreateFMul(r, k), c(1.421413741));
    r = builder.CreateFAdd(builder.CreateFMul(r, k), c(-0.284496736));
    r = builder.CreateFAdd(builder.CreateFMul(r, k), c(0.254829592));
    llvm::Value* e = fastExp(builder.CreateFNeg(builder.CreateFMul(x, x)));
    llvm::Value* magnitude = builder.CreateFSub(one, builder.CreateFMul(builder.CreateFMul(e, k), r));
    llvm::Value* large = builder.CreateBinaryIntrinsic(llvm::Intrinsic::copysign, magnitude, x);
    // Below 1 the formula's 1 − (…) cancels (8 ULP of 1 lost near 0.05); there the Cephes erff
    // odd polynomial x·P(x²) keeps the relative error small.
    llvm::Value* z = builder.CreateFMul(x, x);
    llvm::Value* p = c(7.853861353153693E-5);
    for (double coefficient : {-8.010193625184903E-4, 5.188327685732524E-3, -2.685381193529856E-2,
                               1.128358514861418E-1, -3.761262582423300E-1, 1.128379165726710E0}) {
      p = multiplyAdd(p, z, c(coefficient));
    }
    llvm::Value* small = builder.CreateFMul(x, p);
    return builder.CreateSelect(builder.CreateFCmpOLT(ax, one), small, large);
  }

  llvm::Value* unary(Op op, DType type, llvm::Value* x, int lanes) {
    if (op == Op::kNot) return builder.CreateNot(x);
    if (op == Op::kIsNan) {
      return ir::isFloating(type) ? builder.CreateFCmpUNO(x, x)
                                  : llvm::Constant::getNullValue(valueType(DType::kBool, lanes));
    }
    llvm::Type* t = x->getType();
    if (!ir::isFloating(type)) {
      switch (op) {
        case Op::kNeg: return builder.CreateNeg(x);
        case Op::kAbs:
          return builder.CreateSelect(builder.CreateICmpSLT(x, llvm::Constant::getNullValue(t)), builder.CreateNeg(x), x);
        case Op::kFloor: case Op::kCeil: case Op::kRound: case Op::kTrunc: return x;
        default: throw std::runtime_error(std::string("kiln cpu: ") + ir::opName(op) + " on integers");
      }
    }
    llvm::Value* one = floatConstant(t, 1.0);
    switch (op) {
      case Op::kNeg: return builder.CreateFNeg(x);
      case Op::kAbs: return builder.CreateUnaryIntrinsic(llvm::Intrinsic::fabs, x);
      case Op::kReciprocal: return builder.CreateFDiv(one, x);
      case Op::kSqrt: return builder.CreateUnaryIntrinsic(llvm::Intrinsic::sqrt, x);
      case Op::kRsqrt: return builder.CreateFDiv(one, builder.CreateUnaryIntrinsic(llvm::Intrinsic::sqrt, x));
      case Op::kFloor: return builder.CreateUnaryIntrinsic(llvm::Intrinsic::floor, x);
      case Op::kCeil: return builder.CreateUnaryIntrinsic(llvm::Intrinsic::ceil, x);
      case Op::kTrunc: return builder.CreateUnaryIntrinsic(llvm::Intrinsic::trunc, x);
      case Op::kRound: return builder.CreateUnaryIntrinsic(llvm::Intrinsic::roundeven, x);
      case Op::kErf:
        if (type == DType::kFloat32) return fastErf(x);
        return callMath(op, type, lanes, {x});
      case Op::kExp:
        if (type == DType::kFloat32) return fastExp(x);
        return callMath(op, type, lanes, {x});
      case Op::kTanh:
        if (type == DType::kFloat32) return fastTanh(x);
        return callMath(op, type, lanes, {x});
      case Op::kSigmoid: {
        llvm::Value* e = type == DType::kFloat32 ? fastExp(builder.CreateFNeg(x))
                                                 : callMath(Op::kExp, type, lanes, {builder.CreateFNeg(x)});
        return builder.CreateFDiv(one, builder.CreateFAdd(one, e));
      }
      default: return callMath(op, type, lanes, {x});
    }
  }

  llvm::Value* binary(Op op, DType operand_type, llvm::Value* a, llvm::Value* b, int lanes) {
    const bool floating = ir::isFloating(operand_type);
    const bool boolean = operand_type == DType::kBool;
    switch (op) {
      case Op::kAnd: return builder.CreateAnd(a, b);
      case Op::kOr: return builder.CreateOr(a, b);
      case Op::kLt: return floating ? builder.CreateFCmpOLT(a, b) : boolean ? builder.CreateICmpULT(a, b) : builder.CreateICmpSLT(a, b);
      case Op::kLe: return floating ? builder.CreateFCmpOLE(a, b) : boolean ? builder.CreateICmpULE(a, b) : builder.CreateICmpSLE(a, b);
      case Op::kGt: return floating ? builder.CreateFCmpOGT(a, b) : boolean ? builder.CreateICmpUGT(a, b) : builder.CreateICmpSGT(a, b);
      case Op::kGe: return floating ? builder.CreateFCmpOGE(a, b) : boolean ? builder.CreateICmpUGE(a, b) : builder.CreateICmpSGE(a, b);
      case Op::kEq: return floating ? builder.CreateFCmpOEQ(a, b) : builder.CreateICmpEQ(a, b);
      case Op::kNe: return floating ? builder.CreateFCmpUNE(a, b) : builder.CreateICmpNE(a, b);
      default: break;
    }
    if (boolean) {
      switch (op) {
        case Op::kAdd: case Op::kMax: return builder.CreateOr(a, b);
        case Op::kMul: case Op::kMin: return builder.CreateAnd(a, b);
        default: throw std::runtime_error(std::string("kiln cpu: ") + ir::opName(op) + " on bool");
      }
    }
    if (floating) {
      switch (op) {
        case Op::kAdd: return builder.CreateFAdd(a, b);
        case Op::kSub: return builder.CreateFSub(a, b);
        case Op::kMul: return builder.CreateFMul(a, b);
        case Op::kDiv: return builder.CreateFDiv(a, b);
        case Op::kMax: return nanPropagating(true, a, b);
        case Op::kMin: return nanPropagating(false, a, b);
        case Op::kPow: case Op::kFmod: return callMath(op, operand_type, lanes, {a, b});
        default: break;
      }
    } else {
      switch (op) {
        case Op::kAdd: return builder.CreateAdd(a, b);
        case Op::kSub: return builder.CreateSub(a, b);
        case Op::kMul: return builder.CreateMul(a, b);
        case Op::kMax: return builder.CreateSelect(builder.CreateICmpSGT(a, b), a, b);
        case Op::kMin: return builder.CreateSelect(builder.CreateICmpSLT(a, b), a, b);
        default: break;
      }
    }
    throw std::runtime_error(std::string("kiln cpu: ") + ir::opName(op) + " on " + ir::dtypeName(operand_type));
  }

  // Emits the body for `lanes` elements at each of the operand pointer sets in `copies`, op by op
  // across the copies: independent dependency chains side by side, so the core overlaps their
  // latencies (a long chain of math on one vector otherwise waits on itself).
  void emitElements(const std::vector<std::vector<llvm::Value*>>& copies, const std::vector<llvm::Value*>& scalars,
                    int lanes) {
    std::vector<std::vector<llvm::Value*>> values(copies.size(), std::vector<llvm::Value*>(kernel.body.size(), nullptr));
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      const Instr& instr = kernel.body[k];
      auto operandType = [&](size_t j) { return kernel.body[static_cast<size_t>(instr.operands[j])].type; };
      for (size_t copy = 0; copy < copies.size(); ++copy) {
        const std::vector<llvm::Value*>& pointers = copies[copy];
        auto operand = [&](size_t j) { return values[copy][static_cast<size_t>(instr.operands[j])]; };
        llvm::Value*& value = values[copy][k];
        switch (instr.op) {
          case Op::kLoad: {
            auto p = static_cast<size_t>(instr.param);
            value = load(instr.type, pointers[p], lanes, layout.operands[p] == Access::kBroadcast);
            break;
          }
          case Op::kScalar: value = splat(scalars[static_cast<size_t>(instr.param)], lanes); break;
          case Op::kConstant: {
            llvm::Type* t = scalarType(instr.type);
            llvm::Value* c = ir::isFloating(instr.type)
                                 ? floatConstant(t, instr.float_value)
                                 : llvm::ConstantInt::get(t, static_cast<uint64_t>(instr.int_value), true);
            value = splat(c, lanes);
            break;
          }
          case Op::kCast: value = cast(operand(0), operandType(0), instr.type, lanes); break;
          case Op::kSelect: value = builder.CreateSelect(operand(0), operand(1), operand(2)); break;
          default:
            value = ir::opArity(instr.op) == 1 ? unary(instr.op, operandType(0), operand(0), lanes)
                                               : binary(instr.op, operandType(0), operand(0), operand(1), lanes);
        }
      }
    }
    const size_t inputs = kernel.tensor_inputs.size();
    for (size_t copy = 0; copy < copies.size(); ++copy) {
      for (size_t o = 0; o < kernel.outputs.size(); ++o) {
        store(kernel.outputType(o), values[copy][static_cast<size_t>(kernel.outputs[o])], copies[copy][inputs + o]);
      }
    }
  }

  // for (i = start; i < end; i += step) body(i), with `end - start` a multiple of step.
  template <typename Body>
  void countedLoop(llvm::Value* start, llvm::Value* end, int64_t step, const char* name, Body body) {
    llvm::Function* function = builder.GetInsertBlock()->getParent();
    llvm::BasicBlock* preheader = builder.GetInsertBlock();
    llvm::BasicBlock* header = llvm::BasicBlock::Create(context, std::string(name) + ".header", function);
    llvm::BasicBlock* loop = llvm::BasicBlock::Create(context, std::string(name) + ".body", function);
    llvm::BasicBlock* exit = llvm::BasicBlock::Create(context, std::string(name) + ".exit", function);
    builder.CreateBr(header);
    builder.SetInsertPoint(header);
    llvm::PHINode* index = builder.CreatePHI(builder.getInt64Ty(), 2, name);
    index->addIncoming(start, preheader);
    builder.CreateCondBr(builder.CreateICmpSLT(index, end), loop, exit);
    builder.SetInsertPoint(loop);
    body(index);
    llvm::Value* next = builder.CreateAdd(index, builder.getInt64(static_cast<uint64_t>(step)), "", true, true);
    index->addIncoming(next, builder.GetInsertBlock());
    builder.CreateBr(header);
    builder.SetInsertPoint(exit);
  }

  // Vectors processed side by side in the main loop (see emitElements).
  static constexpr int kInterleave = 4;

  int vectorLanes() const {
    bool vectorizable = true;
    for (Access c : layout.operands) vectorizable &= c != Access::kStrided;
    if (!vectorizable) return 1;
    int widest = 4;
    for (const Instr& instr : kernel.body) {
      // Constants and scalar arguments are splats: only per-element values set the width.
      if (instr.op == Op::kConstant || instr.op == Op::kScalar) continue;
      if (instr.type == DType::kFloat64 || instr.type == DType::kInt64) widest = 8;
    }
    return std::max(2, vector_bits / (8 * widest));
  }

  llvm::Function* emit(const std::string& symbol) {
    llvm::Type* i64 = builder.getInt64Ty();
    llvm::Type* ptr = builder.getPtrTy();
    auto* type = llvm::FunctionType::get(builder.getVoidTy(), {ptr, ptr, i64, i64, ptr, ptr}, false);
    llvm::Function* function = llvm::Function::Create(type, llvm::Function::ExternalLinkage, symbol, module);
    function->addFnAttr(llvm::Attribute::NoUnwind);
    for (unsigned a : {0u, 1u, 4u, 5u}) function->addParamAttr(a, llvm::Attribute::NoAlias);
    auto args = function->arg_begin();
    llvm::Value* data = &*args++;
    llvm::Value* strides = &*args++;
    llvm::Value* inner_size = &*args++;
    llvm::Value* outer_size = &*args++;
    llvm::Value* float_args = &*args++;
    llvm::Value* int_args = &*args++;
    builder.SetInsertPoint(llvm::BasicBlock::Create(context, "entry", function));

    const size_t operands = layout.operands.size();
    std::vector<llvm::Value*> bases, inner_strides, outer_strides;
    for (size_t k = 0; k < operands; ++k) {
      bases.push_back(builder.CreateLoad(ptr, builder.CreateConstGEP1_64(ptr, data, k), "base" + std::to_string(k)));
      inner_strides.push_back(builder.CreateLoad(i64, builder.CreateConstGEP1_64(i64, strides, k)));
      outer_strides.push_back(builder.CreateLoad(i64, builder.CreateConstGEP1_64(i64, strides, operands + k)));
    }
    std::vector<llvm::Value*> scalars;
    for (size_t j = 0; j < kernel.scalar_inputs.size(); ++j) {
      DType t = kernel.scalar_inputs[j];
      if (ir::isFloating(t)) {
        scalars.push_back(cast(builder.CreateLoad(builder.getDoubleTy(), builder.CreateConstGEP1_64(builder.getDoubleTy(), float_args, j)),
                               DType::kFloat64, t, 1));
      } else {
        llvm::Value* v = builder.CreateLoad(i64, builder.CreateConstGEP1_64(i64, int_args, j));
        scalars.push_back(cast(v, DType::kInt64, t, 1));
      }
    }
    const int lanes = vectorLanes();
    countedLoop(builder.getInt64(0), outer_size, 1, "outer", [&](llvm::Value* row) {
      std::vector<llvm::Value*> rows;
      for (size_t k = 0; k < operands; ++k) {
        rows.push_back(builder.CreateGEP(builder.getInt8Ty(), bases[k], builder.CreateMul(row, outer_strides[k])));
      }
      auto pointersAt = [&](llvm::Value* i) {
        std::vector<llvm::Value*> pointers;
        for (size_t k = 0; k < operands; ++k) {
          const Access access = innerAccess(layout.operands[k]);
          if (access == Access::kBroadcast) {
            pointers.push_back(rows[k]);
            continue;
          }
          llvm::Value* offset = builder.CreateMul(i, inner_strides[k]);
          if (access == Access::kContiguous) {
            const int64_t size = ir::dtypeSize(kernel.operandType(k));
            offset = builder.CreateMul(i, builder.getInt64(static_cast<uint64_t>(size)));
          }
          pointers.push_back(builder.CreateGEP(builder.getInt8Ty(), rows[k], offset));
        }
        return pointers;
      };
      llvm::Value* vector_end = builder.getInt64(0);
      if (lanes > 1) {
        // Blocks of kInterleave vectors, then single vectors, then single elements.
        const int block = lanes * kInterleave;
        llvm::Value* block_end = builder.CreateAnd(inner_size, builder.getInt64(~static_cast<uint64_t>(block - 1)));
        countedLoop(builder.getInt64(0), block_end, block, "block", [&](llvm::Value* i) {
          std::vector<std::vector<llvm::Value*>> copies;
          for (int copy = 0; copy < kInterleave; ++copy) {
            copies.push_back(pointersAt(builder.CreateAdd(i, builder.getInt64(static_cast<uint64_t>(copy * lanes)))));
          }
          emitElements(copies, scalars, lanes);
        });
        vector_end = builder.CreateAnd(inner_size, builder.getInt64(~static_cast<uint64_t>(lanes - 1)));
        countedLoop(block_end, vector_end, lanes, "vector", [&](llvm::Value* i) {
          emitElements({pointersAt(i)}, scalars, lanes);
        });
      }
      countedLoop(vector_end, inner_size, 1, "scalar", [&](llvm::Value* i) {
        emitElements({pointersAt(i)}, scalars, 1);
      });
    });
    builder.CreateRetVoid();
    return function;
  }
};

std::string describeFeatures() {
  llvm::StringMap<bool> features;
  llvm::sys::getHostCPUFeatures(features);
  std::string joined;
  for (const auto& entry : features) {
    if (!joined.empty()) joined += ",";
    joined += (entry.getValue() ? "+" : "-") + entry.getKey().str();
  }
  return joined;
}

}  // namespace

void initializeLlvm() {
  static std::once_flag once;
  std::call_once(once, [] {
    llvm::InitializeNativeTarget();
    llvm::InitializeNativeTargetAsmPrinter();
    llvm::InitializeNativeTargetAsmParser();
  });
}

const CpuTarget& CpuTarget::host() {
  // Never destroyed: a background compile may still read it while the process exits.
  static const CpuTarget& target = *[] {
    auto* t = new CpuTarget();
    llvm::StringMap<bool> features;
    llvm::sys::getHostCPUFeatures(features);
    auto has = [&](const char* name) { return features.count(name) && features[name]; };
    t->vector_bits = has("avx512f") ? 512 : has("avx2") ? 256 : 128;
    t->cpu = llvm::sys::getHostCPUName().str();
    t->features = describeFeatures();
    t->triple = llvm::sys::getProcessTriple();
    return t;
  }();
  return target;
}

EmittedModule emitCpuModule(const ir::Kernel& kernel, const CpuLayout& layout) {
  failIfInjected(FaultStage::kCompile);
  std::string problems = ir::verify(kernel);
  if (!problems.empty()) throw std::runtime_error("kiln cpu: invalid kernel IR: " + problems);
  if (layout.operands.size() != kernel.tensor_inputs.size() + kernel.outputs.size()) {
    throw std::runtime_error("kiln cpu: layout does not match the kernel's operands");
  }
  for (Access access : layout.operands) {
    if (innerAccess(access) != access) throw std::runtime_error("kiln cpu: layout holds a non-inner access");
  }
  initializeLlvm();
  const CpuTarget& target = CpuTarget::host();
  EmittedModule emitted;
  emitted.context = std::make_unique<llvm::LLVMContext>();
  emitted.module = std::make_unique<llvm::Module>(kernel.name, *emitted.context);
  emitted.symbol = "kiln_" + kernel.name;
  Emitter emitter(*emitted.context, *emitted.module, kernel, layout, target.vector_bits);
  emitter.emit(emitted.symbol);
  std::string verify_errors;
  llvm::raw_string_ostream verify_stream(verify_errors);
  if (llvm::verifyModule(*emitted.module, &verify_stream)) {
    throw std::runtime_error("kiln cpu: emitted invalid LLVM IR: " + verify_stream.str());
  }
  auto builder = llvm::orc::JITTargetMachineBuilder::detectHost();
  if (!builder) throw std::runtime_error("kiln cpu: cannot target the host: " + llvm::toString(builder.takeError()));
  builder->setCodeGenOptLevel(llvm::CodeGenOpt::Aggressive);
  auto machine = builder->createTargetMachine();
  if (!machine) throw std::runtime_error("kiln cpu: " + llvm::toString(machine.takeError()));
  emitted.machine = std::move(*machine);
  emitted.module->setDataLayout(emitted.machine->createDataLayout());
  emitted.module->setTargetTriple(emitted.machine->getTargetTriple().str());
  for (llvm::Function& function : *emitted.module) {
    if (function.isDeclaration()) continue;
    function.addFnAttr("target-cpu", target.cpu);
    function.addFnAttr("target-features", target.features);
    function.addFnAttr("prefer-vector-width", std::to_string(target.vector_bits));
    function.addFnAttr("min-legal-vector-width", std::to_string(target.vector_bits));
  }
  return emitted;
}

}  // namespace kiln
