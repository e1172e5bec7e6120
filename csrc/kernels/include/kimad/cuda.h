// Kimad's native kernels: the torch-free CUDA API (launchers on raw device pointers).
//
// Same contracts as kimad/kernels.h; every launcher enqueues on `stream` and returns the CUDA
// error of the launch. Device pointers only.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace kimad {
namespace cuda {

// Writes to *first_invalid (device memory, int64) the position of the first index outside
// [0, numel), or leaves it untouched when all are valid; the caller initialises it to
// INT64_MAX. Asynchronous.
cudaError_t find_invalid_index(const int32_t* indices, int64_t count, int64_t numel,
                               int64_t* first_invalid, cudaStream_t stream);

// out[indices[i]] += scale * values[i] with atomic adds (duplicates add up; the order of
// additions to one element is unspecified). Precondition: all indices valid. Asynchronous.
cudaError_t scatter_add(const float* values, const int32_t* indices, int64_t count, float scale,
                        float* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace kimad
