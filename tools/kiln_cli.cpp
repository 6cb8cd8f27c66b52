// The kiln command-line tool: env, demo (and the verbs of later modules).
// Every --json output is one JSON object on stdout; errors are one line on stderr, exit code 2.
#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>
#include <torch/version.h>
#include <torch/script.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <sstream>

#include "codegen/cuda_driver.h"
#include "codegen/versions.h"
#include "kiln/kiln.h"
#include "tools/cli_args.h"
#include "tools/demo_model.h"

namespace {

using kiln::cli::Args;
using kiln::cli::UsageError;

constexpr const char* kUsage =
    "usage: kiln VERB [ARGS]\n"
    "  env [--json]                                  versions, GPU, cache directory\n"
    "  demo [--device cpu|cuda] [--json] [--save FILE]  run the embedded BERT-style encoder layer\n";

std::string jsonString(const std::string& text) {
  std::string out = "\"";
  for (char c : text) {
    if (c == '"' || c == '\\') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + "\"";
}

bool cudaAvailable() { return torch::cuda::is_available(); }

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
    std::cout << "{\"kiln\": " << jsonString(kiln::version())
              << ", \"torch\": " << jsonString(TORCH_VERSION)
              << ", \"cuda_driver\": " << jsonString(kiln::cuda::driverVersion())
              << ", \"nvrtc\": " << jsonString(kiln::cuda::nvrtcVersion())
              << ", \"llvm\": " << jsonString(kiln::llvmVersion()) << ", \"gpu\": " << jsonString(gpu)
              << ", \"gpu_count\": " << gpus.size() << ", \"arch\": " << jsonString(arch)
              << ", \"torch_cuda\": " << (cudaAvailable() ? "true" : "false")
              << ", \"cpu_threads\": " << at::get_num_threads()
              << ", \"cache_dir\": " << jsonString(options.cache_dir)
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
    layer.save(path);
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

  if (args.has("--json")) {
    std::cout << "{\"model\": \"bert-base encoder layer\", \"device\": " << jsonString(device_name)
              << ", \"dtype\": " << jsonString(c10::toString(dtype)) << ", \"batch\": " << config.batch
              << ", \"sequence\": " << config.sequence << ", \"checksum\": " << checksum
              << ", \"unfused_ms\": " << unfused.ms_per_forward
              << ", \"fused_ms\": " << fused.ms_per_forward << ", \"max_abs_error\": " << max_error
              << ", \"match\": " << (match ? "true" : "false") << ", \"report\": " << report.toJson()
              << "}\n";
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
    std::printf("%s", report.toText().c_str());
  }
  return match ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return 2;
  }
  std::string verb = argv[1];
  try {
    if (verb == "env") return runEnv(kiln::cli::parse(argc, argv, 2, {}, {"--json"}));
    if (verb == "demo") {
      return runDemo(kiln::cli::parse(argc, argv, 2, {"--device", "--save"}, {"--json"}));
    }
    if (verb == "--help" || verb == "-h" || verb == "help") {
      std::cout << kUsage;
      return 0;
    }
    throw UsageError("unknown verb '" + verb + "'");
  } catch (const UsageError& error) {
    std::cerr << "kiln " << verb << ": " << error.what() << "\n" << kUsage;
    return 2;
  } catch (const c10::Error& error) {
    std::cerr << "kiln " << verb << ": " << error.what_without_backtrace() << "\n";
    return 2;
  } catch (const std::exception& error) {
    std::cerr << "kiln " << verb << ": " << error.what() << "\n";
    return 2;
  }
}
