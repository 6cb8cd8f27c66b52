// A random-graph fuzzer: random DAGs of 2-20 supported ops over inputs of random broadcasting
// shapes, dtypes, scalars and strides, fused and compared against eager. KILN_FUZZ_GRAPHS sets the
// count (default 500; long mode: 10000+), KILN_FUZZ_SEED the first seed. A failure prints the
// seed and the TorchScript source, which reproduce it.
#include <gtest/gtest.h>
#include <torch/jit.h>

#include "support/fuzz_graphs.h"
#include "support/graph_testing.h"

namespace kiln {
namespace {

using namespace kiln::testing;

TEST(Fuzz, RandomGraphsMatchEager) { checkFuzzGraphsMatchEager(c10::kCPU, 500); }

}  // namespace
}  // namespace kiln
