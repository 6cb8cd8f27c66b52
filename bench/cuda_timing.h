// Timing GPU work for the CUDA suites: CUDA events around several calls on the current stream,
// so the host enqueues the next call while the GPU runs the previous one and the window measures
// the GPU, not the first call's host latency.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

namespace kiln_bench {

// Seconds one call of `body` takes on the current stream, over `calls` calls.
template <typename Body>
double timeOnStream(Body&& body, int calls) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaEventRecord(start, stream);
  for (int i = 0; i < calls; ++i) body();
  cudaEventRecord(stop, stream);
  cudaEventSynchronize(stop);
  float milliseconds = 0.0f;
  cudaEventElapsedTime(&milliseconds, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return milliseconds / 1e3 / calls;
}

}  // namespace kiln_bench
