// jsonQuote: every character JSON requires escaped is escaped, everything else passes through.
#include "codegen/json.h"

#include <gtest/gtest.h>

namespace kiln {
namespace {

TEST(Json, QuotesAndEscapes) {
  EXPECT_EQ(jsonQuote("plain"), "\"plain\"");
  EXPECT_EQ(jsonQuote("a\"b\\c"), "\"a\\\"b\\\\c\"");
  EXPECT_EQ(jsonQuote("line\nnext\ttab\r"), "\"line\\nnext\\ttab\\r\"");
  EXPECT_EQ(jsonQuote(std::string("nul\0bell\a", 9)), "\"nul\\u0000bell\\u0007\"");
  EXPECT_EQ(jsonQuote("caf\xc3\xa9"), "\"caf\xc3\xa9\"");  // UTF-8 passes through
}

}  // namespace
}  // namespace kiln
