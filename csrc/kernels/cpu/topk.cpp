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
#include "kimad/topk.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
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

// The bins and values of v for one block, for the profile's histogram.
KIMAD_SIMD_CLONES
void bin_value_block(const float* g, const float* s, int64_t len, float sign, uint16_t* bin, float* v) {
  for (int64_t i = 0; i < len; ++i) {
    const float x = g[i] + sign * s[i];
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    bin[i] = static_cast<uint16_t>((u & 0x7FFFFFFFu) >> 16);
    v[i] = x;
  }
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

// Pass 1 over one segment: count histogram (and, when sum_squares is given, per-bin sums of
// squares). Non-finite entries land in bins >= kFirstNonFiniteBin, so they need no own count.
void histogram_segment(Grad g, const float* s, int64_t begin, int64_t end, float sign,
                       uint32_t* counts, double* sum_squares) {
  alignas(64) uint16_t bin[kBlock];
  alignas(64) float v[kBlock];
  alignas(64) float converted[kBlock];
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t len = std::min(kBlock, end - b);
    const float* gb = g.block(b, len, converted);
    if (sum_squares == nullptr) {
      bin_block(gb, s + b, len, sign, bin);
      for (int64_t i = 0; i < len; ++i) ++counts[bin[i]];
    } else {
      bin_value_block(gb, s + b, len, sign, bin, v);
      for (int64_t i = 0; i < len; ++i) {
        const double x = v[i];
        ++counts[bin[i]];
        sum_squares[bin[i]] += x * x;
      }
    }
  }
}

// Pass 1 over all segments; merged counts (and sums of squares) into counts[kTopKBins].
// Per-segment counts are kept in seg_counts (segments x kTopKBins) for the output offsets.
// Returns the number of non-finite entries.
int64_t histogram(Grad g, const float* s, const Segments& seg, float sign,
                  std::vector<uint32_t>& seg_counts, std::vector<uint32_t>& counts,
                  std::vector<double>* sum_squares) {
  seg_counts.assign(static_cast<size_t>(seg.count) * kTopKBins, 0);
  std::vector<double> seg_sums(sum_squares ? static_cast<size_t>(seg.count) * kTopKBins : 0, 0.0);
#pragma omp parallel for schedule(static, 1) num_threads(seg.count) if (seg.count > 1)
  for (int64_t t = 0; t < seg.count; ++t) {
    histogram_segment(g, s, seg.begin(t), seg.end(t), sign, seg_counts.data() + t * kTopKBins,
                      sum_squares ? seg_sums.data() + t * kTopKBins : nullptr);
  }
  counts.assign(kTopKBins, 0);
  if (sum_squares) sum_squares->assign(kTopKBins, 0.0);
  for (int64_t t = 0; t < seg.count; ++t) {  // in segment order: deterministic for a thread count
    const uint32_t* c = seg_counts.data() + t * kTopKBins;
    for (int b = 0; b < kTopKBins; ++b) counts[b] += c[b];
    if (sum_squares) {
      const double* q = seg_sums.data() + t * kTopKBins;
      for (int b = 0; b < kTopKBins; ++b) (*sum_squares)[b] += q[b];
    }
  }
  int64_t non_finite = 0;
  for (uint32_t b = kFirstNonFiniteBin; b < kNoBin; ++b) non_finite += counts[b];
  return non_finite;
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

}  // namespace

TopKStats topk_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t k,
                      float* values, int32_t* indices) {
  TopKStats stats{0, 0.0, 0.0};
  if (n <= 0) return stats;
  k = std::clamp<int64_t>(k, 0, n);
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  const Segments seg = segments_for(n);

  // 1. Histogram; reject non-finite input before anything is written.
  std::vector<uint32_t> seg_counts, counts;
  stats.non_finite = histogram(grad, state, seg, sign, seg_counts, counts, nullptr);
  if (stats.non_finite > 0) return stats;

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
    const uint32_t* h = seg_counts.data() + t * kTopKBins;
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
  std::vector<uint32_t> seg_low(static_cast<size_t>(seg.count) * kTopKBins, 0);
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

void profile_from_histogram(const uint32_t* counts, const double* sum_squares, const int64_t* ks,
                            int64_t R, double* errors) {
  // below[b] = sum of squares of bins < b; taken_above[b] = entries in bins >= b.
  std::vector<double> below(kTopKBins + 1, 0.0);
  std::vector<int64_t> at_or_above(kTopKBins + 1, 0);
  for (int b = 0; b < kTopKBins; ++b) below[b + 1] = below[b] + sum_squares[b];
  for (int b = kTopKBins - 1; b >= 0; --b) at_or_above[b] = at_or_above[b + 1] + counts[b];
  for (int64_t r = 0; r < R; ++r) {
    const int64_t k = ks[r];
    if (k <= 0) {
      errors[r] = below[kTopKBins];
      continue;
    }
    if (k >= at_or_above[0]) {
      errors[r] = 0.0;
      continue;
    }
    // The bin T of the k-th largest: the largest b with at_or_above[b] >= k.
    int64_t lo = 0, hi = kTopKBins - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (at_or_above[mid] >= k) lo = mid; else hi = mid - 1;
    }
    const int64_t taken = k - at_or_above[lo + 1];
    const int64_t untaken = counts[lo] - taken;
    errors[r] = below[lo] + (untaken == 0 ? 0.0 : sum_squares[lo] * (static_cast<double>(untaken) / counts[lo]));
  }
}

TopKStats error_profile(Grad grad, const float* state, int64_t n, Feedback mode,
                        const int64_t* ks, int64_t R, double* errors) {
  TopKStats stats{0, 0.0, 0.0};
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  std::vector<uint32_t> seg_counts, counts(kTopKBins, 0);
  std::vector<double> sum_squares(kTopKBins, 0.0);
  if (n > 0) {
    stats.non_finite = histogram(grad, state, segments_for(n), sign, seg_counts, counts, &sum_squares);
    if (stats.non_finite > 0) return stats;
  }
  for (int b = 0; b < kTopKBins; ++b) stats.sq_norm += sum_squares[b];  // ||v||^2 by bins
  profile_from_histogram(counts.data(), sum_squares.data(), ks, R, errors);
  stats.sq_error = 0.0;
  return stats;
}

}  // namespace cpu
}  // namespace kimad
