// Kimad's native kernels: the CUDA build of kimad/quant.h (launchers on raw device pointers).
//
// Same contracts as the kimad::cpu functions of kimad/quant.h, and given the same bucket norms
// bitwise the same codes and state (the double sums behind a norm are added in another order, so
// in rare cases a float32 norm differs in its last bit). Synchronous host functions: the
// non-finite count (encode) and the header check (decode) are read back before anything is
// written. Work buffers come from the stream-ordered allocator (cudaMallocAsync) on `stream`.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "kimad/quant.h"

namespace kimad {
namespace cuda {

// QSGD (bits 8, 4, 2) or sign (bits 1) encode with error feedback; grad, state and payload are
// device pointers, *stats is host memory. Returns after the results are in place.
cudaError_t quant_encode(Grad grad, float* state, int64_t n, Feedback mode, int bits, int64_t bucket,
                         uint64_t seed, uint8_t* payload, QuantStats* stats, cudaStream_t stream);

// Validating decode-and-accumulate (see kimad::cpu::quant_decode_accumulate); payload and out are
// device pointers, *status is host memory.
cudaError_t quant_decode_accumulate(const uint8_t* payload, int64_t bytes, int bits, int64_t numel, int64_t bucket,
                                    float scale, float* out, QuantDecodeStatus* status, cudaStream_t stream);

// Expected squared QSGD errors and the sign error (see kimad::cpu::quant_error_estimate); grad and
// state are device pointers, errors[4] and *stats host memory (errors untouched when non-finite).
cudaError_t quant_error_estimate(Grad grad, const float* state, int64_t n, Feedback mode, int64_t bucket,
                                 double* errors, QuantStats* stats, cudaStream_t stream);

}  // namespace cuda
}  // namespace kimad
