// Decode-and-accumulate of sparse (values, int32 indices) messages on the GPU.
#include <cstdint>

#include "kimad/cuda.h"
#include "launch.cuh"

namespace kimad {
namespace cuda {
namespace {

using launch::blocks_for;
using launch::kThreads;

__global__ void find_invalid_kernel(const int32_t* __restrict__ indices, int64_t count, int64_t numel,
                                    unsigned long long* first_invalid) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = indices[i];
    if (j < 0 || j >= numel) atomicMin(first_invalid, static_cast<unsigned long long>(i));
  }
}

__global__ void scatter_add_kernel(const float* __restrict__ values, const int32_t* __restrict__ indices,
                                   int64_t count, float scale, float* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    atomicAdd(out + indices[i], scale * values[i]);
  }
}

}  // namespace

cudaError_t find_invalid_index(const int32_t* indices, int64_t count, int64_t numel,
                               int64_t* first_invalid, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  static_assert(sizeof(unsigned long long) == sizeof(int64_t), "int64 atomics");
  find_invalid_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
      indices, count, numel, reinterpret_cast<unsigned long long*>(first_invalid));
  return cudaGetLastError();
}

cudaError_t scatter_add(const float* values, const int32_t* indices, int64_t count, float scale,
                        float* out, cudaStream_t stream) {
  if (count <= 0) return cudaSuccess;
  scatter_add_kernel<<<blocks_for(count), kThreads, 0, stream>>>(values, indices, count, scale, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kimad
