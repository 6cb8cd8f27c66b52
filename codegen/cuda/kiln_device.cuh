// Device helpers for kiln's generated CUDA kernels. This file is compiled by NVRTC as a prefix of
// every generated kernel (it is turned into a string at build time), so it includes nothing and
// depends on no toolkit header: half and bfloat16 are carried as their 16-bit patterns and
// converted with PTX instructions, rounding exactly as ATen's conversions do. The CUDA emulator
// (codegen/cuda/kiln_emulator.h) compiles this file as host C++ with KILN_CUDA_EMULATION defined.
#pragma once

typedef unsigned short kiln_f16;   // IEEE half, as bits
typedef unsigned short kiln_bf16;  // bfloat16, as bits

#ifndef KILN_CUDA_EMULATION
__device__ __forceinline__ float kiln_f16_to_f32(kiln_f16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ kiln_f16 kiln_f32_to_f16(float f) {
  kiln_f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
#else  // on the host, in the CUDA emulator (codegen/cuda/kiln_emulator.h): the same roundings
__device__ __forceinline__ float kiln_f16_to_f32(kiln_f16 h) { return kiln_emu_from_half(h); }
__device__ __forceinline__ kiln_f16 kiln_f32_to_f16(float f) { return kiln_emu_to_half(f); }
#endif
__device__ __forceinline__ double kiln_f16_to_f64(kiln_f16 h) { return (double)kiln_f16_to_f32(h); }
// Through float, as eager converts (c10::Half is made from a float): a double is rounded twice.
__device__ __forceinline__ kiln_f16 kiln_f64_to_f16(double d) { return kiln_f32_to_f16((float)d); }
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

// ---- row reductions (the kRows schedule): a block per row, blockDim.x a multiple of 32 ----

template <typename T> __device__ __forceinline__ T kiln_warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}
template <typename T> __device__ __forceinline__ T kiln_warp_max(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = kiln_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
template <typename T> __device__ __forceinline__ T kiln_warp_min(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = kiln_min(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Each block reduction returns the result to every thread: warps combine by shuffles, their
// partials meet in `scratch` (3 * 32 + 1 doubles), and the block is synchronized before return so
// that the next reduction may use `scratch` again.
#define KILN_BLOCK_REDUCTION(NAME, WARP, IDENTITY)                                     \
  template <typename T> __device__ __forceinline__ T NAME(T v, double* scratch) {      \
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;                        \
    const int warps = (blockDim.x + 31) >> 5;                                          \
    v = WARP(v);                                                                       \
    if (lane == 0) scratch[warp] = (double)v;                                          \
    __syncthreads();                                                                   \
    if (warp == 0) {                                                                   \
      T partial = lane < warps ? (T)scratch[lane] : (T)(IDENTITY);                     \
      partial = WARP(partial);                                                         \
      if (lane == 0) scratch[96] = (double)partial;                                    \
    }                                                                                  \
    __syncthreads();                                                                   \
    const T result = (T)scratch[96];                                                   \
    __syncthreads();                                                                   \
    return result;                                                                     \
  }
KILN_BLOCK_REDUCTION(kiln_block_sum, kiln_warp_sum, 0)
KILN_BLOCK_REDUCTION(kiln_block_max, kiln_warp_max, -__int_as_float(0x7f800000))
KILN_BLOCK_REDUCTION(kiln_block_min, kiln_warp_min, __int_as_float(0x7f800000))
#undef KILN_BLOCK_REDUCTION

// a / b for Welford's counts (whole numbers, never 0 where divided): float takes the fast
// division (2 ULP), whose IEEE form calls a slow path that saves registers on the stack.
__device__ __forceinline__ float kiln_count_div(float a, float b) { return __fdividef(a, b); }
__device__ __forceinline__ double kiln_count_div(double a, double b) { return a / b; }

// Welford's running (count, mean, m2), and Chan et al.'s merge of two of them.
template <typename T> __device__ __forceinline__ void kiln_welford_add(T& n, T& mean, T& m2, T x) {
  n += (T)1;
  const T delta = x - mean;
  mean += kiln_count_div(delta, n);
  m2 += delta * (x - mean);
}
template <typename T> __device__ __forceinline__ void kiln_welford_merge(T& n, T& mean, T& m2, T n_b, T mean_b, T m2_b) {
  const T count = n + n_b;
  if (count == (T)0) return;
  const T share = kiln_count_div(n_b, count);
  const T delta = mean_b - mean;
  mean += delta * share;
  m2 += m2_b + delta * delta * n * share;
  n = count;
}
template <typename T> __device__ __forceinline__ void kiln_warp_welford(T& n, T& mean, T& m2) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T n_b = __shfl_xor_sync(0xffffffffu, n, offset);
    const T mean_b = __shfl_xor_sync(0xffffffffu, mean, offset);
    const T m2_b = __shfl_xor_sync(0xffffffffu, m2, offset);
    kiln_welford_merge(n, mean, m2, n_b, mean_b, m2_b);
  }
}
// The population variance of the block's values (m2 / n), to every thread.
template <typename T> __device__ __forceinline__ T kiln_block_var(T n, T mean, T m2, double* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  kiln_warp_welford(n, mean, m2);
  if (lane == 0) {
    scratch[warp] = (double)n;
    scratch[32 + warp] = (double)mean;
    scratch[64 + warp] = (double)m2;
  }
  __syncthreads();
  if (warp == 0) {
    T n_w = lane < warps ? (T)scratch[lane] : (T)0;
    T mean_w = lane < warps ? (T)scratch[32 + lane] : (T)0;
    T m2_w = lane < warps ? (T)scratch[64 + lane] : (T)0;
    kiln_warp_welford(n_w, mean_w, m2_w);
    if (lane == 0) scratch[96] = (double)(m2_w / n_w);
  }
  __syncthreads();
  const T result = (T)scratch[96];
  __syncthreads();
  return result;
}
// The population variance of a warp's values (m2 / n), to every lane (a warp per row).
template <typename T> __device__ __forceinline__ T kiln_warp_var(T n, T mean, T m2) {
  kiln_warp_welford(n, mean, m2);
  return m2 / n;
}
