// Decode-and-accumulate of sparse (values, int32 indices) messages on the CPU.
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

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

// This thread's share [lo, hi) of [0, numel) inside an OpenMP parallel region: contiguous ranges, one per
// thread, whose bounds are multiples of `granule` (the output blocks a thread owns whole).
std::pair<int64_t, int64_t> thread_range(int64_t numel, int64_t granule) {
#ifdef _OPENMP
  const int t = omp_get_thread_num();
  const int nt = omp_get_num_threads();
#else
  const int t = 0, nt = 1;
#endif
  const int64_t granules = (numel + granule - 1) / granule;
  const int64_t per = (granules + nt - 1) / nt;
  return {std::min(numel, per * t * granule), std::min(numel, per * (t + 1) * granule)};
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

// Output elements per block of the merging decode: 64 KiB of `out` stays in L2 while every
// message's entries that fall in it are added.
constexpr int64_t kBlock = 1 << 14;

// One chunk of one message, as the validation pass splits the batch.
struct Chunk {
  int64_t message;
  int64_t begin;
  int64_t end;
};

// Whether every index of indices[begin, end) is in [0, numel) and whether the chunk is
// non-decreasing, counting the step from the entry before `begin`. Branch-free so it vectorises.
KIMAD_SIMD_CLONES
void check_chunk(const int32_t* indices, int64_t begin, int64_t end, int64_t numel, bool* valid,
                 bool* sorted) {
  const uint64_t limit = static_cast<uint64_t>(numel);
  uint32_t bad = 0, down = 0;
  for (int64_t i = begin; i < end; ++i) {
    bad |= static_cast<uint32_t>(static_cast<uint64_t>(static_cast<int64_t>(indices[i])) >= limit);
  }
  for (int64_t i = std::max<int64_t>(begin, 1); i < end; ++i) {
    down |= static_cast<uint32_t>(indices[i] < indices[i - 1]);
  }
  *valid = bad == 0;
  *sorted = down == 0;
}

// Adds the entries of non-decreasing messages that fall in out[lo, hi), block by block, zeroing
// each block first unless accumulating. Additions per element: message order, then entry order.
void merge_range(const SparseMessage* messages, int64_t n, float scale, bool accumulate, float* out,
                 int64_t lo, int64_t hi) {
  std::vector<int64_t> cursor(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    const int32_t* idx = messages[r].indices;
    cursor[r] = idx == nullptr ? 0 : std::lower_bound(idx, idx + messages[r].count, lo) - idx;
  }
  for (int64_t block_lo = lo; block_lo < hi; block_lo += kBlock) {
    const int64_t block_hi = std::min(hi, block_lo + kBlock);
    if (!accumulate) std::fill(out + block_lo, out + block_hi, 0.0f);
    for (int64_t r = 0; r < n; ++r) {
      const float* values = messages[r].values;
      const int32_t* idx = messages[r].indices;
      const int64_t count = messages[r].count;
      int64_t c = cursor[r];
      for (; c < count && idx[c] < block_hi; ++c) out[idx[c]] += scale * values[c];
      cursor[r] = c;
    }
  }
}

// Adds to out[lo, hi) the per-element sums of non-decreasing messages, block by block: each
// element's sum is formed from 0 in a zeroed scratch block (message order, then entry order) and
// added to out once, at the element's first entry (later entries of it add the scratch's 0 back).
void add_sum_range(const SparseMessage* messages, int64_t n, float scale, float* out, int64_t lo, int64_t hi) {
  thread_local std::vector<float> scratch;  // this thread's; all zero between blocks
  scratch.assign(kBlock, 0.0f);
  std::vector<int64_t> cursor(static_cast<size_t>(n)), start(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) {
    const int32_t* idx = messages[r].indices;
    cursor[r] = idx == nullptr ? 0 : std::lower_bound(idx, idx + messages[r].count, lo) - idx;
  }
  for (int64_t block_lo = lo; block_lo < hi; block_lo += kBlock) {
    const int64_t block_hi = std::min(hi, block_lo + kBlock);
    float* sum = scratch.data();  // sum[j - block_lo] for j in [block_lo, block_hi)
    for (int64_t r = 0; r < n; ++r) {
      const int32_t* idx = messages[r].indices;
      const float* values = messages[r].values;
      int64_t c = start[r] = cursor[r];
      for (; c < messages[r].count && idx[c] < block_hi; ++c) sum[idx[c] - block_lo] += scale * values[c];
      cursor[r] = c;
    }
    for (int64_t r = 0; r < n; ++r) {
      const int32_t* idx = messages[r].indices;
      for (int64_t c = start[r]; c < cursor[r]; ++c) {
        out[idx[c]] += sum[idx[c] - block_lo];
        sum[idx[c] - block_lo] = 0.0f;
      }
    }
  }
}

// Checks every message's indices (bounds, and whether all are non-decreasing), chunked across threads.
InvalidIndex check_batch(const SparseMessage* messages, int64_t n, int64_t numel, bool* all_sorted,
                         int64_t* entries_out) {
  std::vector<Chunk> chunks;
  int64_t entries = 0;
  for (int64_t r = 0; r < n; ++r) {
    entries += std::max<int64_t>(messages[r].count, 0);
    for (int64_t b = 0; b < messages[r].count; b += kParallelGrain) {
      chunks.push_back({r, b, std::min(messages[r].count, b + kParallelGrain)});
    }
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  std::vector<char> valid(chunks.size()), sorted(chunks.size());
#pragma omp parallel for schedule(dynamic) if (entries >= kParallelGrain)
  for (int64_t c = 0; c < nchunks; ++c) {
    bool v = true, s = true;
    check_chunk(messages[chunks[c].message].indices, chunks[c].begin, chunks[c].end, numel, &v, &s);
    valid[c] = v;
    sorted[c] = s;
  }
  *all_sorted = true;
  *entries_out = entries;
  for (int64_t c = 0; c < nchunks; ++c) {
    if (!valid[c]) {
      const Chunk& k = chunks[c];
      return {k.message, first_invalid_serial(messages[k.message].indices, k.begin, k.end, numel)};
    }
    *all_sorted = *all_sorted && sorted[c];
  }
  return {-1, -1};
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
    const auto [lo, hi] = thread_range(numel, 1);
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

InvalidIndex sparse_sum(const SparseMessage* messages, int64_t n, float scale, bool accumulate,
                        float* out, int64_t numel) {
  bool all_sorted;
  int64_t entries;
  const InvalidIndex bad = check_batch(messages, n, numel, &all_sorted, &entries);
  if (bad.message >= 0) return bad;

  const bool threaded = entries + numel / 16 >= kParallelGrain && num_threads() > 1;
  if (all_sorted) {
    // One pass over `out`: each thread owns whole blocks of one contiguous range.
    const int threads = threaded ? num_threads() : 1;
#pragma omp parallel num_threads(threads)
    {
      const auto [lo, hi] = thread_range(numel, kBlock);
      merge_range(messages, n, scale, accumulate, out, lo, hi);
    }
    return {-1, -1};
  }
  if (!accumulate) {
#pragma omp parallel for schedule(static) if (threaded)
    for (int64_t b = 0; b < numel; b += kBlock) std::fill(out + b, out + std::min(numel, b + kBlock), 0.0f);
  }
  for (int64_t r = 0; r < n; ++r) scatter_add(messages[r].values, messages[r].indices, messages[r].count, scale, out, numel);
  return {-1, -1};
}

InvalidIndex sparse_add_sum(const SparseMessage* messages, int64_t n, float scale, float* out, int64_t numel) {
  bool all_sorted;
  int64_t entries;
  const InvalidIndex bad = check_batch(messages, n, numel, &all_sorted, &entries);
  if (bad.message >= 0) return bad;
  if (!all_sorted) {  // rare (top-k encoders emit sorted indices): sum into a zeroed copy, then add it
    std::vector<float> sum(static_cast<size_t>(numel), 0.0f);
    for (int64_t r = 0; r < n; ++r) {
      scatter_add(messages[r].values, messages[r].indices, messages[r].count, scale, sum.data(), numel);
    }
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t c = 0; c < messages[r].count; ++c) {
        const int32_t j = messages[r].indices[c];
        out[j] += sum[j];
        sum[j] = 0.0f;
      }
    }
    return {-1, -1};
  }
  const bool threaded = entries >= kParallelGrain && num_threads() > 1;
#pragma omp parallel num_threads(threaded ? num_threads() : 1)
  {
    const auto [lo, hi] = thread_range(numel, kBlock);
    add_sum_range(messages, n, scale, out, lo, hi);
  }
  return {-1, -1};
}

}  // namespace cpu
}  // namespace kimad
