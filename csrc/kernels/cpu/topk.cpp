// Fused error feedback + exact top-k encode, and the error profile, on the CPU.
//
// topk_encode makes two passes over (g, s) and none over a sorted copy:
//   1. per segment (one per thread): the histogram of the top 16 key bits of |v| (non-finite
//      entries are exactly those of the bins >= 0x7F80); nothing is written, so a NaN leaves
//      no trace, and nothing else is computed, so the pass is one scatter per entry;
//   2. the merged histogram gives the bin T holding the k-th largest |v|; per segment, v is
//      formed again (and stored, for EF), the squares of the entries below T are summed, and
//      every entry of a bin >= T is appended in index order to that segment's list (the sure
//      picks and the candidates of bin T); chunks of 16 with no such entry are skipped whole;
//   3. bin T is resolved exactly by a histogram of the low 16 key bits of its candidates, ties
//      at the last key going to the lowest indices; each segment then copies its picks to the
//      output at its offset (so the output is sorted) and updates the state at those indices.
// ||v||^2 is the sum of squares below T plus those of the lists, so no pass sums all of v.
// error_profile is pass 1 plus ||v||^2 (a vectorised sum in the same pass); it can hand its
// histogram to the encode that follows, which then starts at pass 2. Tensors of fewer than
// kTopKSmallN elements skip the histogram (clearing and scanning 2^16 bins would cost more than
// the data): the encode finds the k-th largest key with nth_element, the profile sorts squares.
#include "kimad/topk.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kimad/kernels.h"

namespace kimad {
namespace cpu {
namespace {

// Below this many elements per thread, threads cost more than they save.
constexpr int64_t kParallelGrain = 1 << 16;
// Elements formed at a time into stack buffers, so the arithmetic vectorises.
constexpr int64_t kBlock = 1024;
constexpr uint32_t kNoBin = kTopKBins;  // "select nothing": above every bin

inline uint32_t abs_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u & 0x7FFFFFFFu;
}

// The histogram bin (top 16 key bits of |v|) of v = g + sign * s for one block. (16-bit bins:
// half the buffer traffic of 32-bit ones, measured faster.)
// (sign = -1 gives g - h exactly: negation is exact.)
KIMAD_SIMD_CLONES
void bin_block(const float* g, const float* s, int64_t len, float sign, uint16_t* bin) {
  for (int64_t i = 0; i < len; ++i) {
    const float x = g[i] + sign * s[i];
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    bin[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) >> 16);
  }
}

// The bins of v for one block, and the sum of its squares (for the profile's exact ||v||^2).
KIMAD_SIMD_CLONES
double bin_square_block(const float* g, const float* s, int64_t len, float sign, uint16_t* bin) {
  double sum = 0.0;
  // Reassociating this sum (vector partial sums) is fine: it is ||v||^2, not part of the output.
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) {
    const float x = g[i] + sign * s[i];
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    bin[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) >> 16);
    sum += static_cast<double>(x) * static_cast<double>(x);
  }
  return sum;
}

constexpr int64_t kChunk = 16;  // entries tested at once for being a pick or candidate

// Pass 2 arithmetic for one block: v, its keys, hit[c] != 0 when chunk c (kChunk entries) may
// hold an entry of key >= top_key, and *below += the sum of squares of the entries under top_key.
// Three simple loops rather than one, so that each vectorises.
KIMAD_SIMD_CLONES
void select_block(const float* g, const float* s, int64_t len, float sign, uint32_t top_key, float* v,
                  uint32_t* key, uint32_t* hit, double* below) {
  for (int64_t i = 0; i < len; ++i) {
    const float x = g[i] + sign * s[i];
    v[i] = x;
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    key[i] = u & 0x7FFFFFFFu;
  }
  const int64_t whole = len - len % kChunk;
  for (int64_t c = 0; c < whole; c += kChunk) {
    uint32_t top = 0;
    for (int64_t j = 0; j < kChunk; ++j) top = std::max(top, key[c + j]);
    hit[c / kChunk] = top >= top_key;
  }
  if (whole < len) hit[whole / kChunk] = 1;
  double sum = 0.0;
  // Reassociating this sum (vector partial sums) is fine: it is ||.||^2, not part of the output.
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < len; ++i) {
    const double x = v[i];
    const double under = key[i] < top_key;  // v is finite here, so 0 * x * x is 0
    sum += under * x * x;
  }
  *below += sum;
}

struct Segments {
  int64_t count;
  int64_t n;
  int64_t begin(int64_t s) const { return n * s / count; }
  int64_t end(int64_t s) const { return n * (s + 1) / count; }
};

Segments segments_for(int64_t n) {
  const int64_t by_size = std::max<int64_t>(1, n / kParallelGrain);
  return {std::min<int64_t>(num_threads(), by_size), n};
}

// Entries of these bins have a key >= 0x7F800000: NaN or +-Inf.
constexpr uint32_t kFirstNonFiniteBin = 0x7F800000u >> 16;

// Pass 1 over one segment: the count histogram; with sq_norm, also the segment's ||v||^2.
// Non-finite entries land in bins >= kFirstNonFiniteBin, so they need no own count.
void histogram_segment(Grad g, const float* s, int64_t begin, int64_t end, float sign, uint32_t* counts,
                       double* sq_norm) {
  alignas(64) uint16_t bin[kBlock];
  alignas(64) float converted[kBlock];
  double sum = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    const float* gb = g.block(b, len, converted);
    if (sq_norm == nullptr) {
      bin_block(gb, s + b, len, sign, bin);
    } else {
      sum += bin_square_block(gb, s + b, len, sign, bin);
    }
    for (int64_t i = 0; i < len; ++i) ++counts[bin[i]];
  }
  if (sq_norm != nullptr) *sq_norm = sum;
}

// Pass 1 over all segments into h (per-segment counts, for the output offsets, and merged ones).
// With sq_norm, also ||v||^2 (segment sums added in segment order: deterministic for a thread
// count). Returns the number of non-finite entries.
int64_t histogram(Grad g, const float* s, int64_t n, Feedback mode, const Segments& seg, TopKHistogram& h,
                  double* sq_norm) {
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  h.n = n;
  h.mode = mode;
  h.segments = seg.count;
  h.counts.assign(kTopKBins, 0);
  if (seg.count > 1) {
    h.seg_counts.assign(static_cast<size_t>(seg.count) * kTopKBins, 0);
  } else {
    h.seg_counts.clear();
  }
  std::vector<double> seg_sq(seg.count, 0.0);
#pragma omp parallel for schedule(static, 1) num_threads(seg.count) if (seg.count > 1)
  for (int64_t t = 0; t < seg.count; ++t) {
    histogram_segment(g, s, seg.begin(t), seg.end(t), sign, h.segment(t),
                      sq_norm ? &seg_sq[t] : nullptr);
  }
  if (seg.count > 1) {
    for (int64_t t = 0; t < seg.count; ++t) {
      const uint32_t* c = h.segment(t);
      for (int b = 0; b < kTopKBins; ++b) h.counts[b] += c[b];
    }
  }
  if (sq_norm) {
    *sq_norm = 0.0;
    for (int64_t t = 0; t < seg.count; ++t) *sq_norm += seg_sq[t];
  }
  int64_t non_finite = 0;
  for (uint32_t b = kFirstNonFiniteBin; b < kNoBin; ++b) non_finite += h.counts[b];
  return non_finite;
}

// Scratch buffers of the calling thread, so that repeated calls neither allocate nor fault in
// pages. (Bind a reference before a parallel region: inside it, each thread has its own.)
TopKHistogram& scratch_histogram() {
  thread_local TopKHistogram h;
  return h;
}

std::vector<uint32_t>& scratch_low_counts() {
  thread_local std::vector<uint32_t> low;
  return low;
}

// Pass 2 over one segment: EF stores v; every entry of a bin >= top_bin is appended to
// (idx, val) in index order; returns the sum of squares of the entries below top_bin.
double gather_segment(Grad g, float* s, int64_t begin, int64_t end, float sign, bool store_v,
                      uint32_t top_bin, int32_t* idx, float* val) {
  alignas(64) float v[kBlock];
  alignas(64) uint32_t key[kBlock];
  alignas(64) uint32_t hit[kBlock / kChunk];
  alignas(64) float converted[kBlock];
  // top_bin == kNoBin selects nothing; its key (1 << 32) does not fit, and no key reaches 2^31.
  const uint32_t top_key = top_bin >= kNoBin ? 0xFFFFFFFFu : top_bin << 16;
  double below = 0.0;
  int64_t p = 0;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    select_block(g.block(b, len, converted), s + b, len, sign, top_key, v, key, hit, &below);
    if (store_v) std::memcpy(s + b, v, static_cast<size_t>(len) * sizeof(float));
    for (int64_t c = 0; c < len; c += kChunk) {
      if (!hit[c / kChunk]) continue;  // most chunks hold no pick: skip them whole
      // Branch-free append to a local buffer (the list has no room past its end).
      int32_t chunk_idx[kChunk];
      float chunk_val[kChunk];
      int64_t m = 0;
      const int64_t stop = std::min(len, c + kChunk);
      for (int64_t i = c; i < stop; ++i) {
        chunk_idx[m] = static_cast<int32_t>(b + i);
        chunk_val[m] = v[i];
        m += key[i] >= top_key;
      }
      if (m == 0) continue;  // (the last chunk is always scanned; the list may be empty)
      std::memcpy(idx + p, chunk_idx, static_cast<size_t>(m) * sizeof(int32_t));
      std::memcpy(val + p, chunk_val, static_cast<size_t>(m) * sizeof(float));
      p += m;
    }
  }
  return below;
}


// Small tensors (n < kTopKSmallN): the same selection (keys > K, then ties at K to the lowest
// indices) with K found by nth_element on a copy of the keys; one thread.
// v and its keys for a small tensor (n < kTopKSmallN); returns the number of non-finite entries.
int64_t form_small(Grad grad, const float* state, int64_t n, float sign, float* v, uint32_t* key) {
  float converted[kTopKSmallN];
  const float* g = grad.block(0, n, converted);
  int64_t non_finite = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[i] = g[i] + sign * state[i];
    key[i] = abs_key(v[i]);
    non_finite += key[i] >= 0x7F800000u;
  }
  return non_finite;
}

TopKStats topk_encode_small(Grad grad, float* state, int64_t n, Feedback mode, int64_t k, float* values,
                            int32_t* indices) {
  TopKStats stats{0, 0.0, 0.0};
  float v[kTopKSmallN];
  uint32_t key[kTopKSmallN], order[kTopKSmallN];
  stats.non_finite = form_small(grad, state, n, mode == Feedback::kEF ? 1.0f : -1.0f, v, key);
  if (stats.non_finite > 0) return stats;
  uint32_t last_key = 0xFFFFFFFFu;  // k == 0: above every key
  int64_t ties = 0;
  if (k > 0) {
    std::memcpy(order, key, static_cast<size_t>(n) * sizeof(uint32_t));
    std::nth_element(order, order + (k - 1), order + n, std::greater<uint32_t>());
    last_key = order[k - 1];
    ties = k;
    for (int64_t i = 0; i < n; ++i) ties -= key[i] > last_key;
  }
  const bool ef = mode == Feedback::kEF;
  int64_t q = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x2 = static_cast<double>(v[i]) * static_cast<double>(v[i]);
    stats.sq_norm += x2;
    const bool sent = key[i] > last_key || (key[i] == last_key && ties-- > 0);
    if (!sent) {
      stats.sq_error += x2;
      if (ef) state[i] = v[i];
      continue;
    }
    values[q] = v[i];
    indices[q] = static_cast<int32_t>(i);
    ++q;
    if (ef) {
      state[i] = 0.0f;
    } else {
      state[i] += v[i];
    }
  }
  return stats;
}

}  // namespace

TopKStats topk_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t k,
                      float* values, int32_t* indices, const TopKHistogram* reuse) {
  TopKStats stats{0, 0.0, 0.0};
  if (n <= 0) return stats;
  k = std::clamp<int64_t>(k, 0, n);
  if (n < kTopKSmallN) return topk_encode_small(grad, state, n, mode, k, values, indices);
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  const Segments seg = segments_for(n);

  // 1. Histogram (or the profile's); reject non-finite input before anything is written. A kept
  // histogram has no non-finite entry (error_profile keeps none then).
  const TopKHistogram* hist = reuse;
  if (hist == nullptr || hist->n != n || hist->mode != mode || hist->segments != seg.count) {
    TopKHistogram& scratch = scratch_histogram();
    stats.non_finite = histogram(grad, state, n, mode, seg, scratch, nullptr);
    if (stats.non_finite > 0) return stats;
    hist = &scratch;
  }
  const std::vector<uint32_t>& counts = hist->counts;

  // The bin T of the k-th largest: bins above T are all sent, `need` of bin T's entries are.
  uint32_t top_bin = kNoBin;
  int64_t need = 0;
  for (int64_t b = kTopKBins - 1, above = 0; b >= 0 && k > 0; --b) {
    if (above + counts[b] >= k) {
      top_bin = static_cast<uint32_t>(b);
      need = k - above;
      break;
    }
    above += counts[b];
  }

  // 2. Per-segment lists of the entries of bins >= T, in index order.
  std::vector<int64_t> list_begin(seg.count + 1, 0);
  for (int64_t t = 0; t < seg.count; ++t) {
    int64_t c = 0;
    const uint32_t* h = hist->segment(t);
    for (uint32_t b = top_bin; b < kNoBin; ++b) c += h[b];
    list_begin[t + 1] = list_begin[t] + c;
  }
  std::vector<int32_t> list_idx(list_begin[seg.count]);
  std::vector<float> list_val(list_begin[seg.count]);
  std::vector<double> seg_below(seg.count, 0.0);
  const bool ef = mode == Feedback::kEF;
#pragma omp parallel for schedule(static, 1) num_threads(seg.count) if (seg.count > 1)
  for (int64_t t = 0; t < seg.count; ++t) {
    seg_below[t] = gather_segment(grad, state, seg.begin(t), seg.end(t), sign, ef, top_bin,
                                  list_idx.data() + list_begin[t], list_val.data() + list_begin[t]);
  }
  if (k == 0) {  // the lists are empty: ||v||^2 is all below
    for (int64_t t = 0; t < seg.count; ++t) stats.sq_error += seg_below[t];
    stats.sq_norm = stats.sq_error;
    return stats;
  }

  // 3. Resolve bin T: a histogram of the low 16 key bits of its candidates, per segment.
  std::vector<uint32_t>& seg_low = scratch_low_counts();
  seg_low.assign(static_cast<size_t>(seg.count) * kTopKBins, 0);
#pragma omp parallel for schedule(static, 1) num_threads(seg.count) if (seg.count > 1)
  for (int64_t t = 0; t < seg.count; ++t) {
    uint32_t* h = seg_low.data() + t * kTopKBins;
    for (int64_t p = list_begin[t]; p < list_begin[t + 1]; ++p) {
      const uint32_t key = abs_key(list_val[p]);
      if ((key >> 16) == top_bin) ++h[key & 0xFFFFu];
    }
  }
  // Last key K = T:L; entries with key > K are sent, and `ties` of those with key == K.
  uint32_t low = 0;
  int64_t ties = 0;
  for (int64_t l = kTopKBins - 1, above = 0; l >= 0; --l) {
    int64_t c = 0;
    for (int64_t t = 0; t < seg.count; ++t) c += seg_low[t * kTopKBins + l];
    if (above + c >= need) {
      low = static_cast<uint32_t>(l);
      ties = need - above;
      break;
    }
    above += c;
  }
  const uint32_t last_key = (top_bin << 16) | low;
  // Output offset of each segment: its sure picks, its candidates above K, and its share of the
  // ties (ties go to the lowest indices, i.e. to the earliest segments first).
  std::vector<int64_t> out_begin(seg.count + 1, 0), seg_ties(seg.count, 0);
  for (int64_t t = 0, ties_left = ties; t < seg.count; ++t) {
    const uint32_t* h = seg_low.data() + t * kTopKBins;
    int64_t sure = list_begin[t + 1] - list_begin[t];
    for (int64_t l = 0; l <= static_cast<int64_t>(low); ++l) sure -= h[l];  // candidates at or below K
    seg_ties[t] = std::min<int64_t>(ties_left, h[low]);
    ties_left -= seg_ties[t];
    out_begin[t + 1] = out_begin[t] + sure + seg_ties[t];
  }
  std::vector<double> seg_unsent(seg.count, 0.0), seg_sent(seg.count, 0.0);
#pragma omp parallel for schedule(static, 1) num_threads(seg.count) if (seg.count > 1)
  for (int64_t t = 0; t < seg.count; ++t) {
    int64_t q = out_begin[t], ties_left = seg_ties[t];
    double unsent = 0.0, sent_sq = 0.0;
    for (int64_t p = list_begin[t]; p < list_begin[t + 1]; ++p) {
      const float x = list_val[p];
      const uint32_t key = abs_key(x);
      const bool sent = key > last_key || (key == last_key && ties_left-- > 0);
      if (!sent) {
        unsent += static_cast<double>(x) * static_cast<double>(x);
        continue;
      }
      sent_sq += static_cast<double>(x) * static_cast<double>(x);
      const int32_t i = list_idx[p];
      values[q] = x;
      indices[q] = i;
      ++q;
      if (ef) {
        state[i] = 0.0f;
      } else {
        state[i] += x;
      }
    }
    seg_unsent[t] = unsent;
    seg_sent[t] = sent_sq;
  }
  // ||v||^2 = below T + unsent candidates + sent, so pass 1 needs no sum of squares.
  for (int64_t t = 0; t < seg.count; ++t) {
    stats.sq_error += seg_below[t] + seg_unsent[t];
    stats.sq_norm += seg_below[t] + seg_unsent[t] + seg_sent[t];
  }
  return stats;
}

void profile_from_histogram(const uint32_t* counts, double sq_norm, const int64_t* ks, int64_t R,
                            double* errors) {
  // The bin T_r of each k-th largest (and how many of its entries are not taken), from the top ...
  std::vector<int64_t> order(R);
  for (int64_t r = 0; r < R; ++r) order[r] = r;
  std::sort(order.begin(), order.end(), [ks](int64_t a, int64_t b) { return ks[a] < ks[b]; });
  std::vector<int64_t> top(R, -1), untaken(R, 0);
  int64_t above = 0, r = 0;  // ks ascending: their bins descend
  while (r < R && ks[order[r]] <= 0) ++r;
  const int64_t first = r;  // order[0, first): k = 0
  for (int64_t b = kTopKBins - 1; b >= 0 && r < R; --b) {
    above += counts[b];
    for (; r < R && ks[order[r]] <= above; ++r) {
      top[order[r]] = b;
      untaken[order[r]] = above - ks[order[r]];
    }
  }
  // ... then, from the bottom, every unsent entry as the largest |v| of its bin (never less than it).
  int64_t next = R - 1;  // order[next]: the largest k not yet finished, i.e. the lowest bin
  double below = 0.0;
  for (int64_t b = 0; b < kTopKBins && next >= first; ++b) {
    const double edge = static_cast<double>(float_from_bits((static_cast<uint32_t>(b + 1) << 16) - 1u));
    for (; next >= first && top[order[next]] == b; --next) {
      // (The exact error never exceeds ||v||^2, so neither need the bound.)
      errors[order[next]] = std::min(sq_norm, below + static_cast<double>(untaken[order[next]]) * edge * edge);
    }
    below += static_cast<double>(counts[b]) * edge * edge;
  }
  for (int64_t q = 0; q < R; ++q) {
    if (ks[q] <= 0) errors[q] = sq_norm;           // nothing sent: exact
    else if (top[q] < 0) errors[q] = 0.0;          // k >= n: everything sent
  }
}

namespace {

// Small tensors: exact errors from the squares sorted ascending (the unsent are the n - k smallest).
void profile_small(const float* v, int64_t n, const int64_t* ks, int64_t R, double* errors, double* sq_norm) {
  std::vector<double> below(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) below[i + 1] = static_cast<double>(v[i]) * static_cast<double>(v[i]);
  std::sort(below.begin() + 1, below.end());
  for (int64_t i = 0; i < n; ++i) below[i + 1] += below[i];  // below[m]: sum of the m smallest squares
  for (int64_t r = 0; r < R; ++r) errors[r] = below[n - std::clamp<int64_t>(ks[r], 0, n)];
  *sq_norm = below[n];
}

// ||v||^2 and the count of non-finite entries, without a histogram (for R == 0).
TopKStats norm_only(Grad grad, const float* state, int64_t n, float sign) {
  TopKStats stats{0, 0.0, 0.0};
  const Segments seg = segments_for(n);
  std::vector<double> seg_sq(seg.count, 0.0);
  std::vector<int64_t> seg_bad(seg.count, 0);
#pragma omp parallel for schedule(static, 1) num_threads(seg.count) if (seg.count > 1)
  for (int64_t t = 0; t < seg.count; ++t) {
    alignas(64) uint16_t bin[kBlock];
    alignas(64) float converted[kBlock];
    for (int64_t b = seg.begin(t); b < seg.end(t); b += kBlock) {
      const int64_t len = std::min(kBlock, seg.end(t) - b);
      seg_sq[t] += bin_square_block(grad.block(b, len, converted), state + b, len, sign, bin);
      for (int64_t i = 0; i < len; ++i) seg_bad[t] += bin[i] >= kFirstNonFiniteBin;
    }
  }
  for (int64_t t = 0; t < seg.count; ++t) {
    stats.sq_norm += seg_sq[t];
    stats.non_finite += seg_bad[t];
  }
  return stats;
}

}  // namespace

TopKStats error_profile(Grad grad, const float* state, int64_t n, Feedback mode,
                        const int64_t* ks, int64_t R, double* errors, TopKHistogram* keep) {
  TopKStats stats{0, 0.0, 0.0};
  if (keep != nullptr) {
    keep->segments = 0;
    ++keep->generation;
  }
  if (n <= 0) {
    for (int64_t r = 0; r < R; ++r) errors[r] = 0.0;
    return stats;
  }
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  if (R == 0) return norm_only(grad, state, n, sign);
  if (n < kTopKSmallN) {
    float v[kTopKSmallN];
    uint32_t key[kTopKSmallN];
    stats.non_finite = form_small(grad, state, n, sign, v, key);
    if (stats.non_finite > 0) return stats;
    profile_small(v, n, ks, R, errors, &stats.sq_norm);
    return stats;
  }
  TopKHistogram& h = keep != nullptr ? *keep : scratch_histogram();
  stats.non_finite = histogram(grad, state, n, mode, segments_for(n), h, &stats.sq_norm);
  if (stats.non_finite > 0) {
    h.segments = 0;  // nothing to reuse
    return stats;
  }
  profile_from_histogram(h.counts.data(), stats.sq_norm, ks, R, errors);
  return stats;
}

}  // namespace cpu
}  // namespace kimad
