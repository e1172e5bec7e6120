// Launch plumbing shared by Kimad's CUDA kernels: error propagation, grid sizing, and a
// stream-ordered scratch buffer. Header-only; included by csrc/kernels/cuda/*.cu only.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace kimad {
namespace cuda {
namespace launch {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over `count` items: at least 1, capped (the loop covers the rest).
inline int blocks_for(int64_t count) {
  const int64_t b = (count + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 16 ? (b > 0 ? b : 1) : 65535 * 16);
}

// A stream-ordered device allocation freed when it goes out of scope.
struct DeviceBuffer {
  explicit DeviceBuffer(cudaStream_t s) : stream(s) {}
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFreeAsync(ptr, stream);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  cudaError_t alloc(size_t bytes) { return cudaMallocAsync(&ptr, bytes > 0 ? bytes : 1, stream); }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
  void* ptr = nullptr;
  cudaStream_t stream;
};

}  // namespace launch
}  // namespace cuda
}  // namespace kimad

// Returns the CUDA error of `expr` from the enclosing function when it is not cudaSuccess.
#define KIMAD_TRY(expr)                                \
  do {                                                 \
    const cudaError_t kimad_err_ = (expr);             \
    if (kimad_err_ != cudaSuccess) return kimad_err_;  \
  } while (0)
