// QSGD and scaled-sign encoders fused with error feedback, their decoder and error estimate, on
// the CPU (layout and contracts in kimad/quant.h).
//
// An encode makes two passes over (g, s):
//   1. per bucket (OpenMP over buckets): v, its float32 L2 norm or mean |v|, ||v||^2 and the count
//      of non-finite entries; nothing is written, so a NaN leaves no trace;
//   2. per chunk of kChunk elements (a multiple of 8, so every chunk starts on a byte of codes for
//      every bit width): v again, the codes, the decoded values, the state update; then the codes
//      of the chunk are packed into its own bytes (no two threads write one byte).
#include "kimad/quant.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// The decoded value q must be bitwise what a receiver computes: no fused multiply-adds.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

namespace kimad {
namespace cpu {
namespace {

// Below this many elements, threads cost more than they save.
constexpr int64_t kParallelGrain = 1 << 16;
// Elements per work item of pass 2 and of the decoder; a multiple of 8 (byte-aligned codes).
constexpr int64_t kChunk = 4096;

// Elements formed at a time into stack buffers, so the arithmetic vectorises.
constexpr int64_t kBlock = 512;

// Sum of squares and of absolute values of x[0, len) in double, in eight lanes (lane i % 8, so
// the order is fixed and the result does not depend on the thread count).
KIMAD_SIMD_CLONES
void lane_sums(const float* __restrict__ x, int64_t len, double lq[8], double la[8]) {
  double q[8], a[8];
  for (int k = 0; k < 8; ++k) q[k] = lq[k], a[k] = la[k];
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int k = 0; k < 8; ++k) {
      const double d = static_cast<double>(x[i + k]);
      q[k] += d * d;
      a[k] += std::fabs(d);
    }
  }
  for (; i < len; ++i) {
    const double d = static_cast<double>(x[i]);
    q[i & 7] += d * d;
    a[i & 7] += std::fabs(d);
  }
  for (int k = 0; k < 8; ++k) lq[k] = q[k], la[k] = a[k];
}

// Sum of squares of x[0, len) in eight lanes, as lane_sums.
KIMAD_SIMD_CLONES
void lane_squares(const float* __restrict__ x, int64_t len, double lq[8]) {
  double q[8];
  for (int k = 0; k < 8; ++k) q[k] = lq[k];
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    for (int k = 0; k < 8; ++k) q[k] += static_cast<double>(x[i + k]) * static_cast<double>(x[i + k]);
  }
  for (; i < len; ++i) q[i & 7] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
  for (int k = 0; k < 8; ++k) lq[k] = q[k];
}

inline double fold(const double l[8]) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

// v = g + sign * s for one block; returns the number of non-finite entries.
KIMAD_SIMD_CLONES
int64_t form_block(const float* g, const float* s, int64_t len, float sign, float* v) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < len; ++i) {
    const float x = g[i] + sign * s[i];
    v[i] = x;
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    bad += (u & 0x7FFFFFFFu) >= 0x7F800000u ? 1u : 0u;
  }
  return bad;
}

// Sums over one bucket of v = g + sign * s: squares and absolute values (lanes restart at the
// bucket's first element); returns the number of non-finite entries.
int64_t bucket_sums(Grad g, const float* s, int64_t len, float sign, double* sq, double* l1) {
  alignas(64) float v[kBlock];
  alignas(64) float converted[kBlock];
  double lq[8] = {0, 0, 0, 0, 0, 0, 0, 0}, la[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t bad = 0;
  for (int64_t b = 0; b < len; b += kBlock) {  // kBlock is a multiple of 8: lanes stay i % 8
    const int64_t m = std::min(kBlock, len - b);
    bad += form_block(g.block(b, m, converted), s + b, m, sign, v);
    lane_sums(v, m, lq, la);
  }
  *sq = fold(lq);
  *l1 = fold(la);
  return bad;
}

// Pass 1: the per-bucket statistic (L2 norm, or mean |v| when `mean_abs`) into stat[buckets].
// Returns the number of non-finite entries (plus buckets whose float32 norm overflows).
int64_t bucket_statistics(Grad g, const float* s, int64_t n, float sign, int64_t bucket, bool mean_abs,
                          float* stat, double* sq_norm) {
  const int64_t buckets = (n + bucket - 1) / bucket;
  int64_t bad = 0;
  double sq_total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : bad, sq_total) if (n >= kParallelGrain)
  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t begin = b * bucket, len = std::min(bucket, n - begin);
    double sq = 0.0, l1 = 0.0;
    const int64_t bucket_bad = bucket_sums(g + begin, s + begin, len, sign, &sq, &l1);
    sq_total += sq;
    const float value = mean_abs ? static_cast<float>(l1 / static_cast<double>(len))
                                 : static_cast<float>(std::sqrt(sq));
    bad += bucket_bad + (bucket_bad == 0 && std::isinf(value) ? 1 : 0);
    stat[b] = value;
  }
  *sq_norm = sq_total;
  return bad;
}

void write_header(uint8_t* payload, int64_t n, uint8_t tag, int bits, int64_t bucket) {
  const uint32_t numel = static_cast<uint32_t>(n);
  const uint16_t field = quant_bucket_field(n, bucket);
  std::memcpy(payload, &numel, 4);  // little-endian hosts (x86-64, aarch64)
  payload[4] = tag;
  payload[5] = static_cast<uint8_t>(bits);
  std::memcpy(payload + 6, &field, 2);
}

// Packs codes[0, full * P) of `bits` each (P = 8 / bits per byte) into `full` bytes, LSB first.
template <int kBits>
KIMAD_SIMD_CLONES void pack_full(const uint8_t* codes, int64_t full, uint8_t* out) {
  constexpr int kPer = 8 / kBits;
  for (int64_t j = 0; j < full; ++j) {
    uint32_t byte = 0;
    for (int k = 0; k < kPer; ++k) byte |= static_cast<uint32_t>(codes[j * kPer + k]) << (k * kBits);
    out[j] = static_cast<uint8_t>(byte);
  }
}

// Packs codes[0, len) of `bits` each into ceil(len * bits / 8) bytes, LSB first.
void pack_codes(const uint8_t* codes, int64_t len, int bits, uint8_t* out) {
  const int per_byte = 8 / bits;
  const int64_t full = len / per_byte;
  switch (bits) {
    case 8: std::memcpy(out, codes, static_cast<size_t>(full)); break;
    case 4: pack_full<4>(codes, full, out); break;
    case 2: pack_full<2>(codes, full, out); break;
    default: pack_full<1>(codes, full, out); break;
  }
  if (full * per_byte < len) {
    uint32_t byte = 0;
    for (int64_t k = 0; full * per_byte + k < len; ++k)
      byte |= static_cast<uint32_t>(codes[full * per_byte + k]) << (k * bits);
    out[full] = static_cast<uint8_t>(byte);
  }
}

// One run of QSGD pass 2 inside one bucket: codes, decoded values and state update; the
// residuals v - q go to r for the squared error.
template <bool kEF>
KIMAD_SIMD_CLONES void qsgd_run(const float* __restrict__ g, float* __restrict__ s, int64_t first, int64_t len,
                                float inv, float step, uint32_t levels, int bits, DrawKey key,
                                uint8_t* __restrict__ code, float* __restrict__ r) {
  const float sign = kEF ? 1.0f : -1.0f;
  const uint32_t sign_bit = 1u << (bits - 1);
  const float top = static_cast<float>(levels);
  const uint32_t index0 = static_cast<uint32_t>(first), count = static_cast<uint32_t>(len);
  for (uint32_t i = 0; i < count; ++i) {  // 32-bit counter: the draw's index vectorises without widening
    const float x = g[i] + sign * s[i];
    const float u = uniform_draw(key, index0 + i);
    float y = (x < 0.0f ? -x : x) * inv;
    y = y < top ? y : top;
    const float fl = static_cast<float>(static_cast<int32_t>(y));
    const float level = fl + (u < y - fl ? 1.0f : 0.0f);
    const bool negative = x < 0.0f;
    const float magnitude = level * step;
    const float q = negative ? -magnitude : magnitude;
    code[i] = static_cast<uint8_t>(static_cast<uint32_t>(static_cast<int32_t>(level)) | (negative ? sign_bit : 0u));
    s[i] = kEF ? x - q : s[i] + q;
    r[i] = x - q;
  }
}

// One run of sign pass 2 inside one bucket of scale `scale`.
template <bool kEF>
KIMAD_SIMD_CLONES void sign_run(const float* __restrict__ g, float* __restrict__ s, int64_t len, float scale,
                                uint8_t* __restrict__ code, float* __restrict__ r) {
  const float sign = kEF ? 1.0f : -1.0f;
  for (int64_t i = 0; i < len; ++i) {
    const float x = g[i] + sign * s[i];
    const bool negative = x < 0.0f;
    const float q = negative ? -scale : scale;
    code[i] = negative ? 1 : 0;
    s[i] = kEF ? x - q : s[i] + q;
    r[i] = x - q;
  }
}

// Pass 2 of either encoder (bits == 1: sign). stat holds the bucket norms / scales.
double encode_pass(Grad g, float* s, int64_t n, Feedback mode, int bits, int64_t bucket, uint64_t seed,
                   const float* stat, uint8_t* codes_out) {
  const bool ef = mode == Feedback::kEF;
  const uint32_t levels = bits > 1 ? (1u << (bits - 1)) - 1u : 1u;
  const DrawKey key = draw_key(seed);
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  double sq_error = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : sq_error) if (n >= kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    alignas(64) uint8_t code[kChunk];
    alignas(64) float r[kChunk];
    alignas(64) float converted[kChunk];
    const int64_t c0 = c * kChunk, c1 = std::min(n, c0 + kChunk);
    const float* gc = g.block(c0, c1 - c0, converted);  // element i at gc[i - c0]
    for (int64_t i = c0; i < c1;) {
      const int64_t b = i / bucket, end = std::min(c1, (b + 1) * bucket);
      uint8_t* cd = code + (i - c0);
      float* rr = r + (i - c0);
      if (bits == 1) {
        if (ef) sign_run<true>(gc + (i - c0), s + i, end - i, stat[b], cd, rr);
        else sign_run<false>(gc + (i - c0), s + i, end - i, stat[b], cd, rr);
      } else {
        const float step = stat[b] / static_cast<float>(levels), inv = qsgd_inverse_step(stat[b], levels);
        if (ef) qsgd_run<true>(gc + (i - c0), s + i, i, end - i, inv, step, levels, bits, key, cd, rr);
        else qsgd_run<false>(gc + (i - c0), s + i, i, end - i, inv, step, levels, bits, key, cd, rr);
      }
      i = end;
    }
    double lq[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    lane_squares(r, c1 - c0, lq);
    sq_error += fold(lq);
    pack_codes(code, c1 - c0, bits, codes_out + c0 * bits / 8);
  }
  return sq_error;
}

QuantStats encode(Grad grad, float* state, int64_t n, Feedback mode, int bits, int64_t bucket, uint64_t seed,
                  uint8_t* payload) {
  QuantStats stats{0, 0.0, 0.0};
  const int64_t buckets = n > 0 ? (n + bucket - 1) / bucket : 0;
  std::vector<float> stat(static_cast<size_t>(buckets));
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  if (n > 0) {
    stats.non_finite = bucket_statistics(grad, state, n, sign, bucket, bits == 1, stat.data(), &stats.sq_norm);
    if (stats.non_finite > 0) return stats;
  }
  write_header(payload, n, bits == 1 ? kSignTag : kQsgdTag, bits, bucket);
  if (n == 0) return stats;
  std::memcpy(payload + kQuantHeaderBytes, stat.data(), static_cast<size_t>(buckets) * sizeof(float));
  stats.sq_error = encode_pass(grad, state, n, mode, bits, bucket, seed, stat.data(),
                               payload + kQuantHeaderBytes + 4 * buckets);
  return stats;
}

// out[i] += scale * decoded[first + i] for one run inside one bucket; codes are the message's
// code bytes, step is N / s (QSGD) or S (sign).
template <int kBits>
KIMAD_SIMD_CLONES void decode_run(const uint8_t* __restrict__ codes, int64_t first, int64_t len, float step,
                                  float scale, float* __restrict__ out) {
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  for (int64_t i = 0; i < len; ++i) {
    const uint64_t p = static_cast<uint64_t>(first + i) * kBits;
    const uint32_t c = (static_cast<uint32_t>(codes[p >> 3]) >> (p & 7)) & kMask;
    float q;
    if (kBits == 1) {
      q = c ? -step : step;
    } else {
      const float magnitude = static_cast<float>(c & (kMask >> 1)) * step;
      q = (c >> (kBits - 1)) ? -magnitude : magnitude;
    }
    out[i] += scale * q;
  }
}

void decode_run(int bits, const uint8_t* codes, int64_t first, int64_t len, float step, float scale, float* out) {
  switch (bits) {
    case 8: decode_run<8>(codes, first, len, step, scale, out); break;
    case 4: decode_run<4>(codes, first, len, step, scale, out); break;
    case 2: decode_run<2>(codes, first, len, step, scale, out); break;
    default: decode_run<1>(codes, first, len, step, scale, out); break;
  }
}

}  // namespace

QuantStats qsgd_encode(Grad grad, float* state, int64_t n, Feedback mode, int bits, int64_t bucket,
                       uint64_t seed, uint8_t* payload) {
  return encode(grad, state, n, mode, bits, bucket, seed, payload);
}

QuantStats sign_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t bucket, uint8_t* payload) {
  return encode(grad, state, n, mode, 1, bucket, 0, payload);
}

QuantDecodeStatus quant_decode_accumulate(const uint8_t* payload, int64_t bytes, int bits, int64_t numel,
                                          int64_t bucket, float scale, float* out) {
  if (bytes != quant_message_bytes(numel, bits, bucket)) return QuantDecodeStatus::kBadLength;
  uint32_t header_numel;
  std::memcpy(&header_numel, payload, 4);
  if (static_cast<int64_t>(header_numel) != numel) return QuantDecodeStatus::kBadNumel;
  if (payload[4] != (bits == 1 ? kSignTag : kQsgdTag) || payload[5] != bits) return QuantDecodeStatus::kBadFormat;
  uint16_t field;
  std::memcpy(&field, payload + 6, 2);
  if (field != quant_bucket_field(numel, bucket)) return QuantDecodeStatus::kBadBucket;
  const int64_t buckets = (numel + bucket - 1) / bucket;
  std::vector<float> stat(static_cast<size_t>(buckets));
  std::memcpy(stat.data(), payload + kQuantHeaderBytes, static_cast<size_t>(buckets) * sizeof(float));
  for (float x : stat) {
    if (!(x >= 0.0f) || std::isinf(x)) return QuantDecodeStatus::kBadScale;
  }
  const uint8_t* codes = payload + kQuantHeaderBytes + 4 * buckets;
  const float levels = bits > 1 ? static_cast<float>((1u << (bits - 1)) - 1u) : 1.0f;
  const int64_t chunks = (numel + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (numel >= kParallelGrain)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t c0 = c * kChunk, c1 = std::min(numel, c0 + kChunk);
    for (int64_t i = c0; i < c1;) {
      const int64_t b = i / bucket, end = std::min(c1, (b + 1) * bucket);
      const float step = bits == 1 ? stat[b] : stat[b] / levels;
      decode_run(bits, codes, i, end - i, step, scale, out + i);
      i = end;
    }
  }
  return QuantDecodeStatus::kOk;
}

QuantStats quant_error_estimate(Grad grad, const float* state, int64_t n, Feedback mode, int64_t bucket,
                                double errors[4]) {
  QuantStats stats{0, 0.0, 0.0};
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  const int64_t buckets = n > 0 ? (n + bucket - 1) / bucket : 0;
  constexpr uint32_t kLevels[3] = {127u, 7u, 1u};  // bits 8, 4, 2
  int64_t bad = 0;
  double sq_total = 0.0, e8 = 0.0, e4 = 0.0, e2 = 0.0, es = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : bad, sq_total, e8, e4, e2, es) if (n >= kParallelGrain)
  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t begin = b * bucket, len = std::min(bucket, n - begin);
    const float* s = state + begin;
    double sq = 0.0, l1 = 0.0;
    const int64_t bucket_bad = bucket_sums(grad + begin, s, len, sign, &sq, &l1);
    const float norm = static_cast<float>(std::sqrt(sq));
    bad += bucket_bad + (bucket_bad == 0 && std::isinf(norm) ? 1 : 0);
    sq_total += sq;
    if (bucket_bad > 0) continue;
    const float mean_abs = static_cast<float>(l1 / static_cast<double>(len));
    float inv[3];
    double step_sq[3], acc[3] = {0.0, 0.0, 0.0};
    for (int r = 0; r < 3; ++r) {
      inv[r] = qsgd_inverse_step(norm, kLevels[r]);
      const double step = static_cast<double>(norm / static_cast<float>(kLevels[r]));
      step_sq[r] = step * step;
    }
    double sign_err = 0.0;
    std::vector<float> converted(grad.type == GradType::kFloat32 ? 0 : static_cast<size_t>(len));
    const float* g = grad.block(begin, len, converted.data());
    for (int64_t i = 0; i < len; ++i) {
      const float x = g[i] + sign * s[i];
      const float ax = x < 0.0f ? -x : x;
      for (int r = 0; r < 3; ++r) {
        const float y = ax * inv[r];  // as the encoder's x
        if (y < static_cast<float>(kLevels[r])) {
          const double p = static_cast<double>(y - static_cast<float>(static_cast<int32_t>(y)));
          acc[r] += p * (1.0 - p);
        }
      }
      const double d = static_cast<double>(ax - mean_abs);  // the encoder's float32 residual
      sign_err += d * d;
    }
    e8 += step_sq[0] * acc[0];
    e4 += step_sq[1] * acc[1];
    e2 += step_sq[2] * acc[2];
    es += sign_err;
  }
  stats.non_finite = bad;
  stats.sq_norm = sq_total;
  if (bad > 0) return stats;
  errors[0] = e8;
  errors[1] = e4;
  errors[2] = e2;
  errors[3] = es;
  return stats;
}

void uniform_draws(uint64_t seed, int64_t n, float* out) {
  const DrawKey key = draw_key(seed);
#pragma omp parallel for schedule(static) if (n >= kParallelGrain)
  for (int64_t i = 0; i < n; ++i) out[i] = uniform_draw(key, static_cast<uint32_t>(i));
}

}  // namespace cpu
}  // namespace kimad
