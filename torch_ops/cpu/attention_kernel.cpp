// The CPU attention kernel, compiled once per instruction set like ATen's own CPU kernels
// (CPU_CAPABILITY = DEFAULT, AVX2 or AVX512 with the matching -m flags; torch_ops/CMakeLists.txt).
// torch_ops/attention_cpu.cpp picks the build this CPU runs and calls its entry point.
//
// Algorithm (FlashAttention's online softmax, laid out for SIMD on a CPU): one task is one
// flattened batch index and one block of up to 4 vectors of queries. The queries are packed once,
// scaled and transposed, so that a vector lane is a query. Keys and values stream through in
// blocks; for each block the scores are computed transposed (key x query), so the per-query
// running max, the exponentials and the running sum are plain vertical vector operations with no
// horizontal reductions, and the output accumulator, also transposed (value dim x query), is
// rescaled by one vector multiply per row. Scratch is O(block) per thread; only the output is
// allocated (by the caller).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "torch_ops/attention_cpu.h"
#include "torch_ops/cpu/attention_masks.h"

#define KILN_CONCAT_IMPL(a, b) a##b
#define KILN_CONCAT(a, b) KILN_CONCAT_IMPL(a, b)
// The register tiles' loops must unroll fully, or the accumulators live in memory (measured: 3x
// slower on AVX-512 with GCC 12, which does not unroll them on its own).
#define KILN_UNROLL _Pragma("GCC unroll 8")

namespace kiln::cpu {
namespace {

using at::vec::Vectorized;

// Keys per streamed block. 128 keeps a packed key block (128 x head_dim floats) and the
// transposed scores (128 x 64 floats) in L2 beside the queries and the accumulator; measured
// against 64 and 256 on the attention benchmark.
constexpr int64_t kKeyBlock = 128;
// Register tile: kRowTile rows (keys for the scores, value columns for the output) times the
// block's vectors of queries. 6 x 4 accumulators + 4 loaded vectors + 1 broadcast fit AVX-512's
// 32 registers; 256-bit builds (16 registers) take 2 vectors of queries, 6 x 2 + 2 + 1.
constexpr int kRowTile = 6;
template <typename acc_t>
constexpr int kMaxQueryVectors = sizeof(Vectorized<acc_t>) >= 64 ? 4 : 2;

template <typename acc_t>
Vectorized<acc_t> exponential(Vectorized<acc_t> x) {
  // ATen's flash attention uses the same 20-ULP float exponential; the softmax is normalized by
  // the sum of the same values, so the error mostly cancels. Doubles get the accurate one.
  if constexpr (std::is_same_v<acc_t, float>) {
    return x.exp_u20();
  } else {
    return x.exp();
  }
}

// sum[r][:] += sum over k of a[r * a_row_stride + k * a_step] * b[k * b_stride][:], the rank-1
// update loop both tiles run: kRows broadcast scalars times kVectors loaded vectors per step.
// Forced inline: `sum` must stay in registers (called out of line it lives in memory, 2x slower).
template <typename acc_t, int kRows, int kVectors>
C10_ALWAYS_INLINE void accumulateTile(const acc_t* a, int64_t a_row_stride, int64_t a_step,
                                      const acc_t* b, int64_t b_stride, int64_t steps,
                                      Vectorized<acc_t> (&sum)[kRows][kVectors]) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  for (int64_t k = 0; k < steps; ++k) {
    Vec row[kVectors];
    KILN_UNROLL
    for (int v = 0; v < kVectors; ++v) row[v] = Vec::loadu(b + k * b_stride + v * kWidth);
    KILN_UNROLL
    for (int r = 0; r < kRows; ++r) {
      const Vec scalar(a[r * a_row_stride + k * a_step]);
      KILN_UNROLL
      for (int v = 0; v < kVectors; ++v) sum[r][v] = at::vec::fmadd(scalar, row[v], sum[r][v]);
    }
  }
}

template <typename acc_t, int kRows, int kVectors>
C10_ALWAYS_INLINE void storeTile(const Vectorized<acc_t> (&sum)[kRows][kVectors], acc_t* out,
                                 int64_t out_stride) {
  constexpr int64_t kWidth = Vectorized<acc_t>::size();
  KILN_UNROLL
  for (int r = 0; r < kRows; ++r) {
    KILN_UNROLL
    for (int v = 0; v < kVectors; ++v) sum[r][v].store(out + r * out_stride + v * kWidth);
  }
}

// scores[r][:] = sum over d of keys[r][d] * query_t[d][:], for kRows keys and kVectors vectors
// of queries. keys rows are key_stride apart with unit column stride. Also folds the tile's
// per-query max into block_max while the scores are still in registers.
template <typename acc_t, int kRows, int kVectors>
void scoreTile(const acc_t* keys, int64_t key_stride, const acc_t* query_t, int64_t query_stride,
               int64_t head_dim, acc_t* scores, int64_t score_stride,
               Vectorized<acc_t>* block_max) {
  using Vec = Vectorized<acc_t>;
  Vec sum[kRows][kVectors];
  KILN_UNROLL
  for (int r = 0; r < kRows; ++r) {
    KILN_UNROLL
    for (int v = 0; v < kVectors; ++v) sum[r][v] = Vec(acc_t(0));
  }
  accumulateTile<acc_t, kRows, kVectors>(keys, key_stride, 1, query_t, query_stride, head_dim, sum);
  storeTile<acc_t, kRows, kVectors>(sum, scores, score_stride);
  KILN_UNROLL
  for (int v = 0; v < kVectors; ++v) {
    Vec tile_max = sum[0][v];
    KILN_UNROLL
    for (int r = 1; r < kRows; ++r) tile_max = at::vec::maximum(tile_max, sum[r][v]);
    block_max[v] = at::vec::maximum(block_max[v], tile_max);
  }
}

// out_t[r][:] += sum over j of values[j][r] * probs[j][:], for kRows value columns.
template <typename acc_t, int kRows, int kVectors>
void valueTile(const acc_t* values, int64_t value_stride, const acc_t* probs, int64_t prob_stride,
               int64_t key_count, acc_t* out_t, int64_t out_stride) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  Vec sum[kRows][kVectors];
  KILN_UNROLL
  for (int r = 0; r < kRows; ++r) {
    KILN_UNROLL
    for (int v = 0; v < kVectors; ++v) sum[r][v] = Vec::loadu(out_t + r * out_stride + v * kWidth);
  }
  accumulateTile<acc_t, kRows, kVectors>(values, 1, value_stride, probs, prob_stride, key_count,
                                         sum);
  storeTile<acc_t, kRows, kVectors>(sum, out_t, out_stride);
}

// Runs `tile<kRows>(first_row)` over `rows` rows: full tiles, then one narrower tile.
template <typename TileAt>
void forRowTiles(int64_t rows, const TileAt& tile_at) {
  int64_t row = 0;
  for (; row + kRowTile <= rows; row += kRowTile)
    tile_at(std::integral_constant<int, kRowTile>(), row);
  switch (rows - row) {
    case 5:
      tile_at(std::integral_constant<int, 5>(), row);
      break;
    case 4:
      tile_at(std::integral_constant<int, 4>(), row);
      break;
    case 3:
      tile_at(std::integral_constant<int, 3>(), row);
      break;
    case 2:
      tile_at(std::integral_constant<int, 2>(), row);
      break;
    case 1:
      tile_at(std::integral_constant<int, 1>(), row);
      break;
    default:
      break;
  }
}

// rows x cols of a strided matrix into a dense acc_t one (dst rows dst_stride apart).
template <typename scalar_t, typename acc_t>
void packRows(const scalar_t* src, int64_t row_stride, int64_t col_stride, int64_t rows,
              int64_t cols, acc_t* dst, int64_t dst_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* from = src + r * row_stride;
    acc_t* to = dst + r * dst_stride;
    if (col_stride == 1) {
      int64_t c = 0;
      if constexpr (at::vec::is_reduced_floating_point_v<scalar_t> &&
                    std::is_same_v<acc_t, float>) {
        // The scalar conversion costs as much as the block's matrix products (measured).
        constexpr int64_t kWidth = Vectorized<float>::size();
        for (; c + kWidth <= cols; c += kWidth) {
          Vectorized<float> converted;
          at::vec::load_to_float(from + c, converted);
          converted.store(to + c);
        }
      }
      for (; c < cols; ++c) to[c] = static_cast<acc_t>(from[c]);
    } else {
      for (int64_t c = 0; c < cols; ++c) to[c] = static_cast<acc_t>(from[c * col_stride]);
    }
  }
}

template <typename acc_t>
struct Scratch {
  Scratch(const AttentionProblem& problem, int64_t query_block)
      : query_t(problem.head_dim * query_block),
        keys(kKeyBlock * problem.head_dim),
        values(kKeyBlock * problem.value_dim),
        scores_t(kKeyBlock * query_block),
        out_t(problem.value_dim * query_block),
        running_max(query_block),
        running_sum(query_block),
        staging(query_block * std::max(problem.head_dim, problem.value_dim)) {}
  std::vector<acc_t> query_t;   // [head_dim][query_block], scaled queries
  std::vector<acc_t> keys;      // [kKeyBlock][head_dim], when keys cannot be read in place
  std::vector<acc_t> values;    // [kKeyBlock][value_dim], likewise
  std::vector<acc_t> scores_t;  // [kKeyBlock][query_block]: scores, then probabilities
  std::vector<acc_t> out_t;     // [value_dim][query_block], unnormalized output
  std::vector<acc_t> running_max;
  std::vector<acc_t> running_sum;
  std::vector<acc_t> staging;  // query or output rows converted to or from a narrower dtype
};

// One task: batch index `batch_index`, queries [query0, query0 + kVectors * vector width).
template <typename scalar_t, typename acc_t, int kVectors>
void attendQueryBlock(const AttentionProblem& problem, int64_t batch_index, int64_t query0,
                      Scratch<acc_t>& scratch) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kWidth = Vec::size();
  constexpr int64_t kBlock = kVectors * kWidth;
  constexpr acc_t kMinusInfinity = -std::numeric_limits<acc_t>::infinity();
  const int64_t head_dim = problem.head_dim;
  const int64_t value_dim = problem.value_dim;
  const int64_t query_count = std::min(kBlock, problem.query_len - query0);

  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;

  // Scaled, transposed queries; padding lanes stay zero so their scores are finite and unused.
  acc_t* query_t = scratch.query_t.data();
  if (query_count < kBlock) std::fill(query_t, query_t + head_dim * kBlock, acc_t(0));
  const StridedMatrices& query = problem.query;
  const scalar_t* query_rows = static_cast<const scalar_t*>(query.data) +
                               query.batch_offsets[batch_index] + query0 * query.row_stride;
  const acc_t scale = static_cast<acc_t>(problem.scale);
  if (query.col_stride == 1) {
    // Rows of the accumulation type, then ATen's vector transpose: a scalar transpose was ~10% of
    // the time at S=128.
    const acc_t* rows = scratch.staging.data();
    int64_t rows_stride = head_dim;
    if constexpr (kSameType) {
      rows = query_rows;
      rows_stride = query.row_stride;
    } else {
      packRows(query_rows, query.row_stride, 1, query_count, head_dim, scratch.staging.data(),
               head_dim);
    }
    at::vec::transpose_mxn<acc_t>(rows, rows_stride, query_t, kBlock, static_cast<int>(query_count),
                                  static_cast<int>(head_dim));
    for (int64_t d = 0; d < head_dim; ++d)
      for (int v = 0; v < kVectors; ++v) {
        acc_t* lanes = query_t + d * kBlock + v * kWidth;
        (Vec::loadu(lanes) * Vec(scale)).store(lanes);
      }
  } else {
    for (int64_t i = 0; i < query_count; ++i)
      for (int64_t d = 0; d < head_dim; ++d)
        query_t[d * kBlock + i] =
            scale * static_cast<acc_t>(query_rows[i * query.row_stride + d * query.col_stride]);
  }

  acc_t* out_t = scratch.out_t.data();
  acc_t* running_max = scratch.running_max.data();
  acc_t* running_sum = scratch.running_sum.data();
  acc_t* scores_t = scratch.scores_t.data();
  std::fill(out_t, out_t + value_dim * kBlock, acc_t(0));
  std::fill(running_max, running_max + kBlock, kMinusInfinity);
  std::fill(running_sum, running_sum + kBlock, acc_t(0));

  // Causal (top-left aligned, as scaled_dot_product_attention): query i sees keys j <= i, so
  // key blocks past the block's last query are skipped entirely.
  const int64_t key_end =
      problem.causal ? std::min(problem.key_len, query0 + query_count) : problem.key_len;
  const StridedMatrices& key = problem.key;
  const StridedMatrices& value = problem.value;
  const scalar_t* key_base =
      static_cast<const scalar_t*>(key.data) + key.batch_offsets[batch_index];
  const scalar_t* value_base =
      static_cast<const scalar_t*>(value.data) + value.batch_offsets[batch_index];

  for (int64_t key0 = 0; key0 < key_end; key0 += kKeyBlock) {
    const int64_t key_count = std::min(kKeyBlock, key_end - key0);

    // This block's rows of keys or values: read in place when they are of the accumulation
    // type with unit column stride, else packed into `packed`. Returns the rows and their stride.
    auto blockRows = [&](const scalar_t* base, const StridedMatrices& matrix, int64_t cols,
                         std::vector<acc_t>& packed) -> std::pair<const acc_t*, int64_t> {
      const scalar_t* rows = base + key0 * matrix.row_stride;
      if constexpr (kSameType) {
        if (matrix.col_stride == 1) return {rows, matrix.row_stride};
      }
      packRows(rows, matrix.row_stride, matrix.col_stride, key_count, cols, packed.data(), cols);
      return {packed.data(), cols};
    };
    const std::pair<const acc_t*, int64_t> key_rows = blockRows(key_base, key, head_dim, scratch.keys);
    const std::pair<const acc_t*, int64_t> value_rows = blockRows(value_base, value, value_dim, scratch.values);
    const acc_t* keys = key_rows.first;
    const int64_t key_stride = key_rows.second;
    const acc_t* values = value_rows.first;
    const int64_t value_stride = value_rows.second;

    Vec block_max[kVectors];
    for (int v = 0; v < kVectors; ++v) block_max[v] = Vec(kMinusInfinity);
    forRowTiles(key_count, [&](auto rows, int64_t row) {
      scoreTile<acc_t, decltype(rows)::value, kVectors>(keys + row * key_stride, key_stride,
                                                        query_t, kBlock, head_dim,
                                                        scores_t + row * kBlock, kBlock, block_max);
    });
    // Masks change scores after the tiles took their max; the max is then taken again.
    const bool causal_diagonal = problem.causal && key0 + key_count - 1 > query0;
    const bool rescan_max = problem.mask_kind != MaskKind::kNone || problem.has_fill_keep ||
                            causal_diagonal || problem.scores_in_dtype;
    applyMasks(problem, batch_index, query0, query_count, key0, key_count, scores_t, 1, kBlock);
    roundScores(problem, query_count, key_count, scores_t, 1, kBlock);
    if (causal_diagonal) {
      for (int64_t j = 0; j < key_count; ++j) {
        const int64_t first_seen_by = std::min(key0 + j - query0, query_count);
        for (int64_t i = 0; i < first_seen_by; ++i) scores_t[j * kBlock + i] = kMinusInfinity;
      }
    }

    // Online softmax, one vector of queries at a time.
    for (int v = 0; v < kVectors; ++v) {
      const Vec old_max = Vec::loadu(running_max + v * kWidth);
      Vec new_max = at::vec::maximum(old_max, block_max[v]);
      if (rescan_max) {
        // Four independent chains: one chain of dependent max instructions was 15% of the time.
        Vec chain_max[4] = {old_max, old_max, old_max, old_max};
        int64_t j = 0;
        for (; j + 4 <= key_count; j += 4) {
          for (int chain = 0; chain < 4; ++chain)
            chain_max[chain] = at::vec::maximum(
                chain_max[chain], Vec::loadu(scores_t + (j + chain) * kBlock + v * kWidth));
        }
        for (; j < key_count; ++j)
          chain_max[0] =
              at::vec::maximum(chain_max[0], Vec::loadu(scores_t + j * kBlock + v * kWidth));
        new_max = at::vec::maximum(at::vec::maximum(chain_max[0], chain_max[1]),
                                   at::vec::maximum(chain_max[2], chain_max[3]));
      }
      // A query whose every score so far is -inf subtracts 0 instead, so exp gives 0, not NaN.
      const Vec safe_max = Vec::blendv(new_max, Vec(acc_t(0)), new_max == Vec(kMinusInfinity));
      const Vec correction = exponential(old_max - safe_max);
      Vec block_sum(acc_t(0));
      for (int64_t j = 0; j < key_count; ++j) {
        acc_t* scores = scores_t + j * kBlock + v * kWidth;
        const Vec prob = exponential(Vec::loadu(scores) - safe_max);
        prob.store(scores);
        block_sum = block_sum + prob;
      }
      at::vec::fmadd(Vec::loadu(running_sum + v * kWidth), correction, block_sum)
          .store(running_sum + v * kWidth);
      new_max.store(running_max + v * kWidth);
      // Before the first block the accumulator is zero: nothing to rescale.
      if (key0 > 0) {
        for (int64_t c = 0; c < value_dim; ++c) {
          acc_t* out = out_t + c * kBlock + v * kWidth;
          (Vec::loadu(out) * correction).store(out);
        }
      }
    }

    forRowTiles(value_dim, [&](auto rows, int64_t column) {
      valueTile<acc_t, decltype(rows)::value, kVectors>(values + column, value_stride, scores_t,
                                                        kBlock, key_count, out_t + column * kBlock,
                                                        kBlock);
    });
  }

  // Normalize and write [query_count, value_dim]. A query that kept no key has a zero sum; its
  // output is 0, as scaled_dot_product_attention gives in torch 2.11, or NaN, as softmax gives.
  acc_t* inverse_sum = running_max;  // the running max is no longer needed
  const acc_t empty_row =
      problem.empty_rows_nan && problem.key_len > 0 ? std::numeric_limits<acc_t>::quiet_NaN()
                                                    : acc_t(0);
  for (int64_t i = 0; i < kBlock; ++i)
    inverse_sum[i] = running_sum[i] > acc_t(0) ? acc_t(1) / running_sum[i] : empty_row;
  for (int64_t c = 0; c < value_dim; ++c)
    for (int v = 0; v < kVectors; ++v) {
      acc_t* lanes = out_t + c * kBlock + v * kWidth;
      (Vec::loadu(lanes) * Vec::loadu(inverse_sum + v * kWidth)).store(lanes);
    }
  // Rows go out at the output's row stride: [B, H, S, D] results may be stored heads-last, as
  // [B, S, H, D] (kiln::attention's heads_last), which a transpose + reshape then reads for free.
  const int64_t out_stride = problem.output_row_stride > 0 ? problem.output_row_stride : value_dim;
  const int64_t out_base = problem.output_offsets.empty() ? batch_index * problem.query_len * value_dim
                                                          : problem.output_offsets[batch_index];
  scalar_t* output = static_cast<scalar_t*>(problem.output) + out_base + query0 * out_stride;
  if constexpr (kSameType) {
    at::vec::transpose_mxn<acc_t>(out_t, kBlock, output, out_stride, static_cast<int>(value_dim),
                                  static_cast<int>(query_count));
  } else {
    acc_t* rows = scratch.staging.data();
    at::vec::transpose_mxn<acc_t>(out_t, kBlock, rows, value_dim, static_cast<int>(value_dim),
                                  static_cast<int>(query_count));
    for (int64_t row = 0; row < query_count; ++row)
      at::vec::convert(rows + row * value_dim, output + row * out_stride, value_dim);
  }
}

template <typename scalar_t, typename acc_t, int kVectors>
void attentionTyped(const AttentionProblem& problem) {
  constexpr int64_t kBlock = kVectors * Vectorized<acc_t>::size();
  const int64_t query_blocks = (problem.query_len + kBlock - 1) / kBlock;
  at::parallel_for(0, problem.batch * query_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch(problem, kBlock);
    for (int64_t task = begin; task < end; ++task)
      attendQueryBlock<scalar_t, acc_t, kVectors>(problem, task / query_blocks,
                                                  (task % query_blocks) * kBlock, scratch);
  });
}

template <typename scalar_t, typename acc_t>
void attentionTyped(const AttentionProblem& problem) {
  // Short query sequences (decoding) get narrower blocks so fewer padding lanes are computed.
  constexpr int64_t kWidth = Vectorized<acc_t>::size();
  constexpr int kMostVectors = kMaxQueryVectors<acc_t>;
  const int64_t vectors =
      std::min<int64_t>(kMostVectors, (problem.query_len + kWidth - 1) / kWidth);
  switch (vectors) {
    case 1:
      return attentionTyped<scalar_t, acc_t, 1>(problem);
    case 2:
      return attentionTyped<scalar_t, acc_t, std::min(2, kMostVectors)>(problem);
    case 3:
      return attentionTyped<scalar_t, acc_t, std::min(3, kMostVectors)>(problem);
    default:
      return attentionTyped<scalar_t, acc_t, kMostVectors>(problem);
  }
}

}  // namespace

void KILN_CONCAT(attentionKernel_, CPU_CAPABILITY)(const AttentionProblem& problem) {
  if (problem.batch == 0 || problem.query_len == 0) return;
  switch (problem.dtype) {
    case c10::ScalarType::Float:
      return attentionTyped<float, float>(problem);
    case c10::ScalarType::Double:
      return attentionTyped<double, double>(problem);
    case c10::ScalarType::BFloat16:
      return attentionTyped<c10::BFloat16, float>(problem);
    case c10::ScalarType::Half:
      return attentionTyped<c10::Half, float>(problem);
    default:
      TORCH_INTERNAL_ASSERT(false, "kiln::attention: unexpected dtype ", problem.dtype);
  }
}

}  // namespace kiln::cpu
