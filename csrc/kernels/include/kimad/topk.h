// Kimad's native kernels: fused error feedback + exact top-k encode, and the error profile.
//
// Both kernels read a gradient g (n float32, float16 or bfloat16; see kimad/grad.h) and an
// error-feedback state s (n float32) and form
//   v = g + e   (classic EF, s = e, the residual of what was not sent), or
//   v = g - h   (EF21,       s = h, the receivers' running estimate of g),
// then select on |v| without sorting: a histogram of the top 16 bits of the IEEE key of |v|
// (sign cleared, so the integer order is the order of |v|) finds the bin holding the k-th
// largest entry, and only that bin's entries are resolved exactly. Torch-free; safe with
// n == 0 and null pointers in that case.
#pragma once

#include <cstdint>

#include "kimad/grad.h"
#include "kimad/simd.h"

namespace kimad {

// Which error feedback the state holds.
enum class Feedback : int {
  kEF = 0,    // s = e: v = g + e; after sending, e = v with the sent entries zeroed.
  kEF21 = 1,  // s = h: v = g - h; after sending, h += TopK(v) (only the sent entries change).
};

// What topk_encode and error_profile report besides their outputs.
struct TopKStats {
  int64_t non_finite;  // entries of v that are NaN or +-Inf; when > 0 nothing was written
  double sq_norm;      // ||v||^2
  double sq_error;     // ||v - TopK_k(v)||^2 of what was sent (topk_encode only)
};

// Number of histogram bins: one per value of the top 16 bits of the key.
constexpr int kTopKBins = 1 << 16;

namespace cpu {

// Exact top-k encode with error feedback, in place on `state`.
//   Selects exactly the k (0 <= k <= n) entries of largest |v|, ties broken by lower index,
//   writes them to values[0, k) (float32, v at that index) and indices[0, k) (int32, strictly
//   ascending), then updates the state (see Feedback). Multi-threaded (OpenMP); the output is
//   identical for any number of threads.
//   If v has a non-finite entry, returns stats.non_finite > 0 and writes nothing at all
//   (state, values and indices untouched). Precondition: n < 2^31.
TopKStats topk_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t k,
                      float* values, int32_t* indices);

// Squared compression error ||v - TopK_k(v)||^2 for each of the R candidates ks[0, R) (each in
// [0, n]) into errors[0, R), from one histogram pass; the state is not modified.
//   Exact when k is 0 (||v||^2), n (0), or falls on a bin boundary. Otherwise the bin holding
//   the k-th largest contributes (untaken / bin count) * (bin's sum of squares). Within one bin
//   |v| varies by less than a factor 1 + 2^-7 (7 mantissa bits are fixed), so this never
//   underestimates and overestimates by at most ((1 + 2^-7)^2 - 1) / 4 < 2^-8 + 2^-16 of that
//   bin's sum of squares (for the lowest, subnormal bins the bound is absolute: < count * 2^-252).
//   If v has a non-finite entry, returns stats.non_finite > 0 and leaves errors untouched.
TopKStats error_profile(Grad grad, const float* state, int64_t n, Feedback mode,
                        const int64_t* ks, int64_t R, double* errors);

// The profile from a merged histogram (counts and sums of squares per bin, kTopKBins each):
// the step of error_profile after the pass over the data, shared with the CUDA build.
void profile_from_histogram(const uint32_t* counts, const double* sum_squares, const int64_t* ks,
                            int64_t R, double* errors);

}  // namespace cpu
}  // namespace kimad
