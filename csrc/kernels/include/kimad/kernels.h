// Kimad's native kernels: the torch-free CPU API.
//
// Kernels take raw pointers and sizes and know nothing of torch, Python or policy; input
// validation of shapes and dtypes happens in csrc/bindings/, data-dependent checks (an index
// out of range inside a message) are reported through return values, never by writing out of
// bounds. Every function here is safe to call with count == 0 and null pointers in that case.
#pragma once

#include <cstdint>

#include "kimad/simd.h"

namespace kimad {
namespace cpu {

// Position of the first entry of `indices[0, count)` that is not in [0, numel), or -1 when
// every index is valid. Multi-threaded (OpenMP) and vectorised.
int64_t find_invalid_index(const int32_t* indices, int64_t count, int64_t numel);

// Decode-and-accumulate of one sparse message: out[indices[i]] += scale * values[i] for i in
// [0, count). Duplicate indices add up; for every output element the additions happen in
// message order, so the result is bitwise identical for any number of threads.
// Precondition: every index is in [0, numel) (check with find_invalid_index first).
void scatter_add(const float* values, const int32_t* indices, int64_t count, float scale,
                 float* out, int64_t numel);

// Validating decode-and-accumulate: checks every index, and only if all are valid performs
// scatter_add. Returns -1 on success, otherwise the position of the first invalid index, in
// which case `out` is left untouched.
int64_t sparse_accumulate(const float* values, const int32_t* indices, int64_t count,
                          float scale, float* out, int64_t numel);

// Number of threads the OpenMP kernels use (1 when built without OpenMP).
int num_threads();

}  // namespace cpu
}  // namespace kimad
