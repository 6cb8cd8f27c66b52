// Device helpers for kiln's generated CUDA kernels. This file is compiled by NVRTC as a prefix of
// every generated kernel (it is turned into a string at build time), so it includes nothing and
// depends on no toolkit header: half and bfloat16 are carried as their 16-bit patterns and
// converted with PTX instructions, rounding exactly as ATen's conversions do.
#pragma once

typedef unsigned short kiln_f16;   // IEEE half, as bits
typedef unsigned short kiln_bf16;  // bfloat16, as bits

__device__ __forceinline__ float kiln_f16_to_f32(kiln_f16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ double kiln_f16_to_f64(kiln_f16 h) { return (double)kiln_f16_to_f32(h); }
__device__ __forceinline__ kiln_f16 kiln_f32_to_f16(float f) {
  kiln_f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ kiln_f16 kiln_f64_to_f16(double d) {
  kiln_f16 h;
  asm("cvt.rn.f16.f64 %0, %1;" : "=h"(h) : "d"(d));
  return h;
}
__device__ __forceinline__ float kiln_bf16_to_f32(kiln_bf16 b) {
  return __uint_as_float(((unsigned)b) << 16);
}
// Round to nearest even; NaN becomes the canonical quiet NaN, as c10::BFloat16 does.
__device__ __forceinline__ kiln_bf16 kiln_f32_to_bf16(float f) {
  if (f != f) return (kiln_bf16)0x7fc0;
  unsigned bits = __float_as_uint(f);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return (kiln_bf16)(bits >> 16);
}

// max/min that propagate NaN from either side, as torch.maximum/minimum do.
__device__ __forceinline__ float kiln_max(float a, float b) { return (a != a) ? a : (b != b) ? b : (a > b ? a : b); }
__device__ __forceinline__ float kiln_min(float a, float b) { return (a != a) ? a : (b != b) ? b : (a < b ? a : b); }
__device__ __forceinline__ double kiln_max(double a, double b) { return (a != a) ? a : (b != b) ? b : (a > b ? a : b); }
__device__ __forceinline__ double kiln_min(double a, double b) { return (a != a) ? a : (b != b) ? b : (a < b ? a : b); }
__device__ __forceinline__ int kiln_max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int kiln_min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ long long kiln_max(long long a, long long b) { return a > b ? a : b; }
__device__ __forceinline__ long long kiln_min(long long a, long long b) { return a < b ? a : b; }

__device__ __forceinline__ float kiln_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double kiln_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float kiln_rsqrt(float x) { return 1.0f / sqrtf(x); }
__device__ __forceinline__ double kiln_rsqrt(double x) { return 1.0 / sqrt(x); }

// Integer arithmetic wraps (two's complement), as in eager; done in unsigned to stay defined.
__device__ __forceinline__ int kiln_wrap_add(int a, int b) { return (int)((unsigned)a + (unsigned)b); }
__device__ __forceinline__ int kiln_wrap_sub(int a, int b) { return (int)((unsigned)a - (unsigned)b); }
__device__ __forceinline__ int kiln_wrap_mul(int a, int b) { return (int)((unsigned)a * (unsigned)b); }
__device__ __forceinline__ long long kiln_wrap_add(long long a, long long b) {
  return (long long)((unsigned long long)a + (unsigned long long)b);
}
__device__ __forceinline__ long long kiln_wrap_sub(long long a, long long b) {
  return (long long)((unsigned long long)a - (unsigned long long)b);
}
__device__ __forceinline__ long long kiln_wrap_mul(long long a, long long b) {
  return (long long)((unsigned long long)a * (unsigned long long)b);
}

// N elements of T moved as one aligned access (16 bytes at most: one LDG.128 / STG.128).
template <typename T, int N>
struct __align__(sizeof(T) * N) kiln_vec {
  T v[N];
};
