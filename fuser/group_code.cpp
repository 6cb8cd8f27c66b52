// The group code (see group_code.h). One line per item, tokens separated by single spaces:
//
//   kiln.group 1
//   options fast_math 0 cpu_parallel_grain 32768
//   in %0 : Tensor
//   in %1 : float
//   %2 = const float 0x4000000000000000 # 2
//   %3 = const str 74616e68 # "tanh"
//   %4 = aten::mul %0 %2 : Tensor
//   out %4
//
// Values are numbered in order of definition. What follows " # " is for people and is ignored.
#include "fuser/group_code.h"

#include <torch/csrc/jit/ir/constants.h>

#include <cinttypes>
#include <cmath>
#include <cstring>
#include <sstream>
#include <unordered_map>
#include <vector>

namespace kiln {
namespace {

using torch::jit::Graph;
using torch::jit::Node;
using torch::jit::Value;

std::optional<std::string> typeName(const c10::TypePtr& type) {
  switch (type->kind()) {
    case c10::TypeKind::TensorType: return "Tensor";
    case c10::TypeKind::FloatType: return "float";
    case c10::TypeKind::IntType: return "int";
    case c10::TypeKind::BoolType: return "bool";
    case c10::TypeKind::ListType:
      if (type->containedType(0)->kind() == c10::TypeKind::IntType) return "int[]";
      return std::nullopt;
    default: return std::nullopt;
  }
}

c10::TypePtr typeNamed(const std::string& name) {
  if (name == "Tensor") return c10::TensorType::get();
  if (name == "float") return c10::FloatType::get();
  if (name == "int") return c10::IntType::get();
  if (name == "bool") return c10::BoolType::get();
  if (name == "int[]") return c10::ListType::ofInts();
  return nullptr;
}

std::string doubleBits(double value) {
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof bits);
  char text[32];
  std::snprintf(text, sizeof text, "0x%016" PRIx64, bits);
  return text;
}

std::string hexBytes(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string hex;
  for (unsigned char c : bytes) {
    hex.push_back(digits[c >> 4]);
    hex.push_back(digits[c & 0xf]);
  }
  return hex.empty() ? "-" : hex;  // "-": the empty string, so the token is never empty
}

std::string readable(double value) {
  char text[40];
  std::snprintf(text, sizeof text, "%.17g", value);
  return text;
}

// "KIND VALUE... # readable", or nullopt for a constant kind the code does not hold.
std::optional<std::string> encodeConstant(const c10::IValue& value) {
  std::ostringstream out;
  if (value.isDouble()) {
    out << "float " << doubleBits(value.toDouble()) << " # " << readable(value.toDouble());
  } else if (value.isBool()) {
    out << "bool " << (value.toBool() ? 1 : 0);
  } else if (value.isInt()) {
    out << "int " << value.toInt();
  } else if (value.isString()) {
    const std::string& text = value.toStringRef();
    out << "str " << hexBytes(text);
    if (text.find_first_of("\n\r") == std::string::npos) out << " # \"" << text << "\"";
  } else if (value.isNone()) {
    out << "None";
  } else if (value.isDevice()) {
    out << "Device " << hexBytes(value.toDevice().str()) << " # " << value.toDevice().str();
  } else if (value.isIntList()) {
    out << "int[]";
    for (int64_t item : value.toIntVector()) out << " " << item;
  } else if (value.isDoubleList()) {
    out << "float[]";
    for (double item : value.toDoubleVector()) out << " " << doubleBits(item);
  } else if (value.isBoolList()) {
    out << "bool[]";
    for (bool item : value.toBoolList()) out << " " << (item ? 1 : 0);
  } else {
    return std::nullopt;
  }
  return out.str();
}

[[noreturn]] void malformed(size_t line, const std::string& what) {
  TORCH_CHECK(false, "kiln: malformed fusion group code, line ", line, ": ", what);
}

std::vector<std::string> tokens(const std::string& line) {
  std::string text = line.substr(0, line.find(" # "));
  std::vector<std::string> out;
  std::istringstream stream(text);
  for (std::string token; stream >> token;) out.push_back(token);
  return out;
}

int64_t parseInt(const std::string& token, size_t line) {
  errno = 0;
  char* end = nullptr;
  long long value = std::strtoll(token.c_str(), &end, 10);
  if (token.empty() || *end != '\0' || errno == ERANGE) malformed(line, "bad integer '" + token + "'");
  return static_cast<int64_t>(value);
}

double parseBits(const std::string& token, size_t line) {
  if (token.size() != 18 || token.compare(0, 2, "0x") != 0) malformed(line, "bad float bits '" + token + "'");
  char* end = nullptr;
  uint64_t bits = std::strtoull(token.c_str() + 2, &end, 16);
  if (*end != '\0') malformed(line, "bad float bits '" + token + "'");
  double value = 0;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

bool parseBool(const std::string& token, size_t line) {
  if (token != "0" && token != "1") malformed(line, "bad bool '" + token + "'");
  return token == "1";
}

std::string parseHex(const std::string& token, size_t line) {
  if (token == "-") return "";
  if (token.size() % 2 != 0) malformed(line, "bad hex string");
  auto nibble = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    malformed(line, "bad hex string");
  };
  std::string bytes;
  for (size_t i = 0; i < token.size(); i += 2) {
    bytes.push_back(static_cast<char>(nibble(token[i]) * 16 + nibble(token[i + 1])));
  }
  return bytes;
}

// The constant of kind `args[0]` with values `args[1..]`.
c10::IValue decodeConstant(const std::vector<std::string>& args, size_t line) {
  const std::string& kind = args[0];
  auto one = [&]() -> const std::string& {
    if (args.size() != 2) malformed(line, kind + " constant takes one value");
    return args[1];
  };
  if (kind == "float") return parseBits(one(), line);
  if (kind == "int") return parseInt(one(), line);
  if (kind == "bool") return parseBool(one(), line);
  if (kind == "str") return parseHex(one(), line);
  if (kind == "Device") {
    try {
      return c10::Device(parseHex(one(), line));
    } catch (const c10::Error&) {
      malformed(line, "bad device");
    }
  }
  if (kind == "None") {
    if (args.size() != 1) malformed(line, "None takes no value");
    return c10::IValue();
  }
  if (kind == "int[]") {
    std::vector<int64_t> items;
    for (size_t i = 1; i < args.size(); ++i) items.push_back(parseInt(args[i], line));
    return items;
  }
  if (kind == "float[]") {
    std::vector<double> items;
    for (size_t i = 1; i < args.size(); ++i) items.push_back(parseBits(args[i], line));
    return items;
  }
  if (kind == "bool[]") {
    c10::List<bool> items;
    for (size_t i = 1; i < args.size(); ++i) items.push_back(parseBool(args[i], line));
    return items;
  }
  malformed(line, "unknown constant kind '" + kind + "'");
}

// "options fast_math 0|1 cpu_parallel_grain N" (N >= 1).
KernelOptions parseOptions(const std::vector<std::string>& t, size_t number) {
  if (t.size() != 5 || t[1] != "fast_math" || (t[2] != "0" && t[2] != "1") || t[3] != "cpu_parallel_grain") {
    malformed(number, "expected 'options fast_math 0|1 cpu_parallel_grain N'");
  }
  KernelOptions options;
  options.fast_math = t[2] == "1";
  options.cpu_parallel_grain = parseInt(t[4], number);
  if (options.cpu_parallel_grain < 1) malformed(number, "cpu_parallel_grain must be at least 1");
  return options;
}

}  // namespace

std::optional<std::string> encodeGroupCode(const Graph& subgraph, const KernelOptions& options, std::string* why,
                                           const std::vector<bool>& number_inputs) {
  auto fail = [&](const std::string& reason) -> std::optional<std::string> {
    if (why) *why = reason;
    return std::nullopt;
  };
  std::unordered_map<const Value*, size_t> ids;
  std::ostringstream out;
  out << kGroupCodeHeader << "\n";
  out << "options fast_math " << (options.fast_math ? 1 : 0) << " cpu_parallel_grain " << options.cpu_parallel_grain
      << "\n";
  auto define = [&](const Value* value) {
    size_t id = ids.size();
    ids[value] = id;
    return "%" + std::to_string(id);
  };
  auto use = [&](const Value* value) -> std::optional<std::string> {
    auto found = ids.find(value);
    if (found == ids.end()) return std::nullopt;
    return "%" + std::to_string(found->second);
  };
  for (size_t i = 0; i < subgraph.inputs().size(); ++i) {
    const Value* input = subgraph.inputs()[i];
    auto type = typeName(input->type());
    if (!type || *type == "int[]") return fail("group input of type " + input->type()->str());
    const bool number = i < number_inputs.size() && number_inputs[i];
    if (number && input->type()->kind() != c10::TypeKind::TensorType) return fail("a number input that is not a tensor");
    out << "in " << define(input) << " : " << *type << (number ? " number" : "") << "\n";
  }
  for (const Node* node : subgraph.nodes()) {
    if (node->kind() == torch::jit::prim::Constant) {
      auto value = torch::jit::toIValue(node->output());
      auto text = value ? encodeConstant(*value) : std::nullopt;
      if (!text) return fail("constant of type " + node->output()->type()->str());
      out << define(node->output()) << " = const " << *text << "\n";
      continue;
    }
    if (node->outputs().size() != 1 || !node->blocks().empty()) {
      return fail(std::string("node ") + node->kind().toQualString() + " with blocks or several outputs");
    }
    auto type = typeName(node->output()->type());
    if (!type) return fail("node result of type " + node->output()->type()->str());
    std::string line = " = " + std::string(node->kind().toQualString());
    for (const Value* input : node->inputs()) {
      auto name = use(input);
      if (!name) return fail("a value used before it is defined");
      line += " " + *name;
    }
    out << define(node->output()) << line << " : " << *type << "\n";
  }
  for (const Value* output : subgraph.outputs()) {
    auto name = use(output);
    if (!name) return fail("an output that is not defined");
    out << "out " << *name << "\n";
  }
  return out.str();
}

std::optional<KernelOptions> groupCodeOptions(const std::string& code) {
  std::istringstream lines(code);
  std::string line;
  std::getline(lines, line);
  if (line != kGroupCodeHeader) malformed(1, std::string("expected '") + kGroupCodeHeader + "'");
  if (!std::getline(lines, line)) return std::nullopt;
  std::vector<std::string> t = tokens(line);
  if (t.empty() || t[0] != "options") return std::nullopt;
  return parseOptions(t, 2);
}

std::vector<bool> groupCodeNumberInputs(const std::string& code) {
  std::vector<bool> numbers;
  std::istringstream lines(code);
  for (std::string line; std::getline(lines, line);) {
    std::vector<std::string> t = tokens(line);
    if (!t.empty() && t[0] == "in") numbers.push_back(t.size() == 5 && t[4] == "number");
  }
  return numbers;
}

std::shared_ptr<Graph> decodeGroupCode(const std::string& code) {
  auto graph = std::make_shared<Graph>();
  std::vector<Value*> values;
  std::istringstream lines(code);
  std::string line;
  size_t number = 0;
  auto value = [&](const std::string& token) -> Value* {
    if (token.size() < 2 || token[0] != '%') malformed(number, "expected %N, found '" + token + "'");
    int64_t index = parseInt(token.substr(1), number);
    if (index < 0 || index >= static_cast<int64_t>(values.size())) malformed(number, "undefined value " + token);
    return values[static_cast<size_t>(index)];
  };
  auto defines = [&](const std::string& token) {
    if (token != "%" + std::to_string(values.size())) malformed(number, "values must be numbered in order");
  };
  bool header = false;
  while (std::getline(lines, line)) {
    ++number;
    if (!header) {
      if (line != kGroupCodeHeader) malformed(number, std::string("expected '") + kGroupCodeHeader + "'");
      header = true;
      continue;
    }
    std::vector<std::string> t = tokens(line);
    if (t.empty()) continue;
    if (t[0] == "options") {
      if (number != 2) malformed(number, "options must follow the header");
      parseOptions(t, number);
    } else if (t[0] == "in") {
      if (!(t.size() == 4 || (t.size() == 5 && t[4] == "number")) || t[2] != ":")
        malformed(number, "expected 'in %N : TYPE' or 'in %N : Tensor number'");
      defines(t[1]);
      c10::TypePtr type = typeNamed(t[3]);
      if (!type) malformed(number, "unknown type '" + t[3] + "'");
      if (type->kind() == c10::TypeKind::ListType) malformed(number, "a group input cannot be a list");
      if (t.size() == 5 && type->kind() != c10::TypeKind::TensorType) malformed(number, "only a tensor input can be a number");
      values.push_back(graph->addInput()->setType(type));
    } else if (t[0] == "out") {
      if (t.size() != 2) malformed(number, "expected 'out %N'");
      graph->registerOutput(value(t[1]));
    } else if (t.size() >= 4 && t[1] == "=" && t[2] == "const") {
      defines(t[0]);
      values.push_back(graph->insertConstant(decodeConstant({t.begin() + 3, t.end()}, number)));
    } else if (t.size() >= 5 && t[1] == "=" && t[t.size() - 2] == ":") {
      defines(t[0]);
      c10::TypePtr type = typeNamed(t.back());
      if (!type) malformed(number, "unknown type '" + t.back() + "'");
      if (t[2].find("::") == std::string::npos) malformed(number, "bad op name '" + t[2] + "'");
      std::vector<Value*> inputs;
      for (size_t i = 3; i + 2 < t.size(); ++i) inputs.push_back(value(t[i]));
      Node* node = graph->create(c10::Symbol::fromQualString(t[2]), inputs, 1);
      graph->appendNode(node);
      values.push_back(node->output()->setType(type));
    } else {
      malformed(number, "unrecognized line");
    }
  }
  if (!header) malformed(1, "empty code");
  return graph;
}

}  // namespace kiln
