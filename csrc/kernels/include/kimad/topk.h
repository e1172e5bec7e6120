// Kimad's native kernels: fused error feedback + exact top-k encode, and the error profile.
//
// Both kernels read a gradient g (n float32, float16 or bfloat16; see kimad/grad.h) and an
// error-feedback state s (n float32) and form
//   v = g + e   (classic EF, s = e, the residual of what was not sent), or
//   v = g - h   (EF21,       s = h, the receivers' running estimate of g),
// then select on |v| without sorting: a histogram of the top 16 bits of the IEEE key of |v|
// (sign cleared, so the integer order is the order of |v|) finds the bin holding the k-th
// largest entry, and only that bin's entries are resolved exactly (tensors of fewer than
// kTopKSmallN elements are selected by nth_element on the keys instead). Torch-free; safe with
// n == 0 and null pointers in that case.
#pragma once

#include <cstdint>
#include <vector>

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

// Below this many elements the kernels select by sorting (nth_element) instead of by histogram:
// a 2^16-bin histogram costs more to clear and scan than the data itself.
constexpr int64_t kTopKSmallN = 1 << 12;

// The first pass of topk_encode over (grad, state): the count histogram of the top 16 key bits of
// |v|, per segment (one per thread). error_profile can keep it so that the encode that follows
// for the same, unchanged (grad, state) skips that pass; the encode checks that n, the feedback
// mode and the segments match and otherwise recomputes. Whether grad and state changed in
// between is the caller's to know (kimad/ops.py checks tensor versions).
struct TopKHistogram {
  uint64_t generation = 0;           // +1 each time error_profile (re)fills it: stale holders can tell
  int64_t n = 0;
  Feedback mode = Feedback::kEF21;
  int64_t segments = 0;              // 0: nothing kept
  std::vector<uint32_t> counts;      // merged, kTopKBins
  std::vector<uint32_t> seg_counts;  // segments x kTopKBins; empty when segments == 1 (then = counts)
  const uint32_t* segment(int64_t t) const {
    return segments == 1 ? counts.data() : seg_counts.data() + t * kTopKBins;
  }
  uint32_t* segment(int64_t t) { return segments == 1 ? counts.data() : seg_counts.data() + t * kTopKBins; }
};

namespace cpu {

// Exact top-k encode with error feedback, in place on `state`.
//   Selects exactly the k (0 <= k <= n) entries of largest |v|, ties broken by lower index,
//   writes them to values[0, k) (float32, v at that index) and indices[0, k) (int32, strictly
//   ascending), then updates the state (see Feedback). Multi-threaded (OpenMP); the output is
//   identical for any number of threads.
//   `reuse` (may be null): a histogram kept by error_profile for this same (grad, state); its
//   pass is then skipped (it is ignored when n, mode or the thread count differ).
//   If v has a non-finite entry, returns stats.non_finite > 0 and writes nothing at all
//   (state, values and indices untouched). Precondition: n < 2^31.
TopKStats topk_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t k,
                      float* values, int32_t* indices, const TopKHistogram* reuse = nullptr);

// Squared compression error ||v - TopK_k(v)||^2 for each of the R candidates ks[0, R) (each in
// [0, n]) into errors[0, R), and the exact ||v||^2 in stats.sq_norm; the state is not modified.
//   Exact when k is 0 (||v||^2), n (0), R == 0 (one pass summing squares, no histogram) or
//   n < kTopKSmallN (sorted squares). Otherwise from the count histogram alone: each unsent entry
//   (the bins below the k-th largest, and the untaken share of its bin) counts as the largest
//   |v| of its bin. Within one bin |v| varies by less than a factor 1 + 2^-7 (7 mantissa bits are
//   fixed), so this never underestimates and overestimates by less than a factor
//   1 + 2^-6 + 2^-14 (for the subnormal bins, |v| < 2^-126, by less than 2^-252 per entry), and
//   never exceeds ||v||^2.
//   `keep` (may be null) receives the histogram for topk_encode's `reuse` (left empty,
//   segments == 0, when no histogram was built); its buffers are reused when already sized, so
//   a caller keeping one per tensor across steps allocates nothing after the first.
//   If v has a non-finite entry, returns stats.non_finite > 0 and leaves errors untouched.
TopKStats error_profile(Grad grad, const float* state, int64_t n, Feedback mode,
                        const int64_t* ks, int64_t R, double* errors, TopKHistogram* keep = nullptr);

// The profile from a merged count histogram (kTopKBins counts) and the exact ||v||^2 (the k = 0
// error): the step of error_profile after the pass over the data, shared with the CUDA build.
void profile_from_histogram(const uint32_t* counts, double sq_norm, const int64_t* ks, int64_t R,
                            double* errors);

}  // namespace cpu
}  // namespace kimad
