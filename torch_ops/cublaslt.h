// kiln::linear on CUDA tensors through cuBLASLt (the library torch's CUDA build ships, opened at
// run time, so libkiln.so still loads on a machine without it): y = act(x · wᵀ + b [+ other]) as
// one cublasLtMatmul, the bias and the activation as its epilogue (BIAS, RELU_BIAS, GELU_BIAS) and
// the residual as its C operand (beta = 1). float16 and bfloat16 accumulate in float32; float32
// runs only where the user allowed TF32 (torch.backends.cuda.matmul.allow_tf32), as ATen's own
// GEMMs would. The algorithm is cuBLASLt's heuristic's first answer, asked once per device,
// dtype, shape, epilogue and alignment and kept with that key's descriptors (a call sets only its
// bias pointer: made each call, they left a 4096 x 768 -> 768 GEMM at 21.2 µs on an H200, kept
// 12.7 µs); the workspace comes from torch's caching allocator; the call goes on torch's current
// stream.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "fuser/library_calls.h"

namespace kiln {

// Why cuBLASLt cannot run this call as one matmul ("" when it can): operands off CUDA or on two
// devices, a dtype it does not take here, a layout it cannot read, exact (erf) GELU (its GELU
// epilogue is the tanh approximation), an activation it lacks, a residual of another shape or
// dtype, or no rows.
std::string cublasLtRefusal(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& other, const Epilogue& epilogue);

// Runs the call (cublasLtRefusal must be ""). Throws where cuBLASLt does not load or fails; the
// caller then runs ATen's ops.
at::Tensor cublasLtLinear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& other, const Epilogue& epilogue);

}  // namespace kiln
