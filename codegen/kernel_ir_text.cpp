// The kernel IR's text form: a printer and a parser that round-trip exactly.
//
//   kernel NAME {
//     in0: f32
//     arg0: f64
//     %0 = load in0 : f32
//     %1 = const 2.5 : f32
//     %2 = mul %0, %1 : f32
//     out0 = %2
//   }
//
// A reduction kernel's per-row output reads 'out1 = row %7'.
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <sstream>
#include <stdexcept>

#include "codegen/kernel_ir.h"

namespace kiln::ir {
namespace {

std::string formatFloat(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%.17g", value);
  return buffer;
}

double parseFloat(const std::string& token) {
  if (token == "nan") return std::nan("");
  if (token == "inf") return INFINITY;
  if (token == "-inf") return -INFINITY;
  // strtod, not stod: stod rejects subnormals (strtod reports ERANGE for them) and 1e-310 is a
  // constant like any other.
  errno = 0;
  char* end = nullptr;
  double value = std::strtod(token.c_str(), &end);
  if (token.empty() || *end != '\0') throw std::invalid_argument("bad number '" + token + "'");
  if (errno == ERANGE && std::isinf(value)) throw std::invalid_argument("number out of range '" + token + "'");
  return value;
}

[[noreturn]] void fail(int line, const std::string& what) {
  throw std::invalid_argument("kiln ir parse error, line " + std::to_string(line) + ": " + what);
}

int parseIndex(const std::string& token, const std::string& prefix, int line) {
  if (token.rfind(prefix, 0) != 0 || token.size() == prefix.size()) {
    fail(line, "expected " + prefix + "N, got '" + token + "'");
  }
  try {
    return std::stoi(token.substr(prefix.size()));
  } catch (const std::exception&) {
    fail(line, "bad index in '" + token + "'");
  }
}

}  // namespace

std::string print(const Kernel& kernel) {
  std::ostringstream out;
  out << "kernel " << kernel.name << " {\n";
  for (size_t i = 0; i < kernel.tensor_inputs.size(); ++i) {
    out << "  in" << i << ": " << dtypeName(kernel.tensor_inputs[i]) << "\n";
  }
  for (size_t i = 0; i < kernel.scalar_inputs.size(); ++i) {
    out << "  arg" << i << ": " << dtypeName(kernel.scalar_inputs[i]) << "\n";
  }
  for (size_t i = 0; i < kernel.body.size(); ++i) {
    const Instr& instr = kernel.body[i];
    out << "  %" << i << " = " << opName(instr.op);
    switch (instr.op) {
      case Op::kLoad:
        out << " in" << instr.param;
        break;
      case Op::kScalar:
        out << " arg" << instr.param;
        break;
      case Op::kConstant:
        out << " " << (isFloating(instr.type) ? formatFloat(instr.float_value)
                                              : std::to_string(instr.int_value));
        break;
      default:
        for (size_t k = 0; k < instr.operands.size(); ++k) {
          out << (k ? ", %" : " %") << instr.operands[k];
        }
    }
    out << " : " << dtypeName(instr.type) << "\n";
  }
  for (size_t i = 0; i < kernel.outputs.size(); ++i) {
    out << "  out" << i << " = " << (kernel.isRowOutput(i) ? "row %" : "%") << kernel.outputs[i] << "\n";
  }
  out << "}\n";
  return out.str();
}

Kernel parse(const std::string& text) {
  Kernel kernel;
  std::istringstream lines(text);
  std::string line;
  int number = 0;
  bool opened = false;
  bool closed = false;
  while (std::getline(lines, line)) {
    ++number;
    // Tokenize on spaces, dropping ',' and ':' separators.
    std::vector<std::string> tokens;
    std::string token;
    for (char c : line) {
      if (c == ' ' || c == '\t' || c == ',' || c == ':' || c == '\r') {
        if (!token.empty()) tokens.push_back(token);
        token.clear();
      } else {
        token += c;
      }
    }
    if (!token.empty()) tokens.push_back(token);
    if (tokens.empty()) continue;
    if (closed) fail(number, "text after the closing brace");
    if (!opened) {
      if (tokens.size() != 3 || tokens[0] != "kernel" || tokens[2] != "{") {
        fail(number, "expected 'kernel NAME {'");
      }
      kernel.name = tokens[1];
      opened = true;
      continue;
    }
    if (tokens[0] == "}") {
      closed = true;
      continue;
    }
    const std::string& head = tokens[0];
    if (head.rfind("in", 0) == 0 || head.rfind("arg", 0) == 0) {
      bool is_tensor = head.rfind("in", 0) == 0;
      int index = parseIndex(head, is_tensor ? "in" : "arg", number);
      auto& list = is_tensor ? kernel.tensor_inputs : kernel.scalar_inputs;
      if (tokens.size() != 2 || index != static_cast<int>(list.size())) {
        fail(number, "inputs must be declared in order as 'inN: TYPE'");
      }
      DType type;
      if (!parseDType(tokens[1], &type)) fail(number, "unknown type '" + tokens[1] + "'");
      list.push_back(type);
      continue;
    }
    if (head.rfind("out", 0) == 0) {
      int index = parseIndex(head, "out", number);
      const bool row = tokens.size() == 4 && tokens[2] == "row";
      if ((tokens.size() != 3 && !row) || tokens[1] != "=" || index != static_cast<int>(kernel.outputs.size())) {
        fail(number, "outputs must be declared in order as 'outN = %V' or 'outN = row %V'");
      }
      kernel.outputs.push_back(parseIndex(tokens.back(), "%", number));
      if (row || !kernel.row_outputs.empty()) kernel.row_outputs.resize(kernel.outputs.size(), false);
      if (row) kernel.row_outputs.back() = true;
      continue;
    }
    int index = parseIndex(head, "%", number);
    if (index != static_cast<int>(kernel.body.size())) fail(number, "values must be numbered in order");
    if (tokens.size() < 4 || tokens[1] != "=") fail(number, "expected '%N = OP ... : TYPE'");
    Instr instr;
    if (!parseOp(tokens[2], &instr.op)) fail(number, "unknown op '" + tokens[2] + "'");
    if (!parseDType(tokens.back(), &instr.type)) fail(number, "unknown type '" + tokens.back() + "'");
    std::vector<std::string> args(tokens.begin() + 3, tokens.end() - 1);
    if (instr.op == Op::kLoad || instr.op == Op::kScalar) {
      if (args.size() != 1) fail(number, "expected one input");
      instr.param = parseIndex(args[0], instr.op == Op::kLoad ? "in" : "arg", number);
    } else if (instr.op == Op::kConstant) {
      if (args.size() != 1) fail(number, "expected one literal");
      try {
        if (isFloating(instr.type)) {
          instr.float_value = parseFloat(args[0]);
        } else {
          instr.int_value = std::stoll(args[0]);
        }
      } catch (const std::exception&) {
        fail(number, "bad literal '" + args[0] + "'");
      }
    } else {
      if (static_cast<int>(args.size()) != opArity(instr.op)) {
        fail(number, std::string(opName(instr.op)) + " takes " +
                         std::to_string(opArity(instr.op)) + " operands");
      }
      for (const std::string& arg : args) instr.operands.push_back(parseIndex(arg, "%", number));
    }
    kernel.body.push_back(instr);
  }
  if (!opened || !closed) fail(number, "unterminated kernel");
  std::string problems = verify(kernel);
  if (!problems.empty()) throw std::invalid_argument("kiln ir parse error: " + problems);
  return kernel;
}

}  // namespace kiln::ir
