// The dtypes torch's oneDNN runs on this CPU: the library ways (torch_ops/library_ops.cpp) offer
// oneDNN only for these, and the tests ask the same question to know which ways a call can run.
#pragma once

#include <c10/core/ScalarType.h>

namespace kiln {

// float32 always; bfloat16 where torch's oneDNN runs it here (AVX-512 BF16 or AMX: not on an
// AVX2-only CPU); no other dtype.
bool onednnTakesDtype(c10::ScalarType dtype);

}  // namespace kiln
