// A stand-in for Triton Inference Server's PyTorch (libtorch) backend, so that a model repository
// made for it is checked without the server: what the backend does to load and run a TorchScript
// model (triton-inference-server/pytorch_backend, src/pt/model_state.cc and
// model_instance_state.cc), and nothing else.
//   - The model is read from <repository>/<model>/1/model.pt and loaded with torch::jit::load from
//     a stream, once per instance (instance_group count).
//   - Each request runs under the settings the backend applies before every forward: optimized
//     execution per DISABLE_OPTIMIZED_EXECUTION (default on), InferenceMode per INFERENCE_MODE
//     (default on), the TensorExpr fuser per ENABLE_TENSOR_FUSER when given, and a NoGradGuard.
//   - Instances serve requests on their own threads at once, as the server's model instances do.
// It does not link libkiln.so: like the server, it gets kiln's operators by LD_PRELOAD, and reads
// kiln's counters through the dispatcher (kiln::_report) to check that the fused groups ran.
//
// Usage: triton_standin REPOSITORY MODEL CHECK.pt [REQUESTS_PER_INSTANCE]
// CHECK.pt: a list saved with torch.save, four tensors per request: INPUT__0, INPUT__1, OUTPUT__0,
// OUTPUT__1 (as examples/triton/export_model.py --check writes it).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/passes/tensorexpr_fuser.h>
#include <torch/script.h>

#include <atomic>
#include <fstream>
#include <iostream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

struct ModelConfig {
  std::string platform;
  int instances = 1;
  std::map<std::string, std::string> parameters;
};

std::string readFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error("cannot read " + path);
  std::ostringstream text;
  text << file.rdbuf();
  return text.str();
}

// The few fields of config.pbtxt the backend's loading and execution depend on.
ModelConfig parseConfig(const std::string& text) {
  ModelConfig config;
  std::smatch match;
  if (std::regex_search(text, match, std::regex(R"re(platform:\s*"([^"]+)")re"))) config.platform = match[1];
  if (std::regex_search(text, match, std::regex(R"(instance_group\s*\[?\s*\{[^}]*count:\s*(\d+))"))) {
    config.instances = std::stoi(match[1]);
  }
  const std::regex parameter(R"re(key:\s*"([A-Z_]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)")re");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), parameter); it != std::sregex_iterator(); ++it) {
    config.parameters[(*it)[1]] = (*it)[2];
  }
  return config;
}

bool flag(const ModelConfig& config, const std::string& key, bool fallback) {
  auto found = config.parameters.find(key);
  return found == config.parameters.end() ? fallback : found->second == "true";
}

torch::jit::Module loadInstance(const std::string& path) {
  std::ifstream stream(path, std::ios::binary);
  if (!stream) throw std::runtime_error("cannot read " + path);
  return torch::jit::load(stream, c10::Device(c10::kCPU));
}

// The backend's Execute(): settings, guards, forward.
c10::IValue execute(torch::jit::Module& module, const ModelConfig& config, std::vector<c10::IValue> inputs) {
  torch::jit::setGraphExecutorOptimize(!flag(config, "DISABLE_OPTIMIZED_EXECUTION", false));
  torch::InferenceMode inference(flag(config, "INFERENCE_MODE", true));
  if (config.parameters.count("ENABLE_TENSOR_FUSER")) {
    torch::jit::setTensorExprFuserEnabled(flag(config, "ENABLE_TENSOR_FUSER", false));
  }
  torch::NoGradGuard no_grad;
  return module.forward(inputs);
}

bool close(const at::Tensor& actual, const at::Tensor& expected, const std::string& what) {
  if (actual.sizes() != expected.sizes() || actual.scalar_type() != expected.scalar_type()) {
    std::cerr << what << ": " << actual.sizes() << " " << actual.scalar_type() << ", expected " << expected.sizes()
              << " " << expected.scalar_type() << "\n";
    return false;
  }
  const double error = (actual - expected).abs().max().item<double>();
  if (!(error <= 1e-4)) {
    std::cerr << what << ": max abs error " << error << " against eager\n";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: triton_standin REPOSITORY MODEL CHECK.pt [REQUESTS_PER_INSTANCE]\n";
    return 2;
  }
  const std::string model_dir = std::string(argv[1]) + "/" + argv[2];
  const int requests = argc > 4 ? std::stoi(argv[4]) : 4;
  try {
    const auto report_op = c10::Dispatcher::singleton().findOp({"kiln::_report", ""});
    if (!report_op) {
      std::cerr << "kiln's operators are not loaded (start with LD_PRELOAD=libkiln.so, as the server)\n";
      return 1;
    }
    const ModelConfig config = parseConfig(readFile(model_dir + "/config.pbtxt"));
    if (config.platform != "pytorch_libtorch") throw std::runtime_error("platform is '" + config.platform + "'");
    const std::string check_text = readFile(argv[3]);
    const c10::IValue check = torch::jit::pickle_load(std::vector<char>(check_text.begin(), check_text.end()));
    const std::vector<c10::IValue> tensors = check.toList().vec();
    if (tensors.empty() || tensors.size() % 4 != 0) throw std::runtime_error("CHECK.pt: expected 4 tensors per request");

    std::vector<torch::jit::Module> instances;
    for (int i = 0; i < config.instances; ++i) instances.push_back(loadInstance(model_dir + "/1/model.pt"));
    std::atomic<int> failures{0}, served{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < config.instances; ++i) {
      threads.emplace_back([&, i] {
        try {
          for (int r = 0; r < requests; ++r) {
            const size_t c = 4 * static_cast<size_t>((r + i) % (tensors.size() / 4));
            const c10::IValue output = execute(instances[static_cast<size_t>(i)], config, {tensors[c], tensors[c + 1]});
            const auto elements = output.toTupleRef().elements();
            const std::string what = "instance " + std::to_string(i) + " request " + std::to_string(r);
            if (!close(elements[0].toTensor(), tensors[c + 2].toTensor(), what + " OUTPUT__0") ||
                !close(elements[1].toTensor(), tensors[c + 3].toTensor(), what + " OUTPUT__1")) {
              failures++;
            }
            served++;
          }
        } catch (const std::exception& error) {
          std::cerr << "instance " << i << ": " << error.what() << "\n";
          failures++;
        }
      });
    }
    for (std::thread& thread : threads) thread.join();

    // Every kiln group of every instance ran its kernel, never its fallback.
    int groups_run = 0;
    const std::regex ran(R"("calls": [1-9])"), fell_back(R"("fallbacks": [1-9])");
    for (torch::jit::Module& instance : instances) {
      std::vector<c10::IValue> stack{instance._ivalue()};
      report_op->callBoxed(&stack);
      const std::string json = stack.back().toStringRef();
      if (std::regex_search(json, fell_back)) {
        std::cerr << "a kiln group took its fallback: " << json << "\n";
        failures++;
      }
      groups_run += static_cast<int>(std::distance(std::sregex_iterator(json.begin(), json.end(), ran), std::sregex_iterator()));
    }
    if (groups_run == 0) {
      std::cerr << "no kiln group ran\n";
      failures++;
    }
    std::cout << config.instances << " instances served " << served.load() << " requests; " << groups_run
              << " kiln groups ran; " << failures.load() << " failures\n";
    return failures.load() == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::cerr << "triton_standin: " << error.what() << "\n";
    return 1;
  }
}
