// kiln::linear and kiln::conv2d (fuser/library_calls.h): a GEMM or convolution with its epilogue,
// run the fastest of the ways this machine offers, by measurement:
//
//   linear:  "aten"            at::linear over the weight as given, then the epilogue's ATen ops
//            "aten_transposed" addmm over the weight transposed once ([K, N], as torch's
//                              FrozenLinearTranspose lays it out), then the epilogue
//            "onednn"          mkldnn::_linear_pointwise on a weight prepacked once, the
//                              activation or the add fused as a post-op
//            "aten_pieces"     sibling linears joined into one call (fuser/linear_siblings.cpp) run
//                              as their own GEMMs again, each into its columns of the result
//            "onednn_m1"       the same on the weight prepacked for a one-row input: oneDNN then
//                              picks another blocked layout, on AMX faster for some bf16 shapes
//                              even with a thousand rows (BERT's 768 -> 768 and 3072 -> 768)
//            "onednn_rows"     the same on the weight prepacked for the shape class's rows (a
//                              power of two): the layout torch's oneDNN Graph fuser gets, 7-14%
//                              faster for ViT's 197 tokens (384 -> 1536 + gelu: 0.77 against
//                              0.90 ms) and much slower for a dozen rows
//            "cublaslt"        CUDA tensors: one cublasLtMatmul, bias and relu / tanh-GELU as its
//                              epilogue, a residual as its C (cublaslt.h); not measured, taken
//                              wherever cuBLASLt can run the call
//   conv2d:  "aten"            at::conv2d, then the epilogue
//            "onednn"          mkldnn::_convolution_pointwise on a prepacked weight, add and
//                              activation fused; its outputs are channels-last
//            "onednn_channels_last"  the same on the input made channels-last first
//            "aten_patches"    a patch embedding (kernel == stride, no padding, no dilation, one
//                              group; ViT's, Swin's and ConvNeXt's stems and downsamplers): the
//                              input's patches copied into rows, one addmm over the weight
//                              flattened and transposed once, the epilogue; channels-last result
//
// The first call of a shape class (dtype, rows rounded up to a power of two, the weight's shape,
// the epilogue, the layouts) times every way that can run it, checks each result against ATen's,
// and remembers the fastest (torch_ops/measured_choice.h); later calls, in this process or
// another on the same machine, run it directly. "aten" is the fallback of every call: a library
// path that cannot take the inputs (a CUDA tensor, a dtype oneDNN lacks, autograd), or that fails
// or disagrees, is never chosen, and a failure is logged once.
//
// Registered as CompositeImplicitAutograd: when autograd needs the result, the ATen ops run above
// the autograd layer and record the graph as eager would.
#include <ATen/ATen.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <unordered_map>

#include "fuser/group_stats.h"
#include "fuser/library_calls.h"
#include "kiln/options.h"
#include "codegen/fault_injection.h"
#include "torch_ops/cublaslt.h"
#include "torch_ops/measured_choice.h"
#include "torch_ops/onednn_dtypes.h"

namespace kiln {
namespace {

constexpr const char* kAten = "aten";
constexpr const char* kAtenTransposed = "aten_transposed";
constexpr const char* kOneDnn = "onednn";
constexpr const char* kOneDnnM1 = "onednn_m1";
constexpr const char* kOneDnnRows = "onednn_rows";
constexpr const char* kAtenPieces = "aten_pieces";
constexpr const char* kOneDnnChannelsLast = "onednn_channels_last";
constexpr const char* kAtenPatches = "aten_patches";
constexpr const char* kCublasLt = "cublaslt";
// What the ways make of a linear's weight (preparedWeight's `what`).
constexpr const char* kPreparedTransposed = "transposed";
constexpr const char* kPreparedOneDnn = "onednn linear";
constexpr const char* kPreparedOneDnnM1 = "onednn linear, one row";
constexpr const char* kPreparedPatches = "patches";

// ---- The epilogue in ATen ops ----------------------------------------------------------------

at::Tensor activate(at::Tensor y, Activation activation, bool in_place) {
  switch (activation) {
    case Activation::kNone: return y;
    case Activation::kRelu: return in_place ? y.relu_() : at::relu(y);
    case Activation::kGelu: return in_place ? at::gelu_(y, "none") : at::gelu(y, "none");
    case Activation::kGeluTanh: return in_place ? at::gelu_(y, "tanh") : at::gelu(y, "tanh");
    case Activation::kTanh: return in_place ? y.tanh_() : at::tanh(y);
    case Activation::kSigmoid: return in_place ? y.sigmoid_() : at::sigmoid(y);
    case Activation::kSilu: return in_place ? at::silu_(y) : at::silu(y);
    case Activation::kHardswish: return in_place ? at::hardswish_(y) : at::hardswish(y);
  }
  return y;
}

// Whether this call may write the sum into `other` (the fuser proved no one reads it afterwards):
// the values are the same as the add's only when shapes and dtypes already agree.
bool writesIntoOther(const Epilogue& epilogue, const std::optional<at::Tensor>& other, at::IntArrayRef out_sizes,
                     at::ScalarType dtype, const at::Tensor& input, bool grad) {
  // Not while autograd records at all: an earlier op may have saved `other` for its backward.
  return epilogue.into_other && !grad && !at::GradMode::is_enabled() && other && other->sizes() == out_sizes &&
         other->scalar_type() == dtype &&
         other->layout() == at::kStrided && other->is_non_overlapping_and_dense() && !other->is_alias_of(input);
}

// `y` is the fresh result of the GEMM or convolution; `grad` says autograd is recording;
// `into_other`: writesIntoOther() said yes.
at::Tensor atenEpilogue(at::Tensor y, const Epilogue& epilogue, const std::optional<at::Tensor>& other, bool grad,
                        bool into_other = false) {
  if (epilogue.add != Epilogue::Add::kNone && into_other) return activate(other->add_(y), epilogue.activation, true);
  if (epilogue.add == Epilogue::Add::kOutOfPlace) y = at::add(y, *other);
  if (epilogue.add == Epilogue::Add::kInPlace) y = grad ? at::add(y, *other).to(y.scalar_type()) : y.add_(*other);
  return activate(y, epilogue.activation, !grad);
}

// ---- oneDNN through ATen's mkldnn operators --------------------------------------------------

// One of ATen's mkldnn operators, looked up in the dispatcher on its first call only (the calls
// are on every GEMM's path). A failed lookup throws, is caught with the way's other failures and
// is tried again on the next call.
class MkldnnOp {
 public:
  MkldnnOp(const char* name, const char* overload) : name_(name), overload_(overload) {}
  c10::IValue call(torch::jit::Stack stack) const {
    std::call_once(found_, [this] { handle_ = c10::Dispatcher::singleton().findSchemaOrThrow(name_, overload_); });
    handle_->callBoxed(&stack);
    return stack.front();
  }

 private:
  const char* name_;
  const char* overload_;
  mutable std::once_flag found_;
  mutable std::optional<c10::OperatorHandle> handle_;
};

const MkldnnOp kReorderLinearWeight("mkldnn::_reorder_linear_weight", "");
const MkldnnOp kLinearPointwise("mkldnn::_linear_pointwise", "");
const MkldnnOp kLinearPointwiseBinary("mkldnn::_linear_pointwise", "binary");
const MkldnnOp kReorderConvolutionWeight("mkldnn::_reorder_convolution_weight", "");
const MkldnnOp kConvolutionPointwise("mkldnn::_convolution_pointwise", "");
const MkldnnOp kConvolutionPointwiseBinary("mkldnn::_convolution_pointwise", "binary");
const MkldnnOp kConvolutionPointwiseBinaryInPlace("mkldnn::_convolution_pointwise_", "binary");

// oneDNN's post-op name and algorithm for an activation.
std::pair<std::string, std::optional<std::string>> onednnActivation(Activation activation) {
  switch (activation) {
    case Activation::kNone: return {"none", std::nullopt};
    case Activation::kGelu: return {"gelu", "none"};
    case Activation::kGeluTanh: return {"gelu", "tanh"};
    case Activation::kSilu: return {"swish", std::nullopt};
    default: return {activationName(activation), std::nullopt};
  }
}

c10::IValue optionalString(const std::optional<std::string>& text) {
  return text ? c10::IValue(*text) : c10::IValue();
}

// The add fuses as oneDNN's binary post-op when it changes neither the shape nor the dtype.
bool addFuses(const Epilogue& epilogue, const std::optional<at::Tensor>& other, at::IntArrayRef out_sizes,
              at::ScalarType dtype) {
  if (epilogue.add == Epilogue::Add::kNone) return true;
  return other && other->sizes() == out_sizes && other->scalar_type() == dtype && other->device().is_cpu() &&
         other->layout() == at::kStrided && other->is_contiguous(other->suggest_memory_format());
}

bool plainCpuTensor(const at::Tensor& tensor) {
  return tensor.device().is_cpu() && tensor.layout() == at::kStrided && !tensor.is_quantized() &&
         !tensor.is_conj() && !tensor.is_neg();
}

bool gradRecorded(std::initializer_list<const at::Tensor*> tensors) {
  if (!at::GradMode::is_enabled()) return false;
  for (const at::Tensor* tensor : tensors) {
    if (tensor != nullptr && tensor->defined() && tensor->requires_grad()) return true;
  }
  return false;
}

// ---- Measuring -------------------------------------------------------------------------------

std::string layoutName(const at::Tensor& tensor) {
  if (tensor.is_contiguous()) return "contiguous";
  if (tensor.dim() == 4 && tensor.is_contiguous(at::MemoryFormat::ChannelsLast)) return "channels_last";
  return "strided";
}

// The bytes the call moves (its operands read once, its result written once) and what the
// unfused ops moved besides: each epilogue op read and wrote the result again.
at::Tensor counted(at::Tensor result, GroupCounters& counters, const Epilogue& epilogue,
                   std::initializer_list<const at::Tensor*> operands) {
  int64_t bytes = static_cast<int64_t>(result.nbytes());
  for (const at::Tensor* operand : operands) {
    if (operand != nullptr && operand->defined()) bytes += static_cast<int64_t>(operand->nbytes());
  }
  const int64_t epilogue_ops = (epilogue.add != Epilogue::Add::kNone) + (epilogue.activation != Activation::kNone);
  counters.bytes_fused = bytes;
  counters.bytes_unfused = bytes + epilogue_ops * 2 * static_cast<int64_t>(result.nbytes());
  return result;
}

// ---- kiln::linear ----------------------------------------------------------------------------

Epilogue epilogueFrom(const std::string& text) {
  std::optional<Epilogue> epilogue = Epilogue::parse(text);
  TORCH_CHECK(epilogue, "kiln: unknown epilogue '", text, "' (made by a newer kiln?)");
  return *epilogue;
}

// One kiln::linear call: its operands and what its ways need of them.
struct LinearCall {
  const at::Tensor& input;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const Epilogue& epilogue;
  int64_t k = 0, n = 0, rows = 0;
  std::vector<int64_t> out_sizes;
  bool fuse_add = false;  // the add fuses as oneDNN's binary post-op
  // The rows of this call's shape class: what onednn_rows prepacks the weight for (one copy per
  // class, whatever the rows of the call that makes it).
  int64_t class_rows = 0;
  std::string prepared_for_rows;

  // `weight_` is 2-D [N, K] and the input's last dim is K.
  LinearCall(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias_,
             const Epilogue& epilogue_)
      : input(input_), weight(weight_), bias(bias_), epilogue(epilogue_), k(weight_.size(1)), n(weight_.size(0)),
        rows(k == 0 ? 0 : input_.numel() / k), out_sizes(input_.sizes().vec()), class_rows(powerOfTwoAtLeast(rows)) {
    out_sizes.back() = n;
  }

  // mkldnn::_linear_pointwise on the weight prepacked for `rows_hint` rows (none: oneDNN's default).
  at::Tensor oneDnn(const char* what, const c10::IValue& rows_hint, const std::optional<at::Tensor>& operand) const {
    at::Tensor packed = preparedWeight(weight, what, [&] { return kReorderLinearWeight.call({weight, rows_hint}).toTensor(); });
    const c10::IValue b = bias ? c10::IValue(*bias) : c10::IValue();
    if (epilogue.add != Epilogue::Add::kNone && fuse_add) {
      at::Tensor y = kLinearPointwiseBinary.call({input, *operand, packed, b, "add"}).toTensor();
      return activate(y, epilogue.activation, true);
    }
    const Activation fused = epilogue.add == Epilogue::Add::kNone ? epilogue.activation : Activation::kNone;
    const auto [attr, algorithm] = onednnActivation(fused);
    at::Tensor y =
        kLinearPointwise.call({input, packed, b, attr, c10::List<std::optional<at::Scalar>>(), optionalString(algorithm)})
            .toTensor();
    return epilogue.add == Epilogue::Add::kNone ? y : atenEpilogue(y, epilogue, operand, false);
  }

  // Runs the way named `way` (one of the constants above, compared by address).
  at::Tensor run(const char* way, const std::optional<at::Tensor>& operand) const {
    if (way == kAtenTransposed) {
      at::Tensor transposed = preparedWeight(weight, kPreparedTransposed, [&] { return weight.t().contiguous(); });
      // A 2-D input is its own rows (no view made: a call of a small model costs microseconds).
      const bool flat_already = input.dim() == 2;
      at::Tensor flat = flat_already ? input : input.reshape({rows, k});
      at::Tensor y = bias ? at::addmm(*bias, flat, transposed) : at::mm(flat, transposed);
      return atenEpilogue(flat_already ? y : y.view(out_sizes), epilogue, operand, false);
    }
    if (way == kAtenPieces) {
      at::Tensor flat = input.reshape({rows, k});
      at::Tensor out = at::empty({rows, n}, input.options());
      int64_t start = 0;
      for (int64_t width : epilogue.pieces) {
        at::Tensor columns = out.narrow(1, start, width);
        at::Tensor piece = weight.narrow(0, start, width).t();
        if (bias) {
          at::addmm_out(columns, bias->narrow(0, start, width), flat, piece);
        } else {
          at::mm_out(columns, flat, piece);
        }
        start += width;
      }
      return activate(out.view(out_sizes), epilogue.activation, true);
    }
    if (way == kOneDnn) return oneDnn(kPreparedOneDnn, c10::IValue(), operand);
    if (way == kOneDnnM1) return oneDnn(kPreparedOneDnnM1, c10::IValue(int64_t{1}), operand);
    if (way == kOneDnnRows) return oneDnn(prepared_for_rows.c_str(), c10::IValue(class_rows), operand);
    TORCH_CHECK(false, "kiln::linear: no way named ", way);
  }
};

// ---- Settled call sites ----------------------------------------------------------------------

// A model calls each GEMM and convolution with the same shapes call after call. Once a call's
// shape class has a settled choice, its call site (the weight) keeps the call's signature, parsed
// epilogue and choice: the next call with that signature runs the chosen way without building the
// ways and the key or looking the choice up (2.5-2.9 µs a call before, beside the 5 µs of a
// 32 x 64 -> 64 GEMM: `LinearCall` in bench/library_bench.cpp).
struct SignatureOf {
  bool defined = false;
  at::ScalarType dtype = at::kFloat;
  c10::Device device = c10::kCPU;
  std::vector<int64_t> sizes, strides;

  explicit SignatureOf(const at::Tensor* tensor) {
    if (tensor == nullptr || !tensor->defined()) return;
    defined = true;
    dtype = tensor->scalar_type();
    device = tensor->device();
    sizes = tensor->sizes().vec();
    strides = tensor->strides().vec();
  }
  bool operator==(const SignatureOf& other) const {
    return defined == other.defined && dtype == other.dtype && device == other.device && sizes == other.sizes &&
           strides == other.strides;
  }
  bool matches(const at::Tensor* tensor) const {
    if (tensor == nullptr || !tensor->defined()) return !defined;
    return defined && tensor->scalar_type() == dtype && tensor->device() == device && tensor->sizes() == sizes &&
           tensor->strides() == strides;
  }
};

const at::Tensor* optionalTensor(const std::optional<at::Tensor>& tensor) { return tensor ? &*tensor : nullptr; }

// One call's operands as a settled signature reads them.
struct CallOperands {
  const at::Tensor& input;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const std::optional<at::Tensor>& other;
  const std::string& epilogue_text;
  std::vector<int64_t> params;  // conv2d: stride, padding, dilation, groups, and whether it writes into other
};

struct SettledCall {
  std::string epilogue_text;
  Epilogue epilogue;
  SignatureOf input, weight, bias, other;
  std::vector<int64_t> params;
  std::string prepared;  // what the chosen way's prepared weight is keyed by, where it depends on the call
  const char* choice;    // one of the way constants
  uint64_t generation;   // choicesGeneration() when it settled
  bool writes_other;     // conv2d: the sum went into `other`

  SettledCall(const CallOperands& call, Epilogue epilogue_, std::string prepared_, const char* choice_,
              uint64_t generation_, bool writes_other_)
      : epilogue_text(call.epilogue_text), epilogue(std::move(epilogue_)), input(&call.input), weight(&call.weight),
        bias(optionalTensor(call.bias)), other(optionalTensor(call.other)), params(call.params),
        prepared(std::move(prepared_)), choice(choice_), generation(generation_), writes_other(writes_other_) {}

  bool sameSignature(const CallOperands& call) const {
    return call.epilogue_text == epilogue_text && call.params == params && input.matches(&call.input) &&
           weight.matches(&call.weight) && bias.matches(optionalTensor(call.bias)) &&
           other.matches(optionalTensor(call.other));
  }
  bool sameSignature(const SettledCall& settled) const {
    return settled.epilogue_text == epilogue_text && settled.params == params && settled.input == input &&
           settled.weight == weight && settled.bias == bias && settled.other == other;
  }
};

// A call site: its counters and the signatures it settled on (the latest first, a few: a weight
// a model shares between calls of different shapes keeps each). The weak reference keeps the
// weight's address from going to another weight while the entry lives; entries of freed weights
// go when a site is added.
struct CallSite {
  c10::weak_intrusive_ptr<c10::TensorImpl> weight;
  GroupCounters* counters;
  std::vector<std::shared_ptr<const SettledCall>> settled;
};
constexpr size_t kSettledPerSite = 4;

std::mutex sites_mutex;
std::unordered_map<const c10::TensorImpl*, CallSite>& callSites() {
  static auto* sites = new std::unordered_map<const c10::TensorImpl*, CallSite>();
  return *sites;
}

// Plain CPU tensors only take the fast path: what the signature does not say (conjugate and
// negative bits, quantization) sends a call to the measured path.
bool fastPathTakes(const CallOperands& call) {
  return plainCpuTensor(call.input) && plainCpuTensor(call.weight) && (!call.bias || plainCpuTensor(*call.bias)) &&
         (!call.other || plainCpuTensor(*call.other));
}

// The site of the call's weight (made on its first call): its counters and, for a call with a
// settled signature (and no choice forced, no autograd), what it settled on.
std::pair<GroupCounters*, std::shared_ptr<const SettledCall>> callSite(const CallOperands& call, bool grad) {
  const c10::TensorImpl* impl = call.weight.unsafeGetTensorImpl();
  const bool fast = !grad && !choiceForced() && fastPathTakes(call);
  {
    std::lock_guard<std::mutex> lock(sites_mutex);
    auto found = callSites().find(impl);
    if (found != callSites().end() && !found->second.weight.expired()) {
      if (fast) {
        const uint64_t generation = choicesGeneration();
        for (const std::shared_ptr<const SettledCall>& settled : found->second.settled) {
          if (settled->generation == generation && settled->sameSignature(call)) return {found->second.counters, settled};
        }
      }
      return {found->second.counters, nullptr};
    }
  }
  GroupCounters* counters = &libraryCounters(impl);
  std::lock_guard<std::mutex> lock(sites_mutex);
  auto& sites = callSites();
  for (auto it = sites.begin(); it != sites.end();) it = it->second.weight.expired() ? sites.erase(it) : std::next(it);
  sites.insert_or_assign(impl, CallSite{c10::weak_intrusive_ptr<c10::TensorImpl>(call.weight.getIntrusivePtr()), counters, {}});
  return {counters, nullptr};
}

void settle(const at::Tensor& weight, std::shared_ptr<const SettledCall> settled) {
  std::lock_guard<std::mutex> lock(sites_mutex);
  auto found = callSites().find(weight.unsafeGetTensorImpl());
  if (found == callSites().end() || found->second.weight.expired()) return;
  auto& list = found->second.settled;
  list.erase(std::remove_if(list.begin(), list.end(),
                            [&](const std::shared_ptr<const SettledCall>& entry) {
                              return entry->generation != settled->generation || entry->sameSignature(*settled);
                            }),
             list.end());
  list.insert(list.begin(), std::move(settled));
  if (list.size() > kSettledPerSite) list.resize(kSettledPerSite);
}

// After the measured path: the settled choice (not one forced for a test) serves the next calls
// with this signature, if it is one of `candidates`.
void settleChosen(const CallOperands& call, const std::string& key, const std::vector<MeasuredWay>& candidates,
                  const Epilogue& epilogue, const std::string& prepared, uint64_t generation, bool writes_other = false) {
  if (choiceForced() || !fastPathTakes(call)) return;
  std::optional<std::string> chosen = settledChoice(key);
  if (!chosen) return;
  for (const MeasuredWay& candidate : candidates) {
    if (*chosen == candidate.name) {
      settle(call.weight, std::make_shared<SettledCall>(call, epilogue, prepared, candidate.name, generation, writes_other));
    }
  }
}

// Runs the settled way; a failure (logged once) runs ATen's ops, and this signature runs them
// from then on, as the measured path does.
template <typename Run, typename RunAten>
at::Tensor runSettled(const SettledCall& settled, const at::Tensor& weight, GroupCounters& counters, const Run& run,
                      const RunAten& run_aten) {
  const auto start = std::chrono::steady_clock::now();
  std::optional<at::Tensor> y;
  const char* ran = kAten;
  if (settled.choice != kAten) {
    try {
      failIfInjected(FaultStage::kLibrary);
      y = run(settled.choice);
      ran = settled.choice;
    } catch (const std::exception& error) {
      static std::once_flag logged;
      std::call_once(logged, [&] {
        log(LogLevel::kWarning, std::string(settled.choice) + " failed for a library call, running ATen's ops: " +
                                    errorLine(error.what()));
      });
      auto aten = std::make_shared<SettledCall>(settled);
      aten->choice = kAten;
      settle(weight, std::move(aten));
    }
  }
  if (!y) y = run_aten();
  counters.calls++;
  counters.timed_calls++;
  counters.timed_ns +=
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
  counters.choice = ran;
  return *y;
}

at::Tensor linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& other, const std::string& epilogue_text) {
  const bool grad = gradRecorded({&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
  const CallOperands operands{input, weight, bias, other, epilogue_text, {}};
  auto [site_counters, settled] = callSite(operands, grad);
  GroupCounters& counters = *site_counters;
  // The fast path: this site's settled choice, for a call with its signature.
  if (settled) {
    LinearCall call(input, weight, bias, settled->epilogue);
    // Only the oneDNN ways read it, and a oneDNN choice settled on operands oneDNN takes.
    call.fuse_add = addFuses(settled->epilogue, other, call.out_sizes, input.scalar_type());
    call.prepared_for_rows = settled->prepared;
    at::Tensor y = runSettled(
        *settled, weight, counters, [&](const char* way) { return call.run(way, other); },
        [&] { return atenEpilogue(at::linear(input, weight, bias), settled->epilogue, other, false); });
    return counted(y, counters, settled->epilogue, {&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
  }
  const Epilogue epilogue = epilogueFrom(epilogue_text);
  if (!epilogue.pieces.empty()) {
    const int64_t rows = std::accumulate(epilogue.pieces.begin(), epilogue.pieces.end(), int64_t{0});
    TORCH_CHECK(weight.dim() == 2 && rows == weight.size(0), "kiln::linear: the pieces of '", epilogue_text,
                "' add up to ", rows, " rows, the weight has ", weight.sizes());
  }
  std::vector<MeasuredWay> candidates;
  candidates.push_back({kAten, [&](const std::optional<at::Tensor>& operand) {
    return atenEpilogue(at::linear(input, weight, bias), epilogue, operand, grad);
  }});
  const bool two_dim_weight = weight.dim() == 2 && input.dim() >= 2 && input.size(-1) == weight.size(1);
  if (grad || !two_dim_weight) return runFastest("", candidates, counters, other);
  LinearCall call(input, weight, bias, epilogue);
  const bool same_kind = !bias || (bias->dim() == 1 && bias->size(0) == call.n && bias->scalar_type() == input.scalar_type() &&
                                   bias->device() == input.device());
  // Measuring times the ways on the host clock: only CPU calls are measured (a CUDA call returns
  // before its kernel ran). On CUDA, cuBLASLt runs the call as one matmul with its epilogue where
  // it can take it (cublaslt.h), ATen's ops where it cannot or fails.
  if (input.is_cuda() && forcedChoice() != kAten && cublasLtRefusal(input, weight, bias, other, epilogue).empty()) {
    try {
      failIfInjected(FaultStage::kLibrary);
      at::Tensor y = cublasLtLinear(input, weight, bias, other, epilogue);
      counters.calls++;
      counters.choice = kCublasLt;
      return counted(y, counters, epilogue, {&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
    } catch (const std::exception& error) {
      static std::once_flag logged;
      std::call_once(logged, [&] { log(LogLevel::kWarning, std::string("cuBLASLt failed, running ATen's ops: ") + error.what()); });
    }
  }
  if (call.rows == 0 || !same_kind || weight.scalar_type() != input.scalar_type() || weight.device() != input.device() ||
      !at::isFloatingType(input.scalar_type()) || !input.device().is_cpu()) {
    return runFastest("", candidates, counters, other);
  }
  auto way = [&call](const char* name, const char* keeps = nullptr) {
    return MeasuredWay{name, [&call, name](const std::optional<at::Tensor>& operand) { return call.run(name, operand); }, keeps};
  };
  candidates.push_back(way(kAtenTransposed, kPreparedTransposed));
  if (epilogue.pieces.size() > 1 && epilogue.add == Epilogue::Add::kNone) candidates.push_back(way(kAtenPieces));
  const bool onednn = plainCpuTensor(input) && plainCpuTensor(weight) && onednnTakesDtype(input.scalar_type()) &&
                      (!bias || plainCpuTensor(*bias));
  call.fuse_add = onednn && addFuses(epilogue, other, call.out_sizes, input.scalar_type());
  call.prepared_for_rows = "onednn linear, " + std::to_string(call.class_rows) + " rows";
  if (onednn) {
    candidates.push_back(way(kOneDnn, kPreparedOneDnn));
    candidates.push_back(way(kOneDnnM1, kPreparedOneDnnM1));
    candidates.push_back(way(kOneDnnRows, call.prepared_for_rows.c_str()));
  }
  const std::string key = "linear " + std::string(c10::toString(input.scalar_type())) + " rows<=" +
                          std::to_string(call.class_rows) + " K=" + std::to_string(call.k) + " N=" +
                          std::to_string(call.n) + (bias ? " bias" : "") + " epilogue=" + epilogue_text + " input " +
                          layoutName(input) + (other ? " other " + layoutName(*other) + " " + c10::toString(other->scalar_type()) : "");
  const uint64_t generation = choicesGeneration();
  at::Tensor y = runFastest(key, candidates, counters, other, false, weight.unsafeGetTensorImpl());
  settleChosen(operands, key, candidates, epilogue, call.prepared_for_rows, generation);
  return counted(y, counters, epilogue, {&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
}

// ---- kiln::conv2d ----------------------------------------------------------------------------

// One kiln::conv2d call (the plain kind every way takes): its operands and what its ways need.
struct ConvCall {
  const at::Tensor& input;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const Epilogue& epilogue;
  const std::vector<int64_t>& stride;
  const std::vector<int64_t>& padding;
  const std::vector<int64_t>& dilation;
  int64_t groups;
  std::vector<int64_t> out_sizes;
  bool into_other = false;  // writesIntoOther() said yes
  bool fuse_add = false;    // the add fuses as oneDNN's binary post-op
  std::string prepared_conv;  // what the oneDNN ways' prepacked weight is keyed by

  // oneDNN's convolution on the weight prepacked once, `x` the input as this way lays it out.
  at::Tensor oneDnn(const at::Tensor& x, const std::optional<at::Tensor>& operand) const {
    at::Tensor packed = preparedWeight(weight, prepared_conv, [&] {
      return kReorderConvolutionWeight.call({weight, padding, stride, dilation, groups, input.sizes().vec()}).toTensor();
    });
    const c10::IValue b = bias ? c10::IValue(*bias) : c10::IValue();
    const auto no_scalars = c10::List<std::optional<at::Scalar>>();
    if (epilogue.add != Epilogue::Add::kNone && into_other &&
        (epilogue.activation == Activation::kNone || epilogue.activation == Activation::kRelu)) {
      // oneDNN's sum post-op: the convolution accumulates into `other` (then relu), in place.
      const c10::IValue relu = epilogue.activation == Activation::kRelu ? c10::IValue("relu") : c10::IValue();
      return kConvolutionPointwiseBinaryInPlace.call(
                       {*operand, x, packed, b, padding, stride, dilation, groups, "add", at::Scalar(1.0), relu,
                        no_scalars, c10::IValue()})
          .toTensor();
    }
    const auto [attr, algorithm] = onednnActivation(epilogue.activation);
    if (epilogue.add != Epilogue::Add::kNone && fuse_add) {
      // After a binary post-op ATen's operator fuses relu only; another activation runs after it.
      const bool relu = epilogue.activation == Activation::kRelu;
      at::Tensor y = kConvolutionPointwiseBinary.call(
                                 {x, *operand, packed, b, padding, stride, dilation, groups, "add", at::Scalar(1.0),
                                  relu ? c10::IValue("relu") : c10::IValue(), no_scalars, c10::IValue()})
                           .toTensor();
      return relu ? y : activate(y, epilogue.activation, true);
    }
    if (epilogue.add == Epilogue::Add::kNone) {
      return kConvolutionPointwise.call(
                       {x, packed, b, padding, stride, dilation, groups, attr, no_scalars, optionalString(algorithm)})
          .toTensor();
    }
    at::Tensor y = kConvolutionPointwise.call(
                             {x, packed, b, padding, stride, dilation, groups, "none", no_scalars, c10::IValue()})
                       .toTensor();
    return atenEpilogue(y, epilogue, operand, false, into_other);
  }

  // A patch embedding's patches copied into rows, one addmm over the flattened weight.
  at::Tensor patches(const std::optional<at::Tensor>& operand) const {
    const int64_t batch = input.size(0), channels = input.size(1), kh = weight.size(2), kw = weight.size(3);
    const int64_t oh = out_sizes[2], ow = out_sizes[3], n = weight.size(0);
    at::Tensor flat_weight = preparedWeight(weight, kPreparedPatches, [&] { return weight.reshape({n, -1}).t().contiguous(); });
    // [N, C, OH·KH, OW·KW] (the rows and columns no patch covers left out) as
    // [N, OH, OW, C, KH, KW]: one row per patch, in the weight's order.
    at::Tensor rows = input.narrow(2, 0, oh * kh)
                          .narrow(3, 0, ow * kw)
                          .reshape({batch, channels, oh, kh, ow, kw})
                          .permute({0, 2, 4, 1, 3, 5})
                          .reshape({batch * oh * ow, channels * kh * kw});
    at::Tensor y = bias ? at::addmm(*bias, rows, flat_weight) : at::mm(rows, flat_weight);
    return atenEpilogue(y.view({batch, oh, ow, n}).permute({0, 3, 1, 2}), epilogue, operand, false, into_other);
  }

  at::Tensor aten(const std::optional<at::Tensor>& operand, bool grad) const {
    at::Tensor y = at::conv2d(input, weight, bias, stride, padding, dilation, groups);
    return atenEpilogue(y, epilogue, operand, grad, writesIntoOther(epilogue, operand, y.sizes(), y.scalar_type(), input, grad));
  }

  at::Tensor run(const char* way, const std::optional<at::Tensor>& operand) const {
    if (way == kOneDnn) return oneDnn(input, operand);
    if (way == kOneDnnChannelsLast) return oneDnn(input.contiguous(at::MemoryFormat::ChannelsLast), operand);
    if (way == kAtenPatches) return patches(operand);
    TORCH_CHECK(false, "kiln::conv2d: no way named ", way);
  }
};

at::Tensor conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const std::optional<at::Tensor>& other, std::vector<int64_t> stride, std::vector<int64_t> padding,
                  std::vector<int64_t> dilation, int64_t groups, const std::string& epilogue_text) {
  const bool grad = gradRecorded({&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
  // The output's sizes where the parameters make sense (the measured path checks them).
  std::vector<int64_t> out_sizes;
  if (input.dim() == 4 && weight.dim() == 4 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2) {
    out_sizes = {input.size(0), weight.size(0)};
    for (int d = 0; d < 2; ++d) {
      const int64_t extent = dilation[d] * (weight.size(2 + d) - 1) + 1;
      out_sizes.push_back(stride[d] > 0 ? (input.size(2 + d) + 2 * padding[d] - extent) / stride[d] + 1 : 0);
    }
  }
  std::vector<int64_t> params = stride;
  params.insert(params.end(), padding.begin(), padding.end());
  params.insert(params.end(), dilation.begin(), dilation.end());
  params.push_back(groups);
  const CallOperands operands{input, weight, bias, other, epilogue_text, std::move(params)};
  auto [site_counters, settled] = callSite(operands, grad);
  GroupCounters& counters = *site_counters;
  if (settled) {
    ConvCall call{input, weight, bias, settled->epilogue, stride, padding, dilation, groups, out_sizes, false, false, {}};
    call.into_other = writesIntoOther(settled->epilogue, other, out_sizes, input.scalar_type(), input, false);
    // Whether the sum goes into `other` reads aliasing, which sizes and strides do not show: a
    // residual that now shares memory with the input is another call, which the measured path
    // decides.
    if (call.into_other == settled->writes_other) {
      call.fuse_add = addFuses(settled->epilogue, other, out_sizes, input.scalar_type());
      call.prepared_conv = settled->prepared;
      at::Tensor y = runSettled(
          *settled, weight, counters, [&](const char* way) { return call.run(way, other); },
          [&] { return call.aten(other, false); });
      return counted(y, counters, settled->epilogue, {&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
    }
  }
  const Epilogue epilogue = epilogueFrom(epilogue_text);
  ConvCall call{input, weight, bias, epilogue, stride, padding, dilation, groups, out_sizes, false, false, {}};
  std::vector<MeasuredWay> candidates;
  candidates.push_back({kAten, [&](const std::optional<at::Tensor>& operand) { return call.aten(operand, grad); }});
  // A call the other ways can take; oneDNN's only in a dtype it takes (bfloat16 not on every CPU).
  const bool plain = !grad && input.dim() == 4 && weight.dim() == 4 && input.numel() > 0 && plainCpuTensor(input) &&
                     plainCpuTensor(weight) && at::isFloatingType(input.scalar_type()) &&
                     weight.scalar_type() == input.scalar_type() && groups > 0 && stride.size() == 2 &&
                     padding.size() == 2 && dilation.size() == 2 && input.size(1) == weight.size(1) * groups &&
                     weight.size(0) % groups == 0 &&
                     (!bias || (plainCpuTensor(*bias) && bias->scalar_type() == input.scalar_type() &&
                                bias->dim() == 1 && bias->size(0) == weight.size(0)));
  if (!plain) return runFastest("", candidates, counters, other, epilogue.into_other);
  const bool onednn = onednnTakesDtype(input.scalar_type());
  if (out_sizes[2] <= 0 || out_sizes[3] <= 0) return runFastest("", candidates, counters, other, epilogue.into_other);
  call.into_other = writesIntoOther(epilogue, other, out_sizes, input.scalar_type(), input, grad);
  call.fuse_add = addFuses(epilogue, other, out_sizes, input.scalar_type());
  const std::string params_text = c10::Join(",", stride) + "/" + c10::Join(",", padding) + "/" + c10::Join(",", dilation) + "/" + std::to_string(groups);
  call.prepared_conv = "onednn conv2d " + params_text;
  auto way = [&call](const char* name, const char* keeps) {
    return MeasuredWay{name, [&call, name](const std::optional<at::Tensor>& operand) { return call.run(name, operand); }, keeps};
  };
  if (onednn) candidates.push_back(way(kOneDnn, call.prepared_conv.c_str()));
  if (onednn && !input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    candidates.push_back(way(kOneDnnChannelsLast, call.prepared_conv.c_str()));
  }
  const bool patches = groups == 1 && weight.size(2) == stride[0] && weight.size(3) == stride[1] &&
                       padding[0] == 0 && padding[1] == 0 && dilation[0] == 1 && dilation[1] == 1 &&
                       weight.size(2) * weight.size(3) > 1;
  if (patches) candidates.push_back(way(kAtenPatches, kPreparedPatches));
  const std::string key = "conv2d " + std::string(c10::toString(input.scalar_type())) + " batch<=" +
                          std::to_string(powerOfTwoAtLeast(input.size(0))) + " input " + c10::Join(",", input.sizes().slice(1)) +
                          " weight " + c10::Join(",", weight.sizes()) + " " + params_text + (bias ? " bias" : "") +
                          " epilogue=" + epilogue_text + (call.into_other ? " into other" : "") + " " + layoutName(input) +
                          (other ? " other " + layoutName(*other) + " " + c10::toString(other->scalar_type()) : "");
  const uint64_t generation = choicesGeneration();
  at::Tensor y = runFastest(key, candidates, counters, other, call.into_other, weight.unsafeGetTensorImpl());
  settleChosen(operands, key, candidates, epilogue, call.prepared_conv, generation, call.into_other);
  return counted(y, counters, epilogue, {&input, &weight, bias ? &*bias : nullptr, other ? &*other : nullptr});
}

at::Tensor conv2dIntoOther(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           at::Tensor& other, std::vector<int64_t> stride, std::vector<int64_t> padding,
                           std::vector<int64_t> dilation, int64_t groups, const std::string& epilogue_text) {
  return conv2d(input, weight, bias, other, std::move(stride), std::move(padding), std::move(dilation), groups,
                epilogue_text);
}

at::Tensor castFloating(const at::Tensor& x, int64_t from, int64_t to) {
  if (x.scalar_type() != static_cast<at::ScalarType>(from)) return x;
  return x.to(static_cast<at::ScalarType>(to));
}

// The layout eager gives a convolution's result (and what elementwise ops make of it): that of
// the convolution's input, channels-last where it is channels-last, contiguous otherwise.
at::Tensor eagerLayout(const at::Tensor& x, const at::Tensor& like) {
  const bool channels_last = x.dim() == 4 && like.dim() == 4 && !like.is_contiguous() &&
                             like.is_contiguous(at::MemoryFormat::ChannelsLast);
  return x.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace

bool onednnTakesDtype(at::ScalarType dtype) {
  if (dtype == at::kFloat) return true;
  if (dtype != at::kBFloat16) return false;
  static const bool bf16 = [] {
    // Registered only in builds of torch with oneDNN.
    std::optional<c10::OperatorHandle> op = c10::Dispatcher::singleton().findSchema({"mkldnn::_is_mkldnn_bf16_supported", ""});
    if (!op) return false;
    try {
      torch::jit::Stack stack;
      op->callBoxed(&stack);
      return stack.front().toBool();
    } catch (const std::exception&) {
      return false;
    }
  }();
  return bf16;
}

TORCH_LIBRARY_FRAGMENT(kiln, m) {
  m.def("linear(Tensor input, Tensor weight, Tensor? bias, Tensor? other, str epilogue) -> Tensor");
  m.def("conv2d(Tensor input, Tensor weight, Tensor? bias, Tensor? other, int[] stride, int[] padding, "
        "int[] dilation, int groups, str epilogue) -> Tensor");
  // The "@other" form: the sum may be written into `other` (the fuser proved no one reads it).
  m.def("conv2d_into_other(Tensor input, Tensor weight, Tensor? bias, Tensor(a!) other, int[] stride, "
        "int[] padding, int[] dilation, int groups, str epilogue) -> Tensor(a!)");
  // Returns x itself when it is not of dtype `from`.
  m.def("cast_floating(Tensor(a) x, int from, int to) -> Tensor(a)");
  // A kiln::conv2d result (channels-last, whatever its input) in the layout eager would have given
  // it: that of `like`, the convolution's input. Returns x itself when it is in that layout.
  m.def("eager_layout(Tensor(a) x, Tensor like) -> Tensor(a)");
  // Tests only: every library call runs this way where it can ("" measures again).
  m.def("_force_library_choice(str choice) -> ()", [](const std::string& choice) { forceChoice(choice); });
}

TORCH_LIBRARY_IMPL(kiln, CompositeImplicitAutograd, m) {
  m.impl("linear", &linear);
  m.impl("conv2d", &conv2d);
  m.impl("conv2d_into_other", &conv2dIntoOther);
  m.impl("cast_floating", &castFloating);
  m.impl("eager_layout", &eagerLayout);
}

}  // namespace kiln
