// kiln::attention(q, k, v, mask, scale, causal): scaled dot-product attention with the inference
// semantics of torch.nn.functional.scaled_dot_product_attention (no dropout). This file checks the
// inputs, broadcasts the batch dims and the mask as views (zero strides, nothing copied) and hands
// the strided operands to the CPU kernel (torch_ops/attention_cpu.h); torch_ops/attention_cuda.cpp
// registers the CUDA kernel over the same checked operands.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <c10/core/GradMode.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "kiln/options.h"
#include "fuser/group_stats.h"
#include "torch_ops/attention_cpu.h"
#include "torch_ops/measured_choice.h"
#include "torch_ops/attention_operands.h"

namespace kiln {
namespace {

bool isAttentionDtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
         dtype == at::kDouble;
}

void checkOperand(const at::Tensor& tensor, const char* name, const at::Tensor& query) {
  TORCH_CHECK(tensor.defined(), "kiln::attention: ", name, " is undefined");
  TORCH_CHECK(tensor.layout() == at::kStrided, "kiln::attention: ", name,
              " must be a strided (dense) tensor, got layout ", tensor.layout());
  TORCH_CHECK(tensor.device() == query.device(), "kiln::attention: ", name,
              " must be on the query's device (", query.device(), "), got ", tensor.device());
  TORCH_CHECK(tensor.dim() >= 2, "kiln::attention: ", name,
              " must have at least 2 dims ([..., seq, head_dim], usually [B, H, S, D]), got ",
              tensor.dim(), " dims with shape ", tensor.sizes());
}

// The flattened batch offsets of a tensor already expanded to [batch_shape..., rows, cols].
std::vector<int64_t> batchOffsets(const at::Tensor& expanded, int64_t batch_rank) {
  int64_t batch = 1;
  for (int64_t d = 0; d < batch_rank; ++d) batch *= expanded.size(d);
  std::vector<int64_t> offsets(batch);
  std::vector<int64_t> index(batch_rank, 0);
  int64_t offset = 0;
  for (int64_t n = 0; n < batch; ++n) {
    offsets[n] = offset;
    // Odometer increment over the batch dims, innermost first.
    for (int64_t d = batch_rank - 1; d >= 0; --d) {
      if (++index[d] < expanded.size(d)) {
        offset += expanded.stride(d);
        break;
      }
      offset -= (expanded.size(d) - 1) * expanded.stride(d);
      index[d] = 0;
    }
  }
  return offsets;
}

cpu::StridedMatrices stridedMatrices(const at::Tensor& expanded, int64_t batch_rank) {
  cpu::StridedMatrices matrices;
  matrices.data = expanded.const_data_ptr();
  matrices.batch_offsets = batchOffsets(expanded, batch_rank);
  matrices.row_stride = expanded.stride(-2);
  matrices.col_stride = expanded.stride(-1);
  return matrices;
}

std::vector<int64_t> scoresShape(const std::vector<int64_t>& batch_shape, int64_t query_len,
                                 int64_t key_len) {
  std::vector<int64_t> shape = batch_shape;
  shape.push_back(query_len);
  shape.push_back(key_len);
  return shape;
}

// The value `fill` takes once stored in a tensor of `dtype`, as masked_fill and where store it.
double roundedTo(double fill, at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return static_cast<float>(static_cast<c10::Half>(static_cast<float>(fill)));
    case at::kBFloat16:
      return static_cast<float>(static_cast<c10::BFloat16>(static_cast<float>(fill)));
    case at::kFloat:
      return static_cast<float>(fill);
    default:
      return fill;
  }
}

cpu::AttentionProblem cpuProblem(const AttentionOperands& operands) {
  const int64_t batch_rank = static_cast<int64_t>(operands.batch_shape.size());
  cpu::AttentionProblem problem;
  problem.dtype = operands.query.scalar_type();
  problem.batch = c10::multiply_integers(operands.batch_shape);
  problem.query_len = operands.query_len;
  problem.key_len = operands.key_len;
  problem.head_dim = operands.head_dim;
  problem.value_dim = operands.value_dim;
  problem.query = stridedMatrices(operands.query, batch_rank);
  problem.key = stridedMatrices(operands.key, batch_rank);
  problem.value = stridedMatrices(operands.value, batch_rank);
  if (operands.mask.defined()) {
    problem.mask_dtype = operands.mask.scalar_type();
    problem.mask_kind =
        problem.mask_dtype == at::kBool ? cpu::MaskKind::kKeep : cpu::MaskKind::kAdditive;
    problem.mask = stridedMatrices(operands.mask, batch_rank);
  }
  if (operands.fill_keep.defined()) {
    problem.has_fill_keep = true;
    problem.fill_keep = stridedMatrices(operands.fill_keep, batch_rank);
    problem.fill = operands.fill;
    problem.fill_adds_mask = operands.fill_adds_mask;
  }
  problem.causal = operands.causal;
  problem.scale = operands.scale;
  problem.empty_rows_nan = operands.empty_rows_nan;
  problem.scores_in_dtype = operands.scores_in_dtype &&
                            (problem.dtype == at::kHalf || problem.dtype == at::kBFloat16);
  problem.output = operands.output.data_ptr();
  problem.output_offsets = batchOffsets(operands.output, batch_rank);
  problem.output_row_stride = operands.output.stride(-2);
  return problem;
}

// heads_last: a [B, H, S, D] result is stored as [B, S, H, D] (the attention pass asks for it when
// the result's only use is transpose(1, 2), whose result is then contiguous). Same sizes, same
// values; other ranks keep the usual layout.
void storeHeadsLast(AttentionOperands& operands, bool heads_last) {
  const at::Tensor& output = operands.output;
  if (!heads_last || output.dim() != 4) return;
  operands.output = at::empty({output.size(0), output.size(2), output.size(1), output.size(3)}, output.options())
                        .permute({0, 2, 1, 3});
}

at::Tensor attentionCpu(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                        const std::optional<at::Tensor>& mask, std::optional<double> scale,
                        bool causal, bool heads_last) {
  auto kiln_kernel = [&](const std::optional<at::Tensor>&) {
    AttentionOperands operands = checkAttention(query, key, value, mask, scale, causal);
    storeHeadsLast(operands, heads_last);
    cpu::attentionForward(cpuProblem(operands));
    return operands.output;
  };
  // In bfloat16 and float16 ATen's own attention (oneDNN's brgemm) may beat kiln's kernel for
  // some shapes (float16, and bfloat16 without AMX, compute in float32 here; a short sequence):
  // measured once per shape class, as the library calls are (torch_ops/measured_choice.h), with
  // kiln's kernel as the reference. float32 and float64 always run kiln's: its result is stored
  // in the layout the consumer reads (heads_last), which the kernels fused after it are compiled
  // for, and a choice that differs between processes would change which kernels a warmed cache
  // must hold (kiln compile warms it for one).
  const bool reduced = query.scalar_type() == at::kBFloat16 || query.scalar_type() == at::kHalf;
  if (!reduced || at::GradMode::is_enabled()) return kiln_kernel(std::nullopt);
  static GroupCounters& counters = groupCounters("kiln::attention on the CPU");
  std::vector<MeasuredWay> ways;
  ways.push_back({"kiln", kiln_kernel});
  ways.push_back({"aten_sdpa", [&](const std::optional<at::Tensor>&) {
    return at::scaled_dot_product_attention(query, key, value, mask, 0.0, causal, scale);
  }});
  std::string shape_class = "attention " + std::string(c10::toString(query.scalar_type()));
  for (const at::Tensor* tensor : {&query, &key, &value}) {
    // The batch rounded up to a power of two; the other sizes as they are.
    std::vector<int64_t> sizes = tensor->sizes().vec();
    if (!sizes.empty()) sizes[0] = powerOfTwoAtLeast(sizes[0]);
    shape_class += " [" + c10::Join(",", sizes) + "]";
  }
  shape_class += mask ? std::string(" mask ") + c10::toString(mask->scalar_type()) : std::string(" no mask");
  shape_class += causal ? " causal" : "";
  return runFastest(shape_class, ways, counters);
}

at::Tensor attentionExplicitCpu(const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                const std::optional<at::Tensor>& keep, double scale, double fill,
                                bool fill_adds_mask, bool heads_last) {
  AttentionOperands operands =
      checkAttentionExplicit(query, key, value, mask, keep, scale, fill, fill_adds_mask);
  storeHeadsLast(operands, heads_last);
  cpu::attentionForward(cpuProblem(operands));
  return operands.output;
}

// Whether a kiln attention kernel runs these inputs on their device.
bool kernelFor(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) {
  if (query.device().is_cpu()) return true;
  return query.is_cuda() && cudaAttentionSupports(query, key, value);
}

bool fitsDtype(double value, at::ScalarType dtype) {
  if (!std::isfinite(value)) return true;
  switch (dtype) {
    case at::kHalf:
      return std::abs(value) <= 65504.0;
    case at::kBFloat16:
    case at::kFloat:
      return std::abs(value) <= std::numeric_limits<float>::max();
    default:
      return true;
  }
}

// kiln::attention_guard: true when the fused attention computes what the original ops would, on
// these very inputs. Every check is on metadata; nothing is read from device memory.
//   sdpa: the original is aten::scaled_dot_product_attention (its mask is bool or additive);
//         otherwise the explicit form, whose `mask` is added and whose `keep` feeds the fill.
bool attentionGuardChecks(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                          const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& keep,
                          double fill, int64_t softmax_dim, std::optional<int64_t> probs_dtype,
                          c10::ArrayRef<double> dropout_p, const c10::List<bool>& dropout_train,
                          bool sdpa) {
  const auto dense = [](const at::Tensor& t) { return t.defined() && t.layout() == at::kStrided; };
  if (!dense(query) || !dense(key) || !dense(value)) return false;
  const at::ScalarType dtype = query.scalar_type();
  if (!isAttentionDtype(dtype) || key.scalar_type() != dtype || value.scalar_type() != dtype)
    return false;
  // Same rank, same batch dims: no broadcasting between q, k and v to reason about.
  const int64_t rank = query.dim();
  if (rank < 2 || key.dim() != rank || value.dim() != rank) return false;
  if (key.device() != query.device() || value.device() != query.device() ||
      !kernelFor(query, key, value))
    return false;
  // On CUDA, scaled_dot_product_attention's own backends (FlashAttention-2, cuDNN) ran 2.4 to 4.3
  // times faster than kiln's kernel on an H200 (docs/gpu-results.md): the original op keeps it.
  if (sdpa && query.is_cuda()) return false;
  for (int64_t d = 0; d < rank - 2; ++d)
    if (key.size(d) != query.size(d) || value.size(d) != query.size(d)) return false;
  if (key.size(-1) != query.size(-1) || value.size(-2) != key.size(-2)) return false;
  std::vector<int64_t> scores_shape(query.sizes().begin(), query.sizes().end());
  scores_shape.back() = key.size(-2);
  const auto fits = [&](const at::Tensor& t) {
    return dense(t) && t.device() == query.device() &&
           at::is_expandable_to(t.sizes(), scores_shape);
  };
  const bool has_mask = mask.has_value() && mask->defined();
  if (has_mask) {
    if (!fits(*mask)) return false;
    const at::ScalarType mask_dtype = mask->scalar_type();
    if (mask_dtype != dtype && !(sdpa && mask_dtype == at::kBool)) return false;
  }
  const bool has_keep = keep.has_value() && keep->defined();
  if (has_keep && (sdpa || !fits(*keep) || keep->scalar_type() != at::kBool)) return false;
  if (has_keep && !fitsDtype(fill, dtype)) return false;  // eager raises or overflows; let it
  if (softmax_dim != -1 && softmax_dim != rank - 1) return false;
  if (probs_dtype.has_value() && *probs_dtype != static_cast<int64_t>(dtype)) return false;
  if (dropout_p.size() != dropout_train.size()) return false;
  for (size_t i = 0; i < dropout_p.size(); ++i)
    if (dropout_train[i] && dropout_p[i] != 0.0) return false;
  // kiln's kernels have no backward: anything autograd would track stays unfused.
  if (at::GradMode::is_enabled()) {
    for (const at::Tensor* t : {&query, &key, &value})
      if (t->requires_grad()) return false;
    if (has_mask && mask->requires_grad()) return false;
  }
  return true;
}

// The guard itself: KILN_DISABLE=1 and any failure of a check send the call to the original ops.
bool attentionGuard(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& keep,
                    double fill, int64_t softmax_dim, std::optional<int64_t> probs_dtype,
                    c10::ArrayRef<double> dropout_p, const c10::List<bool>& dropout_train,
                    bool sdpa) {
  if (Options::global().disabled) return false;
  try {
    return attentionGuardChecks(query, key, value, mask, keep, fill, softmax_dim, probs_dtype, dropout_p,
                                dropout_train, sdpa);
  } catch (const std::exception& error) {
    static std::atomic<bool> warned{false};
    if (!warned.exchange(true)) {
      log(LogLevel::kWarning, std::string("an attention guard failed; that call runs unfused: ") + error.what());
    }
    return false;
  }
}

}  // namespace

AttentionOperands checkAttention(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const std::optional<at::Tensor>& mask,
                                 std::optional<double> scale, bool causal) {
  TORCH_CHECK(query.defined(), "kiln::attention: query is undefined");
  checkOperand(query, "query", query);
  checkOperand(key, "key", query);
  checkOperand(value, "value", query);
  TORCH_CHECK(isAttentionDtype(query.scalar_type()),
              "kiln::attention: query must be float32, float64, float16 or bfloat16, got ",
              query.scalar_type());
  TORCH_CHECK(
      key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
      "kiln::attention: query, key and value must have the same dtype, got query ",
      query.scalar_type(), ", key ", key.scalar_type(), ", value ", value.scalar_type());
  AttentionOperands operands;
  operands.query_len = query.size(-2);
  operands.key_len = key.size(-2);
  operands.head_dim = query.size(-1);
  operands.value_dim = value.size(-1);
  TORCH_CHECK(key.size(-1) == operands.head_dim, "kiln::attention: key's last dim (head_dim) ",
              "must equal query's, got query ", query.sizes(), " and key ", key.sizes());
  TORCH_CHECK(value.size(-2) == operands.key_len, "kiln::attention: value's sequence dim (-2) ",
              "must equal key's, got key ", key.sizes(), " and value ", value.sizes());

  // Leading dims broadcast as in a batched matmul.
  const auto batchDims = [](const at::Tensor& t) { return t.sizes().slice(0, t.dim() - 2); };
  try {
    operands.batch_shape =
        at::infer_size(at::infer_size(batchDims(query), batchDims(key)), batchDims(value));
  } catch (const c10::Error&) {
    TORCH_CHECK(false, "kiln::attention: the batch dims (all but the last two) of query, key ",
                "and value must broadcast, got query ", query.sizes(), ", key ", key.sizes(),
                ", value ", value.sizes());
  }
  const auto& batch_shape = operands.batch_shape;
  operands.query = query.expand(scoresShape(batch_shape, operands.query_len, operands.head_dim));
  operands.key = key.expand(scoresShape(batch_shape, operands.key_len, operands.head_dim));
  operands.value = value.expand(scoresShape(batch_shape, operands.key_len, operands.value_dim));

  if (mask.has_value() && mask->defined()) {
    checkOperand(*mask, "mask", query);
    const at::ScalarType mask_dtype = mask->scalar_type();
    TORCH_CHECK(
        mask_dtype == at::kBool || mask_dtype == at::kFloat || mask_dtype == query.scalar_type(),
        "kiln::attention: mask must be bool (true keeps a score), float32 or the query's "
        "dtype (",
        query.scalar_type(), "; added to the scores), got ", mask_dtype);
    const std::vector<int64_t> scores_shape =
        scoresShape(batch_shape, operands.query_len, operands.key_len);
    TORCH_CHECK(at::is_expandable_to(mask->sizes(), scores_shape), "kiln::attention: mask of ",
                "shape ", mask->sizes(), " does not broadcast to the scores' shape ",
                c10::IntArrayRef(scores_shape), " ([..., query_len, key_len])");
    operands.mask = mask->expand(scores_shape);
  }
  operands.causal = causal;
  operands.scale =
      scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(operands.head_dim));
  operands.output = at::empty(scoresShape(batch_shape, operands.query_len, operands.value_dim),
                              query.options());
  return operands;
}

AttentionOperands checkAttentionExplicit(const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value,
                                         const std::optional<at::Tensor>& mask,
                                         const std::optional<at::Tensor>& keep, double scale,
                                         double fill, bool fill_adds_mask) {
  const bool has_mask = mask.has_value() && mask->defined();
  TORCH_CHECK(!has_mask || at::isFloatingType(mask->scalar_type()),
              "kiln::attention_explicit: mask is added to the scores and must be floating point, "
              "got ",
              mask->scalar_type());
  TORCH_CHECK(!fill_adds_mask || has_mask,
              "kiln::attention_explicit: fill_adds_mask needs a mask");
  AttentionOperands operands = checkAttention(query, key, value, mask, scale, /*causal=*/false);
  operands.empty_rows_nan = true;
  operands.scores_in_dtype = true;
  if (keep.has_value() && keep->defined()) {
    checkOperand(*keep, "keep", query);
    TORCH_CHECK(keep->scalar_type() == at::kBool,
                "kiln::attention_explicit: keep must be bool, got ", keep->scalar_type());
    const std::vector<int64_t> scores_shape =
        scoresShape(operands.batch_shape, operands.query_len, operands.key_len);
    TORCH_CHECK(at::is_expandable_to(keep->sizes(), scores_shape),
                "kiln::attention_explicit: keep of shape ", keep->sizes(),
                " does not broadcast to the scores' shape ", c10::IntArrayRef(scores_shape));
    operands.fill_keep = keep->expand(scores_shape);
    operands.fill = roundedTo(fill, query.scalar_type());
    operands.fill_adds_mask = fill_adds_mask;
  }
  return operands;
}

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float? scale=None, "
      "bool causal=False, bool heads_last=False) -> Tensor");
  // What the fuser puts in place of the explicit matmul/softmax form (see attentionExplicitCpu).
  m.def(
      "attention_explicit(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? keep, float scale, "
      "float fill, bool fill_adds_mask, bool heads_last=False) -> Tensor");
  // Reads metadata only, so one kernel serves every device.
  m.def(
      "attention_guard(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? keep, float fill, "
      "int softmax_dim, int? probs_dtype, float[] dropout_p, bool[] dropout_train, bool sdpa) "
      "-> bool",
      &attentionGuard);
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("attention", &attentionCpu);
  m.impl("attention_explicit", &attentionExplicitCpu);
}

}  // namespace kiln
