// The host side of kiln's CUDA emulator: what a generated kernel's CUDA C++ needs from the
// toolkit, in portable C++, so that the very source NVRTC compiles also compiles as a host shared
// library (codegen/cuda_emulator.cpp) and runs on the CPU. This text is included twice around the
// device helpers and the kernel: first the CUDA vocabulary, then (KILN_EMU_LAUNCHER defined) the
// grid emulator behind `kiln_emu_launch`.
//
// Note: this checks the generator, not the hardware. Blocks run one after another; within a block
// every thread is a fiber on one stack each. Kernels without block synchronization or warp
// collectives run their threads one after another; the others (KILN_EMU_LOCKSTEP) run their
// threads until each reaches a barrier: __syncthreads() waits for every live thread of the block,
// a warp shuffle for every live lane of its warp (a shuffle some lanes of a warp skip while others
// wait at __syncthreads() is reported as a divergence, not run). Float arithmetic is the host's
// IEEE arithmetic without contraction (NVRTC runs with --fmad=false), and the math library is the
// host's, so transcendental results differ from the GPU's by their few ULP.
#ifndef KILN_EMU_LAUNCHER

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KILN_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

struct kiln_emu_dim3 {
  unsigned x, y, z;
};
static thread_local kiln_emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline double __longlong_as_double(long long i) { double d; memcpy(&d, &i, 8); return d; }
static inline long long __double_as_longlong(double d) { long long i; memcpy(&i, &d, 8); return i; }
static inline float __fdividef(float a, float b) { return a / b; }

// IEEE half from float or double, rounded once to nearest even (PTX cvt.rn.f16.f32/.f64); NaN
// becomes the canonical NaN 0x7fff as the hardware's cvt gives.
static inline unsigned short kiln_emu_to_half(double value) {
  uint64_t bits;
  memcpy(&bits, &value, 8);
  const unsigned short sign = (unsigned short)((bits >> 48) & 0x8000u);
  const uint64_t magnitude = bits & 0x7fffffffffffffffull;
  if (magnitude > 0x7ff0000000000000ull) return 0x7fff;
  if (magnitude >= 0x7ff0000000000000ull) return (unsigned short)(sign | 0x7c00u);
  const int exponent = (int)(magnitude >> 52) - 1023;
  if (exponent < -26) return sign;  // below a quarter of the smallest subnormal: to zero
  const uint64_t mantissa = (magnitude & ((1ull << 52) - 1)) | (1ull << 52);
  const int drop = exponent >= -14 ? 42 : 42 + (-14 - exponent);
  uint64_t kept = mantissa >> drop;
  const uint64_t rest = mantissa & ((1ull << drop) - 1), half = 1ull << (drop - 1);
  if (rest > half || (rest == half && (kept & 1))) ++kept;
  // Normal: the implicit bit carries into the exponent field; subnormal: kept is the field.
  const uint64_t field = exponent >= -14 ? ((uint64_t)(exponent + 14) << 10) + kept : kept;
  return (unsigned short)(sign | (field >= 0x7c00u ? 0x7c00u : (unsigned)field));
}
static inline float kiln_emu_from_half(unsigned short h) {
  const unsigned sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
  return __uint_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

extern "C" void kiln_emu_sync_block();
extern "C" void kiln_emu_exchange(uint64_t* value);  // a warp's lanes swap values by lane ^ mask

static inline void __syncthreads() { kiln_emu_sync_block(); }
template <typename T>
static inline T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  uint64_t slot[2] = {0, (uint64_t)(unsigned)lane_mask};
  memcpy(slot, &value, sizeof(T));
  kiln_emu_exchange(slot);
  memcpy(&value, slot, sizeof(T));
  return value;
}

static void kiln_emu_body(const void* params);

#else  // KILN_EMU_LAUNCHER: the grid emulator

namespace {

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kFiberStack = 256 * 1024;

enum FiberState { kReady, kAtWarpBarrier, kAtBlockBarrier, kDone };

struct Fiber {
  void* sp;
  FiberState state;
  uint64_t slot[2];  // a shuffle's value, then the lane mask
};

struct Block {
  Fiber fibers[kMaxThreads];
  unsigned threads = 0;
  unsigned current = 0;
  void* scheduler_sp = nullptr;
  const void* params = nullptr;
  char* stacks = nullptr;
  char error[256] = {0};
};
thread_local Block* running = nullptr;

}  // namespace

// Saves the callee-saved registers and the stack pointer to *save, resumes the context at `load`.
extern "C" void kiln_emu_switch(void** save, void* load);
#if defined(__x86_64__)
asm(".text\n"
    ".globl kiln_emu_switch\n"
    ".hidden kiln_emu_switch\n"
    ".type kiln_emu_switch,@function\n"
    "kiln_emu_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size kiln_emu_switch, .-kiln_emu_switch\n");
#else
#error "the CUDA emulator's fibers are written for x86-64"
#endif

static void yieldToScheduler(FiberState state) {
  Block& block = *running;
  Fiber& fiber = block.fibers[block.current];
  fiber.state = state;
  kiln_emu_switch(&fiber.sp, block.scheduler_sp);
}

static void fiberMain() {
  kiln_emu_body(running->params);
  yieldToScheduler(kDone);
  abort();  // a finished fiber is never resumed
}

extern "C" void kiln_emu_sync_block() {
#ifdef KILN_EMU_LOCKSTEP
  yieldToScheduler(kAtBlockBarrier);
#else
  fprintf(stderr, "kiln cuda emulator: __syncthreads() in a kernel compiled without lockstep\n");
  abort();
#endif
}

extern "C" void kiln_emu_exchange(uint64_t* slot) {
#ifdef KILN_EMU_LOCKSTEP
  Block& block = *running;
  const unsigned lane = block.current;
  Fiber& fiber = block.fibers[lane];
  fiber.slot[0] = slot[0];
  fiber.slot[1] = slot[1];
  yieldToScheduler(kAtWarpBarrier);  // every live lane of the warp has stored its value
  const unsigned source = (lane & ~31u) | ((lane & 31u) ^ (unsigned)(slot[1] & 31u));
  if (source < block.threads && block.fibers[source].state != kDone) slot[0] = block.fibers[source].slot[0];
  yieldToScheduler(kAtWarpBarrier);  // every lane has read before any stores again
#else
  (void)slot;
  fprintf(stderr, "kiln cuda emulator: a warp shuffle in a kernel compiled without lockstep\n");
  abort();
#endif
}

// Starts fiber t at fiberMain on its own stack: six saved registers, then fiberMain as the return
// address, then a slot that stands for fiberMain's own return address (16-byte alignment as after
// a call).
static void startFiber(Block& block, unsigned t) {
  uintptr_t top = (uintptr_t)(block.stacks + (size_t)(t + 1) * kFiberStack) & ~(uintptr_t)15;
  void** sp = (void**)top;
  *--sp = nullptr;
  *--sp = (void*)&fiberMain;
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  block.fibers[t].sp = sp;
  block.fibers[t].state = kReady;
}

// Runs the current block's threads in lockstep; false (block.error set) on a divergent barrier.
static bool runLockstep(Block& block) {
  for (unsigned t = 0; t < block.threads; ++t) startFiber(block, t);
  for (;;) {
    for (unsigned t = 0; t < block.threads; ++t) {
      if (block.fibers[t].state != kReady) continue;
      block.current = t;
      threadIdx = {t, 0, 0};
      kiln_emu_switch(&block.scheduler_sp, block.fibers[t].sp);
    }
    // Every fiber now waits or is done: release the barriers that every live thread has reached.
    bool live = false, released = false, at_block = true;
    for (unsigned warp = 0; warp * 32 < block.threads; ++warp) {
      bool warp_live = false, warp_waits = true;
      for (unsigned t = warp * 32; t < block.threads && t < warp * 32 + 32; ++t) {
        const FiberState state = block.fibers[t].state;
        if (state == kDone) continue;
        warp_live = live = true;
        warp_waits = warp_waits && state == kAtWarpBarrier;
        at_block = at_block && state == kAtBlockBarrier;
      }
      if (warp_live && warp_waits) {
        for (unsigned t = warp * 32; t < block.threads && t < warp * 32 + 32; ++t) {
          if (block.fibers[t].state == kAtWarpBarrier) block.fibers[t].state = kReady;
        }
        released = true;
      }
    }
    if (!live) return true;
    if (released) continue;
    if (at_block) {
      for (unsigned t = 0; t < block.threads; ++t) {
        if (block.fibers[t].state == kAtBlockBarrier) block.fibers[t].state = kReady;
      }
      continue;
    }
    snprintf(block.error, sizeof block.error,
             "block %u: some threads wait at __syncthreads() while others of the same block wait at a warp "
             "shuffle (a divergent barrier)", blockIdx.x);
    return false;
  }
}

// Runs the kernel over a grid of `grid` blocks of `threads` threads (x only). 0 on success, else
// -1 with `error` filled.
extern "C" __attribute__((visibility("default"))) int kiln_emu_launch(unsigned grid, unsigned threads,
                                                                    const void* params, char* error,
                                                                    size_t error_size) {
  if (threads == 0 || threads > kMaxThreads || grid == 0) {
    snprintf(error, error_size, "bad launch: %u blocks of %u threads", grid, threads);
    return -1;
  }
  Block* block = new Block;
  block->threads = threads;
  block->params = params;
  gridDim = {grid, 1, 1};
  blockDim = {threads, 1, 1};
  bool ok = true;
#ifdef KILN_EMU_LOCKSTEP
  block->stacks = (char*)malloc((size_t)threads * kFiberStack + 16);
  running = block;
  for (unsigned b = 0; ok && b < grid; ++b) {
    blockIdx = {b, 0, 0};
    ok = runLockstep(*block);
  }
  running = nullptr;
  free(block->stacks);
#else
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx = {b, 0, 0};
    for (unsigned t = 0; t < threads; ++t) {
      threadIdx = {t, 0, 0};
      kiln_emu_body(params);
    }
  }
#endif
  if (!ok) snprintf(error, error_size, "%s", block->error);
  delete block;
  return ok ? 0 : -1;
}

#endif  // KILN_EMU_LAUNCHER
