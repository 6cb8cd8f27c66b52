// Loads a TorchScript file, enables kiln, and runs it on random inputs of the given shapes.
// usage: kiln_example_app MODEL.pt SHAPE... (SHAPE like 8,128,768; float32 on the CPU)
#include <kiln/kiln.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>

#include <iostream>
#include <sstream>

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: kiln_example_app MODEL.pt SHAPE...\n";
    return 2;
  }
  kiln::enable();
  torch::jit::Module module = torch::jit::load(argv[1]);
  module.eval();
  std::vector<torch::jit::IValue> inputs;
  for (int i = 2; i < argc; ++i) {
    std::vector<int64_t> shape;
    std::stringstream spec(argv[i]);
    for (std::string dim; std::getline(spec, dim, ',');) shape.push_back(std::stoll(dim));
    inputs.emplace_back(torch::randn(shape));
  }
  torch::NoGradGuard no_grad;
  at::Tensor output;
  for (int run = 0; run < 3; ++run) output = module.forward(inputs).toTensor();
  kiln::Report report = kiln::report(torch::jit::lastExecutedOptimizedGraph());
  std::cout << "output " << output.sizes() << " sum " << output.sum().item<double>() << "\n"
            << report.toText();
  return 0;
}
