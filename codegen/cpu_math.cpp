// Inline float32 math for the CPU backend (see cpu_math.h).
#include "codegen/cpu_math.h"

namespace kiln {

// Names of the SLEEF functions for each math op. The 3.5-ULP variants are used where SLEEF has
// one: several times faster than the 1-ULP ones (tanh: 0.65 vs 2.3 ns per float on AVX-512) and
// far inside float32 comparison tolerances.
const char* sleefBase(ir::Op op, const char** ulp) {
  *ulp = "_u10";
  switch (op) {
    case ir::Op::kExp: return "exp";
    case ir::Op::kExp2: return "exp2";
    case ir::Op::kExpm1: return "expm1";
    case ir::Op::kLog: *ulp = "_u35"; return "log";
    case ir::Op::kLog2: *ulp = "_u35"; return "log2";
    case ir::Op::kLog10: return "log10";
    case ir::Op::kLog1p: return "log1p";
    case ir::Op::kSin: *ulp = "_u35"; return "sin";
    case ir::Op::kCos: *ulp = "_u35"; return "cos";
    case ir::Op::kTan: *ulp = "_u35"; return "tan";
    case ir::Op::kTanh: *ulp = "_u35"; return "tanh";
    case ir::Op::kErf: return "erf";
    case ir::Op::kErfc: *ulp = "_u15"; return "erfc";
    case ir::Op::kPow: return "pow";
    case ir::Op::kFmod: *ulp = ""; return "fmod";
    default: return nullptr;
  }
}

bool isTranscendental(ir::Op op) {
  const char* ulp = nullptr;
  return sleefBase(op, &ulp) != nullptr || op == ir::Op::kSigmoid;
}

llvm::Value* multiplyAdd(llvm::IRBuilder<>& builder, llvm::Value* a, llvm::Value* b, llvm::Value* c) {
  return builder.CreateIntrinsic(llvm::Intrinsic::fmuladd, {a->getType()}, {a, b, c});
}

// float32 exp inline: 2^n · p(r), r = x − n·ln2 in two parts, Cephes expf's degree-6
// polynomial (under 2 ULP). 2^n is applied as two factors 2^(n/2), so overflow to Inf and
// gradual underflow to denormals come out of the multiplies, as in eager. Inline, a chain of
// math ops stays in registers: a call into SLEEF makes the whole vector register file
// caller-saved, and those spills cost more than the math itself.
llvm::Value* inlineExp(llvm::IRBuilder<>& builder, llvm::Value* x) {
  llvm::Type* t = x->getType();
  auto c = [&](double v) { return llvm::ConstantFP::get(t, v); };
  llvm::Type* int_type = builder.getInt32Ty();
  if (auto* vector = llvm::dyn_cast<llvm::VectorType>(t)) int_type = llvm::VectorType::get(int_type, vector->getElementCount());
  llvm::Value* clamped = builder.CreateMinNum(builder.CreateMaxNum(x, c(-104.0)), c(89.0));
  llvm::Value* n = builder.CreateUnaryIntrinsic(llvm::Intrinsic::roundeven,
                                                builder.CreateFMul(clamped, c(1.44269504088896341)));
  llvm::Value* r = multiplyAdd(builder, n, c(-0.693359375), clamped);
  r = multiplyAdd(builder, n, c(2.12194440e-4), r);
  llvm::Value* p = c(1.9875691500E-4);
  for (double coefficient : {1.3981999507E-3, 8.3334519073E-3, 4.1665795894E-2, 1.6666665459E-1, 5.0000001201E-1}) {
    p = multiplyAdd(builder, p, r, c(coefficient));
  }
  p = builder.CreateFAdd(multiplyAdd(builder, p, builder.CreateFMul(r, r), r), c(1.0));
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
llvm::Value* inlineTanh(llvm::IRBuilder<>& builder, llvm::Value* x) {
  llvm::Type* t = x->getType();
  auto c = [&](double v) { return llvm::ConstantFP::get(t, v); };
  llvm::Value* ax = builder.CreateUnaryIntrinsic(llvm::Intrinsic::fabs, x);
  llvm::Value* s = builder.CreateFMul(x, x);
  llvm::Value* p = c(-5.70498872745E-3);
  for (double coefficient : {2.06390887954E-2, -5.37397155531E-2, 1.33314422036E-1, -3.33332819422E-1}) {
    p = multiplyAdd(builder, p, s, c(coefficient));
  }
  // x + x·s·p rounds -0.0 to +0.0: tanh keeps the sign of its argument, zeros included.
  llvm::Value* small = builder.CreateBinaryIntrinsic(llvm::Intrinsic::copysign,
                                                     multiplyAdd(builder, builder.CreateFMul(p, s), x, x), x);
  llvm::Value* e = inlineExp(builder, builder.CreateFMul(builder.CreateMinNum(ax, c(20.0)), c(2.0)));
  llvm::Value* large = builder.CreateFSub(c(1.0), builder.CreateFDiv(c(2.0), builder.CreateFAdd(e, c(1.0))));
  large = builder.CreateBinaryIntrinsic(llvm::Intrinsic::copysign, large, x);
  llvm::Value* result = builder.CreateSelect(builder.CreateFCmpOLT(ax, c(0.625)), small, large);
  return builder.CreateSelect(builder.CreateFCmpUNO(x, x), x, result);
}

// float32 erf: for |x| ≥ 1 Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), the formula ATen's
// vectorized CPU erf uses, several times faster than SLEEF's erf; below 1 a polynomial.
llvm::Value* inlineErf(llvm::IRBuilder<>& builder, llvm::Value* x) {
  llvm::Type* t = x->getType();
  auto c = [&](double v) { return llvm::ConstantFP::get(t, v); };
  llvm::Value* one = c(1.0);
  llvm::Value* ax = builder.CreateUnaryIntrinsic(llvm::Intrinsic::fabs, x);
  llvm::Value* k = builder.CreateFDiv(one, builder.CreateFAdd(builder.CreateFMul(c(0.3275911), ax), one));
  llvm::Value* r = builder.CreateFAdd(builder.CreateFMul(c(1.061405429), k), c(-1.453152027));
  r = builder.CreateFAdd(builder.CreateFMul(r, k), c(1.421413741));
  r = builder.CreateFAdd(builder.CreateFMul(r, k), c(-0.284496736));
  r = builder.CreateFAdd(builder.CreateFMul(r, k), c(0.254829592));
  llvm::Value* e = inlineExp(builder, builder.CreateFNeg(builder.CreateFMul(x, x)));
  llvm::Value* magnitude = builder.CreateFSub(one, builder.CreateFMul(builder.CreateFMul(e, k), r));
  llvm::Value* large = builder.CreateBinaryIntrinsic(llvm::Intrinsic::copysign, magnitude, x);
  // Below 1 the formula's 1 − (…) cancels (8 ULP of 1 lost near 0.05); there the Cephes erff
  // odd polynomial x·P(x²) keeps the relative error small.
  llvm::Value* z = builder.CreateFMul(x, x);
  llvm::Value* p = c(7.853861353153693E-5);
  for (double coefficient : {-8.010193625184903E-4, 5.188327685732524E-3, -2.685381193529856E-2,
                             1.128358514861418E-1, -3.761262582423300E-1, 1.128379165726710E0}) {
    p = multiplyAdd(builder, p, z, c(coefficient));
  }
  llvm::Value* small = builder.CreateFMul(x, p);
  return builder.CreateSelect(builder.CreateFCmpOLT(ax, one), small, large);
}

}  // namespace kiln
