// Kimad's native kernels: the CUDA build of kimad/topk.h (launchers on raw device pointers).
//
// Same contracts as the kimad::cpu functions of kimad/topk.h. Unlike the elementwise launchers
// of kimad/cuda.h these are synchronous host functions: the threshold bin and the buffer sizes
// depend on the histogram, which is read back before the second pass. Work buffers come from the
// stream-ordered allocator (cudaMallocAsync) on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kimad/topk.h"

namespace kimad {
namespace cuda {

// Histogram of the top 16 key bits of |v| (counts and sums of squares, written to HOST arrays
// of kTopKBins each), plus stats->non_finite and stats->sq_norm. grad/state are device pointers.
cudaError_t key_histogram(Grad grad, const float* state, int64_t n, Feedback mode,
                          uint32_t* counts_host, double* sum_squares_host, TopKStats* stats,
                          cudaStream_t stream);

// Exact top-k encode with error feedback (see kimad::cpu::topk_encode); grad, state, values and
// indices are device pointers, *stats is host memory. Returns after the results are in place.
cudaError_t topk_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t k,
                        float* values, int32_t* indices, TopKStats* stats, cudaStream_t stream);

}  // namespace cuda
}  // namespace kimad
