// Every supported op x every dtype against eager on fresh random inputs (never zeros), contiguous,
// transposed, sliced and expanded, 0-dim and empty. Each op is fused alone (min group size 1).
#include <gtest/gtest.h>
#include <torch/jit.h>

#include "support/graph_testing.h"
#include "support/op_cases.h"

namespace kiln {
namespace {

using namespace kiln::testing;

class OpCoverage : public ::testing::TestWithParam<OpCase> {};

TEST_P(OpCoverage, MatchesEagerForEveryDtypeAndLayout) { checkOpMatchesEager(GetParam(), c10::kCPU); }

INSTANTIATE_TEST_SUITE_P(Ops, OpCoverage, ::testing::ValuesIn(kOps),
                         [](const ::testing::TestParamInfo<OpCase>& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace kiln
