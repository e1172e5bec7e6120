// Decode-and-accumulate of sparse (values, int32 indices) messages on the CPU.
#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kimad/kernels.h"

namespace kimad {
namespace cpu {
namespace {

// Below this many entries threads cost more than they save.
constexpr int64_t kParallelGrain = 1 << 15;

// True when every index of the chunk is in [0, numel). Branch-free so it vectorises; the
// unsigned compare folds "negative" and "too large" into one test.
KIMAD_SIMD_CLONES
bool chunk_all_valid(const int32_t* indices, int64_t count, int64_t numel) {
  const uint64_t limit = static_cast<uint64_t>(numel);
  uint32_t bad = 0;
  for (int64_t i = 0; i < count; ++i) {
    bad |= static_cast<uint32_t>(static_cast<uint64_t>(static_cast<int64_t>(indices[i])) >= limit);
  }
  return bad == 0;
}

int64_t first_invalid_serial(const int32_t* indices, int64_t begin, int64_t end, int64_t numel) {
  for (int64_t i = begin; i < end; ++i) {
    if (indices[i] < 0 || indices[i] >= numel) return i;
  }
  return -1;
}

// Scatter of the entries whose index falls in [lo, hi): each thread owns one output range, so
// there are no races and every element sees its additions in message order.
void scatter_range(const float* values, const int32_t* indices, int64_t count, float scale,
                   float* out, int64_t lo, int64_t hi) {
  for (int64_t i = 0; i < count; ++i) {
    const int64_t j = indices[i];
    if (j >= lo && j < hi) out[j] += scale * values[i];
  }
}

}  // namespace

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int64_t find_invalid_index(const int32_t* indices, int64_t count, int64_t numel) {
  if (count <= 0) return -1;
  if (count < kParallelGrain) {
    return chunk_all_valid(indices, count, numel) ? -1 : first_invalid_serial(indices, 0, count, numel);
  }
  const int64_t chunks = (count + kParallelGrain - 1) / kParallelGrain;
  int64_t first_bad_chunk = chunks;
#pragma omp parallel for schedule(static) reduction(min : first_bad_chunk)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t begin = c * kParallelGrain;
    const int64_t len = std::min(kParallelGrain, count - begin);
    if (!chunk_all_valid(indices + begin, len, numel)) first_bad_chunk = std::min(first_bad_chunk, c);
  }
  if (first_bad_chunk == chunks) return -1;
  const int64_t begin = first_bad_chunk * kParallelGrain;
  return first_invalid_serial(indices, begin, std::min(count, begin + kParallelGrain), numel);
}

void scatter_add(const float* values, const int32_t* indices, int64_t count, float scale,
                 float* out, int64_t numel) {
  if (count <= 0) return;
  const int threads = count < kParallelGrain ? 1 : num_threads();
  if (threads <= 1) {
    scatter_range(values, indices, count, scale, out, 0, numel);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int t = omp_get_thread_num();
    const int nt = omp_get_num_threads();
#else
    const int t = 0, nt = 1;
#endif
    const int64_t span = (numel + nt - 1) / nt;
    const int64_t lo = std::min(numel, span * t);
    const int64_t hi = std::min(numel, lo + span);
    scatter_range(values, indices, count, scale, out, lo, hi);
  }
}

int64_t sparse_accumulate(const float* values, const int32_t* indices, int64_t count,
                          float scale, float* out, int64_t numel) {
  const int64_t bad = find_invalid_index(indices, count, numel);
  if (bad >= 0) return bad;
  scatter_add(values, indices, count, scale, out, numel);
  return -1;
}

}  // namespace cpu
}  // namespace kimad
