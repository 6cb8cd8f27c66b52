// cuBLASLt behind kiln::linear on CUDA tensors (cublaslt.h).
//
// Row-major y[M, N] = x[M, K] · w[N, K]ᵀ is, in cuBLASLt's column-major terms, D (N × M, ld N) =
// op(A) · B with A = w read as K × N (ld K) transposed, B = x read as K × M (ld K): the bias is
// then one value per row of D, as cuBLASLt's bias epilogues expect, and a residual `other` of y's
// shape is C with beta = 1 (the epilogue applies to alpha·AB + beta·C + bias).
#include "torch_ops/cublaslt.h"

#if defined(KILN_HAVE_CUDA_KERNELS)
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <dlfcn.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#endif

namespace kiln {

#if defined(KILN_HAVE_CUDA_KERNELS)
namespace {

// The entry points kiln uses, from the cuBLASLt torch loaded (or the first on the library path).
struct LtApi {
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) preference_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) preference_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) preference_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  std::string error;  // why it did not load
};

const LtApi& api() {
  static const LtApi loaded = [] {
    LtApi lt;
    void* library = nullptr;
    for (const char* name : {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"}) {
      library = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (library != nullptr) break;
    }
    if (library == nullptr) {
      lt.error = "cuBLASLt (libcublasLt.so) does not load";
      return lt;
    }
    auto bind = [&](auto& slot, const char* symbol) {
      slot = reinterpret_cast<std::remove_reference_t<decltype(slot)>>(dlsym(library, symbol));
      if (slot == nullptr && lt.error.empty()) lt.error = std::string("cuBLASLt lacks ") + symbol;
    };
    bind(lt.create, "cublasLtCreate");
    bind(lt.desc_create, "cublasLtMatmulDescCreate");
    bind(lt.desc_destroy, "cublasLtMatmulDescDestroy");
    bind(lt.desc_set, "cublasLtMatmulDescSetAttribute");
    bind(lt.layout_create, "cublasLtMatrixLayoutCreate");
    bind(lt.layout_destroy, "cublasLtMatrixLayoutDestroy");
    bind(lt.preference_create, "cublasLtMatmulPreferenceCreate");
    bind(lt.preference_destroy, "cublasLtMatmulPreferenceDestroy");
    bind(lt.preference_set, "cublasLtMatmulPreferenceSetAttribute");
    bind(lt.heuristic, "cublasLtMatmulAlgoGetHeuristic");
    bind(lt.matmul, "cublasLtMatmul");
    return lt;
  }();
  return loaded;
}

void check(cublasStatus_t status, const char* what) {
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "kiln: cuBLASLt ", what, " failed (status ", static_cast<int>(status), ")");
}

// One handle per device, made on first use (a handle may be shared by threads).
cublasLtHandle_t handleFor(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::array<cublasLtHandle_t, 64> handles{};
  TORCH_CHECK(device >= 0 && device < static_cast<c10::DeviceIndex>(handles.size()), "kiln: CUDA device ", device,
              " out of range");
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) check(api().create(&handles[device]), "handle creation");
  return handles[device];
}

// Descriptors of one shape, dtype, epilogue and alignment: made once with the plan that holds them.
struct Descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t preference = nullptr;
  ~Descriptors() {
    const LtApi& lt = api();
    if (preference) lt.preference_destroy(preference);
    for (cublasLtMatrixLayout_t layout : {a, b, c}) {
      if (layout) lt.layout_destroy(layout);
    }
    if (op) lt.desc_destroy(op);
  }
};

// What a call of one key needs besides its pointers: its descriptors and the heuristic's algorithm.
// The bias pointer is an attribute of the shared matmul descriptor, so a call sets it and enqueues
// its matmul under the plan's lock.
struct Plan {
  Descriptors d;
  cublasLtMatmulAlgo_t algo{};
  size_t workspace = 0;
  std::mutex mutex;
};

constexpr size_t kMaxWorkspace = size_t{32} << 20;

cudaDataType_t dataType(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    default: return CUDA_R_32F;
  }
}

int alignment(const at::Tensor& tensor) {
  const auto address = reinterpret_cast<uintptr_t>(tensor.const_data_ptr());
  for (int bytes : {16, 8, 4}) {
    if (address % bytes == 0) return bytes;
  }
  return static_cast<int>(tensor.element_size());
}

}  // namespace
#endif

std::string cublasLtRefusal(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& other, const Epilogue& epilogue) {
#if !defined(KILN_HAVE_CUDA_KERNELS)
  (void)input, (void)weight, (void)bias, (void)other, (void)epilogue;
  return "this kiln was built without CUDA";
#else
  if (!input.is_cuda() || !weight.is_cuda() || input.device() != weight.device()) return "operands not on one CUDA device";
  const at::ScalarType dtype = input.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && dtype != at::kFloat) return "a dtype other than float16, bfloat16, float32";
  if (dtype == at::kFloat && !at::globalContext().allowTF32CuBLAS()) return "float32 without TF32 allowed";
  if (weight.scalar_type() != dtype || weight.dim() != 2 || !weight.is_contiguous()) return "a weight that is not a contiguous [N, K] matrix of the input's dtype";
  if (input.dim() < 1 || input.size(-1) != weight.size(1) || !input.is_contiguous()) return "an input that is not contiguous with K columns";
  if (input.numel() == 0 || weight.size(0) == 0) return "no rows";
  if (bias && (bias->device() != input.device() || bias->scalar_type() != dtype || bias->dim() != 1 ||
               bias->size(0) != weight.size(0) || !bias->is_contiguous()))
    return "a bias that is not [N] of the input's dtype";
  if (epilogue.activation == Activation::kGelu) return "exact GELU (cuBLASLt's is the tanh approximation)";
  if (epilogue.activation != Activation::kNone && epilogue.activation != Activation::kRelu &&
      epilogue.activation != Activation::kGeluTanh)
    return "an activation cuBLASLt lacks";
  if (epilogue.add != Epilogue::Add::kNone) {
    std::vector<int64_t> out_sizes = input.sizes().vec();
    out_sizes.back() = weight.size(0);
    if (!other || other->device() != input.device() || other->scalar_type() != dtype ||
        other->sizes() != at::IntArrayRef(out_sizes) || !other->is_contiguous())
      return "a residual that is not a contiguous tensor of the result's shape and dtype";
  }
  // Rows and columns are 64-bit in a layout; leading dimensions too. M * N of one call is ATen's
  // limit as well.
  return "";
#endif
}

at::Tensor cublasLtLinear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& other, const Epilogue& epilogue) {
#if !defined(KILN_HAVE_CUDA_KERNELS)
  (void)input, (void)weight, (void)bias, (void)other, (void)epilogue;
  TORCH_CHECK(false, "kiln: this kiln was built without CUDA");
#else
  const std::string refusal = cublasLtRefusal(input, weight, bias, other, epilogue);
  TORCH_CHECK(refusal.empty(), "kiln: cuBLASLt cannot run this linear: ", refusal);
  const LtApi& lt = api();
  TORCH_CHECK(lt.error.empty(), "kiln: ", lt.error);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t k = weight.size(1), n = weight.size(0), m = input.numel() / k;
  std::vector<int64_t> out_sizes = input.sizes().vec();
  out_sizes.back() = n;
  at::Tensor out = at::empty(out_sizes, input.options());
  const bool add = epilogue.add != Epilogue::Add::kNone;

  const at::ScalarType dtype = input.scalar_type();
  cublasLtEpilogue_t which = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (epilogue.activation == Activation::kRelu) which = bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  if (epilogue.activation == Activation::kGeluTanh) which = bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  const int align_a = alignment(weight), align_b = alignment(input), align_c = add ? alignment(*other) : 16,
            align_d = alignment(out);
  const std::array<int64_t, 11> key = {input.device().index(), static_cast<int64_t>(dtype), m, n, k, which, add,
                                       align_a, align_b, align_c, align_d};
  cublasLtHandle_t handle = handleFor(input.device().index());
  static std::mutex plans_mutex;
  static auto* plans = new std::map<std::array<int64_t, 11>, std::unique_ptr<Plan>>();
  Plan* plan = nullptr;
  {
    std::lock_guard<std::mutex> lock(plans_mutex);
    std::unique_ptr<Plan>& slot = (*plans)[key];
    if (!slot) {
      // Made under the lock, once per key: the heuristic's answer for this device, dtype, shape,
      // epilogue and alignment. A failure leaves no plan, and the next call asks again.
      auto made = std::make_unique<Plan>();
      Descriptors& d = made->d;
      const cudaDataType_t type = dataType(dtype);
      const cublasComputeType_t compute = dtype == at::kFloat ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
      try {
        check(lt.desc_create(&d.op, compute, CUDA_R_32F), "matmul descriptor");
        const cublasOperation_t transposed = CUBLAS_OP_T, plain = CUBLAS_OP_N;
        check(lt.desc_set(d.op, CUBLASLT_MATMUL_DESC_TRANSA, &transposed, sizeof transposed), "TRANSA");
        check(lt.desc_set(d.op, CUBLASLT_MATMUL_DESC_TRANSB, &plain, sizeof plain), "TRANSB");
        check(lt.desc_set(d.op, CUBLASLT_MATMUL_DESC_EPILOGUE, &which, sizeof which), "EPILOGUE");
        check(lt.layout_create(&d.a, type, static_cast<uint64_t>(k), static_cast<uint64_t>(n), k), "layout of A");
        check(lt.layout_create(&d.b, type, static_cast<uint64_t>(k), static_cast<uint64_t>(m), k), "layout of B");
        check(lt.layout_create(&d.c, type, static_cast<uint64_t>(n), static_cast<uint64_t>(m), n), "layout of C and D");
        check(lt.preference_create(&d.preference), "preference");
        const uint64_t max_workspace = kMaxWorkspace;
        check(lt.preference_set(d.preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &max_workspace,
                                sizeof max_workspace),
              "workspace preference");
        const std::array<std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t>, 4> alignments = {{
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, static_cast<uint32_t>(align_a)},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, static_cast<uint32_t>(align_b)},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, static_cast<uint32_t>(align_c)},
            {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, static_cast<uint32_t>(align_d)},
        }};
        for (const auto& [attribute, bytes] : alignments)
          check(lt.preference_set(d.preference, attribute, &bytes, sizeof bytes), "alignment preference");
        cublasLtMatmulHeuristicResult_t result{};
        int returned = 0;
        check(lt.heuristic(handle, d.op, d.a, d.b, d.c, d.c, d.preference, 1, &result, &returned), "heuristic");
        TORCH_CHECK(returned > 0, "kiln: cuBLASLt's heuristic has no algorithm for ", m, "x", n, "x", k, " in ",
                    dtype, " with epilogue ", which);
        made->algo = result.algo;
        made->workspace = result.workspaceSize;
      } catch (...) {
        plans->erase(key);
        throw;
      }
      slot = std::move(made);
    }
    plan = slot.get();
  }
  // The workspace from torch's caching allocator (reused across calls, capturable).
  at::Tensor workspace = at::empty({static_cast<int64_t>(std::max<size_t>(plan->workspace, 1))},
                                   input.options().dtype(at::kByte));
  const float alpha = 1.0f, beta = add ? 1.0f : 0.0f;
  const void* c_data = add ? other->const_data_ptr() : out.const_data_ptr();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(input.device().index()).stream();
  std::lock_guard<std::mutex> lock(plan->mutex);
  if (bias) {
    const void* bias_data = bias->const_data_ptr();
    check(lt.desc_set(plan->d.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_data, sizeof bias_data), "BIAS_POINTER");
  }
  const Descriptors& d = plan->d;
  check(lt.matmul(handle, d.op, &alpha, weight.const_data_ptr(), d.a, input.const_data_ptr(), d.b, &beta, c_data, d.c,
                  out.data_ptr(), d.c, &plan->algo, workspace.data_ptr(), plan->workspace, stream),
        "matmul");
  return out;
#endif
}

}  // namespace kiln
