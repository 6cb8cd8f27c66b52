#include "torch_ops/fusion_runtime.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/interpreter.h>

#include <atomic>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_map>

#include "codegen/cpu_kernel.h"
#include "codegen/cuda_driver.h"
#include "codegen/fault_injection.h"
#include "codegen/kernel_dump.h"
#include "fuser/group_code.h"
#include "fuser/group_stats.h"
#include "fuser/lowering.h"
#include "kiln/options.h"
#include "torch_ops/fusion_cuda.h"

namespace kiln {

namespace {
std::atomic<int64_t> compile_count{0};
}  // namespace

// One compiled kernel of a group (per layout, or per CUDA device and specialization).
struct CompiledEntry {
  std::once_flag once;
  std::atomic<bool> done{false};  // `once` has run
  std::shared_ptr<CpuKernel> kernel;  // CPU: null if compilation failed
  std::shared_ptr<const CudaFunction> cuda_function;  // CUDA: null if compiling or loading failed
  std::string error;
  std::atomic<bool> launch_failed{false};  // a launch threw: this kernel is not used again
};

struct SignatureEntry {
  std::optional<LoweredGroup> lowered;
  std::string why;
  std::mutex mutex;
  std::map<std::string, std::shared_ptr<CompiledEntry>> kernels;  // by layout, or CUDA device and specialization

  // The entry for `key`, made empty on first request (compiled by whoever runs its `once`).
  std::shared_ptr<CompiledEntry> compiledEntry(const std::string& key) {
    std::lock_guard<std::mutex> lock(mutex);
    std::shared_ptr<CompiledEntry>& slot = kernels[key];
    if (!slot) slot = std::make_shared<CompiledEntry>();
    return slot;
  }
};

struct FusionProgram {
  std::string text;
  GroupCounters* counters = nullptr;  // kiln::report's statistics for this group
  std::shared_ptr<torch::jit::Graph> graph;  // null when the code could not be decoded
  std::vector<char> input_kinds;  // 't' tensor, 'f' float, 'i' int, 'b' bool, per subgraph input
  std::mutex mutex;
  std::map<std::vector<int64_t>, std::shared_ptr<SignatureEntry>> signatures;
  // Set once, when something inside kiln failed for this group: it runs unfused from then on.
  std::once_flag fail_once;
  std::atomic<bool> failed{false};
  std::string failure;
  // The original ops, interpreted, for a fusion_group that cannot run its kernel after all.
  std::once_flag fallback_once;
  std::unique_ptr<torch::jit::Code> fallback;
};

struct PreparedLaunch {
  std::shared_ptr<FusionProgram> program;
  c10::Device device = c10::kCPU;
  std::shared_ptr<CpuKernel> kernel;                  // on the CPU
  std::shared_ptr<const CudaFunction> cuda_function;  // on a CUDA device
  std::shared_ptr<CompiledEntry> compiled;            // whose kernel this call runs
  CudaSpecialization cuda_specialization;
  const LoweredGroup* lowered = nullptr;
  std::vector<at::Tensor> inputs;      // loaded tensor inputs
  std::vector<double> float_args;      // per kernel scalar input
  std::vector<int64_t> int_args;
  std::vector<int64_t> shape;          // iteration shape (as eager's output shape)
  std::vector<int64_t> sizes;          // collapsed sizes, innermost last
  std::vector<std::vector<int64_t>> input_strides;  // collapsed, bytes
  int64_t numel = 0;
};

namespace {

std::mutex programs_mutex;

// Sends `program` to its fallback for good, saying why once.
void giveUp(FusionProgram& program, const std::string& reason) {
  std::call_once(program.fail_once, [&] {
    program.failure = reason;
    program.failed.store(true);
    log(LogLevel::kWarning, "a fusion group runs unfused from now on: " + reason);
  });
}

std::unordered_map<std::string, std::shared_ptr<FusionProgram>>& programs() {
  static auto* table = new std::unordered_map<std::string, std::shared_ptr<FusionProgram>>();
  return *table;
}

std::shared_ptr<FusionProgram> decodeProgram(const std::string& text) {
  auto program = std::make_shared<FusionProgram>();
  program->text = text;
  program->counters = &groupCounters(text);
  try {
    failIfInjected(FaultStage::kDecode);
    std::shared_ptr<torch::jit::Graph> graph = decodeGroupCode(text);
    for (const torch::jit::Value* input : graph->inputs()) {
      switch (input->type()->kind()) {
        case c10::TypeKind::TensorType: program->input_kinds.push_back('t'); break;
        case c10::TypeKind::FloatType: program->input_kinds.push_back('f'); break;
        case c10::TypeKind::IntType: program->input_kinds.push_back('i'); break;
        default: program->input_kinds.push_back('b'); break;  // decodeGroupCode allows no other
      }
    }
    program->graph = std::move(graph);
  } catch (const std::exception& error) {
    giveUp(*program, std::string("its code cannot be read: ") + error.what());
  }
  return program;
}

// Broadcast `shape` into `out` (right-aligned), as eager does; false if incompatible.
bool broadcastInto(std::vector<int64_t>& out, c10::IntArrayRef shape) {
  if (shape.size() > out.size()) out.insert(out.begin(), shape.size() - out.size(), 1);
  size_t offset = out.size() - shape.size();
  for (size_t d = 0; d < shape.size(); ++d) {
    int64_t& target = out[offset + d];
    if (shape[d] == target || shape[d] == 1) continue;
    if (target != 1) return false;
    target = shape[d];
  }
  return true;
}

}  // namespace

std::shared_ptr<FusionProgram> programFor(const c10::intrusive_ptr<c10::ivalue::ConstantString>& code) {
  // The interpreter passes the same string object on every call: remember the last few by
  // identity (holding a reference, so an address is never reused while cached).
  thread_local std::vector<std::pair<c10::intrusive_ptr<c10::ivalue::ConstantString>, std::shared_ptr<FusionProgram>>> recent;
  for (auto& entry : recent) {
    if (entry.first.get() == code.get()) return entry.second;
  }
  std::shared_ptr<FusionProgram> program;
  {
    std::lock_guard<std::mutex> lock(programs_mutex);
    auto& slot = programs()[code->string()];
    if (!slot) slot = decodeProgram(code->string());
    program = slot;
  }
  if (recent.size() >= 16) recent.erase(recent.begin());
  recent.emplace_back(code, program);
  return program;
}

namespace {

// A call that takes the fallback: counted in the group's statistics, with the reason for `why`.
std::shared_ptr<PreparedLaunch> rejectCall(FusionProgram& program, const std::string& reason, std::string* why) {
  if (why) *why = reason;
  program.counters->fallbacks++;
  return nullptr;
}

std::shared_ptr<PreparedLaunch> prepareLaunch(const std::shared_ptr<FusionProgram>& program,
                                              const std::vector<at::Tensor>& tensors,
                                              const std::vector<double>& floats,
                                              const std::vector<int64_t>& ints, std::string* why) {
  auto reject = [&](const std::string& reason) { return rejectCall(*program, reason, why); };
  // Signature: per input, (dtype, rank) for tensors, kind for scalars. Every tensor must be on
  // one device, the CPU or a CUDA device (eager would move a CPU 0-dim tensor to the GPU: the
  // fallback does).
  c10::Device device = c10::kCPU;
  std::vector<int64_t> key;
  std::vector<InputSignature> signature;
  size_t t = 0, f = 0, i = 0;
  for (char kind : program->input_kinds) {
    InputSignature input;
    switch (kind) {
      case 't': {
        if (t >= tensors.size()) return reject("too few tensors");
        const at::Tensor& tensor = tensors[t++];
        if (!tensor.defined()) return reject("undefined tensor");
        if (t == 1) device = tensor.device();
        if (tensor.device() != device) return reject("inputs on " + device.str() + " and " + tensor.device().str());
        if (tensor.layout() != c10::kStrided) return reject("non-strided tensor");
        if (at::GradMode::is_enabled() && tensor.requires_grad()) return reject("input requires grad");
        input.dtype = tensor.scalar_type();
        input.dim = tensor.dim();
        break;
      }
      case 'f': input = {false, at::kDouble, 0}; f++; break;
      case 'i': input = {false, at::kLong, 0}; i++; break;
      default: input = {false, at::kBool, 0}; i++; break;
    }
    key.push_back(static_cast<int64_t>(input.dtype) * 64 + input.dim + (input.is_tensor ? 0 : 32));
    signature.push_back(input);
  }
  if (t != tensors.size() || f != floats.size() || i != ints.size()) return reject("argument count mismatch");
  if (device.is_cuda()) {
    std::string unavailable;
    if (!cudaFusionAvailable(device.index(), &unavailable)) return reject(unavailable);
  } else if (!device.is_cpu()) {
    return reject("device " + device.str() + " has no kiln backend");
  }

  std::shared_ptr<SignatureEntry> entry;
  {
    std::lock_guard<std::mutex> lock(program->mutex);
    auto& slot = program->signatures[key];
    if (!slot) {
      slot = std::make_shared<SignatureEntry>();
      try {
        failIfInjected(FaultStage::kLower);
        slot->lowered = lowerGroup(*program->graph, signature, &slot->why);
        if (!slot->lowered) log(LogLevel::kInfo, "group left to eager for this signature: " + slot->why);
      } catch (const std::exception& error) {
        slot->why = std::string("lowering failed: ") + error.what();
        log(LogLevel::kWarning, "a fusion group runs unfused for this signature from now on: " + slot->why);
      }
    }
    entry = slot;
  }
  if (!entry->lowered) return reject(entry->why);
  const LoweredGroup& lowered = *entry->lowered;
  failIfInjected(FaultStage::kGuard);

  auto launch = std::make_shared<PreparedLaunch>();
  launch->program = program;
  launch->device = device;
  launch->lowered = &lowered;
  launch->inputs = tensors;
  // batch_norm's per-channel [C] tensors, viewed as [C, 1, …] to broadcast along dim 1 of the
  // normalized input, which must have C channels (eager raises otherwise: so does the fallback).
  for (const ChannelParam& param : lowered.channel_params) {
    at::Tensor& tensor = launch->inputs[static_cast<size_t>(param.input)];
    std::vector<int64_t> x_shape;
    for (int source : param.x_sources) {
      if (!broadcastInto(x_shape, tensors[static_cast<size_t>(source)].sizes())) return reject("shapes do not broadcast");
    }
    if (static_cast<int64_t>(x_shape.size()) != param.x_rank || x_shape[1] != tensor.size(0)) {
      return reject("batch_norm parameter does not match the input's channels");
    }
    std::vector<int64_t> view(static_cast<size_t>(param.x_rank - 1), 1);
    view[0] = tensor.size(0);
    tensor = tensor.view(view);
  }
  const std::vector<at::Tensor>& inputs = launch->inputs;
  {
    size_t fi = 0, ii = 0;
    for (char kind : program->input_kinds) {
      if (kind == 't') continue;
      if (kind == 'f') {
        launch->float_args.push_back(floats[fi++]);
        launch->int_args.push_back(0);
      } else {
        launch->float_args.push_back(0);
        launch->int_args.push_back(kind == 'b' ? (ints[ii++] != 0) : ints[ii++]);
      }
    }
  }
  // Eager's output shape: the broadcast of the inputs each output is computed from. Every
  // output must have the same shape (the iteration space); a tensor read only for its dtype
  // (type_as) takes no part and is never loaded.
  std::vector<int64_t>& shape = launch->shape;
  std::vector<bool> shaped(inputs.size(), false);
  for (size_t o = 0; o < lowered.output_sources.size(); ++o) {
    std::vector<int64_t> output_shape;
    for (int source : lowered.output_sources[o]) {
      if (!broadcastInto(output_shape, inputs[static_cast<size_t>(source)].sizes())) {
        return reject("shapes do not broadcast");
      }
      shaped[static_cast<size_t>(source)] = true;
    }
    if (o == 0) shape = output_shape;
    if (output_shape != shape) return reject("outputs of different shapes");
  }
  launch->numel = c10::multiply_integers(shape);

  // Strides in bytes over the iteration shape (0 where broadcast), inputs then outputs.
  const size_t rank = shape.size();
  const size_t operands = inputs.size() + lowered.output_dtypes.size();
  std::vector<std::vector<int64_t>> strides(operands, std::vector<int64_t>(rank, 0));
  for (size_t k = 0; k < inputs.size(); ++k) {
    const at::Tensor& tensor = inputs[k];
    if (!shaped[k]) continue;  // never loaded: strides stay 0
    size_t offset = rank - static_cast<size_t>(tensor.dim());
    for (size_t d = 0; d < static_cast<size_t>(tensor.dim()); ++d) {
      strides[k][offset + d] = tensor.size(static_cast<int64_t>(d)) == 1 ? 0 : tensor.stride(static_cast<int64_t>(d)) * tensor.element_size();
    }
  }
  for (size_t o = 0; o < lowered.output_dtypes.size(); ++o) {
    int64_t stride = static_cast<int64_t>(c10::elementSize(lowered.output_dtypes[o]));
    for (size_t d = rank; d-- > 0;) {
      strides[inputs.size() + o][d] = stride;
      stride *= shape[d];
    }
  }
  // Collapse: drop size-1 dims, merge neighbours every operand walks as one.
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> collapsed(operands);
  for (size_t d = 0; d < rank; ++d) {
    if (shape[d] == 1) continue;
    bool merge = !sizes.empty();
    for (size_t k = 0; merge && k < operands; ++k) merge = collapsed[k].back() == strides[k][d] * shape[d];
    if (merge) {
      sizes.back() *= shape[d];
      for (size_t k = 0; k < operands; ++k) collapsed[k].back() = strides[k][d];
    } else {
      sizes.push_back(shape[d]);
      for (size_t k = 0; k < operands; ++k) collapsed[k].push_back(strides[k][d]);
    }
  }
  if (sizes.empty()) {
    sizes.push_back(1);
    for (auto& c : collapsed) c.push_back(0);
  }
  launch->sizes = sizes;
  launch->input_strides = collapsed;

  if (device.is_cuda()) {
    if (launch->numel == 0) return launch;  // empty: outputs only, no kernel
    std::string why_not;
    std::optional<CudaSpecialization> specialization = cudaSpecializationFor(*launch, &why_not);
    if (!specialization) return reject(why_not);
    if (cudaArgumentLayout(lowered.kernel, *specialization).bytes() > kMaxCudaArgumentBytes) return reject("too many operands for one CUDA kernel's arguments");
    std::shared_ptr<CompiledEntry> compiled =
        entry->compiledEntry("cuda:" + std::to_string(device.index()) + " " + specialization->toString());
    // A module load inside a CUDA graph capture would break the capture: the first use of a
    // kernel while one is underway runs the original ops (captured as usual) instead.
    if (!compiled->done.load() && cudaCaptureUnderway(device.index())) {
      return reject("first use of this kernel during CUDA graph capture");
    }
    std::call_once(compiled->once, [&] {
      try {
        compiled->cuda_function = loadCudaFunction(lowered.kernel, *specialization, device.index());
        compile_count++;
      } catch (const std::exception& error) {
        compiled->error = error.what();
        log(LogLevel::kWarning, "a fusion group failed to compile or load on " + device.str() +
                                    " and runs unfused from now on: " + compiled->error);
      }
      compiled->done.store(true);
    });
    if (!compiled->cuda_function) return reject("compile failed: " + compiled->error);
    if (compiled->launch_failed.load()) return reject("its kernel failed to launch");
    launch->cuda_function = compiled->cuda_function;
    launch->compiled = compiled;
    launch->cuda_specialization = *specialization;
    return launch;
  }

  CpuLayout layout;
  for (size_t k = 0; k < operands; ++k) {
    int64_t element = k < inputs.size() ? inputs[k].element_size()
                                         : static_cast<int64_t>(c10::elementSize(lowered.output_dtypes[k - inputs.size()]));
    int64_t inner = collapsed[k].back();
    layout.operands.push_back(inner == element ? StrideClass::kContiguous
                              : inner == 0     ? StrideClass::kBroadcast
                                               : StrideClass::kStrided);
  }
  if (launch->numel == 0) return launch;  // empty: outputs only, no kernel

  std::shared_ptr<CompiledEntry> compiled = entry->compiledEntry(layout.toString());
  std::call_once(compiled->once, [&] {
    try {
      compiled->kernel = CpuKernel::compile(lowered.kernel, layout, /*keep_text=*/dumpEnabled());
      compile_count++;
      if (dumpEnabled()) {
        const std::string ir_text = ir::print(lowered.kernel);
        char stem[64];
        std::snprintf(stem, sizeof stem, "%s-%016zx", lowered.kernel.name.c_str(),
                      std::hash<std::string>()(ir_text + layout.toString()));
        dumpKernelFiles(stem, {{"kir", ir_text + "# layout " + layout.toString() + "\n"},
                               {"ll", compiled->kernel->llvmIr()},
                               {"s", compiled->kernel->assembly()}});
      }
      log(LogLevel::kDebug, "compiled a kernel for layout " + layout.toString() + " in " +
                                std::to_string(compiled->kernel->compileMilliseconds()) + " ms:\n" +
                                ir::print(lowered.kernel));
    } catch (const std::exception& error) {
      compiled->error = error.what();
      log(LogLevel::kWarning, "a fusion group failed to compile and runs unfused from now on: " + compiled->error);
    }
  });
  if (!compiled->kernel) return reject("compile failed: " + compiled->error);
  if (compiled->launch_failed.load()) return reject("its kernel failed to launch");
  launch->kernel = compiled->kernel;
  launch->compiled = compiled;
  recordCudaTarget(*launch);
  return launch;
}

}  // namespace

std::shared_ptr<PreparedLaunch> prepare(const std::shared_ptr<FusionProgram>& program,
                                        const std::vector<at::Tensor>& tensors,
                                        const std::vector<double>& floats,
                                        const std::vector<int64_t>& ints, std::string* why) {
  auto reject = [&](const std::string& reason) { return rejectCall(*program, reason, why); };
  if (Options::global().disabled) return reject("KILN_DISABLE is set");
  if (program->failed.load()) return reject(program->failure);
  try {
    return prepareLaunch(program, tensors, floats, ints, why);
  } catch (const std::exception& error) {
    giveUp(*program, std::string("an internal check failed: ") + error.what());
    return reject(program->failure);
  }
}

namespace {

// The group's original ops, interpreted from its decoded code, on the call's arguments.
std::vector<at::Tensor> runFallback(FusionProgram& program, const std::vector<at::Tensor>& tensors,
                                    const std::vector<double>& floats, const std::vector<int64_t>& ints) {
  TORCH_CHECK(program.graph, "kiln::fusion_group: ", program.failure);
  std::call_once(program.fallback_once, [&] {
    program.fallback = std::make_unique<torch::jit::Code>(program.graph->copy(), "kiln_fallback");
  });
  torch::jit::Stack stack;
  size_t t = 0, f = 0, i = 0;
  for (char kind : program.input_kinds) {
    switch (kind) {
      case 't': TORCH_CHECK(t < tensors.size(), "kiln::fusion_group: too few tensors"); stack.emplace_back(tensors[t++]); break;
      case 'f': TORCH_CHECK(f < floats.size(), "kiln::fusion_group: too few floats"); stack.emplace_back(floats[f++]); break;
      case 'i': TORCH_CHECK(i < ints.size(), "kiln::fusion_group: too few ints"); stack.emplace_back(ints[i++]); break;
      default: TORCH_CHECK(i < ints.size(), "kiln::fusion_group: too few ints"); stack.emplace_back(ints[i++] != 0); break;
    }
  }
  torch::jit::InterpreterState(*program.fallback).run(stack);
  std::vector<at::Tensor> outputs;
  for (const c10::IValue& value : stack) outputs.push_back(value.toTensor());
  return outputs;
}

}  // namespace

std::vector<at::Tensor> launchOrFallback(const std::shared_ptr<PreparedLaunch>& prepared,
                                         const std::shared_ptr<FusionProgram>& program,
                                         const std::vector<at::Tensor>& tensors,
                                         const std::vector<double>& floats,
                                         const std::vector<int64_t>& ints) {
  if (prepared) {
    try {
      return launch(*prepared);
    } catch (const std::exception& error) {
      if (prepared->compiled && !prepared->compiled->launch_failed.exchange(true)) {
        log(LogLevel::kWarning, std::string("a fusion group's kernel failed to launch; the group runs unfused for "
                                            "these inputs from now on: ") + error.what());
      } else if (!prepared->compiled) {
        giveUp(*program, std::string("a launch failed: ") + error.what());
      }
    }
  }
  return runFallback(*program, tensors, floats, ints);
}


namespace {

// The argument block of cudaArgumentLayout: data pointers, then (strided schedule) sizes and
// element strides, numel, the scalars as float64 and as int64.
void launchCuda(const PreparedLaunch& prepared, const std::vector<at::Tensor>& outputs) {
  const LoweredGroup& lowered = *prepared.lowered;
  const CudaSpecialization& specialization = prepared.cuda_specialization;
  const CudaArgumentLayout layout = cudaArgumentLayout(lowered.kernel, specialization);
  std::vector<int64_t> arguments;
  std::vector<int64_t> element_sizes;
  for (const at::Tensor& input : prepared.inputs) {
    arguments.push_back(reinterpret_cast<int64_t>(input.const_data_ptr()));
    element_sizes.push_back(input.element_size());
  }
  for (const at::Tensor& output : outputs) {
    arguments.push_back(reinterpret_cast<int64_t>(output.data_ptr()));
    element_sizes.push_back(output.element_size());
  }
  if (layout.rank > 0) {
    for (int64_t size : prepared.sizes) arguments.push_back(size);
    for (size_t k = 0; k < element_sizes.size(); ++k) {
      for (int64_t stride : prepared.input_strides[k]) arguments.push_back(stride / element_sizes[k]);
    }
  }
  if (layout.inner) arguments.push_back(prepared.sizes.back());
  arguments.push_back(prepared.numel);
  for (double value : prepared.float_args) {
    int64_t bits = 0;
    std::memcpy(&bits, &value, sizeof bits);
    arguments.push_back(bits);
  }
  if (prepared.float_args.empty()) arguments.push_back(0);
  for (int64_t value : prepared.int_args) arguments.push_back(value);
  if (prepared.int_args.empty()) arguments.push_back(0);
  const int64_t work = specialization.schedule == CudaSchedule::kLinearVectorized
                           ? std::max<int64_t>(1, prepared.numel / cudaVectorWidth(lowered.kernel))
                           : prepared.numel;
  launchCudaFunction(*prepared.cuda_function, prepared.device.index(), arguments, work);
}

}  // namespace

std::vector<at::Tensor> launch(const PreparedLaunch& prepared) {
  failIfInjected(FaultStage::kLaunch);
  const LoweredGroup& lowered = *prepared.lowered;
  std::vector<at::Tensor> outputs;
  for (at::ScalarType dtype : lowered.output_dtypes) {
    outputs.push_back(at::empty(prepared.shape, at::TensorOptions().dtype(dtype).device(prepared.device)));
  }
  int64_t bytes_fused = 0;
  for (const at::Tensor& input : prepared.inputs) bytes_fused += input.numel() * input.element_size();
  for (const at::Tensor& output : outputs) bytes_fused += output.numel() * output.element_size();
  GroupCounters& counters = *prepared.program->counters;
  counters.calls++;
  counters.bytes_fused = bytes_fused;
  counters.bytes_unfused = lowered.unfused_bytes_per_element * prepared.numel;
  if (prepared.numel == 0) return outputs;
  if (prepared.device.is_cuda()) {
    launchCuda(prepared, outputs);
    return outputs;
  }

  const size_t operands = prepared.inputs.size() + outputs.size();
  std::vector<char*> bases;
  for (const at::Tensor& input : prepared.inputs) bases.push_back(static_cast<char*>(input.data_ptr()));
  for (const at::Tensor& output : outputs) bases.push_back(static_cast<char*>(output.data_ptr()));
  const std::vector<int64_t>& sizes = prepared.sizes;
  const auto& strides = prepared.input_strides;
  const size_t rank = sizes.size();
  const int64_t inner = sizes[rank - 1];
  CpuKernelFn kernel = prepared.kernel->function();
  const double* float_args = prepared.float_args.data();
  const int64_t* int_args = prepared.int_args.data();
  const int64_t grain = Options::global().cpu_parallel_grain;

  if (rank == 1) {
    // One long row: split it into chunks.
    at::parallel_for(0, inner, grain, [&](int64_t begin, int64_t end) {
      std::vector<char*> data(operands);
      std::vector<int64_t> call_strides(2 * operands, 0);
      for (size_t k = 0; k < operands; ++k) {
        data[k] = bases[k] + begin * strides[k][0];
        call_strides[k] = strides[k][0];
      }
      kernel(data.data(), call_strides.data(), end - begin, 1, float_args, int_args);
    });
    return outputs;
  }
  // Rows of the innermost dim; consecutive rows sharing the outer indices go in one 2-D call.
  const int64_t rows = prepared.numel / inner;
  const int64_t row_block = sizes[rank - 2];
  at::parallel_for(0, rows, std::max<int64_t>(1, grain / inner), [&](int64_t begin, int64_t end) {
    std::vector<char*> data(operands);
    std::vector<int64_t> call_strides(2 * operands);
    for (size_t k = 0; k < operands; ++k) {
      call_strides[k] = strides[k][rank - 1];
      call_strides[operands + k] = strides[k][rank - 2];
    }
    int64_t row = begin;
    while (row < end) {
      int64_t within = row % row_block;
      int64_t count = std::min(end - row, row_block - within);
      // Offsets of the dims outside the 2-D block.
      for (size_t k = 0; k < operands; ++k) data[k] = bases[k] + within * strides[k][rank - 2];
      int64_t outer_index = row / row_block;
      for (size_t d = rank - 2; d-- > 0;) {
        int64_t index = outer_index % sizes[d];
        outer_index /= sizes[d];
        for (size_t k = 0; k < operands; ++k) data[k] += index * strides[k][d];
      }
      kernel(data.data(), call_strides.data(), inner, count, float_args, int_args);
      row += count;
    }
  });
  return outputs;
}

int64_t kernelCompileCount() { return compile_count.load(); }

std::optional<CudaSpecialization> cudaSpecializationFor(const PreparedLaunch& prepared, std::string* why) {
  const LoweredGroup& lowered = *prepared.lowered;
  const size_t inputs = prepared.inputs.size();
  const size_t operands = inputs + lowered.output_dtypes.size();
  auto elementSize = [&](size_t k) {
    return k < inputs ? prepared.inputs[k].element_size()
                      : static_cast<int64_t>(c10::elementSize(lowered.output_dtypes[k - inputs]));
  };
  const size_t rank = prepared.sizes.size();
  CudaSpecialization specialization;
  // 32-bit indices while every element offset (and the grid-stride loop's step past the end)
  // stays below 2^31.
  const int64_t limit = (int64_t{1} << 31) - (int64_t{1} << 24);
  bool index64 = prepared.numel >= limit;
  for (size_t k = 0; k < operands; ++k) {
    int64_t largest = 0;
    for (size_t d = 0; d < rank; ++d) largest += (prepared.sizes[d] - 1) * std::abs(prepared.input_strides[k][d]) / elementSize(k);
    index64 |= largest >= limit;
  }
  specialization.index64 = index64;
  // Linear schedules: one dimension where each operand is contiguous or broadcast, or two
  // dimensions [rows, inner] where each operand is contiguous over both, broadcast, one row
  // broadcast over the rows, or one value per row.
  if (rank <= 2) {
    const int64_t inner = prepared.sizes[rank - 1];
    std::vector<CudaAccess> access;
    for (size_t k = 0; k < operands; ++k) {
      const int64_t element = elementSize(k);
      const int64_t inner_stride = prepared.input_strides[k][rank - 1];
      const int64_t outer_stride = rank == 2 ? prepared.input_strides[k][0] : 0;
      if (inner_stride == element && (rank == 1 || outer_stride == inner * element)) access.push_back(CudaAccess::kFull);
      else if (inner_stride == 0 && outer_stride == 0) access.push_back(CudaAccess::kScalar);
      else if (rank == 2 && inner_stride == element && outer_stride == 0) access.push_back(CudaAccess::kRow);
      else if (rank == 2 && inner_stride == 0 && outer_stride == element) access.push_back(CudaAccess::kColumn);
      else break;
    }
    if (access.size() == operands) {
      specialization.schedule = CudaSchedule::kLinear;
      specialization.access = access;
      // Vectorized: every operand read by vectors starts aligned to one, and a vector never
      // straddles two rows. Outputs come from torch's caching allocator (512-byte aligned).
      const int width = cudaVectorWidth(lowered.kernel);
      bool vectorize = prepared.numel >= width && (!specialization.usesInner() || inner % width == 0);
      for (size_t k = 0; vectorize && k < inputs; ++k) {
        if (access[k] != CudaAccess::kFull && access[k] != CudaAccess::kRow) continue;
        vectorize = reinterpret_cast<uintptr_t>(prepared.inputs[k].const_data_ptr()) %
                        static_cast<uintptr_t>(width * elementSize(k)) == 0;
      }
      if (vectorize) specialization.schedule = CudaSchedule::kLinearVectorized;
      return specialization;
    }
  }
  if (rank > static_cast<size_t>(kMaxCudaRank)) {
    if (why) *why = "rank " + std::to_string(rank) + " after collapsing exceeds " + std::to_string(kMaxCudaRank);
    return std::nullopt;
  }
  for (size_t k = 0; k < operands; ++k) {
    for (size_t d = 0; d < rank; ++d) {
      if (prepared.input_strides[k][d] % elementSize(k) != 0) {
        if (why) *why = "a stride that is not a whole number of elements";
        return std::nullopt;
      }
    }
  }
  specialization.schedule = CudaSchedule::kStrided;
  specialization.rank = static_cast<int>(rank);
  return specialization;
}

namespace {
thread_local CudaTargetRecorder* active_recorder = nullptr;
}  // namespace

CudaTargetRecorder::CudaTargetRecorder() { active_recorder = this; }
CudaTargetRecorder::~CudaTargetRecorder() { active_recorder = nullptr; }

void recordCudaTarget(const PreparedLaunch& prepared) {
  CudaTargetRecorder* recorder = active_recorder;
  if (!recorder || prepared.numel == 0) return;
  std::string why;
  std::optional<CudaSpecialization> specialization = cudaSpecializationFor(prepared, &why);
  if (!specialization) {
    recorder->skipped.push_back(why);
    return;
  }
  std::string key = ir::print(prepared.lowered->kernel) + "|" + specialization->toString();
  if (std::find(recorder->keys_.begin(), recorder->keys_.end(), key) != recorder->keys_.end()) return;
  recorder->keys_.push_back(key);
  recorder->targets_.push_back({prepared.lowered->kernel, *specialization});
}

}  // namespace kiln
