// The CPU attention kernel for bfloat16 on AMX (Intel's tile matrix unit, Sapphire Rapids and
// later): both matrix products on tiles (TDPBF16PS, bf16 in, fp32 sums), the softmax in fp32 on
// AVX-512, online across key blocks as FlashAttention does. Built with AVX-512, AVX512-BF16 and
// AMX flags (torch_ops/CMakeLists.txt) and run only where the CPU has AMX and the kernel lets this
// process use its tile registers (attention_cpu.cpp).
//
// Layout. One task is one flattened batch index and 32 queries (two tiles' rows; 16 when the
// sequence is that short):
//   scores [32][key block] = Q [32][D] x K^T          C tiles 0-3 (2 x 2 of 16 x 16), A 4-5, B 6-7
//   out    [32][Dv]       += P [32][key block] x V    the same, 32 value columns at a time
// Each B tile (from L2) serves two A tiles and each A tile two B tiles: half the loads of one row
// of four C tiles (measured 3-8% faster at S = 128 to 2048).
// A tile operand holds 16 rows of 32 bf16; the B operand is "VNNI" packed, each 4-byte element a
// pair of rows of the K dimension. Keys and values are packed once per batch index into that form
// (zero padded to whole tiles) before the query tasks start, in parallel; queries are packed per
// task. Padding keys get probability 0 and padding queries are never written out.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "torch_ops/attention_cpu.h"
#include "torch_ops/cpu/attention_masks.h"

namespace kiln::cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTileRows = 16;  // rows of every tile
constexpr int64_t kTaskRows = 32;  // queries per task: two A tiles
constexpr int64_t kPairCols = 16;  // columns of a B tile (keys of K^T, value columns of V)
constexpr int64_t kDepth = 32;     // bf16 of the K dimension per tile product
constexpr int64_t kTileElements = kTileRows * kPairCols * 2;  // bf16 in one 1 KB tile
// Keys per online-softmax block: the block's fp32 scores (16 KB) and bf16 probabilities stay in
// L1 beside the query tile; S <= 256 takes one block, so no rescaling at all.
constexpr int64_t kKeyBlock = 256;

int64_t roundUp(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 as 16 rows of 64 bytes, for this thread; released when the task ends.
struct TileScope {
  TileScope() {
    TileConfig config;
    for (int t = 0; t < 8; ++t) {
      config.bytes_per_row[t] = 64;
      config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
};

uint16_t bits(c10::BFloat16 value) { return value.x; }

// The 16 bf16 of a conversion as integers, for the integer stores (a cast between vector types
// of one size; no intrinsic names it).
__m256i asIntegers(__m256bh value) { return (__m256i)value; }

// keys [key_len][head_dim] -> [key chunk of 16][depth step of 32][pair r][key n] of 4-byte pairs
// (K[n][2r], K[n][2r + 1]): the B operand of Q x K^T.
void packKeys(const c10::BFloat16* keys, const StridedMatrices& matrix, int64_t key_len,
              int64_t head_dim, int64_t depth_steps, uint16_t* packed) {
  const int64_t chunks = roundUp(key_len, kPairCols) / kPairCols;
  // Pairs of adjacent bf16 as 4-byte units: the packing is then a 16 x 16 transpose of those,
  // done by ATen's AVX-512 float transpose (shuffles only; the bits are never read as floats).
  const bool pairs = matrix.col_stride == 1 && head_dim % 2 == 0 && matrix.row_stride % 2 == 0 &&
                     reinterpret_cast<uintptr_t>(keys) % 4 == 0;
  if (pairs) {
    const auto* units = reinterpret_cast<const float*>(keys);
    const int64_t units_per_row = matrix.row_stride / 2;
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t s = 0; s < depth_steps; ++s) {
        const int rows = static_cast<int>(std::min(kPairCols, key_len - c * kPairCols));
        const int cols = static_cast<int>(std::min(kTileRows, (head_dim - s * kDepth) / 2));
        if (rows <= 0 || cols <= 0) continue;  // all padding: stays zero
        at::vec::transpose_mxn<float>(
            units + c * kPairCols * units_per_row + s * (kDepth / 2), units_per_row,
            reinterpret_cast<float*>(packed + (c * depth_steps + s) * kTileElements), kPairCols,
            rows, cols);
      }
    return;
  }
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t s = 0; s < depth_steps; ++s) {
      uint16_t* tile = packed + (c * depth_steps + s) * kTileElements;
      for (int64_t r = 0; r < kTileRows; ++r)
        for (int64_t n = 0; n < kPairCols; ++n) {
          const int64_t key = c * kPairCols + n;
          for (int64_t half = 0; half < 2; ++half) {
            const int64_t d = s * kDepth + 2 * r + half;
            tile[(r * kPairCols + n) * 2 + half] =
                key < key_len && d < head_dim
                    ? bits(keys[key * matrix.row_stride + d * matrix.col_stride])
                    : 0;
          }
        }
    }
}

// values [key_len][value_dim] -> [column chunk of 16][key step of 32][pair r][column n] of pairs
// (V[2r][n], V[2r + 1][n]): the B operand of P x V.
void packValues(const c10::BFloat16* values, const StridedMatrices& matrix, int64_t key_len,
                int64_t value_dim, int64_t key_steps, uint16_t* packed) {
  const int64_t chunks = roundUp(value_dim, kPairCols) / kPairCols;
  // Two rows of 16 columns interleaved by one permute: lanes 0-15 row 2r, 16-31 row 2r + 1.
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t s = 0; s < key_steps; ++s) {
      uint16_t* tile = packed + (c * key_steps + s) * kTileElements;
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t key = s * kDepth + 2 * r;
        const int64_t column = c * kPairCols;
        uint16_t* out = tile + r * kPairCols * 2;
        if (matrix.col_stride == 1 && key + 1 < key_len && column + kPairCols <= value_dim) {
          const __m256i first = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(values + key * matrix.row_stride + column));
          const __m256i second = _mm256_loadu_si256(
              reinterpret_cast<const __m256i*>(values + (key + 1) * matrix.row_stride + column));
          const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
          _mm512_storeu_si512(out, _mm512_permutexvar_epi16(interleave, both));
          continue;
        }
        for (int64_t n = 0; n < kPairCols; ++n)
          for (int64_t half = 0; half < 2; ++half) {
            const int64_t row = key + half;
            out[n * 2 + half] =
                row < key_len && column + n < value_dim
                    ? bits(values[row * matrix.row_stride + (column + n) * matrix.col_stride])
                    : 0;
          }
      }
    }
}

struct Packed {
  int64_t depth_steps;           // head_dim / 32, rounded up
  int64_t key_steps;             // key_len / 32, rounded up
  int64_t value_chunks;          // value_dim / 16, rounded up
  int64_t key_tile_count;        // per batch index, of 16 keys
  std::vector<uint16_t> keys;    // per batch index: key chunks x depth steps tiles
  std::vector<uint16_t> values;  // per batch index: value chunks x key steps tiles
  int64_t keys_per_batch() const { return key_tile_count * depth_steps * kTileElements; }
  int64_t values_per_batch() const { return value_chunks * key_steps * kTileElements; }
};

// Scratch of one thread.
struct Scratch {
  explicit Scratch(const Packed& packed)
      : query(kTaskRows * packed.depth_steps * kDepth),
        scores(kTaskRows * kKeyBlock),
        probs(kTaskRows * kKeyBlock),
        out(kTaskRows * packed.value_chunks * kPairCols) {}
  std::vector<uint16_t> query;  // [32][depth steps * 32] bf16, zero padded
  std::vector<float> scores;    // [32][kKeyBlock]
  std::vector<uint16_t> probs;  // [32][kKeyBlock] bf16, zero padded
  std::vector<float> out;       // [32][value chunks * 16], unnormalized
  float running_max[kTaskRows];
  float running_sum[kTaskRows];
};

// C[q][c] (+)= A[q] x B[c] over `steps` steps of the K dimension, for q < query_tiles (1 or 2)
// and c < column_tiles (1 or 2), in tiles C = 0-3 (C[q][c] is tile 2q + c), A = 4-5, B = 6-7. The
// C tiles start from `c_rows` (fp32, c_stride bytes between rows; the second query tile 16 rows
// down) when `accumulate`, else from zero, and are stored back there. a_at(q, s) and b_at(c, s)
// give the operands of step s. A step loads all four operands before its products (loads and
// products interleaved were 1.1-1.3x slower: a load into a tile waits for the product reading it).
// GCC's tile intrinsics spell tile numbers into their assembly text, so every tile number below
// is a literal.
template <typename AAt, typename BAt>
void tileProduct(int query_tiles, int column_tiles, int64_t steps, float* c_rows, int64_t c_stride,
                 bool accumulate, int64_t a_stride, const AAt& a_at, const BAt& b_at) {
  float* second_row = c_rows + kTileRows * c_stride / static_cast<int64_t>(sizeof(float));
  const bool q1 = query_tiles > 1, c1 = column_tiles > 1;
  if (accumulate) {
    _tile_loadd(0, c_rows, c_stride);
    if (c1) _tile_loadd(1, c_rows + kPairCols, c_stride);
    if (q1) _tile_loadd(2, second_row, c_stride);
    if (q1 && c1) _tile_loadd(3, second_row + kPairCols, c_stride);
  } else {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(4, a_at(0, s), a_stride);
    _tile_loadd(6, b_at(0, s), 64);
    if (c1) _tile_loadd(7, b_at(1, s), 64);
    if (q1) _tile_loadd(5, a_at(1, s), a_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (c1) _tile_dpbf16ps(1, 4, 7);
    if (q1) _tile_dpbf16ps(2, 5, 6);
    if (q1 && c1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c_rows, c_stride);
  if (c1) _tile_stored(1, c_rows + kPairCols, c_stride);
  if (q1) _tile_stored(2, second_row, c_stride);
  if (q1 && c1) _tile_stored(3, second_row + kPairCols, c_stride);
}

// scores[:, 0:key_count) = Q x K^T for keys [key0, key0 + key_count), key_count padded to 16.
void scoreBlock(const Packed& packed, const uint16_t* keys, Scratch& scratch, int query_tiles,
                int64_t key0, int64_t key_count) {
  const int64_t depth = packed.depth_steps * kDepth;
  const int64_t chunks = roundUp(key_count, kPairCols) / kPairCols;
  for (int64_t first = 0; first < chunks; first += 2) {
    const int64_t chunk0 = key0 / kPairCols + first;
    tileProduct(
        query_tiles, static_cast<int>(std::min<int64_t>(2, chunks - first)), packed.depth_steps,
        scratch.scores.data() + first * kPairCols, kKeyBlock * sizeof(float), /*accumulate=*/false,
        depth * 2,
        [&](int q, int64_t s) { return scratch.query.data() + q * kTileRows * depth + s * kDepth; },
        [&](int c, int64_t s) {
          return keys + ((chunk0 + c) * packed.depth_steps + s) * kTileElements;
        });
  }
}

// out += P x V for the block's keys [key0, key0 + key_count); the probabilities of padding keys
// are zero up to a whole step of 32.
void valueBlock(const Packed& packed, const uint16_t* values, Scratch& scratch, int query_tiles,
                int64_t key0, int64_t key_count) {
  const int64_t out_cols = packed.value_chunks * kPairCols;
  const int64_t steps = roundUp(key_count, kDepth) / kDepth;
  for (int64_t first = 0; first < packed.value_chunks; first += 2) {
    tileProduct(
        query_tiles, static_cast<int>(std::min<int64_t>(2, packed.value_chunks - first)), steps,
        scratch.out.data() + first * kPairCols, out_cols * sizeof(float), /*accumulate=*/true,
        kKeyBlock * 2,
        [&](int q, int64_t s) {
          return scratch.probs.data() + q * kTileRows * kKeyBlock + s * kDepth;
        },
        [&](int c, int64_t s) {
          return values + ((first + c) * packed.key_steps + key0 / kDepth + s) * kTileElements;
        });
  }
}

// Largest of row[0, n), -inf for n = 0.
float rowMax(const float* row, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) best = _mm512_max_ps(best, _mm512_loadu_ps(row + j));
  if (j < n)
    best = _mm512_max_ps(
        best, _mm512_mask_loadu_ps(best, static_cast<__mmask16>((1u << (n - j)) - 1), row + j));
  return _mm512_reduce_max_ps(best);
}

// exp(x) for probabilities that are rounded to bf16 (8 bits) right after: 2^(x log2(e)) as
// 2^n * 2^f, n the nearest integer, 2^f by its Taylor polynomial of degree 4 on [-1/2, 1/2]
// (relative error < 4e-5, a hundredth of bf16's rounding). Half the instructions of ATen's 20-ULP
// exponential, which the softmax spends most of its time in. Below 2^-126 (a masked score, -inf)
// the result is exactly 0, set by a lane mask: letting it underflow costs a microcode assist per
// instruction on Intel CPUs (measured: 1.5x slower with 3 masked keys in 128). NaN stays NaN.
__m512 probabilityExp(__m512 x) {
  const __m512 lowest = _mm512_set1_ps(-126.0f);
  const __m512 unclamped = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __mmask16 normal = _mm512_cmp_ps_mask(unclamped, lowest, _CMP_NLT_UQ);
  // max(lowest, t) returns t when t is NaN.
  const __m512 t = _mm512_max_ps(lowest, unclamped);
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(9.6181291e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_maskz_scalef_ps(normal, p, n);
}

// probs[0, n) = bf16(exp(row * factor - max)), zero up to `padded`; returns the sum of the fp32
// values.
float exponentiate(const float* row, int64_t n, float factor, float max, uint16_t* probs,
                   int64_t padded) {
  const __m512 scale = _mm512_set1_ps(factor);
  const __m512 shift = _mm512_set1_ps(-max);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j < n; j += 16) {
    const __mmask16 lanes =
        n - j >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                          lanes, row + j);
    const __m512 p = probabilityExp(_mm512_fmadd_ps(x, scale, shift));
    sum = _mm512_add_ps(sum, p);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), asIntegers(_mm512_cvtneps_pbh(p)));
  }
  for (; j < padded; j += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j), _mm256_setzero_si256());
  return _mm512_reduce_add_ps(sum);
}

__mmask16 firstLanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// The masks models use, applied in vectors while the scores are scaled: none, additive float32
// or bf16, or boolean keep, with the key dimension adjacent. Anything else (the explicit form's
// fill, other dtypes, strided keys) takes the general path: scale, then applyMasks.
bool vectorMasks(const AttentionProblem& problem) {
  if (problem.has_fill_keep) return false;
  if (problem.mask_kind == MaskKind::kNone) return true;
  return problem.mask.col_stride == 1 && (problem.mask_dtype == c10::ScalarType::Bool ||
                                          problem.mask_dtype == c10::ScalarType::Float ||
                                          problem.mask_dtype == c10::ScalarType::BFloat16);
}

// The vector mask forms (vectorMasks): what scaleAndMask adds to a row of scores.
enum class MaskForm { kNone, kKeep, kAddFloat, kAddBFloat16 };

MaskForm maskForm(const AttentionProblem& problem) {
  if (problem.mask_kind == MaskKind::kKeep) return MaskForm::kKeep;
  if (problem.mask_kind == MaskKind::kNone) return MaskForm::kNone;
  return problem.mask_dtype == c10::ScalarType::Float ? MaskForm::kAddFloat
                                                      : MaskForm::kAddBFloat16;
}

// row[0, n) = row * scale (+ mask, or -inf where the keep mask is false); mask_row points at the
// query's mask for key 0 of the block (unused for kNone: scaled only). The form is a template
// argument so that the loop carries no branch.
template <MaskForm kForm>
void scaleAndMask(float* row, int64_t n, float scale, const void* mask_row) {
  const __m512 factor = _mm512_set1_ps(scale);
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 lanes = firstLanes(n - j);
    __m512 x = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, row + j), factor);
    if constexpr (kForm == MaskForm::kKeep) {
      const __m128i bytes = _mm_maskz_loadu_epi8(lanes, static_cast<const uint8_t*>(mask_row) + j);
      x = _mm512_mask_blend_ps(_mm_test_epi8_mask(bytes, bytes), minus_infinity, x);
    } else if constexpr (kForm == MaskForm::kAddFloat) {
      x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(lanes, static_cast<const float*>(mask_row) + j));
    } else if constexpr (kForm == MaskForm::kAddBFloat16) {
      // bf16 -> fp32: the 16 bits become the high half.
      const __m256i half =
          _mm256_maskz_loadu_epi16(lanes, static_cast<const uint16_t*>(mask_row) + j);
      x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16)));
    }
    _mm512_mask_storeu_ps(row + j, lanes, x);
  }
}

// The explicit form's scores as its graph holds them: each rounded to bfloat16 (to nearest even)
// and back, 16 at a time.
void roundToBFloat16(float* scores, int64_t rows, int64_t key_count) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = scores + i * kKeyBlock;
    for (int64_t j = 0; j < key_count; j += 16) {
      const __mmask16 lanes = firstLanes(key_count - j);
      const __m256i rounded = asIntegers(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, row + j)));
      _mm512_mask_storeu_ps(row + j, lanes,
                            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(rounded), 16)));
    }
  }
}

// scaleAndMask<form> for the block's rows of valid queries.
template <MaskForm kForm>
void scaleAndMaskRows(const AttentionProblem& problem, int64_t batch_index, int64_t query0,
                      int64_t query_count, int64_t key0, int64_t key_count, float scale,
                      float* scores) {
  const StridedMatrices& mask = problem.mask;
  const size_t mask_bytes = kForm == MaskForm::kNone ? 0 : c10::elementSize(problem.mask_dtype);
  for (int64_t i = 0; i < query_count; ++i) {
    const void* mask_row =
        kForm == MaskForm::kNone
            ? nullptr
            : static_cast<const char*>(mask.data) +
                  (mask.batch_offsets[batch_index] + (query0 + i) * mask.row_stride + key0) *
                      mask_bytes;
    scaleAndMask<kForm>(scores + i * kKeyBlock, key_count, scale, mask_row);
  }
}

void attendQueries(const AttentionProblem& problem, const Packed& packed, int64_t batch_index,
                   int64_t query0, Scratch& scratch) {
  constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
  const int64_t query_count = std::min(kTaskRows, problem.query_len - query0);
  const int query_tiles = query_count > kTileRows ? 2 : 1;
  const int64_t rows = query_tiles * kTileRows;
  const int64_t depth = packed.depth_steps * kDepth;
  const int64_t out_cols = packed.value_chunks * kPairCols;

  // The queries, zero padded to whole tiles and depth steps.
  std::fill(scratch.query.begin(), scratch.query.begin() + rows * depth, 0);
  const StridedMatrices& query = problem.query;
  const auto* query_rows = static_cast<const c10::BFloat16*>(query.data) +
                           query.batch_offsets[batch_index] + query0 * query.row_stride;
  for (int64_t i = 0; i < query_count; ++i) {
    uint16_t* to = scratch.query.data() + i * depth;
    const c10::BFloat16* from = query_rows + i * query.row_stride;
    if (query.col_stride == 1) {
      std::memcpy(to, from, problem.head_dim * sizeof(uint16_t));
    } else {
      for (int64_t d = 0; d < problem.head_dim; ++d) to[d] = bits(from[d * query.col_stride]);
    }
  }
  std::fill(scratch.out.begin(), scratch.out.begin() + rows * out_cols, 0.0f);
  std::fill(scratch.running_max, scratch.running_max + rows, kMinusInfinity);
  std::fill(scratch.running_sum, scratch.running_sum + rows, 0.0f);

  const uint16_t* keys = packed.keys.data() + batch_index * packed.keys_per_batch();
  const uint16_t* values = packed.values.data() + batch_index * packed.values_per_batch();
  const float scale = static_cast<float>(problem.scale);
  // Causal (top-left aligned): query i sees keys j <= i; blocks past the last query are skipped.
  const int64_t key_end =
      problem.causal ? std::min(problem.key_len, query0 + query_count) : problem.key_len;
  // Masks are added to scaled scores, so then the scores are scaled first; without masks the
  // scale is folded into the exponential's argument (exp(s * scale - max * scale)). Masks that
  // vectorMasks does not take go the general way: scaled, then applied one score at a time.
  const bool masked = problem.mask_kind != MaskKind::kNone || problem.has_fill_keep ||
                      problem.scores_in_dtype || scale <= 0.0f;
  const float factor = masked ? 1.0f : scale;
  const bool vector_masks = vectorMasks(problem);
  const MaskForm form = vector_masks ? maskForm(problem) : MaskForm::kNone;
  for (int64_t key0 = 0; key0 < key_end; key0 += kKeyBlock) {
    const int64_t key_count = std::min(kKeyBlock, key_end - key0);
    scoreBlock(packed, keys, scratch, query_tiles, key0, key_count);
    float* scores = scratch.scores.data();
    if (masked) {
      auto rows_of = [&](auto form_constant) {
        scaleAndMaskRows<decltype(form_constant)::value>(problem, batch_index, query0, query_count,
                                                         key0, key_count, scale, scores);
      };
      switch (form) {
        case MaskForm::kKeep:
          rows_of(std::integral_constant<MaskForm, MaskForm::kKeep>());
          break;
        case MaskForm::kAddFloat:
          rows_of(std::integral_constant<MaskForm, MaskForm::kAddFloat>());
          break;
        case MaskForm::kAddBFloat16:
          rows_of(std::integral_constant<MaskForm, MaskForm::kAddBFloat16>());
          break;
        case MaskForm::kNone:
          rows_of(std::integral_constant<MaskForm, MaskForm::kNone>());
          break;
      }
      if (!vector_masks)
        applyMasks(problem, batch_index, query0, query_count, key0, key_count, scores, kKeyBlock,
                   int64_t{1});
      if (problem.scores_in_dtype) roundToBFloat16(scores, query_count, key_count);
    }
    const int64_t padded = roundUp(key_count, kDepth);
    for (int64_t i = 0; i < rows; ++i) {
      uint16_t* probs = scratch.probs.data() + i * kKeyBlock;
      if (i >= query_count) {
        std::fill(probs, probs + padded, 0);
        continue;
      }
      float* row = scores + i * kKeyBlock;
      // Keys this query sees: all of the block, or up to its own position when causal.
      const int64_t seen =
          problem.causal ? std::clamp<int64_t>(query0 + i + 1 - key0, 0, key_count) : key_count;
      const float old_max = scratch.running_max[i];
      const float new_max = std::max(old_max, rowMax(row, seen) * factor);
      // A query whose every score so far is -inf subtracts 0 instead, so exp gives 0, not NaN.
      const float safe_max = new_max == kMinusInfinity ? 0.0f : new_max;
      const float correction = std::exp(old_max - safe_max);
      const float block_sum = exponentiate(row, seen, factor, safe_max, probs, padded);
      scratch.running_sum[i] = scratch.running_sum[i] * correction + block_sum;
      scratch.running_max[i] = new_max;
      if (key0 > 0 && correction != 1.0f) {
        float* out = scratch.out.data() + i * out_cols;
        const __m512 c = _mm512_set1_ps(correction);
        for (int64_t col = 0; col < out_cols; col += 16)
          _mm512_storeu_ps(out + col, _mm512_mul_ps(_mm512_loadu_ps(out + col), c));
      }
    }
    valueBlock(packed, values, scratch, query_tiles, key0, key_count);
  }

  // Normalize and write. A query that kept no key: 0, as scaled_dot_product_attention gives, or
  // NaN, as softmax gives in the explicit form.
  const float empty_row = problem.empty_rows_nan && problem.key_len > 0
                              ? std::numeric_limits<float>::quiet_NaN()
                              : 0.0f;
  const int64_t out_stride =
      problem.output_row_stride > 0 ? problem.output_row_stride : problem.value_dim;
  const int64_t out_base = problem.output_offsets.empty()
                               ? batch_index * problem.query_len * problem.value_dim
                               : problem.output_offsets[batch_index];
  auto* output = static_cast<c10::BFloat16*>(problem.output) + out_base + query0 * out_stride;
  for (int64_t i = 0; i < query_count; ++i) {
    const float sum = scratch.running_sum[i];
    const __m512 inverse = _mm512_set1_ps(sum > 0.0f ? 1.0f / sum : empty_row);
    const float* out = scratch.out.data() + i * out_cols;
    uint16_t* to = reinterpret_cast<uint16_t*>(output + i * out_stride);
    for (int64_t col = 0; col < problem.value_dim; col += 16) {
      const int64_t n = std::min<int64_t>(16, problem.value_dim - col);
      const __m256bh converted =
          _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(out + col), inverse));
      _mm256_mask_storeu_epi16(to + col, static_cast<__mmask16>(n == 16 ? 0xffff : (1u << n) - 1),
                               asIntegers(converted));
    }
  }
}

}  // namespace

void attentionKernel_AMX(const AttentionProblem& problem) {
  TORCH_INTERNAL_ASSERT(problem.dtype == c10::ScalarType::BFloat16,
                        "kiln::attention: the AMX kernel is bf16 only");
  if (problem.batch == 0 || problem.query_len == 0) return;
  Packed packed;
  packed.depth_steps = std::max<int64_t>(1, roundUp(problem.head_dim, kDepth) / kDepth);
  packed.key_steps = roundUp(problem.key_len, kDepth) / kDepth;
  packed.key_tile_count = packed.key_steps * 2;
  packed.value_chunks = std::max<int64_t>(1, roundUp(problem.value_dim, kPairCols) / kPairCols);
  packed.keys.resize(static_cast<size_t>(problem.batch * packed.keys_per_batch()));
  packed.values.resize(static_cast<size_t>(problem.batch * packed.values_per_batch()));
  at::parallel_for(0, problem.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      packKeys(static_cast<const c10::BFloat16*>(problem.key.data) + problem.key.batch_offsets[b],
               problem.key, problem.key_len, problem.head_dim, packed.depth_steps,
               packed.keys.data() + b * packed.keys_per_batch());
      packValues(
          static_cast<const c10::BFloat16*>(problem.value.data) + problem.value.batch_offsets[b],
          problem.value, problem.key_len, problem.value_dim, packed.key_steps,
          packed.values.data() + b * packed.values_per_batch());
    }
  });
  const int64_t query_blocks = (problem.query_len + kTaskRows - 1) / kTaskRows;
  at::parallel_for(0, problem.batch * query_blocks, 1, [&](int64_t begin, int64_t end) {
    TileScope tiles;
    Scratch scratch(packed);
    for (int64_t task = begin; task < end; ++task)
      attendQueries(problem, packed, task / query_blocks, (task % query_blocks) * kTaskRows,
                    scratch);
  });
}

}  // namespace kiln::cpu
