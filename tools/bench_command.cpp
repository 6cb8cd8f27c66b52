#include "tools/bench_command.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/codegen/onednn/interface.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <iostream>
#include <sstream>

#include "codegen/json.h"
#include "fuser/fusion_pass.h"
#include "kiln/kiln.h"
#include "tools/roofline.h"

namespace kiln::cli {
namespace {

using Clock = std::chrono::steady_clock;

struct Variant {
  std::string name;   // in --json
  std::string title;  // in the table
  std::function<torch::jit::Module(const torch::jit::Module&)> make;
  bool kiln_pass = false;  // kiln's executor pass registered while it warms up
  bool onednn = false;     // the oneDNN Graph fuser registered while it warms up
  torch::jit::Module module;
  bool low_inputs = false;  // runs on the inputs converted to the reduced precision
  std::string failure;     // empty: it ran
  int calls_per_round = 1;
  std::vector<double> ms;  // every timed call
  double max_error = 0;
};

std::string oneLine(const std::string& text) {
  std::string line = text.substr(0, text.find('\n'));
  return line.size() > 160 ? line.substr(0, 157) + "..." : line;
}

}  // namespace

std::vector<OutputAccuracy> outputAccuracy(const c10::IValue& expected, const c10::IValue& actual) {
  std::vector<at::Tensor> a, b;
  appendTensors(expected, a);
  appendTensors(actual, b);
  std::vector<OutputAccuracy> result;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    if (!a[i].is_floating_point() || a[i].sizes() != b[i].sizes()) continue;
    const at::Tensor x = a[i].to(at::kDouble).flatten(), y = b[i].to(at::kDouble).flatten();
    OutputAccuracy accuracy;
    accuracy.name = "output " + std::to_string(i);
    if (x.numel() > 0) {
      accuracy.max_abs = (x - y).abs().max().item<double>();
      const double scale = x.abs().max().item<double>();
      accuracy.max_rel = scale > 0 ? accuracy.max_abs / scale : accuracy.max_abs;
      const double norms = x.norm().item<double>() * y.norm().item<double>();
      accuracy.cosine = norms > 0 ? x.dot(y).item<double>() / norms : (accuracy.max_abs == 0 ? 1.0 : 0.0);
    }
    result.push_back(accuracy);
  }
  return result;
}

double maxDifference(const c10::IValue& reference, const c10::IValue& output) {
  std::vector<at::Tensor> a, b;
  appendTensors(reference, a);
  appendTensors(output, b);
  if (a.size() != b.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].sizes() != b[i].sizes()) return INFINITY;
    const at::Tensor x = a[i].to(at::kDouble), y = b[i].to(at::kDouble);
    if (!at::equal(x.isnan(), y.isnan())) return INFINITY;
    const at::Tensor both = x.isnan();
    worst = std::max(worst, (x - y).masked_fill(both, 0).abs().max().item<double>());
  }
  return worst;
}

namespace {

double median(std::vector<double> values) {
  if (values.empty()) return NAN;
  std::nth_element(values.begin(), values.begin() + static_cast<std::ptrdiff_t>(values.size() / 2), values.end());
  return values[values.size() / 2];
}

Variant variant(const char* name, const char* title, std::function<torch::jit::Module(const torch::jit::Module&)> make,
                bool kiln_pass = false, bool onednn = false) {
  Variant v;
  v.name = name;
  v.title = title;
  v.make = std::move(make);
  v.kiln_pass = kiln_pass;
  v.onednn = onednn;
  return v;
}

torch::jit::Module evalCopy(const torch::jit::Module& m) {
  torch::jit::Module copy = m.clone();
  copy.eval();
  return copy;
}

at::ScalarType lowDtype(Precision precision) {
  return precision == Precision::kFloat16 ? at::kHalf : at::kBFloat16;
}

std::vector<torch::jit::IValue> lowInputs(const std::vector<torch::jit::IValue>& inputs, at::ScalarType low) {
  std::vector<torch::jit::IValue> converted;
  for (const torch::jit::IValue& input : inputs) {
    converted.push_back(input.isTensor() && input.toTensor().scalar_type() == at::kFloat
                            ? torch::jit::IValue(input.toTensor().to(low))
                            : input);
  }
  return converted;
}

// The routes, the default executor first: it is the reference for speed and outputs.
std::vector<Variant> variants(const BenchSettings& settings, const std::vector<torch::jit::IValue>& inputs,
                              PrecisionPlan* plan) {
  const Precision precision = settings.precision;
  std::vector<Variant> list;
  list.push_back(variant("torchscript", "TorchScript (default executor)", evalCopy));
  list.push_back(variant("freeze_optimize_for_inference", "freeze + optimize_for_inference", [](const torch::jit::Module& m) {
    torch::jit::Module frozen = torch::jit::freeze(evalCopy(m));
    return torch::jit::optimize_for_inference(frozen);
  }));
  list.push_back(variant("onednn_graph", "oneDNN Graph fuser (frozen)",
                         [](const torch::jit::Module& m) { return torch::jit::freeze(evalCopy(m)); }, false, true));
  list.push_back(variant("kiln_executor", "kiln executor pass", evalCopy, true));
  if (precision == Precision::kFloat32) {
    // With the example inputs: kiln::optimize times the model with convolution regions and without.
    list.push_back(variant("kiln_optimize", "kiln::optimize", [&inputs](const torch::jit::Module& m) {
      return optimize(m, Options::global(), inputs);
    }, true));
    return list;
  }
  const at::ScalarType low = lowDtype(precision);
  const std::string low_title = std::string("TorchScript, module.to(") + c10::toString(low) + ")";
  const std::string kiln_title = std::string("kiln::optimize, ") + precisionName(precision);
  Variant converted = variant("torchscript_low_precision", low_title.c_str(), [low](const torch::jit::Module& m) {
    torch::jit::Module copy = evalCopy(m);
    copy.to(low);
    return copy;
  });
  converted.low_inputs = true;
  list.push_back(converted);
  const double min_cosine = settings.min_cosine;
  list.push_back(variant("kiln_optimize", kiln_title.c_str(), [precision, min_cosine, &inputs, plan](const torch::jit::Module& m) {
    Options options = Options::global();
    options.precision = precision;
    options.min_cosine = min_cosine;
    return optimize(m, options, inputs, plan);
  }, true));
  return list;
}

class Progress {
 public:
  explicit Progress(bool on) : on_(on) {}
  void say(const std::string& text) {
    if (!on_) return;
    std::fprintf(stderr, "\r\033[Kkiln bench: %s", text.c_str());
    std::fflush(stderr);
  }
  ~Progress() {
    if (on_) std::fprintf(stderr, "\r\033[K");
  }

 private:
  bool on_;
};

}  // namespace

int benchModel(const std::string& model_path, const torch::jit::Module& module,
               const std::vector<torch::jit::IValue>& inputs, const BenchSettings& settings) {
  torch::NoGradGuard no_grad;
  const bool kiln_was_enabled = enabled();
  PrecisionPlan plan;
  std::vector<Variant> list = variants(settings, inputs, &plan);
  const std::vector<torch::jit::IValue> low_inputs = lowInputs(inputs, lowDtype(settings.precision));
  Progress progress(settings.progress);
  c10::IValue reference;
  // Make and warm up each variant under its own executor passes (the executor optimizes a graph
  // on its first calls and keeps it); work out its calls per round from the warm-up.
  for (size_t v = 0; v < list.size(); ++v) {
    Variant& variant = list[v];
    progress.say("preparing " + variant.title + " (" + std::to_string(v + 1) + " of " + std::to_string(list.size()) + ")");
    variant.kiln_pass ? enable() : disable();
    try {
      if (variant.onednn) torch::jit::RegisterLlgaFuseGraph::setEnabled(true);
      variant.module = variant.make(module);
      c10::IValue output;
      double seconds = 0;
      for (int call = 0; call < 3; ++call) {
        const auto start = Clock::now();
        output = variant.module.forward(variant.low_inputs ? low_inputs : inputs);
        seconds = std::chrono::duration<double>(Clock::now() - start).count();
      }
      if (v == 0) reference = output;
      variant.max_error = maxDifference(reference, output);
      variant.calls_per_round = static_cast<int>(std::clamp(std::ceil(settings.round_seconds / std::max(seconds, 1e-6)), 1.0, 1000.0));
    } catch (const std::exception& error) {
      variant.failure = oneLine(error.what());
      if (v == 0) {
        if (variant.onednn) torch::jit::RegisterLlgaFuseGraph::setEnabled(false);
        kiln_was_enabled ? enable() : disable();
        throw std::runtime_error("the model rejects these inputs: " + variant.failure);
      }
    }
    if (variant.onednn) torch::jit::RegisterLlgaFuseGraph::setEnabled(false);
  }
  kiln_was_enabled ? enable() : disable();
  // Interleaved rounds: every variant once per round, in turn.
  for (int round = 0; round < settings.rounds; ++round) {
    for (Variant& variant : list) {
      if (!variant.failure.empty()) continue;
      progress.say("round " + std::to_string(round + 1) + " of " + std::to_string(settings.rounds) + ": " + variant.title);
      for (int call = 0; call < variant.calls_per_round; ++call) {
        const auto start = Clock::now();
        variant.module.forward(variant.low_inputs ? low_inputs : inputs);
        variant.ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
      }
    }
  }
  const double base = median(list[0].ms);
  // kiln's groups, as kiln::optimize made them (their counters also hold the executor pass's
  // calls of the same groups).
  Report groups;
  if (list.back().failure.empty()) groups = report(list.back().module.get_method("forward").graph());
  const std::string device = cpuDescription();
  if (settings.json) {
    std::ostringstream out;
    out << "{\"model\": " << jsonQuote(model_path) << ", \"device\": " << jsonQuote(device)
        << ", \"rounds\": " << settings.rounds << ", \"variants\": [";
    for (size_t v = 0; v < list.size(); ++v) {
      const Variant& variant = list[v];
      const double ms = median(variant.ms);
      out << (v ? ", " : "") << "{\"name\": " << jsonQuote(variant.name) << ", \"title\": " << jsonQuote(variant.title)
          << ", \"ok\": " << (variant.failure.empty() ? "true" : "false");
      if (variant.failure.empty()) {
        out << ", \"median_ms\": " << ms << ", \"min_ms\": " << *std::min_element(variant.ms.begin(), variant.ms.end())
            << ", \"calls\": " << variant.ms.size() << ", \"speedup\": " << base / ms << ", \"max_abs_error\": "
            << (std::isfinite(variant.max_error) ? std::to_string(variant.max_error) : "null");
      } else {
        out << ", \"failure\": " << jsonQuote(variant.failure);
      }
      out << "}";
    }
    out << "], \"kiln_groups\": " << groups.toJson();
    if (settings.min_cosine > 0) out << ", \"precision_plan\": " << plan.toJson();
    out << "}\n";
    std::cout << out.str();
    return 0;
  }
  std::printf("kiln bench: %s on %s; %d interleaved rounds, median of every call\n", model_path.c_str(), device.c_str(),
              settings.rounds);
  std::printf("%-34s %12s %14s %14s %8s\n", "variant", "median ms", "vs TorchScript", "max abs diff", "calls");
  for (const Variant& variant : list) {
    if (!variant.failure.empty()) {
      std::printf("%-34s failed: %s\n", variant.title.c_str(), variant.failure.c_str());
      continue;
    }
    const double ms = median(variant.ms);
    char error[32];
    std::snprintf(error, sizeof error, "%.2g", variant.max_error);
    std::printf("%-34s %12.3f %13.2fx %14s %8zu\n", variant.title.c_str(), ms, base / ms,
                &variant == &list[0] ? "reference" : error, variant.ms.size());
  }
  if (settings.min_cosine > 0) std::printf("kiln::optimize precision: %s\n", plan.toText().c_str());
  if (!groups.groups.empty()) {
    // Groups with one code share their counters: one line for each, with how often it occurs.
    struct Line {
      const GroupReport* group;
      std::string ops;
      int count = 0;
    };
    std::vector<Line> lines;
    double group_ns = 0;
    for (const GroupReport& group : groups.groups) {
      std::string ops;
      for (const std::string& op : group.ops) ops += (ops.empty() ? "" : " ") + op.substr(op.find("::") + 2);
      if (group.ns_per_call > 0) group_ns += group.ns_per_call;
      auto same = std::find_if(lines.begin(), lines.end(), [&](const Line& line) {
        return line.ops == ops && line.group->kind == group.kind && line.group->bytes_fused == group.bytes_fused &&
               line.group->ns_per_call == group.ns_per_call && line.group->choice == group.choice;
      });
      if (same != lines.end()) {
        same->count++;
      } else {
        lines.push_back({&group, ops, 1});
      }
    }
    std::printf("kiln groups (kiln::optimize): %zu; %.3f ms of a call in kiln groups\n",
                groups.groups.size(), group_ns / 1e6);
    for (const Line& line : lines) {
      const GroupReport& group = *line.group;
      const std::string name = group.name + (line.count > 1 ? " x" + std::to_string(line.count) : "");
      if (group.ns_per_call > 0 && group.bytes_fused > 0) {
        std::printf("  %-22s %-40s %9.3f ms/call %9.2f MB %7.1f GB/s  %s\n", name.c_str(), oneLine(line.ops).c_str(),
                    group.ns_per_call / 1e6, group.bytes_fused / 1e6, group.bytes_fused / group.ns_per_call,
                    group.choice.c_str());
      } else if (group.ns_per_call > 0 && !group.choice.empty()) {
        std::printf("  %-22s %-40s %9.3f ms/call  %s\n", name.c_str(), oneLine(line.ops).c_str(),
                    group.ns_per_call / 1e6, group.choice.c_str());
      } else {
        std::printf("  %-22s %-40s %s\n", name.c_str(), oneLine(line.ops).c_str(),
                    group.kind == "attention" ? "(attention kernel, not timed per group)" : "(not run)");
      }
    }
  }
  return 0;
}

}  // namespace kiln::cli
