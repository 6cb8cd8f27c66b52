// The CPU backend's emitter (see cpu_emitter.h); cpu_kernel.h has the kernel's calling convention.
#include "codegen/cpu_emitter.h"

#include <llvm/ExecutionEngine/Orc/JITTargetMachineBuilder.h>
#include <llvm/IR/IRBuilder.h>
#include <llvm/IR/Verifier.h>
#include <llvm/MC/TargetRegistry.h>
#include <llvm/Support/raw_ostream.h>

#include <cmath>
#include <stdexcept>

#include "codegen/cpu_math.h"
#include "codegen/fault_injection.h"

namespace kiln {
namespace {

using ir::DType;
using ir::Instr;
using ir::Op;

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
  llvm::BasicBlock* entry_block = nullptr;  // where accumulator slots are allocated
  llvm::Value* row_size = nullptr;          // the inner extent (rowsize)

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
    // Into half through float32, as eager converts (a double is rounded twice: c10::Half is made
    // from a float).
    if (to == DType::kFloat16 && from != DType::kFloat32) {
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
  llvm::Value* multiplyAdd(llvm::Value* a, llvm::Value* b, llvm::Value* c) { return kiln::multiplyAdd(builder, a, b, c); }

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
        if (type == DType::kFloat32) return inlineErf(builder, x);
        return callMath(op, type, lanes, {x});
      case Op::kExp:
        if (type == DType::kFloat32) return inlineExp(builder, x);
        return callMath(op, type, lanes, {x});
      case Op::kTanh:
        if (type == DType::kFloat32) return inlineTanh(builder, x);
        return callMath(op, type, lanes, {x});
      case Op::kSigmoid: {
        llvm::Value* e = type == DType::kFloat32 ? inlineExp(builder, builder.CreateFNeg(x))
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

  // The body's values for `lanes` elements at each of the operand pointer sets in `copies`, op by
  // op across the copies: independent dependency chains side by side, so the core overlaps their
  // latencies (a long chain of math on one vector otherwise waits on itself). Only the `wanted`
  // values are computed; a value in `known` (a reduction kernel's per-row value, already
  // computed for the row) is splat.
  using Values = std::vector<std::vector<llvm::Value*>>;
  Values evaluate(const Values& copies, const std::vector<llvm::Value*>& scalars, int lanes,
                  const std::vector<bool>& wanted, const std::vector<llvm::Value*>& known,
                  const std::vector<int>& reload = {}) {
    Values values(copies.size(), std::vector<llvm::Value*>(kernel.body.size(), nullptr));
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      if (!wanted[k]) continue;
      const Instr& instr = kernel.body[k];
      auto operandType = [&](size_t j) { return kernel.body[static_cast<size_t>(instr.operands[j])].type; };
      for (size_t copy = 0; copy < copies.size(); ++copy) {
        const std::vector<llvm::Value*>& pointers = copies[copy];
        auto operand = [&](size_t j) { return values[copy][static_cast<size_t>(instr.operands[j])]; };
        llvm::Value*& value = values[copy][k];
        if (known[k]) {
          value = splat(known[k], lanes);
          continue;
        }
        if (k < reload.size() && reload[k] >= 0) {  // kept by an earlier read of the row
          value = load(instr.type, pointers[static_cast<size_t>(reload[k])], lanes, false);
          continue;
        }
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
          case Op::kRowSize: value = splat(cast(row_size, DType::kInt64, instr.type, 1), lanes); break;
          case Op::kCast: value = cast(operand(0), operandType(0), instr.type, lanes); break;
          case Op::kSelect: value = builder.CreateSelect(operand(0), operand(1), operand(2)); break;
          case Op::kFma:
            value = builder.CreateIntrinsic(llvm::Intrinsic::fma, {operand(0)->getType()}, {operand(0), operand(1), operand(2)});
            break;
          case Op::kReduceSum: case Op::kReduceMax: case Op::kReduceMin: case Op::kReduceVar:
            throw std::logic_error("kiln cpu: a reduction's result is needed before its row is read");
          default:
            value = ir::opArity(instr.op) == 1 ? unary(instr.op, operandType(0), operand(0), lanes)
                                               : binary(instr.op, operandType(0), operand(0), operand(1), lanes);
        }
      }
    }
    return values;
  }

  // The values that depend only on operands broadcast along the row, scalars and constants.
  std::vector<bool> rowInvariant() const {
    std::vector<bool> invariant(kernel.body.size(), false);
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      const Instr& instr = kernel.body[k];
      switch (instr.op) {
        case Op::kLoad: invariant[k] = layout.operands[static_cast<size_t>(instr.param)] == Access::kBroadcast; break;
        case Op::kScalar: case Op::kConstant: case Op::kRowSize: invariant[k] = true; break;
        default:
          if (ir::isReduction(instr.op)) break;
          invariant[k] = true;
          for (int operand : instr.operands) invariant[k] = invariant[k] && invariant[static_cast<size_t>(operand)];
      }
    }
    return invariant;
  }

  // Of those, the computed values (not loads, scalars or constants, which cost nothing to splat)
  // that a value computed per element reads or an output stores: computed once per row.
  std::vector<int> hoistedValues(const std::vector<bool>& invariant) const {
    auto leaf = [&](size_t k) {
      const Op op = kernel.body[k].op;
      return op == Op::kLoad || op == Op::kScalar || op == Op::kConstant || op == Op::kRowSize;
    };
    std::vector<bool> read_per_element(kernel.body.size(), false);
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      if (invariant[k]) continue;
      for (int operand : kernel.body[k].operands) read_per_element[static_cast<size_t>(operand)] = true;
    }
    for (int output : kernel.outputs) read_per_element[static_cast<size_t>(output)] = true;
    std::vector<int> hoisted;
    for (size_t k = 0; k < kernel.body.size(); ++k) {
      if (invariant[k] && !leaf(k) && read_per_element[k]) hoisted.push_back(static_cast<int>(k));
    }
    return hoisted;
  }

  std::vector<bool> needed(const std::vector<int>& roots, const std::vector<bool>& stop) const {
    return ir::dependencies(kernel, roots, stop);
  }
  std::vector<bool> needed(const std::vector<int>& roots, const std::vector<llvm::Value*>& known) const {
    std::vector<bool> stop(known.size());
    for (size_t k = 0; k < known.size(); ++k) stop[k] = known[k] != nullptr;
    return needed(roots, stop);
  }


  // Stores the outputs stored at every element (all of them, in a kernel without reductions).
  void storeElementOutputs(const Values& values, const Values& copies) {
    const size_t inputs = kernel.tensor_inputs.size();
    for (size_t copy = 0; copy < copies.size(); ++copy) {
      for (size_t o = 0; o < kernel.outputs.size(); ++o) {
        if (kernel.isRowOutput(o)) continue;
        store(kernel.outputType(o), values[copy][static_cast<size_t>(kernel.outputs[o])], copies[copy][inputs + o]);
      }
    }
  }

  // ---- row reductions: accumulators live in stack slots (promoted to registers by mem2reg) ----

  // One reduction's partial results over a row: kInterleave vector slots for the main loops and
  // one scalar slot for the tail. For reduce_var each slot holds Welford's (count, mean, m2).
  struct Accumulator {
    int value = 0;  // the reduction's body index
    std::vector<llvm::AllocaInst*> vectors, means, counts;  // per interleaved copy
    llvm::AllocaInst* scalar = nullptr;
    llvm::AllocaInst* scalar_mean = nullptr;
    llvm::AllocaInst* scalar_count = nullptr;
  };

  llvm::AllocaInst* slot(llvm::Type* type, const char* name) {
    llvm::IRBuilder<> at(entry_block, entry_block->begin());
    return at.CreateAlloca(type, nullptr, name);
  }

  llvm::Value* identity(Op op, llvm::Type* type) {
    switch (op) {
      case Op::kReduceMax: return floatConstant(type, -INFINITY);
      case Op::kReduceMin: return floatConstant(type, INFINITY);
      default: return llvm::Constant::getNullValue(type);
    }
  }

  Accumulator makeAccumulator(int value, int lanes) {
    const Instr& instr = kernel.body[static_cast<size_t>(value)];
    llvm::Type* scalar = scalarType(instr.type);
    llvm::Type* vector = valueType(instr.type, lanes);
    const bool welford = instr.op == Op::kReduceVar;
    Accumulator acc;
    acc.value = value;
    for (int copy = 0; lanes > 1 && copy < kInterleave; ++copy) {
      acc.vectors.push_back(slot(vector, "acc"));
      builder.CreateStore(identity(instr.op, vector), acc.vectors.back());
      if (!welford) continue;
      acc.means.push_back(slot(vector, "mean"));
      acc.counts.push_back(slot(scalar, "count"));
      builder.CreateStore(identity(instr.op, vector), acc.means.back());
      builder.CreateStore(identity(instr.op, scalar), acc.counts.back());
    }
    acc.scalar = slot(scalar, "acc");
    builder.CreateStore(identity(instr.op, scalar), acc.scalar);
    if (welford) {
      acc.scalar_mean = slot(scalar, "mean");
      acc.scalar_count = slot(scalar, "count");
      builder.CreateStore(identity(instr.op, scalar), acc.scalar_mean);
      builder.CreateStore(identity(instr.op, scalar), acc.scalar_count);
    }
    return acc;
  }

  // a ⊕ b for sum, max and min.
  llvm::Value* combine(Op op, llvm::Value* a, llvm::Value* b) {
    switch (op) {
      case Op::kReduceMax: return nanPropagating(true, a, b);
      case Op::kReduceMin: return nanPropagating(false, a, b);
      default: return builder.CreateFAdd(a, b);
    }
  }

  // Welford's update of (count, mean, m2) by x; count is a scalar shared by x's lanes.
  void welfordUpdate(llvm::AllocaInst* count_slot, llvm::AllocaInst* mean_slot, llvm::AllocaInst* m2_slot,
                     llvm::Value* x, int lanes) {
    llvm::Type* scalar = count_slot->getAllocatedType();
    llvm::Type* vector = mean_slot->getAllocatedType();
    llvm::Value* count = builder.CreateFAdd(builder.CreateLoad(scalar, count_slot), floatConstant(scalar, 1));
    builder.CreateStore(count, count_slot);
    llvm::Value* mean = builder.CreateLoad(vector, mean_slot);
    llvm::Value* delta = builder.CreateFSub(x, mean);
    llvm::Value* inverse = splat(builder.CreateFDiv(floatConstant(scalar, 1), count), lanes);
    mean = multiplyAdd(delta, inverse, mean);
    builder.CreateStore(mean, mean_slot);
    llvm::Value* m2 = builder.CreateLoad(vector, m2_slot);
    builder.CreateStore(multiplyAdd(delta, builder.CreateFSub(x, mean), m2), m2_slot);
  }

  // Chan et al.'s merge of two Welford states; counts are scalars (shared by the lanes).
  struct Moments {
    llvm::Value* count;
    llvm::Value* mean;
    llvm::Value* m2;
  };
  Moments welfordMerge(const Moments& a, const Moments& b, int lanes) {
    llvm::Value* count = builder.CreateFAdd(a.count, b.count);
    llvm::Value* empty = builder.CreateFCmpOEQ(count, llvm::Constant::getNullValue(count->getType()));
    llvm::Value* share = builder.CreateSelect(empty, llvm::Constant::getNullValue(count->getType()),
                                              builder.CreateFDiv(b.count, count));
    llvm::Value* delta = builder.CreateFSub(b.mean, a.mean);
    llvm::Value* mean = multiplyAdd(delta, splat(share, lanes), a.mean);
    llvm::Value* spread = builder.CreateFMul(builder.CreateFMul(delta, delta), splat(builder.CreateFMul(a.count, share), lanes));
    llvm::Value* m2 = builder.CreateFAdd(builder.CreateFAdd(a.m2, b.m2), spread);
    return {count, mean, m2};
  }

  // The lower or upper half of a vector's lanes (a scalar for the halves of two lanes).
  llvm::Value* half(llvm::Value* vector, int lanes, bool upper) {
    if (lanes == 2) return builder.CreateExtractElement(vector, uint64_t{upper ? 1u : 0u});
    llvm::SmallVector<int, 16> mask;
    for (int lane = 0; lane < lanes / 2; ++lane) mask.push_back(lane + (upper ? lanes / 2 : 0));
    return builder.CreateShuffleVector(vector, mask);
  }

  // Feeds one evaluated value per copy into the accumulator (lanes 1: the scalar slot).
  void accumulate(const Accumulator& acc, const Values& values, int lanes) {
    const Instr& instr = kernel.body[static_cast<size_t>(acc.value)];
    const auto operand = static_cast<size_t>(instr.operands[0]);
    for (size_t copy = 0; copy < values.size(); ++copy) {
      llvm::Value* x = values[copy][operand];
      llvm::AllocaInst* target = lanes == 1 ? acc.scalar : acc.vectors[copy];
      if (instr.op == Op::kReduceVar) {
        welfordUpdate(lanes == 1 ? acc.scalar_count : acc.counts[copy], lanes == 1 ? acc.scalar_mean : acc.means[copy],
                      target, x, lanes);
        continue;
      }
      builder.CreateStore(combine(instr.op, builder.CreateLoad(target->getAllocatedType(), target), x), target);
    }
  }

  // The row's result from the accumulator's slots.
  llvm::Value* finish(const Accumulator& acc, int lanes) {
    const Instr& instr = kernel.body[static_cast<size_t>(acc.value)];
    auto read = [&](llvm::AllocaInst* slot) { return builder.CreateLoad(slot->getAllocatedType(), slot); };
    if (instr.op == Op::kReduceVar) {
      Moments total{read(acc.scalar_count), read(acc.scalar_mean), read(acc.scalar)};
      if (lanes > 1) {
        Moments merged{read(acc.counts[0]), read(acc.means[0]), read(acc.vectors[0])};
        for (int copy = 1; copy < kInterleave; ++copy) {
          merged = welfordMerge(merged, {read(acc.counts[copy]), read(acc.means[copy]), read(acc.vectors[copy])}, lanes);
        }
        // Every lane holds as many elements: halve until one lane is left.
        for (int width = lanes; width > 1; width /= 2) {
          Moments low{merged.count, half(merged.mean, width, false), half(merged.m2, width, false)};
          Moments high{merged.count, half(merged.mean, width, true), half(merged.m2, width, true)};
          merged = welfordMerge(low, high, width / 2);
        }
        total = welfordMerge(merged, total, 1);
      }
      return builder.CreateFDiv(total.m2, total.count);
    }
    llvm::Value* result = read(acc.scalar);
    if (lanes == 1) return result;
    llvm::Value* vector = read(acc.vectors[0]);
    for (int copy = 1; copy < kInterleave; ++copy) vector = combine(instr.op, vector, read(acc.vectors[copy]));
    for (int width = lanes; width > 1; width /= 2) {
      vector = combine(instr.op, half(vector, width, false), half(vector, width, true));
    }
    return combine(instr.op, vector, result);
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
    entry_block = llvm::BasicBlock::Create(context, "entry", function);
    builder.SetInsertPoint(entry_block);

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
    row_size = inner_size;
    const ir::RowSchedule schedule = ir::rowSchedule(kernel);
    const CpuStashPlan plan = planCpuStash(kernel);
    const size_t inputs = kernel.tensor_inputs.size();
    // Where each kept value lives, as an index into a read's pointer set: an output, or a
    // scratch row (after the operands).
    std::vector<int> kept_at(kernel.body.size(), -1);
    for (const CpuStash& kept : plan.values) {
      kept_at[static_cast<size_t>(kept.value)] = kept.output >= 0 ? static_cast<int>(inputs) + kept.output
                                                                  : static_cast<int>(operands) + kept.scratch;
    }
    const std::vector<bool> invariant = rowInvariant();
    std::vector<llvm::Value*> scratch_rows;
    for (size_t j = 0; j < plan.scratch_element_bytes.size(); ++j) {
      scratch_rows.push_back(builder.CreateLoad(ptr, builder.CreateConstGEP1_64(ptr, data, operands + j), "scratch" + std::to_string(j)));
    }
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
        for (size_t j = 0; j < scratch_rows.size(); ++j) {
          llvm::Value* offset = builder.CreateMul(i, builder.getInt64(static_cast<uint64_t>(plan.scratch_element_bytes[j])));
          pointers.push_back(builder.CreateGEP(builder.getInt8Ty(), scratch_rows[j], offset));
        }
        return pointers;
      };
      // What a read of stage `stage` (the last read: stages + 1) loads back instead of computing.
      auto keptBefore = [&](int stage) {
        std::vector<int> reload(kernel.body.size(), -1);
        for (const CpuStash& kept : plan.values) {
          const auto v = static_cast<size_t>(kept.value);
          if (kept.stage < stage && !invariant[v]) reload[v] = kept_at[v];
        }
        return reload;
      };
      auto stopAt = [&](const std::vector<llvm::Value*>& known, const std::vector<int>& reload) {
        std::vector<bool> stop(kernel.body.size());
        for (size_t k = 0; k < stop.size(); ++k) stop[k] = known[k] != nullptr || reload[k] >= 0;
        return stop;
      };
      // One read of the row: blocks of kInterleave vectors, then single vectors, then single
      // elements; `step` gets the pointer sets of each and their lane count.
      auto readRow = [&](const auto& step) {
        llvm::Value* vector_end = builder.getInt64(0);
        if (lanes > 1) {
          const int block = lanes * kInterleave;
          llvm::Value* block_end = builder.CreateAnd(inner_size, builder.getInt64(~static_cast<uint64_t>(block - 1)));
          countedLoop(builder.getInt64(0), block_end, block, "block", [&](llvm::Value* i) {
            Values copies;
            for (int copy = 0; copy < kInterleave; ++copy) {
              copies.push_back(pointersAt(builder.CreateAdd(i, builder.getInt64(static_cast<uint64_t>(copy * lanes)))));
            }
            step(copies, lanes);
          });
          vector_end = builder.CreateAnd(inner_size, builder.getInt64(~static_cast<uint64_t>(lanes - 1)));
          countedLoop(block_end, vector_end, lanes, "vector", [&](llvm::Value* i) { step(Values{pointersAt(i)}, lanes); });
        }
        countedLoop(vector_end, inner_size, 1, "scalar", [&](llvm::Value* i) { step(Values{pointersAt(i)}, 1); });
      };
      // Values the same along the whole row (computed from operands broadcast along it, scalars
      // and constants: a batch_norm's per-channel scale and shift over an NCHW tensor) are
      // computed once per row, not per element: the loads cannot be hoisted by LLVM (an output
      // may alias them), and with them the sqrt and divisions would run on every vector.
      // (A reduction kernel's row stash keeps none of them: they are computed, not reloaded.)
      std::vector<llvm::Value*> known(kernel.body.size(), nullptr);
      const std::vector<int> hoisted = hoistedValues(invariant);
      if (!hoisted.empty()) {
        const Values computed = evaluate(Values{rows}, scalars, 1, needed(hoisted, known), known);
        for (int k : hoisted) known[static_cast<size_t>(k)] = computed[0][static_cast<size_t>(k)];
      }
      // A reduction kernel reads the row once per stage, accumulating that stage's reductions,
      // and computes the per-row values that follow from them.
      for (int stage = 1; stage <= schedule.stages; ++stage) {
        std::vector<Accumulator> accumulators;
        std::vector<int> operands_read;
        for (size_t k = 0; k < kernel.body.size(); ++k) {
          if (!ir::isReduction(kernel.body[k].op) || schedule.stage[k] != stage) continue;
          accumulators.push_back(makeAccumulator(static_cast<int>(k), lanes));
          operands_read.push_back(kernel.body[k].operands[0]);
        }
        const std::vector<int> reload = keptBefore(stage);
        const std::vector<bool> wanted = needed(operands_read, stopAt(known, reload));
        readRow([&](const Values& copies, int width) {
          const Values values = evaluate(copies, scalars, width, wanted, known, reload);
          for (const Accumulator& acc : accumulators) accumulate(acc, values, width);
          for (const CpuStash& kept : plan.values) {
            const auto v = static_cast<size_t>(kept.value);
            if (kept.stage != stage || invariant[v]) continue;
            for (size_t copy = 0; copy < copies.size(); ++copy) {
              store(kernel.body[v].type, values[copy][v], copies[copy][static_cast<size_t>(kept_at[v])]);
            }
          }
        });
        for (const Accumulator& acc : accumulators) known[static_cast<size_t>(acc.value)] = finish(acc, lanes);
        std::vector<int> row_values;
        for (size_t k = 0; k < kernel.body.size(); ++k) {
          if (!schedule.per_element[k] && schedule.stage[k] == stage && !known[k]) row_values.push_back(static_cast<int>(k));
        }
        const Values computed = evaluate(Values{rows}, scalars, 1, needed(row_values, known), known);
        for (int k : row_values) known[static_cast<size_t>(k)] = computed[0][static_cast<size_t>(k)];
      }
      std::vector<int> row_outputs, element_outputs;
      for (size_t o = 0; o < kernel.outputs.size(); ++o) {
        (kernel.isRowOutput(o) ? row_outputs : element_outputs).push_back(kernel.outputs[o]);
      }
      if (!row_outputs.empty()) {
        const Values computed = evaluate(Values{rows}, scalars, 1, needed(row_outputs, known), known);
        for (size_t o = 0; o < kernel.outputs.size(); ++o) {
          if (kernel.isRowOutput(o)) store(kernel.outputType(o), computed[0][static_cast<size_t>(kernel.outputs[o])], rows[inputs + o]);
        }
      }
      if (element_outputs.empty()) return;
      const std::vector<int> reload = keptBefore(schedule.stages + 1);
      const std::vector<bool> wanted = needed(element_outputs, stopAt(known, reload));
      readRow([&](const Values& copies, int width) {
        storeElementOutputs(evaluate(copies, scalars, width, wanted, known, reload), copies);
      });
    });
    builder.CreateRetVoid();
    return function;
  }
};

}  // namespace

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
