// The kiln command-line tool: env, demo, report, fuse, compile, cache.
// Every --json output is one JSON object on stdout. Every error is one line on stderr: exit code 2
// for a usage error, a model that cannot be loaded or a bad KILN_* value; 1 for a file that could
// not be written (which then is as it was: outputs are written whole and renamed into place).
#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/version.h>
#include <torch/script.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <map>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "codegen/atomic_file.h"
#include "codegen/cuda_driver.h"
#include "codegen/json.h"
#include "codegen/cuda_kernel_builder.h"
#include "codegen/kernel_cache.h"
#include "codegen/nvrtc_compiler.h"
#include "kiln/options.h"
#include "torch_ops/fusion_runtime.h"
#include "codegen/versions.h"
#include "fuser/fusion_pass.h"
#include "kiln/kiln.h"
#include "tools/cli_args.h"
#include "tools/demo_model.h"

namespace {

using kiln::cli::Args;
using kiln::cli::UsageError;

// An error printed as the one line "kiln: MESSAGE" (no usage hint) with its exit code.
struct CliError : std::runtime_error {
  CliError(const std::string& message, int code) : std::runtime_error(message), exit_code(code) {}
  int exit_code;
};

constexpr const char* kUsage =
    "usage: kiln VERB [ARGS]\n"
    "  env [--json]                                  versions, GPU, cache directory\n"
    "  demo [--device cpu|cuda] [--json] [--save FILE]  run the embedded BERT-style encoder layer\n"
    "  report MODEL.pt [--input SHAPE:DTYPE]... [--json] [--dot FILE]  what kiln fuses, bytes saved\n"
    "  fuse IN.pt OUT.pt                             fuse ahead of time and save (needs libkiln to load)\n"
    "  compile MODEL.pt --input SHAPE:DTYPE... --arch sm_90 [--json]\n"
    "                                                compile every CUDA kernel the model needs into the\n"
    "                                                disk cache (no GPU needed)\n"
    "  cache info|clear [--json]                     the disk cache: where, how full; empty it\n";

bool cudaAvailable() { return torch::cuda::is_available(); }

// The one line of a torch error worth printing: a TorchScript traceback ends with the error
// itself ("RuntimeError: ..."); any other message starts with it.
std::string errorLine(const std::string& message) {
  std::vector<std::string> lines;
  std::istringstream stream(message);
  for (std::string line; std::getline(stream, line);) {
    const size_t start = line.find_first_not_of(" \t\r");
    if (start != std::string::npos) lines.push_back(line.substr(start));
  }
  if (lines.empty()) return "unknown error";
  const bool traceback = message.find("Traceback of TorchScript") != std::string::npos;
  return traceback ? lines.back() : lines.front();
}

// Every file the CLI writes goes through here: on failure the old file is untouched, exit code 1.
void writeOutput(const std::string& path, const std::string& contents) {
  const std::string error = kiln::writeFileAtomically(path, contents);
  if (!error.empty()) throw CliError(error, 1);
}

// torch writes the archive to memory first, so a full disk cannot cut a model file short.
void saveModel(const torch::jit::Module& module, const std::string& path) {
  std::ostringstream archive;
  module.save(archive);
  writeOutput(path, archive.str());
}

int runEnv(const Args& args) {
  std::vector<kiln::cuda::DeviceInfo> gpus = kiln::cuda::devices();
  std::string gpu = "none";
  std::string arch = "none";
  if (!gpus.empty()) {
    gpu = gpus[0].name;
    arch = "sm_" + std::to_string(gpus[0].major) + std::to_string(gpus[0].minor);
  }
  const kiln::Options& options = kiln::Options::global();
  if (args.has("--json")) {
    std::cout << "{\"kiln\": " << kiln::jsonQuote(kiln::version())
              << ", \"torch\": " << kiln::jsonQuote(TORCH_VERSION)
              << ", \"cuda_driver\": " << kiln::jsonQuote(kiln::cuda::driverVersion())
              << ", \"nvrtc\": " << kiln::jsonQuote(kiln::cuda::nvrtcVersion())
              << ", \"llvm\": " << kiln::jsonQuote(kiln::llvmVersion()) << ", \"gpu\": " << kiln::jsonQuote(gpu)
              << ", \"gpu_count\": " << gpus.size() << ", \"arch\": " << kiln::jsonQuote(arch)
              << ", \"torch_cuda\": " << (cudaAvailable() ? "true" : "false")
              << ", \"cpu_threads\": " << at::get_num_threads()
              << ", \"cache_dir\": " << kiln::jsonQuote(options.cache_dir)
              << ", \"pass_enabled\": " << (kiln::enabled() ? "true" : "false") << "}\n";
    return 0;
  }
  std::cout << "kiln        " << kiln::version() << "\n"
            << "torch       " << TORCH_VERSION << "\n"
            << "CUDA driver " << kiln::cuda::driverVersion() << "\n"
            << "NVRTC       " << kiln::cuda::nvrtcVersion() << "\n"
            << "LLVM        " << kiln::llvmVersion() << "\n"
            << "GPU         " << gpu << (gpus.empty() ? "" : " (" + arch + ")") << "\n"
            << "CPU threads " << at::get_num_threads() << "\n"
            << "cache dir   " << options.cache_dir << "\n"
            << "pass        " << (kiln::enabled() ? "enabled" : "disabled (KILN_DISABLE)") << "\n";
  return 0;
}

struct Timing {
  at::Tensor output;
  double ms_per_forward = 0;
  std::shared_ptr<torch::jit::Graph> graph;
};

Timing timeForward(torch::jit::Module& module, const std::vector<torch::jit::IValue>& inputs,
                   bool cuda, int warmup, int iterations) {
  torch::NoGradGuard no_grad;
  Timing timing;
  for (int i = 0; i < warmup; ++i) timing.output = module.forward(inputs).toTensor();
  timing.graph = torch::jit::lastExecutedOptimizedGraph();
  if (cuda) torch::cuda::synchronize();
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iterations; ++i) timing.output = module.forward(inputs).toTensor();
  if (cuda) torch::cuda::synchronize();
  std::chrono::duration<double, std::milli> elapsed = std::chrono::steady_clock::now() - start;
  timing.ms_per_forward = elapsed.count() / iterations;
  return timing;
}

int runDemo(const Args& args) {
  std::string device_name = args.value("--device", cudaAvailable() ? "cuda" : "cpu");
  if (device_name != "cpu" && device_name != "cuda") throw UsageError("--device must be cpu or cuda");
  if (device_name == "cuda" && !cudaAvailable()) {
    throw UsageError("--device cuda: no CUDA device is available here");
  }
  const bool cuda = device_name == "cuda";
  torch::Device device(cuda ? torch::kCUDA : torch::kCPU);
  torch::ScalarType dtype = cuda ? torch::kHalf : torch::kFloat;
  kiln::demo::EncoderConfig config;
  torch::jit::Module layer = kiln::demo::encoderLayer(config, device, dtype);
  std::vector<torch::jit::IValue> inputs = kiln::demo::encoderInputs(config, device, dtype);
  if (args.values.count("--save")) {
    std::string path = args.value("--save", "");
    saveModel(layer, path);
    std::cerr << "kiln demo: saved the unfused encoder layer to " << path << "\n";
  }
  const int warmup = 3;
  const int iterations = cuda ? 50 : 5;

  const bool was_enabled = kiln::enabled();
  kiln::disable();
  torch::jit::Module unfused_module = layer.clone();
  Timing unfused = timeForward(unfused_module, inputs, cuda, warmup, iterations);
  kiln::enable();
  torch::jit::Module fused_module = layer.clone();
  Timing fused = timeForward(fused_module, inputs, cuda, warmup, iterations);
  if (!was_enabled) kiln::disable();

  kiln::Report report = kiln::report(fused.graph);
  at::Tensor reference = unfused.output.to(torch::kFloat64);
  at::Tensor result = fused.output.to(torch::kFloat64);
  double max_error = (reference - result).abs().max().item<double>();
  double tolerance = cuda ? 2e-2 : 1e-4;
  bool match = max_error <= tolerance && !std::isnan(max_error);
  double checksum = result.sum().item<double>();
  // The disk cache serves CUDA kernels: a second run with the same cache compiles nothing.
  const kiln::KernelCache::Stats cache = kiln::KernelCache::global().stats();

  if (args.has("--json")) {
    std::cout << "{\"model\": \"bert-base encoder layer\", \"device\": " << kiln::jsonQuote(device_name)
              << ", \"dtype\": " << kiln::jsonQuote(c10::toString(dtype)) << ", \"batch\": " << config.batch
              << ", \"sequence\": " << config.sequence << ", \"checksum\": " << checksum
              << ", \"unfused_ms\": " << unfused.ms_per_forward
              << ", \"fused_ms\": " << fused.ms_per_forward << ", \"max_abs_error\": " << max_error
              << ", \"match\": " << (match ? "true" : "false") << ", \"kernel_cache\": {\"hits\": " << cache.hits
              << ", \"misses\": " << cache.misses << ", \"stores\": " << cache.stores << "}"
              << ", \"report\": " << report.toJson() << "}\n";
  } else {
    std::printf("kiln demo: BERT-base encoder layer (hidden %lld, %lld heads, FFN %lld), batch %lld, "
                "sequence %lld, %s %s, %d CPU threads\n",
                static_cast<long long>(config.hidden), static_cast<long long>(config.heads),
                static_cast<long long>(config.ffn), static_cast<long long>(config.batch),
                static_cast<long long>(config.sequence), device_name.c_str(),
                c10::toString(dtype), at::get_num_threads());
    std::printf("output checksum   %.6f\n", checksum);
    std::printf("unfused           %.3f ms per forward\n", unfused.ms_per_forward);
    std::printf("fused (kiln)      %.3f ms per forward (%.2fx)\n", fused.ms_per_forward,
                unfused.ms_per_forward / fused.ms_per_forward);
    std::printf("fused vs unfused  max |diff| %.3g (%s, tolerance %.0e)\n", max_error,
                match ? "match" : "MISMATCH", tolerance);
    if (cuda) {
      std::printf("CUDA kernels      %lld from the disk cache, %lld compiled (%s)\n", static_cast<long long>(cache.hits),
                  static_cast<long long>(cache.misses), kiln::KernelCache::global().dir().c_str());
    }
    std::printf("%s", report.toText().c_str());
  }
  return match ? 0 : 1;
}

torch::jit::Module loadModel(const std::string& path) {
  try {
    torch::jit::Module module = torch::jit::load(path);
    module.eval();
    return module;
  } catch (const c10::Error& error) {
    throw CliError("cannot load " + path + ": " + errorLine(error.what_without_backtrace()), 2);
  } catch (const std::exception& error) {
    throw CliError("cannot load " + path + ": " + errorLine(error.what()), 2);
  }
}

// SHAPE:DTYPE, e.g. 8,128,768:float16.
at::Tensor inputFromSpec(const std::string& spec) {
  size_t colon = spec.find(':');
  std::string shape_text = spec.substr(0, colon);
  std::string dtype_name = colon == std::string::npos ? "float32" : spec.substr(colon + 1);
  std::vector<int64_t> shape;
  std::stringstream stream(shape_text);
  for (std::string dim; std::getline(stream, dim, ',');) {
    char* end = nullptr;
    long long value = std::strtoll(dim.c_str(), &end, 10);
    if (dim.empty() || *end != '\0' || value < 0) throw UsageError("bad shape in --input " + spec);
    shape.push_back(value);
  }
  static const std::map<std::string, at::ScalarType> dtypes = {
      {"float32", at::kFloat}, {"float", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf},
      {"half", at::kHalf}, {"bfloat16", at::kBFloat16}, {"int32", at::kInt}, {"int64", at::kLong}, {"bool", at::kBool}};
  auto found = dtypes.find(dtype_name);
  if (found == dtypes.end()) throw UsageError("unknown dtype '" + dtype_name + "' in --input " + spec);
  if (found->second == at::kBool) return torch::rand(shape) > 0.5;
  if (at::isIntegralType(found->second, false)) return torch::randint(0, 8, shape, at::TensorOptions().dtype(found->second));
  return torch::randn(shape).to(found->second);
}

std::string dotGraph(const std::shared_ptr<torch::jit::Graph>& graph, const kiln::Report& report) {
  std::ostringstream dot;
  dot << "digraph kiln {\n  node [shape=box, fontname=monospace];\n";
  std::map<const torch::jit::Node*, std::string> names;
  size_t group_index = 0;
  int counter = 0;
  std::function<void(torch::jit::Block*)> visit = [&](torch::jit::Block* block) {
    for (torch::jit::Node* node : block->nodes()) {
      std::string kind = node->kind().toQualString();
      if (kind == "prim::Constant" || kind == "prim::ListConstruct" || kind == "prim::ListUnpack" ||
          kind == "kiln::fusion_guard" || kind == "kiln::attention_guard") {
        continue;
      }
      if (kind == "prim::If" && !node->blocks().empty()) {
        if (kiln::isKilnFallback(node) && group_index < report.groups.size()) {
          const kiln::GroupReport& group = report.groups[group_index];
          std::string cluster = "g" + std::to_string(group_index++);
          const char* color = group.kind == "attention" ? "lightsalmon" : "lightblue";
          dot << "  subgraph cluster_" << cluster << " {\n    label=\"" << group.name << "\"; style=filled; color=" << color << ";\n";
          for (size_t i = 0; i < group.ops.size(); ++i) {
            dot << "    " << cluster << "_" << i << " [label=\"" << group.ops[i] << "\"];\n";
            if (i) dot << "    " << cluster << "_" << i - 1 << " -> " << cluster << "_" << i << " [style=dotted];\n";
          }
          dot << "  }\n";
          names[node] = cluster + "_0";
          continue;
        }
      }
      std::string name = "n" + std::to_string(counter++);
      names[node] = name;
      dot << "  " << name << " [label=\"" << kind << "\"];\n";
      for (torch::jit::Block* inner : node->blocks()) visit(inner);
    }
  };
  visit(graph->block());
  for (const auto& [node, name] : names) {
    for (const torch::jit::Value* input : node->inputs()) {
      const torch::jit::Node* producer = input->node();
      if (producer->kind() == torch::jit::prim::ListConstruct && !producer->inputs().empty()) producer = producer->input(0)->node();
      auto found = names.find(producer);
      if (found != names.end()) dot << "  " << found->second << " -> " << name << ";\n";
    }
  }
  dot << "}\n";
  return dot.str();
}

int runReport(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("report takes one MODEL.pt");
  torch::jit::Module module = loadModel(args.positional[0]);
  torch::NoGradGuard no_grad;
  torch::jit::Module fused = kiln::optimize(module);
  std::shared_ptr<torch::jit::Graph> graph = fused.get_method("forward").graph();
  std::vector<torch::jit::IValue> inputs;
  for (const std::string& spec : args.all("--input")) inputs.emplace_back(inputFromSpec(spec));
  if (!inputs.empty()) fused.forward(inputs);  // measures each group's bytes on these shapes
  kiln::Report report = kiln::report(graph);
  if (args.values.count("--dot")) writeOutput(args.value("--dot", ""), dotGraph(graph, report));
  if (args.has("--json")) {
    std::cout << report.toJson() << "\n";
  } else {
    std::cout << report.toText();
    if (inputs.empty()) std::cout << "(pass --input SHAPE:DTYPE per input to measure bytes moved)\n";
  }
  return 0;
}

int runFuse(const Args& args) {
  if (args.positional.size() != 2) throw UsageError("fuse takes IN.pt OUT.pt");
  torch::jit::Module module = loadModel(args.positional[0]);
  torch::jit::Module fused = kiln::optimize(module);
  saveModel(fused, args.positional[1]);
  kiln::Report report = kiln::report(fused.get_method("forward").graph());
  std::cerr << "kiln fuse: " << report.groups.size() << " groups; wrote " << args.positional[1] << "\n";
  return 0;
}

// Runs the fused model on the CPU with the example inputs, recording the CUDA kernel each fusion
// group would need on a GPU with the same shapes, then compiles each for --arch into the cache.
int runCompile(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("compile takes one MODEL.pt");
  const std::string arch = args.value("--arch", "");
  if (arch.empty()) throw UsageError("compile needs --arch, e.g. --arch sm_90");
  std::vector<int> known = kiln::nvrtcSupportedArchs();
  int number = 0;
  if (std::sscanf(arch.c_str(), "sm_%d", &number) != 1 || arch != "sm_" + std::to_string(number) ||
      std::find(known.begin(), known.end(), number) == known.end()) {
    std::string list;
    for (int a : known) list += (list.empty() ? "sm_" : ", sm_") + std::to_string(a);
    throw UsageError("unknown --arch '" + arch + "' (this NVRTC knows " + list + ")");
  }
  std::vector<torch::jit::IValue> inputs;
  for (const std::string& spec : args.all("--input")) inputs.emplace_back(inputFromSpec(spec));
  if (inputs.empty()) throw UsageError("compile needs one --input SHAPE:DTYPE per model input");
  torch::jit::Module module = loadModel(args.positional[0]);
  torch::NoGradGuard no_grad;
  torch::jit::Module fused = kiln::optimize(module);
  kiln::CudaTargetRecorder recorder;
  try {
    fused.forward(inputs);
  } catch (const c10::Error& error) {
    throw UsageError("the model rejects these --input shapes: " +
                     errorLine(error.what_without_backtrace()));
  }
  const bool fast_math = kiln::Options::global().fast_math;
  std::ostringstream kernels;
  int compiled = 0, cached = 0;
  for (size_t i = 0; i < recorder.targets().size(); ++i) {
    const kiln::CudaTarget& target = recorder.targets()[i];
    kiln::CudaKernelBinary binary = kiln::obtainCudaKernel(target.kernel, target.specialization, arch, fast_math);
    (binary.from_cache ? cached : compiled)++;
    const std::string name = binary.name + "_" + binary.cache_key.substr(0, 8);
    if (args.has("--json")) {
      kernels << (i ? ", " : "") << "{\"name\": " << kiln::jsonQuote(name)
              << ", \"specialization\": " << kiln::jsonQuote(target.specialization.toString())
              << ", \"status\": " << (binary.from_cache ? "\"cached\"" : "\"compiled\"")
              << ", \"compile_ms\": " << binary.compile_ms << ", \"fetch_ms\": " << binary.fetch_ms
              << ", \"registers\": " << binary.registers << ", \"spill_bytes\": " << binary.spill_bytes
              << ", \"binary_bytes\": " << binary.binary.size() << ", \"cache_key\": " << kiln::jsonQuote(binary.cache_key)
              << "}";
    } else {
      std::printf("%-24s %-22s %-9s %8.1f ms  %3d registers  %d spill bytes\n", name.c_str(),
                  target.specialization.toString().c_str(), binary.from_cache ? "cached" : "compiled",
                  binary.from_cache ? binary.fetch_ms : binary.compile_ms, binary.registers, binary.spill_bytes);
    }
  }
  const kiln::KernelCache::Info info = kiln::KernelCache::global().info();
  if (args.has("--json")) {
    std::cout << "{\"arch\": " << kiln::jsonQuote(arch) << ", \"nvrtc\": " << kiln::jsonQuote(kiln::cuda::nvrtcVersion())
              << ", \"cache_dir\": " << kiln::jsonQuote(info.dir) << ", \"compiled\": " << compiled
              << ", \"cached\": " << cached << ", \"kernels\": [" << kernels.str() << "], \"skipped\": [";
    for (size_t i = 0; i < recorder.skipped.size(); ++i) std::cout << (i ? ", " : "") << kiln::jsonQuote(recorder.skipped[i]);
    std::cout << "]}\n";
  } else {
    std::printf("%zu kernels for %s: %d compiled, %d from the cache (%s)\n", recorder.targets().size(), arch.c_str(),
                compiled, cached, info.dir.c_str());
    for (const std::string& why : recorder.skipped) std::printf("skipped a group: %s\n", why.c_str());
  }
  return 0;
}

int runCache(const Args& args) {
  if (args.positional.size() != 1 || (args.positional[0] != "info" && args.positional[0] != "clear")) {
    throw UsageError("cache takes info or clear");
  }
  kiln::KernelCache& cache = kiln::KernelCache::global();
  if (args.positional[0] == "clear") {
    const kiln::KernelCache::ClearResult cleared = cache.clear();
    if (!cleared.error.empty()) {
      throw CliError("cache clear: " + cleared.error + " (removed " +
                         std::to_string(cleared.removed) + ", " + std::to_string(cleared.left) +
                         " left)",
                     1);
    }
    if (args.has("--json")) {
      std::cout << "{\"dir\": " << kiln::jsonQuote(cache.dir())
                << ", \"removed\": " << cleared.removed << "}\n";
    } else {
      std::printf("removed %lld cached kernels from %s\n", static_cast<long long>(cleared.removed),
                  cache.dir().c_str());
    }
    return 0;
  }
  const kiln::KernelCache::Info info = cache.info();
  if (args.has("--json")) {
    std::cout << "{\"dir\": " << kiln::jsonQuote(info.dir) << ", \"files\": " << info.files
              << ", \"bytes\": " << info.bytes << ", \"max_bytes\": " << info.max_bytes << "}\n";
  } else {
    std::printf("%s: %lld kernels, %.1f MB of %.0f MB\n", info.dir.c_str(), static_cast<long long>(info.files),
                static_cast<double>(info.bytes) / 1e6, static_cast<double>(info.max_bytes) / 1e6);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "kiln: missing VERB (see kiln --help)\n";
    return 2;
  }
  std::string verb = argv[1];
  if (verb == "--help" || verb == "-h" || verb == "help") {
    std::cout << kUsage;
    return 0;
  }
  // A rejected KILN_* value stops every verb here; the library itself would warn and go on.
  const std::vector<std::string>& problems = kiln::Options::global().problems;
  if (!problems.empty()) {
    std::cerr << "kiln: " << problems.front() << "\n";
    return 2;
  }
  try {
    if (verb == "env") return runEnv(kiln::cli::parse(argc, argv, 2, {}, {"--json"}));
    if (verb == "demo") {
      return runDemo(kiln::cli::parse(argc, argv, 2, {"--device", "--save"}, {"--json"}));
    }
    if (verb == "report") {
      return runReport(kiln::cli::parse(argc, argv, 2, {"--input", "--dot"}, {"--json"}));
    }
    if (verb == "fuse") return runFuse(kiln::cli::parse(argc, argv, 2, {"--device"}, {}));
    if (verb == "compile") return runCompile(kiln::cli::parse(argc, argv, 2, {"--input", "--arch"}, {"--json"}));
    if (verb == "cache") return runCache(kiln::cli::parse(argc, argv, 2, {}, {"--json"}));
    throw UsageError("unknown verb '" + verb + "'");
  } catch (const UsageError& error) {
    std::cerr << "kiln: " << error.what() << " (see kiln --help)\n";
    return 2;
  } catch (const CliError& error) {
    std::cerr << "kiln: " << error.what() << "\n";
    return error.exit_code;
  } catch (const c10::Error& error) {
    std::cerr << "kiln " << verb << ": " << errorLine(error.what_without_backtrace()) << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "kiln " << verb << ": " << errorLine(error.what()) << "\n";
    return 2;
  }
}
