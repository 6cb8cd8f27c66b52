// FlashAttention-2-style forward pass for sm_80+ (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate).
//
// One thread block = 4 warps = 64 queries of one batch index; each warp owns 16 query rows. The
// block's Q tile is loaded once into shared memory and then into registers (ldmatrix). K and V
// stream through shared memory in tiles of 64 keys with cp.async: V's load overlaps the scores
// and the softmax, the next K's load overlaps P·V. Scores live only in registers: the online
// softmax keeps a running max and a per-thread partial row sum, rescales the output accumulator
// when the max grows, and turns the probabilities into the A operand of the P·V MMA without
// leaving registers (the m16n8 accumulator layout of two adjacent key tiles is the m16k16 A
// layout). Shared-memory rows are padded by 16 bytes so ldmatrix's 8 row addresses fall in
// distinct banks for every head dim. Nothing of size query_len x key_len is ever written.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kiln/kernels/flash_attention.h"

namespace kiln::kernels {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockM = 16 * kWarps;  // queries per block
constexpr int kBlockN = 64;           // keys per streamed tile
constexpr float kLog2e = 1.4426950408889634f;

template <int kHeadDim>
struct Layout {
  static constexpr int kStride = kHeadDim + 8;  // elements per shared row: 16 bytes of padding
  static constexpr int kTileElements = kBlockM * kStride;
  static constexpr int kSharedBytes = 3 * kTileElements * 2;  // Q, K, V tiles of 2-byte elements
};
static_assert(kBlockM == kBlockN, "Q, K and V tiles share one shape");

__device__ __forceinline__ uint32_t sharedAddress(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared, zero-filled when !valid (the source is then not read).
__device__ __forceinline__ void copyAsync16(void* shared, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sharedAddress(shared)),
               "l"(global), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void commitAsync() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void waitAsync() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void loadMatrices(uint32_t (&r)[4], const void* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(sharedAddress(shared)));
}
__device__ __forceinline__ void loadMatricesTransposed(uint32_t (&r)[4], const void* shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(sharedAddress(shared)));
}

// c += a (16x16, row major) * b (16x8, column major).
template <typename T>
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                   uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t pack(float low, float high);
template <>
__device__ __forceinline__ uint32_t pack<__half>(float low, float high) {
  __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<uint32_t*>(&pair);
}
template <>
__device__ __forceinline__ uint32_t pack<__nv_bfloat16>(float low, float high) {
  __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<uint32_t*>(&pair);
}

// The element offset of batch index `n` in an operand with these batch strides.
__device__ __forceinline__ int64_t batchOffset(const AttentionParams& p, const int64_t* strides,
                                               int64_t n) {
  int64_t offset = 0;
  for (int d = p.batch_rank - 1; d >= 0; --d) {
    const int64_t size = p.batch_sizes[d];
    offset += (n % size) * strides[d];
    n /= size;
  }
  return offset;
}

// x rounded to T and back: a score as the explicit form's graph holds it.
template <typename T>
__device__ __forceinline__ float roundedTo(float x);
template <>
__device__ __forceinline__ float roundedTo<__half>(float x) {
  return __half2float(__float2half_rn(x));
}
template <>
__device__ __forceinline__ float roundedTo<__nv_bfloat16>(float x) {
  return __bfloat162float(__float2bfloat16_rn(x));
}

__device__ __forceinline__ float maskValue(MaskDtype dtype, const void* base, int64_t offset) {
  switch (dtype) {
    case MaskDtype::kFloat:
      return static_cast<const float*>(base)[offset];
    case MaskDtype::kHalf:
      return __half2float(static_cast<const __half*>(base)[offset]);
    case MaskDtype::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[offset]);
    default:
      return 0.0f;
  }
}

// Issues the cp.async copies of rows [row0, row0 + kBlockM) of a [rows, kHeadDim] matrix.
template <int kHeadDim>
__device__ __forceinline__ void loadTile(uint16_t* shared, const uint16_t* global,
                                         int64_t row_stride, int row0, int rows) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  for (int chunk = threadIdx.x; chunk < kBlockM * kChunks; chunk += kThreads) {
    const int row = chunk / kChunks;
    const int column = (chunk % kChunks) * 8;
    const bool valid = row0 + row < rows;
    const uint16_t* source = valid ? global + (row0 + row) * row_stride + column : global;
    copyAsync16(shared + row * Layout<kHeadDim>::kStride + column, source, valid);
  }
}

// kRoundScores: p.scores_in_dtype, a template parameter so that the other kernels stay as they
// were (a run-time test in the score loop cost kiln::attention 1.7x on an H200).
template <typename T, int kHeadDim, bool kRoundScores>
__global__ void __launch_bounds__(kThreads)
    flashAttentionKernel(const __grid_constant__ AttentionParams p) {
  using L = Layout<kHeadDim>;
  constexpr int kSteps = kHeadDim / 16;  // k-steps of Q·K^T, and pairs of 8-wide output tiles
  constexpr int kKeyTiles = kBlockN / 8;
  extern __shared__ __align__(16) uint16_t shared[];
  uint16_t* q_tile = shared;
  uint16_t* k_tile = shared + L::kTileElements;
  uint16_t* v_tile = shared + 2 * L::kTileElements;

  const int64_t n = blockIdx.x;  // flattened batch index
  const int query0 = blockIdx.y * kBlockM;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const auto* query = static_cast<const uint16_t*>(p.query.data) +
                      batchOffset(p, p.query.batch_strides, n);
  const auto* key = static_cast<const uint16_t*>(p.key.data) + batchOffset(p, p.key.batch_strides, n);
  const auto* value = static_cast<const uint16_t*>(p.value.data) +
                      batchOffset(p, p.value.batch_strides, n);
  const int64_t mask_base = p.mask_dtype != MaskDtype::kNone
                                ? batchOffset(p, p.mask.batch_strides, n)
                                : 0;
  const int64_t keep_base =
      p.fill_keep.data != nullptr ? batchOffset(p, p.fill_keep.batch_strides, n) : 0;

  // Causal: the block's last query sees keys up to itself; later tiles are skipped.
  const int key_end = p.causal ? min(p.key_len, query0 + kBlockM) : p.key_len;

  loadTile<kHeadDim>(q_tile, query, p.query.row_stride, query0, p.query_len);
  if (key_end > 0) loadTile<kHeadDim>(k_tile, key, p.key.row_stride, 0, p.key_len);
  commitAsync();
  waitAsync<0>();
  __syncthreads();

  uint32_t q_fragments[kSteps][4];
  #pragma unroll
  for (int step = 0; step < kSteps; ++step)
    loadMatrices(q_fragments[step],
                 q_tile + (warp * 16 + lane % 16) * L::kStride + step * 16 + (lane / 16) * 8);

  float output[2 * kSteps][4];
  #pragma unroll
  for (int t = 0; t < 2 * kSteps; ++t)
    #pragma unroll
    for (int i = 0; i < 4; ++i) output[t][i] = 0.0f;
  // This thread's two query rows: lane / 4 and lane / 4 + 8 of the warp's 16.
  const int rows[2] = {query0 + warp * 16 + lane / 4, query0 + warp * 16 + lane / 4 + 8};
  float running_max[2] = {-INFINITY, -INFINITY};
  float partial_sum[2] = {0.0f, 0.0f};  // this thread's columns only; summed over the quad at the end

  for (int key0 = 0; key0 < key_end; key0 += kBlockN) {
    loadTile<kHeadDim>(v_tile, value, p.value.row_stride, key0, p.key_len);
    commitAsync();

    float scores[kKeyTiles][4];
    #pragma unroll
    for (int t = 0; t < kKeyTiles; ++t)
      #pragma unroll
      for (int i = 0; i < 4; ++i) scores[t][i] = 0.0f;
    #pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      #pragma unroll
      for (int pair = 0; pair < kKeyTiles / 2; ++pair) {
        uint32_t b[4];
        loadMatrices(b, k_tile + (pair * 16 + lane % 8 + (lane / 16) * 8) * L::kStride + step * 16 +
                            ((lane / 8) % 2) * 8);
        mma<T>(scores[2 * pair], q_fragments[step], b[0], b[1]);
        mma<T>(scores[2 * pair + 1], q_fragments[step], b[2], b[3]);
      }
    }

    // Scale, mask, and the tile's row max.
    float tile_max[2] = {-INFINITY, -INFINITY};
    #pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int row = rows[i / 2];
        const int column = key0 + t * 8 + (lane % 4) * 2 + i % 2;
        float s = scores[t][i] * p.scale;
        if (column >= p.key_len || (p.causal && column > row)) {
          s = -INFINITY;
        } else if (row < p.query_len) {
          float additive = 0.0f;
          if (p.mask_dtype == MaskDtype::kBool) {
            const auto* keep = static_cast<const bool*>(p.mask.data);
            if (!keep[mask_base + row * p.mask.row_stride + column * p.mask.col_stride]) s = -INFINITY;
          } else if (p.mask_dtype != MaskDtype::kNone) {
            additive = maskValue(p.mask_dtype, p.mask.data,
                                 mask_base + row * p.mask.row_stride + column * p.mask.col_stride);
            s += additive;
          }
          if (p.fill_keep.data != nullptr) {
            const auto* keep = static_cast<const bool*>(p.fill_keep.data);
            if (!keep[keep_base + row * p.fill_keep.row_stride + column * p.fill_keep.col_stride])
              s = p.fill_adds_mask ? p.fill + additive : p.fill;
          }
          if constexpr (kRoundScores) s = roundedTo<T>(s);
        }
        scores[t][i] = s;
        tile_max[i / 2] = fmaxf(tile_max[i / 2], s);
      }
    }

    // Online softmax: the quad of lanes sharing a row agrees on its max.
    float correction[2];
    float base[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffff, tile_max[r], 2));
      const float new_max = fmaxf(running_max[r], tile_max[r]);
      // A row that has seen only -inf subtracts 0, so exp gives 0 rather than NaN. Subtract
      // before scaling by log2(e): a max near -FLT_MAX (finfo.min masks) would overflow.
      base[r] = new_max == -INFINITY ? 0.0f : new_max;
      correction[r] = exp2f((running_max[r] - base[r]) * kLog2e);
      running_max[r] = new_max;
      partial_sum[r] *= correction[r];
    }
    #pragma unroll
    for (int t = 0; t < kKeyTiles; ++t) {
      #pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float probability = exp2f((scores[t][i] - base[i / 2]) * kLog2e);
        scores[t][i] = probability;
        partial_sum[i / 2] += probability;
      }
    }
    #pragma unroll
    for (int t = 0; t < 2 * kSteps; ++t) {
      output[t][0] *= correction[0];
      output[t][1] *= correction[0];
      output[t][2] *= correction[1];
      output[t][3] *= correction[1];
    }

    waitAsync<0>();  // V has landed
    __syncthreads();  // and every warp is done reading K
    if (key0 + kBlockN < key_end) {
      loadTile<kHeadDim>(k_tile, key, p.key.row_stride, key0 + kBlockN, p.key_len);
      commitAsync();
    }

    // output += P · V, P straight from the score registers.
    #pragma unroll
    for (int chunk = 0; chunk < kBlockN / 16; ++chunk) {
      uint32_t a[4];
      a[0] = pack<T>(scores[2 * chunk][0], scores[2 * chunk][1]);
      a[1] = pack<T>(scores[2 * chunk][2], scores[2 * chunk][3]);
      a[2] = pack<T>(scores[2 * chunk + 1][0], scores[2 * chunk + 1][1]);
      a[3] = pack<T>(scores[2 * chunk + 1][2], scores[2 * chunk + 1][3]);
      #pragma unroll
      for (int pair = 0; pair < kSteps; ++pair) {
        uint32_t b[4];
        loadMatricesTransposed(b, v_tile + (chunk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * L::kStride +
                                      pair * 16 + (lane / 16) * 8);
        mma<T>(output[2 * pair], a, b[0], b[1]);
        mma<T>(output[2 * pair + 1], a, b[2], b[3]);
      }
    }
    waitAsync<0>();   // the next K has landed
    __syncthreads();  // and every warp is done reading V
  }

  // Normalize and store this thread's two rows.
  auto* out = static_cast<uint16_t*>(p.output);
  const int64_t out_base = batchOffset(p, p.output_batch_strides, n);
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = partial_sum[r];
    sum += __shfl_xor_sync(0xffffffff, sum, 1);
    sum += __shfl_xor_sync(0xffffffff, sum, 2);
    // No key at all (key_len == 0) gives 0 in both forms, as eager's empty matmul does.
    const float inverse =
        sum > 0.0f ? 1.0f / sum : (p.empty_rows_nan && p.key_len > 0 ? NAN : 0.0f);
    if (rows[r] >= p.query_len) continue;
    uint16_t* row_out = out + out_base + rows[r] * p.output_row_stride;
    #pragma unroll
    for (int t = 0; t < 2 * kSteps; ++t) {
      const int column = t * 8 + (lane % 4) * 2;
      *reinterpret_cast<uint32_t*>(row_out + column) =
          pack<T>(output[t][2 * r] * inverse, output[t][2 * r + 1] * inverse);
    }
  }
}

template <typename T, int kHeadDim>
cudaError_t launch(const AttentionParams& params, cudaStream_t stream) {
  constexpr int kShared = Layout<kHeadDim>::kSharedBytes;
  auto* kernel = params.scores_in_dtype ? &flashAttentionKernel<T, kHeadDim, true>
                                        : &flashAttentionKernel<T, kHeadDim, false>;
  if (kShared > 48 * 1024) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kShared);
    if (status != cudaSuccess) return status;
  }
  const dim3 grid(static_cast<unsigned>(params.batch),
                  static_cast<unsigned>((params.query_len + kBlockM - 1) / kBlockM));
  kernel<<<grid, kThreads, kShared, stream>>>(params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launchFor(const AttentionParams& params, cudaStream_t stream) {
  switch (params.head_dim) {
    case 32:
      return launch<T, 32>(params, stream);
    case 64:
      return launch<T, 64>(params, stream);
    case 96:
      return launch<T, 96>(params, stream);
    case 128:
      return launch<T, 128>(params, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

bool flashAttentionSupportsHeadDim(int head_dim) {
  return head_dim == 32 || head_dim == 64 || head_dim == 96 || head_dim == 128;
}

cudaError_t flashAttentionForward(const AttentionParams& params, cudaStream_t stream) {
  if (params.batch == 0 || params.query_len == 0) return cudaSuccess;
  if (params.batch > 0x7fffffff || (params.query_len + kBlockM - 1) / kBlockM > 65535)
    return cudaErrorInvalidConfiguration;
  return params.dtype == AttentionDtype::kHalf ? launchFor<__half>(params, stream)
                                                : launchFor<__nv_bfloat16>(params, stream);
}

}  // namespace kiln::kernels
