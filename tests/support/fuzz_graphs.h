// The random-graph fuzzer's cases: random DAGs of 2-20 supported ops over inputs of random
// broadcasting shapes, dtypes, scalars and strides, as TorchScript source and inputs on a device.
// Shared by the CPU fuzz test and the GPU one.
#pragma once

#include <gtest/gtest.h>
#include <torch/csrc/jit/passes/dead_code_elimination.h>
#include <torch/csrc/jit/passes/inliner.h>
#include <torch/jit.h>
#include <torch/torch.h>

#include <iostream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "support/graph_testing.h"
#include "support/op_cases.h"

namespace kiln::testing {

inline int64_t envInt(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  return value && *value ? std::stoll(value) : fallback;
}

struct FuzzCase {
  std::string source;
  std::vector<c10::IValue> inputs;
  at::ScalarType lowest_precision = at::kDouble;
};

inline at::Tensor fuzzTensor(std::mt19937_64& rng, std::vector<int64_t> shape, at::ScalarType dtype, c10::Device device) {
  at::Tensor t;
  if (dtype == at::kBool) t = torch::rand(shape) > 0.5;
  else if (at::isIntegralType(dtype, false)) t = torch::randint(-9, 10, shape, at::TensorOptions().dtype(dtype));
  else t = (torch::randn(shape) * 1.5).to(dtype);
  t = t.to(device);
  switch (rng() % 4) {
    case 0: return t;
    case 1: return t.dim() >= 2 ? t.transpose(0, t.dim() - 1).contiguous().transpose(0, t.dim() - 1) : t;
    case 2: {
      std::vector<int64_t> wide = shape;
      if (wide.empty()) return t;
      wide.back() *= 2;
      return fuzzTensor(rng, wide, dtype, device).slice(static_cast<int64_t>(wide.size()) - 1, 0, wide.back(), 2);
    }
    default: return t;
  }
}

inline FuzzCase makeCase(uint64_t seed, c10::Device device = c10::kCPU) {
  std::mt19937_64 rng(seed);
  torch::manual_seed(seed);  // the values too, so one seed alone reproduces a case
  FuzzCase c;
  const at::ScalarType dtypes[] = {at::kFloat, at::kFloat, at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kInt, at::kLong};
  const int rank = static_cast<int>(rng() % 4) + 1;
  std::vector<int64_t> base;
  for (int d = 0; d < rank; ++d) base.push_back(static_cast<int64_t>(rng() % 6) + 1);
  const int num_inputs = static_cast<int>(rng() % 3) + 1;
  std::ostringstream src;
  src << "def f(";
  std::vector<std::string> pool;
  for (int i = 0; i < num_inputs; ++i) {
    at::ScalarType dtype = dtypes[rng() % std::size(dtypes)];
    // Broadcasting: drop leading dims or set some to 1.
    std::vector<int64_t> shape(base.begin() + static_cast<long>(rng() % base.size()), base.end());
    for (auto& s : shape) if (rng() % 4 == 0) s = 1;
    if (rng() % 10 == 0) shape.clear();  // a 0-dim input
    c.inputs.push_back(fuzzTensor(rng, shape, dtype, device));
    // Integers promote to float32 (the default dtype) in float ops: they count as float32.
    at::ScalarType precision = at::isFloatingType(dtype) ? dtype : at::kFloat;
    if (c10::elementSize(precision) < c10::elementSize(c.lowest_precision)) c.lowest_precision = precision;
    src << (i ? ", " : "") << "x" << i;
    pool.push_back("x" + std::to_string(i));
  }
  src << "):\n";
  const char* unary[] = {"torch.sigmoid({})", "torch.tanh({})", "torch.relu({})", "torch.abs({})", "-{}",
                         "torch.exp(torch.tanh({}))", "torch.sin({})", "torch.floor({})", "torch.sqrt(torch.abs({}))",
                         "torch.gelu({})", "torch.silu({})", "torch.clamp({}, -1.0, 2)", "torch.erf({})",
                         "torch.log1p(torch.abs({}))", "torch.hardswish({})", "torch.sign({})", "({} * 0.5)", "({} + 2)",
                         // row reductions over the last dim (integers promoted by * 1.0, as they must be)
                         "torch.softmax({} * 1.0, -1)", "torch.log_softmax(torch.tanh({} * 1.0), -1)",
                         "({} - ({0} * 1.0).mean(-1, keepdim=True))",
                         "({} * 1.0 / (({0} * 1.0).abs().amax(-1, keepdim=True) + 1))"};
  const char* binary[] = {"{} + {}", "{} - {}", "{} * {}", "torch.maximum({}, {})", "torch.minimum({}, {})",
                          "torch.where({} > {}, {0}, {1})", "({} / (torch.abs({}) + 1))", "torch.lerp({}.float(), {}.float(), 0.25)",
                          "torch.addcmul({}, {}, {0}, value=0.5)"};
  const int ops = static_cast<int>(rng() % 19) + 2;
  for (int k = 0; k < ops; ++k) {
    std::string a = pool[rng() % pool.size()];
    std::string b = pool[rng() % pool.size()];
    std::string expr;
    if (rng() % 2) {
      expr = unary[rng() % std::size(unary)];
      // Step functions amplify a 1-ULP difference of an upstream transcendental (tanh(x) is 1.0
      // in one library, 0.99999994 in another; floor then differs by 1): they take inputs only.
      if (expr.find("floor") != std::string::npos || expr.find("sign") != std::string::npos) {
        a = pool[rng() % static_cast<size_t>(num_inputs)];
      }
      expr.replace(expr.find("{}"), 2, a);
      for (size_t at = expr.find("{0}"); at != std::string::npos; at = expr.find("{0}")) expr.replace(at, 3, a);
    } else {
      expr = binary[rng() % std::size(binary)];
      // lerp's operands go through .float(): float32 precision enters the graph.
      if (expr.find(".float()") != std::string::npos && c.lowest_precision == at::kDouble) c.lowest_precision = at::kFloat;
      for (auto [token, value] : {std::pair<std::string, std::string>{"{}", a}, {"{}", b}}) {
        size_t at = expr.find(token);
        if (at != std::string::npos) expr.replace(at, 2, value);
      }
      for (auto [token, value] : {std::pair<std::string, std::string>{"{0}", a}, {"{1}", b}}) {
        size_t at = expr.find(token);
        if (at != std::string::npos) expr.replace(at, 3, value);
      }
    }
    std::string name = "v" + std::to_string(k);
    src << "    " << name << " = " << expr << "\n";
    pool.push_back(name);
  }
  src << "    return " << pool.back();
  if (pool.size() > 3 && rng() % 3 == 0) src << ", " << pool[pool.size() - 2];
  src << "\n";
  c.source = src.str();
  return c;
}

// Fuses `graphs` random graphs (KILN_FUZZ_GRAPHS overrides the count, KILN_FUZZ_SEED the first
// seed, fresh each run otherwise; `offset` is added, for shards) and runs each against eager on
// `device`. Returns how many fused calls ran kiln's kernel. emulated_cuda: the kernels are CUDA's
// run on the CPU, expected to compute as eager's CUDA kernels do (hardswish, op_cases.h).
inline int64_t checkFuzzGraphsMatchEager(c10::Device device, int64_t default_graphs, int64_t offset = 0,
                                         bool emulated_cuda = false) {
  const int64_t graphs = envInt("KILN_FUZZ_GRAPHS", default_graphs);
  const uint64_t first = static_cast<uint64_t>(
      envInt("KILN_FUZZ_SEED", static_cast<int64_t>(std::random_device{}() & 0x7fffffff) + 1) + offset);
  std::cout << "[   SEED   ] fuzzing graphs " << first << " to " << first + static_cast<uint64_t>(graphs) - 1
            << " (KILN_FUZZ_SEED=" << first << ")" << std::endl;
  int64_t fused_groups = 0;
  int64_t kernel_calls = 0;
  for (uint64_t seed = first; seed < first + static_cast<uint64_t>(graphs); ++seed) {
    FuzzCase c = makeCase(seed, device);
    SCOPED_TRACE("seed " + std::to_string(seed) + " (KILN_FUZZ_SEED=" + std::to_string(seed) +
                 " KILN_FUZZ_GRAPHS=1 reproduces)\n" + c.source);
    std::shared_ptr<torch::jit::Graph> original, reference;
    // Kept while the reference runs: its inlined nodes' call stacks point into this unit (an error
    // raised in them, as eager's rejection of a dtype, reads them).
    std::shared_ptr<torch::jit::CompilationUnit> cuda_unit;
    try {
      auto unit = torch::jit::compile(c.source);
      original = torch::jit::toGraphFunction(unit->get_function("f")).graph()->copy();
      reference = original;
      if (emulated_cuda && c.source.find("torch.hardswish(") != std::string::npos) {
        std::string source = c.source;
        for (size_t at = source.find("torch.hardswish("); at != std::string::npos; at = source.find("torch.hardswish("))
          source.replace(at, 16, "hardswish_cuda(");
        cuda_unit = torch::jit::compile("def hardswish_cuda(x):\n    return " KILN_CUDA_HARDSWISH "\n" + source);
        reference = torch::jit::toGraphFunction(cuda_unit->get_function("f")).graph()->copy();
        torch::jit::Inline(*reference);
        torch::jit::EliminateDeadCode(reference);  // as compile does to f: an unused call goes
      }
    } catch (const std::exception& error) {
      ADD_FAILURE() << "fuzzer wrote invalid TorchScript: " << error.what();
      return kernel_calls;
    }
    std::shared_ptr<torch::jit::Graph> graph = original->copy();
    fuse(graph, testOptions());
    std::vector<c10::IValue> expected;
    try {
      expected = runGraph(reference, c.inputs);
    } catch (const std::exception&) {
      EXPECT_ANY_THROW(runGraph(graph, c.inputs));
      continue;
    }
    int64_t calls_before = 0;  // a group's counters are shared by every graph holding it
    for (const GroupReport& group : report(graph).groups) calls_before += group.calls;
    std::vector<c10::IValue> actual = runGraph(graph, c.inputs);
    if (actual.size() != expected.size()) {
      ADD_FAILURE() << actual.size() << " outputs, eager has " << expected.size();
      return kernel_calls;
    }
    for (size_t i = 0; i < actual.size(); ++i) {
      at::Tensor e = expected[i].toTensor();
      at::Tensor a = actual[i].toTensor();
      if (a.scalar_type() != e.scalar_type() || a.device() != e.device()) {
        ADD_FAILURE() << "output " << i << ": " << a.scalar_type() << " on " << a.device() << ", eager " << e.scalar_type()
                      << " on " << e.device();
        return kernel_calls;
      }
      // Chains compound rounding: compare at the lowest input precision, with headroom.
      if (e.is_floating_point() && c10::elementSize(e.scalar_type()) > c10::elementSize(c.lowest_precision)) {
        a = a.to(c.lowest_precision);
        e = e.to(c.lowest_precision);
      }
      ::testing::AssertionResult same = sameTensor(a, e, 8.0);
      if (!same) {
        ADD_FAILURE() << "output " << i << ": " << same.message();
        return kernel_calls;
      }
    }
    for (const GroupReport& group : report(graph).groups) {
      fused_groups++;
      kernel_calls += group.calls;
    }
    kernel_calls -= calls_before;
  }
  EXPECT_GT(fused_groups, graphs / 2) << "the fuzzer should mostly produce fusible graphs";
  return kernel_calls;
}

}  // namespace kiln::testing
