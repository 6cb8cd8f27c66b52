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
#include <fstream>
#include <cerrno>
#include <cstring>
#include <thread>
#include <mutex>
#include <unistd.h>
#include <atomic>

#include "codegen/atomic_file.h"
#include "codegen/cuda_driver.h"
#include "codegen/json.h"
#include "codegen/cpu_kernel.h"
#include "codegen/cuda_kernel_builder.h"
#include "codegen/pipeline.h"
#include "codegen/kernel_cache.h"
#include "codegen/nvrtc_compiler.h"
#include "kiln/options.h"
#include "torch_ops/fusion_runtime.h"
#include "codegen/versions.h"
#include "fuser/fusion_pass.h"
#include "kiln/kiln.h"
#include "tools/cli_args.h"
#include "tools/bench_command.h"
#include "tools/compile_command.h"
#include "tools/demo_model.h"
#include "tools/roofline.h"

namespace {

using kiln::cli::Args;
using kiln::cli::UsageError;
using kiln::cli::errorLine;

// An error printed as the one line "kiln: MESSAGE" (no usage hint) with its exit code.
struct CliError : std::runtime_error {
  CliError(const std::string& message, int code) : std::runtime_error(message), exit_code(code) {}
  int exit_code;
};

constexpr const char* kUsage =
    "usage: kiln VERB [ARGS]\n"
    "  env [--json]                                  versions, GPU, cache directory\n"
    "  demo [--device cpu|cuda] [--json] [--save FILE]  run the embedded BERT-style encoder layer\n"
    "  report MODEL.pt [--input SHAPE:DTYPE...|--inputs FILE.pt] [--json] [--dot FILE.dot|.svg|.png]\n"
    "         [--roofline FILE.svg|.png]            what kiln fuses, bytes saved; each group's bandwidth\n"
    "                                                against this CPU's copy bandwidth (needs inputs)\n"
    "  fuse IN.pt OUT.pt [--input SHAPE:DTYPE...|--inputs FILE.pt] [--precision fp32|bf16|fp16]\n"
    "       [--max-error REL] [--min-cosine C]\n"
    "                                                fuse ahead of time and save (needs libkiln to load);\n"
    "                                                with inputs, measure the library calls' ways on them\n"
    "                                                and check the outputs; with --precision, report\n"
    "                                                each output's error against fp32, keep the leading\n"
    "                                                ops fp32 as far as --min-cosine needs, and refuse\n"
    "                                                to save past --max-error or below --min-cosine\n"
    "  run MODEL.pt --input SHAPE:DTYPE...|--inputs FILE.pt [--calls N] [--json]\n"
    "                                                load and run a model in this fresh process: time to\n"
    "                                                first result, then each call\n"
    "  compile MODEL.pt --input SHAPE:DTYPE...|--inputs FILE.pt --arch host|sm_90 [--jobs N] [--json]\n"
    "                                                compile every kernel the model needs for this CPU or\n"
    "                                                a GPU into the disk cache, in parallel (no GPU needed)\n"
    "  bench MODEL.pt --input SHAPE:DTYPE...|--inputs FILE.pt [--rounds N] [--precision P]\n"
    "        [--min-cosine C] [--json]\n"
    "                                                TorchScript, freeze + optimize_for_inference, oneDNN\n"
    "                                                Graph, kiln's pass and kiln::optimize side by side\n"
    "  cache info|clear [--json]                     the disk cache: where, how full; empty it\n";

bool cudaAvailable() { return torch::cuda::is_available(); }

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
  // The disk cache serves CPU and CUDA kernels: a second run with the same cache compiles nothing.
  const kiln::KernelCache::Stats cache = kiln::kernelCacheStats();

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
    std::printf("kernels           %lld from the disk cache, %lld compiled (%s)\n", static_cast<long long>(cache.hits),
                static_cast<long long>(cache.misses), kiln::KernelCache::global().dir().c_str());
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

// The example inputs: one tensor per --input SHAPE:DTYPE (random), or the list or tuple of
// tensors in --inputs FILE.pt (saved with torch.save; token ids need real values).
std::vector<torch::jit::IValue> exampleInputs(const Args& args) {
  std::vector<torch::jit::IValue> inputs;
  for (const std::string& spec : args.all("--input")) inputs.emplace_back(inputFromSpec(spec));
  if (!args.values.count("--inputs")) return inputs;
  if (!inputs.empty()) throw UsageError("give --input or --inputs, not both");
  const std::string path = args.value("--inputs", "");
  torch::jit::IValue saved;
  try {
    std::ifstream file(path, std::ios::binary);
    if (!file) throw std::runtime_error(std::strerror(errno));
    std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
    saved = torch::jit::pickle_load(bytes);
  } catch (const std::exception& error) {
    throw CliError("cannot read --inputs " + path + ": " + errorLine(error.what()), 2);
  }
  std::vector<torch::jit::IValue> items;
  if (saved.isList()) items = saved.toList().vec();
  else if (saved.isTuple()) items = saved.toTupleRef().elements().vec();
  else if (saved.isTensor()) items = {saved};
  for (const torch::jit::IValue& item : items) {
    if (!item.isTensor()) throw CliError("--inputs " + path + " holds a " + item.tagKind() + "; expected tensors", 2);
  }
  if (items.empty()) throw CliError("--inputs " + path + ": expected a list or tuple of tensors", 2);
  return items;
}

// Loads a model and runs it --calls times in this fresh process, timing the load and each call:
// the time to first result is what a service restart costs (kiln's kernels come from the disk
// cache when it is warm, and are compiled when it is cold).
int runRun(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("run takes one MODEL.pt");
  const int64_t calls = args.intValue("--calls", 3, 1, 1000000);
  std::vector<torch::jit::IValue> inputs = exampleInputs(args);
  if (inputs.empty()) throw UsageError("run needs --input SHAPE:DTYPE per model input, or --inputs FILE.pt");
  using Clock = std::chrono::steady_clock;
  auto since = [](Clock::time_point start) { return std::chrono::duration<double, std::milli>(Clock::now() - start).count(); };
  torch::NoGradGuard no_grad;
  const Clock::time_point start = Clock::now();
  torch::jit::Module module = loadModel(args.positional[0]);
  const double load_ms = since(start);
  std::vector<double> call_ms;
  torch::jit::IValue output;
  for (int64_t i = 0; i < calls; ++i) {
    const Clock::time_point call_start = Clock::now();
    try {
      output = module.forward(inputs);
    } catch (const c10::Error& error) {
      throw UsageError("the model rejects these inputs: " + errorLine(error.what_without_backtrace()));
    }
    call_ms.push_back(since(call_start));
  }
  const kiln::KernelCache::Stats cache = kiln::kernelCacheStats();
  const kiln::Report report = kiln::report(module.get_method("forward").graph());
  if (args.has("--json")) {
    std::cout << "{\"model\": " << kiln::jsonQuote(args.positional[0]) << ", \"load_ms\": " << load_ms
              << ", \"call_ms\": [";
    for (size_t i = 0; i < call_ms.size(); ++i) std::cout << (i ? ", " : "") << call_ms[i];
    std::cout << "], \"first_result_ms\": " << load_ms + call_ms[0] << ", \"kiln_groups\": " << report.groups.size()
              << ", \"kernel_cache\": {\"hits\": " << cache.hits << ", \"misses\": " << cache.misses
              << ", \"stores\": " << cache.stores << "}}\n";
  } else {
    std::printf("load %.1f ms, first call %.1f ms: first result after %.1f ms\n", load_ms, call_ms[0], load_ms + call_ms[0]);
    for (size_t i = 1; i < call_ms.size(); ++i) std::printf("call %zu: %.2f ms\n", i + 1, call_ms[i]);
    std::printf("%zu kiln groups in the saved graph; kernel cache: %lld hits, %lld misses\n", report.groups.size(),
                static_cast<long long>(cache.hits), static_cast<long long>(cache.misses));
  }
  return 0;
}

// Times each CPU group over 10 calls (after the call that measured bytes) and draws them against
// the copy bandwidth measured for the same sizes. Identical groups share one code and one point.
void writeRoofline(const std::string& path, const std::string& model, torch::jit::Module& fused,
                   const std::shared_ptr<torch::jit::Graph>& graph, const std::vector<torch::jit::IValue>& inputs) {
  const kiln::Report before = kiln::report(graph);
  for (int call = 0; call < 10; ++call) fused.forward(inputs);
  const kiln::Report after = kiln::report(graph);
  std::vector<kiln::cli::RooflinePoint> points;
  std::map<std::string, size_t> seen;  // a group's code-level statistics -> its point
  double min_bytes = 1e300, max_bytes = 0;
  for (size_t g = 0; g < after.groups.size() && g < before.groups.size(); ++g) {
    const kiln::GroupReport& a = after.groups[g];
    const kiln::GroupReport& b = before.groups[g];
    const int64_t calls = a.calls - b.calls;
    if (a.kind != "elementwise" || a.ns_per_call < 0 || calls <= 0 || a.bytes_fused <= 0) continue;
    const double total_ns = a.ns_per_call * static_cast<double>(a.calls) -
                            std::max(0.0, b.ns_per_call) * static_cast<double>(b.calls);
    std::ostringstream key;
    for (const std::string& op : a.ops) key << op << " ";
    key << a.bytes_fused << " " << a.calls << " " << a.ns_per_call;
    auto found = seen.find(key.str());
    if (found != seen.end()) {
      points[found->second].label += ", " + a.name.substr(a.name.rfind('_') + 1);
      continue;
    }
    seen[key.str()] = points.size();
    points.push_back({a.name, static_cast<double>(a.bytes_fused), total_ns / static_cast<double>(calls) / 1e9});
    min_bytes = std::min(min_bytes, points.back().bytes);
    max_bytes = std::max(max_bytes, points.back().bytes);
  }
  if (points.empty()) throw CliError("--roofline: no kiln group ran on the CPU for these inputs", 1);
  const kiln::cli::RooflineCurve copy = kiln::cli::measureCopyBandwidth(min_bytes / 2, max_bytes * 2);
  const std::string name = model.substr(model.find_last_of('/') + 1);
  const std::string svg = kiln::cli::rooflineSvg(points, copy, "kiln groups in " + name + " against copy bandwidth, " +
                                                                    kiln::cli::cpuDescription());
  if (std::string error = kiln::cli::writeImage(path, svg); !error.empty()) throw CliError(error, 1);
  std::cerr << "kiln report: wrote " << path << " (" << points.size() << " group points, copy measured from "
            << static_cast<int64_t>(copy.bytes.front()) << " to " << static_cast<int64_t>(copy.bytes.back()) << " bytes)\n";
}

// The --dot graph as DOT text, or rendered by Graphviz's `dot` for .svg and .png.
void writeDot(const std::string& path, const std::string& dot) {
  const size_t period = path.rfind('.');
  const std::string suffix = period == std::string::npos ? "" : path.substr(period + 1);
  if (suffix != "svg" && suffix != "png") return writeOutput(path, dot);
  if (std::system("command -v dot > /dev/null 2>&1") != 0) {
    throw CliError("--dot " + path + ": rendering ." + suffix + " needs Graphviz (apt-get install graphviz); a .dot file needs nothing", 1);
  }
  std::string rendered;
  if (std::string error = kiln::cli::runFilter("dot -T" + suffix, dot, &rendered); !error.empty()) throw CliError(error, 1);
  writeOutput(path, rendered);
}

int runReport(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("report takes one MODEL.pt");
  torch::jit::Module module = loadModel(args.positional[0]);
  torch::NoGradGuard no_grad;
  torch::jit::Module fused = kiln::optimize(module);
  std::shared_ptr<torch::jit::Graph> graph = fused.get_method("forward").graph();
  std::vector<torch::jit::IValue> inputs = exampleInputs(args);
  if (!inputs.empty()) fused.forward(inputs);  // measures each group's bytes on these shapes
  kiln::Report report = kiln::report(graph);
  if (args.values.count("--roofline")) {
    if (inputs.empty()) throw UsageError("--roofline needs the model's inputs (--input or --inputs)");
    const std::string path = args.value("--roofline", "");
    const std::string suffix = path.size() > 4 ? path.substr(path.size() - 4) : "";
    if (suffix != ".svg" && suffix != ".png") throw UsageError("--roofline " + path + ": give a .svg or .png file");
    writeRoofline(args.value("--roofline", ""), args.positional[0], fused, graph, inputs);
  }
  if (args.values.count("--dot")) writeDot(args.value("--dot", ""), dotGraph(graph, report));
  if (args.has("--json")) {
    std::cout << report.toJson() << "\n";
  } else {
    std::cout << report.toText();
    if (inputs.empty()) std::cout << "(pass --input SHAPE:DTYPE per input to measure bytes moved)\n";
  }
  return 0;
}

kiln::Precision precisionArgument(const Args& args) {
  kiln::Precision precision = kiln::Precision::kFloat32;
  const std::string text = args.value("--precision", "fp32");
  if (!kiln::parsePrecision(text, &precision)) throw UsageError("--precision takes fp32, bf16 or fp16, not '" + text + "'");
  return precision;
}

// --min-cosine C: a number in (0, 1) (a fused module is not bit-identical even in fp32); 0 when absent.
double minCosineArgument(const Args& args) {
  if (!args.values.count("--min-cosine")) return 0;
  const std::string text = args.value("--min-cosine", "");
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || *end != '\0' || !(value > 0 && value < 1))
    throw UsageError("--min-cosine takes a number above 0 and below 1, not '" + text + "'");
  return value;
}

// With example inputs, the fused module runs them before it is saved: every library call measures
// its ways on these shapes (the choices go to the disk cache, so this machine's later runs start
// with them) and the outputs are compared with the model's own.
int runFuse(const Args& args) {
  if (args.positional.size() != 2) throw UsageError("fuse takes IN.pt OUT.pt");
  torch::jit::Module module = loadModel(args.positional[0]);
  std::vector<torch::jit::IValue> inputs = exampleInputs(args);
  kiln::Options options = kiln::Options::global();
  options.precision = precisionArgument(args);
  const bool reduced = options.precision != kiln::Precision::kFloat32;
  std::optional<double> max_error;
  if (args.values.count("--max-error")) {
    const std::string text = args.value("--max-error", "");
    char* end = nullptr;
    const double value = std::strtod(text.c_str(), &end);
    if (text.empty() || *end != '\0' || !(value >= 0)) throw UsageError("--max-error takes a number >= 0, not '" + text + "'");
    max_error = value;
  }
  options.min_cosine = minCosineArgument(args);
  if (reduced && inputs.empty())
    throw UsageError("--precision " + std::string(kiln::precisionName(options.precision)) +
                     " needs example inputs (--input or --inputs) to report the accuracy");
  if (max_error && !reduced) throw UsageError("--max-error goes with --precision bf16 or fp16");
  if (options.min_cosine > 0 && !reduced) throw UsageError("--min-cosine goes with --precision bf16 or fp16");
  c10::IValue expected;
  if (!inputs.empty()) {
    torch::NoGradGuard no_grad;
    try {
      module.eval();
      expected = module.forward(kiln::copyArguments(inputs));  // a module may change its inputs
    } catch (const c10::Error& error) {
      throw UsageError("the model rejects these inputs: " + errorLine(error.what_without_backtrace()));
    }
  }
  kiln::PrecisionPlan plan;
  // Example inputs go to kiln::optimize: in float32 it times the model with convolution regions and
  // without on them, in a reduced precision they bound the accuracy.
  torch::jit::Module fused = reduced || !inputs.empty() ? kiln::optimize(module, options, inputs, &plan)
                                                        : kiln::optimize(module, options);
  if (options.min_cosine > 0) std::fprintf(stderr, "kiln fuse: %s\n", plan.toText().c_str());
  std::string checked;
  if (!inputs.empty()) {
    torch::NoGradGuard no_grad;
    c10::IValue actual;
    for (int call = 0; call < 2; ++call) actual = fused.forward(kiln::copyArguments(inputs));
    char text[96];
    std::snprintf(text, sizeof text, "; max |diff| from the model on the inputs %.3g", kiln::cli::maxDifference(expected, actual));
    checked = text;
    if (reduced) {
      // The accuracy report: every floating output against the float32 model's.
      const std::vector<kiln::cli::OutputAccuracy> accuracy = kiln::cli::outputAccuracy(expected, actual);
      const kiln::cli::OutputAccuracy* worst = nullptr;
      for (const kiln::cli::OutputAccuracy& output : accuracy) {
        std::fprintf(stderr, "kiln fuse: %s in %s: max abs error %.3g, max rel error %.3g (of the output's largest magnitude), cosine %.6f\n",
                     output.name.c_str(), kiln::precisionName(options.precision), output.max_abs, output.max_rel, output.cosine);
        if (!worst || output.max_rel > worst->max_rel) worst = &output;
      }
      if (max_error && worst && !(worst->max_rel <= *max_error)) {
        char refusal[160];
        std::snprintf(refusal, sizeof refusal, "%s's relative error %.3g exceeds --max-error %g; %s not written",
                      worst->name.c_str(), worst->max_rel, *max_error, args.positional[1].c_str());
        throw CliError(refusal, 1);
      }
      for (const kiln::cli::OutputAccuracy& output : accuracy) {
        if (options.min_cosine == 0 || output.cosine >= options.min_cosine) continue;
        char refusal[200];
        std::snprintf(refusal, sizeof refusal, "%s's cosine %.6f to fp32 is below --min-cosine %g; %s not written",
                      output.name.c_str(), output.cosine, options.min_cosine, args.positional[1].c_str());
        throw CliError(refusal, 1);
      }
    }
  }
  saveModel(fused, args.positional[1]);
  kiln::Report report = kiln::report(fused.get_method("forward").graph());
  std::cerr << "kiln fuse: " << report.groups.size() << " groups" << checked << "; wrote " << args.positional[1] << "\n";
  return 0;
}

// Runs the fused model on the CPU with the example inputs, recording the kernel each fusion group
// would need for --arch (the host's CPU, or a GPU with the same shapes), through kiln::optimize
// and through the executor pass, then compiles them into the disk cache, in parallel across
// --jobs threads.
int runCompile(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("compile takes one MODEL.pt");
  const std::string arch = args.value("--arch", "");
  if (arch.empty()) throw UsageError("compile needs --arch: host, or a GPU's, e.g. sm_90");
  if (arch != "host") {
    std::vector<int> known = kiln::nvrtcSupportedArchs();
    int number = 0;
    if (std::sscanf(arch.c_str(), "sm_%d", &number) != 1 || arch != "sm_" + std::to_string(number) ||
        std::find(known.begin(), known.end(), number) == known.end()) {
      std::string list;
      for (int a : known) list += (list.empty() ? "host, sm_" : ", sm_") + std::to_string(a);
      throw UsageError("unknown --arch '" + arch + "' (this kiln knows " + list + ")");
    }
  }
  const unsigned hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t jobs = args.intValue("--jobs", hardware, 1, 1024);
  std::vector<torch::jit::IValue> inputs = exampleInputs(args);
  if (inputs.empty()) throw UsageError("compile needs one --input SHAPE:DTYPE per model input, or --inputs FILE.pt");
  torch::jit::Module module = loadModel(args.positional[0]);
  torch::NoGradGuard no_grad;
  torch::jit::Module fused = kiln::optimize(module);
  std::vector<kiln::RecordedKernel> wanted;
  std::vector<std::string> skipped;
  {
    kiln::KernelRecording recorder(/*for_cuda=*/arch != "host");
    try {
      fused.forward(inputs);
      // The model as kiln's executor pass runs it (kiln::enable(), no kiln::optimize): its groups
      // differ where kiln::optimize made library calls, and a deployment may run either way. The
      // profiling executor fuses from the second call on.
      const bool was_enabled = kiln::enabled();
      kiln::enable();
      torch::jit::Module executed = module.clone();
      for (int call = 0; call < 3; ++call) executed.forward(inputs);
      if (!was_enabled) kiln::disable();
    } catch (const c10::Error& error) {
      throw UsageError("the model rejects these --input shapes: " + errorLine(error.what_without_backtrace()));
    }
    for (const kiln::RecordedKernel& recorded : recorder.kernels()) {
      if (arch == "host" || recorded.cuda) wanted.push_back(recorded);
      else skipped.push_back(recorded.cuda_skipped);
    }
  }
  return kiln::cli::compileKernels(wanted, skipped, arch, jobs, args.has("--json"));
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

// kiln bench: every route a TorchScript user has, side by side (tools/bench_command.h).
int runBench(const Args& args) {
  if (args.positional.size() != 1) throw UsageError("bench takes one MODEL.pt");
  std::vector<torch::jit::IValue> inputs = exampleInputs(args);
  if (inputs.empty()) throw UsageError("bench needs the model's inputs (--input or --inputs)");
  kiln::cli::BenchSettings settings;
  settings.rounds = static_cast<int>(args.intValue("--rounds", 5, 1, 1000));
  settings.json = args.has("--json");
  settings.progress = !settings.json && isatty(STDERR_FILENO);
  settings.precision = precisionArgument(args);
  settings.min_cosine = minCosineArgument(args);
  if (settings.min_cosine > 0 && settings.precision == kiln::Precision::kFloat32)
    throw UsageError("--min-cosine goes with --precision bf16 or fp16");
  return kiln::cli::benchModel(args.positional[0], loadModel(args.positional[0]), inputs, settings);
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
      return runReport(kiln::cli::parse(argc, argv, 2, {"--input", "--inputs", "--dot", "--roofline"}, {"--json"}));
    }
    if (verb == "fuse") {
      return runFuse(kiln::cli::parse(argc, argv, 2, {"--device", "--input", "--inputs", "--precision", "--max-error", "--min-cosine"}, {}));
    }
    if (verb == "compile") return runCompile(kiln::cli::parse(argc, argv, 2, {"--input", "--inputs", "--arch", "--jobs"}, {"--json"}));
    if (verb == "run") return runRun(kiln::cli::parse(argc, argv, 2, {"--input", "--inputs", "--calls"}, {"--json"}));
    if (verb == "bench") {
      return runBench(kiln::cli::parse(argc, argv, 2, {"--input", "--inputs", "--rounds", "--precision", "--min-cosine"}, {"--json"}));
    }
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
