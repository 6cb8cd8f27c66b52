#include "torch_ops/fusion_runtime.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/interpreter.h>

#include <atomic>
#include <chrono>
#include <map>
#include <set>
#include <mutex>
#include <unordered_map>

#include "codegen/cuda_emulator.h"
#include "codegen/fault_injection.h"
#include "fuser/group_code.h"
#include "fuser/group_stats.h"
#include "fuser/lowering.h"
#include "kiln/options.h"
#include "torch_ops/fusion_cuda.h"

namespace kiln {

// A group lowered for one signature, with its kernels.
struct SignatureEntry {
  std::optional<LoweredGroup> lowered;
  std::unique_ptr<KernelFamily> family;  // set when lowered
  std::vector<int64_t> cpu_scratch;      // the CPU kernel's scratch rows: bytes per element each
  std::string why;                       // why not lowered
};

struct FusionProgram {
  std::string text;
  GroupCounters* counters = nullptr;  // kiln::report's statistics for this group
  std::shared_ptr<torch::jit::Graph> graph;  // null when the code could not be decoded
  KernelOptions options;  // from the code; Options::global() for a code that carries none
  std::vector<char> input_kinds;  // 't' tensor, 'f' float, 'i' int, 'b' bool, per subgraph input
  std::vector<bool> number_tensors;  // per tensor input: stands for a Python number (group code)
  std::mutex mutex;
  std::map<std::vector<int64_t>, std::shared_ptr<SignatureEntry>> signatures;
  std::set<std::string> reasons_said;  // fallback reasons logged so far
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
  std::shared_ptr<SignatureEntry> entry;  // the group lowered for this call's signature
  c10::Device device = c10::kCPU;
  std::vector<at::Tensor> inputs;   // tensor inputs as the kernel loads them
  std::vector<double> float_args;   // per kernel scalar input
  std::vector<int64_t> int_args;
  std::vector<int64_t> shape;       // iteration shape (as eager's output shape)
  LaunchPlan plan;                  // from the pipeline
};

namespace {

std::mutex programs_mutex;
thread_local KernelRecorder* active_recorder = nullptr;  // set by a KernelRecording
thread_local bool recording_for_cuda = false;             // and lower as for a CUDA device
std::atomic<int64_t> emulated_resident_blocks{0};         // > 0: a CudaEmulation is alive

bool emulatingCuda(c10::Device device) { return device.is_cpu() && emulated_resident_blocks.load() > 0; }

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
  program->options = KernelOptions::from(Options::global());
  try {
    failIfInjected(FaultStage::kDecode);
    std::shared_ptr<torch::jit::Graph> graph = decodeGroupCode(text);
    if (std::optional<KernelOptions> options = groupCodeOptions(text)) program->options = *options;
    const std::vector<bool> numbers = groupCodeNumberInputs(text);
    for (size_t i = 0; i < graph->inputs().size(); ++i) {
      const torch::jit::Value* input = graph->inputs()[i];
      switch (input->type()->kind()) {
        case c10::TypeKind::TensorType:
          program->input_kinds.push_back('t');
          program->number_tensors.push_back(i < numbers.size() && numbers[i]);
          break;
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

// A call that takes the fallback: counted in the group's statistics, with the reason for `why`;
// each reason is logged once per group (KILN_LOG=info).
std::shared_ptr<PreparedLaunch> rejectCall(FusionProgram& program, const std::string& reason, std::string* why) {
  if (why) *why = reason;
  program.counters->fallbacks++;
  if (Options::global().log_level >= LogLevel::kInfo) {
    std::lock_guard<std::mutex> lock(program.mutex);
    if (program.reasons_said.insert(reason).second) log(LogLevel::kInfo, "a fusion group's call runs its original ops: " + reason);
  }
  return nullptr;
}

// The call's signature: per input, (dtype, rank) for tensors, kind for scalars, and the one
// device every tensor is on. Empty, or why the call cannot be fused (eager would move a CPU
// 0-dim tensor to the GPU: the fallback does).
struct CallSignature {
  c10::Device device = c10::kCPU;
  bool lower_for_cuda = false;
  bool emulated_cuda = false;  // CPU tensors run as on a CUDA device (CudaEmulation), read once per call
  std::vector<int64_t> key;
  std::vector<InputSignature> inputs;
};

std::string readSignature(const FusionProgram& program, const std::vector<at::Tensor>& tensors,
                          const std::vector<double>& floats, const std::vector<int64_t>& ints,
                          CallSignature* signature) {
  size_t t = 0, f = 0, i = 0;
  for (char kind : program.input_kinds) {
    InputSignature input;
    switch (kind) {
      case 't': {
        if (t >= tensors.size()) return "too few tensors";
        const at::Tensor& tensor = tensors[t++];
        if (!tensor.defined()) return "undefined tensor";
        if (t == 1) signature->device = tensor.device();
        if (tensor.device() != signature->device) return "inputs on " + signature->device.str() + " and " + tensor.device().str();
        if (tensor.layout() != c10::kStrided) return "non-strided tensor";
        if (at::GradMode::is_enabled() && tensor.requires_grad()) return "input requires grad";
        input.dtype = tensor.scalar_type();
        input.dim = tensor.dim();
        input.wrapped_number = program.number_tensors[t - 1] || tensor.unsafeGetTensorImpl()->is_wrapped_number();
        break;
      }
      case 'f': input = {false, at::kDouble, 0}; f++; break;
      case 'i': input = {false, at::kLong, 0}; i++; break;
      default: input = {false, at::kBool, 0}; i++; break;
    }
    signature->key.push_back(static_cast<int64_t>(input.dtype) * 64 + input.dim + (input.is_tensor ? 0 : 32) +
                             (input.wrapped_number ? int64_t{1} << 20 : 0));
    signature->inputs.push_back(input);
  }
  if (t != tensors.size() || f != floats.size() || i != ints.size()) return "argument count mismatch";
  const c10::Device device = signature->device;
  // Lowering follows eager's kernels on each device (a recording for a GPU lowers as for one).
  signature->emulated_cuda = emulatingCuda(device);
  signature->lower_for_cuda = device.is_cuda() || recording_for_cuda || signature->emulated_cuda;
  signature->key.push_back(signature->emulated_cuda ? 2 : signature->lower_for_cuda ? 1 : 0);
  std::string unavailable;
  if (device.is_cuda() && !cudaFusionAvailable(device.index(), &unavailable)) return unavailable;
  if (!device.is_cuda() && !device.is_cpu()) return "device " + device.str() + " has no kiln backend";
  return "";
}

// The group lowered for `signature` (once per signature; a failure is remembered with its why).
std::shared_ptr<SignatureEntry> loweredFor(FusionProgram& program, const CallSignature& signature) {
  std::lock_guard<std::mutex> lock(program.mutex);
  std::shared_ptr<SignatureEntry>& slot = program.signatures[signature.key];
  if (slot) return slot;
  slot = std::make_shared<SignatureEntry>();
  try {
    failIfInjected(FaultStage::kLower);
    slot->lowered = lowerGroup(*program.graph, signature.inputs, &slot->why, signature.lower_for_cuda);
    if (slot->lowered) {
      slot->family = std::make_unique<KernelFamily>(slot->lowered->kernel, program.options);
      slot->cpu_scratch = planCpuStash(slot->lowered->kernel).scratch_element_bytes;
    } else {
      log(LogLevel::kInfo, "group left to eager for this signature: " + slot->why);
    }
  } catch (const std::exception& error) {
    slot->lowered.reset();
    slot->why = std::string("lowering failed: ") + error.what();
    log(LogLevel::kWarning, "a fusion group runs unfused for this signature from now on: " + slot->why);
  }
  return slot;
}

// batch_norm's per-channel [C] tensors, viewed as [C, 1, …] to broadcast along dim 1 of the
// normalized input, which must have C channels (eager raises otherwise: so does the fallback).
std::string viewChannelParams(const LoweredGroup& lowered, const std::vector<at::Tensor>& tensors,
                              std::vector<at::Tensor>& inputs) {
  for (const ChannelParam& param : lowered.channel_params) {
    at::Tensor& tensor = inputs[static_cast<size_t>(param.input)];
    std::vector<int64_t> x_shape;
    for (int source : param.x_sources) {
      if (!broadcastInto(x_shape, tensors[static_cast<size_t>(source)].sizes())) return "shapes do not broadcast";
    }
    if (static_cast<int64_t>(x_shape.size()) != param.x_rank || x_shape[1] != tensor.size(0)) {
      return "batch_norm parameter does not match the input's channels";
    }
    std::vector<int64_t> view(static_cast<size_t>(param.x_rank - 1), 1);
    view[0] = tensor.size(0);
    tensor = tensor.view(view);
  }
  return "";
}

// Each scalar input as the kernel reads it: a float64 and an int64 slot per scalar.
// (`group_ints`: every scalar input's int slot, the kernel's or not.)
void packScalars(const FusionProgram& program, const LoweredGroup& lowered, const std::vector<double>& floats,
                 const std::vector<int64_t>& ints, PreparedLaunch& launch, std::vector<int64_t>* group_ints) {
  std::vector<double> group_floats;
  size_t fi = 0, ii = 0;
  for (char kind : program.input_kinds) {
    if (kind == 't') continue;
    group_floats.push_back(kind == 'f' ? floats[fi++] : 0.0);
    group_ints->push_back(kind == 'f' ? 0 : kind == 'b' ? (ints[ii++] != 0) : ints[ii++]);
  }
  for (int source : lowered.scalar_sources) {
    launch.float_args.push_back(group_floats[static_cast<size_t>(source)]);
    launch.int_args.push_back((*group_ints)[static_cast<size_t>(source)]);
  }
}

// Eager's output shape: the broadcast of the inputs each output is computed from. Every output
// must have the same shape (the iteration space). `shaped` marks the inputs that take part; one
// read only for its dtype (type_as) does not and is never loaded.
std::string iterationShape(const LoweredGroup& lowered, const std::vector<at::Tensor>& inputs,
                           std::vector<int64_t>* shape, std::vector<bool>* shaped) {
  shaped->assign(inputs.size(), false);
  for (size_t o = 0; o < lowered.output_sources.size(); ++o) {
    std::vector<int64_t> output_shape;
    for (int source : lowered.output_sources[o]) {
      if (!broadcastInto(output_shape, inputs[static_cast<size_t>(source)].sizes())) return "shapes do not broadcast";
      (*shaped)[static_cast<size_t>(source)] = true;
    }
    if (o == 0) *shape = output_shape;
    if (output_shape != *shape) return "outputs of different shapes";
  }
  return "";
}

// A group with row reductions reduces the iteration shape's innermost dimension: what each
// reduction reads (and each per-element operand a per-row value meets) must span that row, as
// eager's reduction over dim -1 of that operand would; a normalization's row and parameters must
// have its normalized_shape.
std::string checkRows(const LoweredGroup& lowered, const std::vector<at::Tensor>& inputs,
                      const std::vector<int64_t>& shape, const std::vector<int64_t>& int_args) {
  if (!lowered.kernel.hasReductions()) return "";
  if (shape.empty()) return "a row reduction of a 0-dim tensor";
  const int64_t row = shape.back();
  if (row == 0) return "a row reduction over an empty row";
  if (lowered.row_length >= 0 && row != lowered.row_length) return "the row does not have normalized_shape's length";
  if (lowered.row_length_scalar >= 0 && row != int_args[static_cast<size_t>(lowered.row_length_scalar)]) {
    return "the row does not have normalized_shape's length";
  }
  for (int param : lowered.row_params) {
    const at::Tensor& tensor = inputs[static_cast<size_t>(param)];
    if (tensor.dim() != 1 || tensor.size(0) != row) return "a normalization's weight or bias does not match its row";
  }
  for (const std::vector<int>& span : lowered.row_spans) {
    std::vector<int64_t> spanned;
    for (int source : span) {
      if (!broadcastInto(spanned, inputs[static_cast<size_t>(source)].sizes())) return "shapes do not broadcast";
    }
    if (spanned.empty() || spanned.back() != row) return "a reduced operand does not span the row";
  }
  return "";
}

// The shape of output `o` over the iteration shape.
std::vector<int64_t> outputShape(const LoweredGroup& lowered, size_t o, const std::vector<int64_t>& shape) {
  std::vector<int64_t> result = shape;
  switch (lowered.output_rows[o]) {
    case OutputRows::kElements: break;
    case OutputRows::kKeepDim: result.back() = 1; break;
    case OutputRows::kDropDim: result.pop_back(); break;
  }
  return result;
}

// The call as the pipeline sees it: byte strides over the iteration shape (0 where broadcast),
// inputs then (fresh, contiguous) outputs; where each input starts.
KernelCall kernelCall(const LoweredGroup& lowered, const std::vector<at::Tensor>& inputs, const std::vector<int64_t>& shape,
                      const std::vector<bool>& shaped, c10::Device device, bool emulated_cuda) {
  KernelCall call;
  const size_t rank = shape.size();
  call.shape = shape;
  for (size_t k = 0; k < inputs.size(); ++k) {
    const at::Tensor& tensor = inputs[k];
    std::vector<int64_t> strides(rank, 0);
    const size_t offset = rank - static_cast<size_t>(tensor.dim());
    for (size_t d = 0; shaped[k] && d < static_cast<size_t>(tensor.dim()); ++d) {
      const int64_t dim = static_cast<int64_t>(d);
      strides[offset + d] = tensor.size(dim) == 1 ? 0 : tensor.stride(dim) * tensor.element_size();
    }
    call.strides.push_back(std::move(strides));
    call.element_sizes.push_back(tensor.element_size());
    // On a device (or the emulated one, which reads this memory), the data pointer; on the CPU (a
    // stand-in for kiln compile), the offset in its allocation, which a GPU's caching allocator
    // aligns as the CPU's allocator may not.
    call.addresses.push_back(device.is_cuda() || emulated_cuda ? reinterpret_cast<uintptr_t>(tensor.const_data_ptr())
                                              : static_cast<uintptr_t>(tensor.storage_offset() * tensor.element_size()));
  }
  for (size_t o = 0; o < lowered.output_dtypes.size(); ++o) {
    // Fresh and contiguous; a per-row output does not move along the row.
    std::vector<int64_t> strides(rank, 0);
    int64_t stride = static_cast<int64_t>(c10::elementSize(lowered.output_dtypes[o]));
    call.element_sizes.push_back(stride);
    const bool per_row = lowered.output_rows[o] != OutputRows::kElements;
    for (size_t d = rank; d-- > 0;) {
      if (per_row && d == rank - 1) continue;
      strides[d] = stride;
      stride *= shape[d];
    }
    call.strides.push_back(std::move(strides));
  }
  call.recorder = active_recorder;
  call.background_compile = Options::global().background_compile;
  if (device.is_cuda()) {
    const int index = device.index();
    call.cuda_device = index;
    call.cuda_arch = cudaArch(index);
    call.may_compile = [index] { return !cudaCaptureUnderway(index); };
  } else if (emulated_cuda) {
    call.cuda_device = 0;
    call.cuda_arch = kEmulatedCudaArch;
    call.background_compile = false;
  }
  return call;
}

std::shared_ptr<PreparedLaunch> prepareLaunch(const std::shared_ptr<FusionProgram>& program,
                                              const std::vector<at::Tensor>& tensors,
                                              const std::vector<double>& floats,
                                              const std::vector<int64_t>& ints, std::string* why) {
  auto reject = [&](const std::string& reason) { return rejectCall(*program, reason, why); };
  CallSignature signature;
  if (std::string reason = readSignature(*program, tensors, floats, ints, &signature); !reason.empty()) return reject(reason);
  std::shared_ptr<SignatureEntry> entry = loweredFor(*program, signature);
  if (!entry->lowered) return reject(entry->why);
  failIfInjected(FaultStage::kGuard);

  auto launch = std::make_shared<PreparedLaunch>();
  launch->program = program;
  launch->entry = entry;
  launch->device = signature.device;
  launch->inputs = tensors;
  const LoweredGroup& lowered = *entry->lowered;
  if (std::string reason = viewChannelParams(lowered, tensors, launch->inputs); !reason.empty()) return reject(reason);
  std::vector<int64_t> group_ints;
  packScalars(*program, lowered, floats, ints, *launch, &group_ints);
  std::vector<bool> shaped;
  if (std::string reason = iterationShape(lowered, launch->inputs, &launch->shape, &shaped); !reason.empty()) {
    return reject(reason);
  }
  if (std::string reason = checkRows(lowered, launch->inputs, launch->shape, group_ints); !reason.empty()) return reject(reason);
  const KernelCall call = kernelCall(lowered, launch->inputs, launch->shape, shaped, signature.device, signature.emulated_cuda);
  std::string not_planned;
  if (!planLaunch(*entry->family, call, loadCudaFunction, &launch->plan, &not_planned)) return reject(not_planned);
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
      if (prepared->device.is_cuda()) return launch(*prepared);
      // On the CPU the call is synchronous: its wall time is the group's (kiln report, --roofline).
      const auto start = std::chrono::steady_clock::now();
      std::vector<at::Tensor> outputs = launch(*prepared);
      GroupCounters& counters = *prepared->program->counters;
      counters.timed_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
      counters.timed_calls++;
      return outputs;
    } catch (const std::exception& error) {
      const std::shared_ptr<CompiledKernel>& compiled = prepared->plan.compiled;
      if (compiled && !compiled->launch_failed.exchange(true)) {
        log(LogLevel::kWarning, std::string("a fusion group's kernel failed to launch; the group runs unfused for "
                                            "these inputs from now on: ") + error.what());
      } else if (!compiled) {
        giveUp(*program, std::string("a launch failed: ") + error.what());
      }
    }
  }
  return runFallback(*program, tensors, floats, ints);
}


std::vector<at::Tensor> launch(const PreparedLaunch& prepared) {
  failIfInjected(FaultStage::kLaunch);
  const LoweredGroup& lowered = *prepared.entry->lowered;
  const LaunchPlan& plan = prepared.plan;
  std::vector<at::Tensor> outputs;
  for (size_t o = 0; o < lowered.output_dtypes.size(); ++o) {
    outputs.push_back(at::empty(outputShape(lowered, o, prepared.shape),
                                at::TensorOptions().dtype(lowered.output_dtypes[o]).device(prepared.device)));
  }
  int64_t bytes_fused = 0;
  for (const at::Tensor& input : prepared.inputs) bytes_fused += input.numel() * input.element_size();
  for (const at::Tensor& output : outputs) bytes_fused += output.numel() * output.element_size();
  GroupCounters& counters = *prepared.program->counters;
  counters.calls++;
  counters.bytes_fused = bytes_fused;
  counters.bytes_unfused = lowered.unfused_bytes_per_element * plan.geometry.numel;
  if (plan.geometry.numel == 0) return outputs;
  if (prepared.device.is_cuda() || plan.compiled->emulated) {
    std::vector<const void*> pointers;
    for (const at::Tensor& input : prepared.inputs) pointers.push_back(input.const_data_ptr());
    for (const at::Tensor& output : outputs) pointers.push_back(output.const_data_ptr());
    std::vector<int64_t> arguments = packCudaArguments(lowered.kernel, plan.cuda, plan.geometry, pointers,
                                                       prepared.float_args, prepared.int_args);
    const int64_t work = cudaWorkItems(lowered.kernel, plan.cuda, plan.geometry);
    if (plan.compiled->emulated) {
      launchEmulatedCuda(*plan.compiled->emulated, cudaGridBlocks(work, emulated_resident_blocks.load()), arguments);
    } else {
      launchCudaFunction(*plan.compiled->cuda, prepared.device.index(), arguments, work);
    }
    return outputs;
  }

  const size_t operands = prepared.inputs.size() + outputs.size();
  std::vector<char*> bases;
  for (const at::Tensor& input : prepared.inputs) bases.push_back(static_cast<char*>(input.data_ptr()));
  for (const at::Tensor& output : outputs) bases.push_back(static_cast<char*>(output.data_ptr()));
  const std::vector<int64_t>& sizes = plan.geometry.sizes;
  const auto& strides = plan.geometry.strides;
  const size_t rank = sizes.size();
  const int64_t inner = sizes[rank - 1];
  CpuKernelFn kernel = plan.compiled->cpu->function();
  const double* float_args = prepared.float_args.data();
  const int64_t* int_args = prepared.int_args.data();
  const int64_t grain = prepared.program->options.cpu_parallel_grain;

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
  const int64_t rows = plan.geometry.numel / inner;
  const int64_t row_block = sizes[rank - 2];
  const std::vector<int64_t>& scratch = prepared.entry->cpu_scratch;
  at::parallel_for(0, rows, std::max<int64_t>(1, grain / inner), [&](int64_t begin, int64_t end) {
    // A reduction kernel's scratch rows, after the operands: one of each per task.
    std::vector<std::vector<char>> scratch_rows;
    std::vector<char*> data(operands);
    for (int64_t bytes : scratch) {
      scratch_rows.emplace_back(static_cast<size_t>(bytes * inner));
      data.push_back(scratch_rows.back().data());
    }
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

int64_t kernelCompileCount() { return kernelsMade(); }

KernelCache::Stats kernelCacheStats() { return KernelCache::global().stats(); }

KernelRecording::KernelRecording(bool for_cuda) {
  active_recorder = &recorder_;
  recording_for_cuda = for_cuda;
}
KernelRecording::~KernelRecording() {
  active_recorder = nullptr;
  recording_for_cuda = false;
}

CudaEmulation::CudaEmulation(int64_t resident_blocks) { emulated_resident_blocks.store(std::max<int64_t>(1, resident_blocks)); }
CudaEmulation::~CudaEmulation() { emulated_resident_blocks.store(0); }

}  // namespace kiln
