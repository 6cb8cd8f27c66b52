// JSON text for kiln's machine-readable outputs (kiln::Report, every `kiln ... --json`): one
// quoting function, so every string is escaped the same way (RFC 8259).
#pragma once

#include <string>

namespace kiln {

// `text` as a JSON string literal, quotes included.
std::string jsonQuote(const std::string& text);

}  // namespace kiln
