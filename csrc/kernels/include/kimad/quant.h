// Kimad's native kernels: stochastic quantisation (QSGD) and scaled sign, fused with error
// feedback, and decode-and-accumulate of their messages.
//
// Both encoders form v = g + e (classic EF) or v = g - h (EF21) as topk.h does, split v into
// buckets of `bucket` consecutive elements (the last one may be shorter) and write one message:
//
//   bytes [0, 8)     header: uint32 numel (little-endian), uint8 format tag ('Q' = 0x51 for
//                    QSGD, 'S' = 0x53 for sign), uint8 bits (8, 4 or 2 for QSGD; 1 for sign),
//                    uint16 bucket field (little-endian; quant_bucket_field: the bucket size,
//                    or 0 when one bucket spans the tensor), so that a receiver expecting
//                    another bucket size refuses the message;
//   then             one float32 (little-endian) per bucket: the bucket's L2 norm (QSGD) or its
//                    mean |v| (sign);
//   then             ceil(numel * bits / 8) bytes of codes, `bits` per element, packed densely
//                    LSB-first: element i occupies bits [i * bits, (i + 1) * bits) of the code
//                    bytes, bit p being bit (p % 8) of byte p / 8 (so with 4 bits, element 2j is
//                    the low nibble of byte j). Unused high bits of the last byte are zero.
//
// A QSGD code is level | (negative << (bits - 1)) with level in [0, s], s = 2^(bits-1) - 1, and
// negative = (v < 0). With the bucket norm N (float32) the level is stochastic rounding of
// x = |v| * (s / N), namely floor(x) + (u < x - floor(x)), u ~ U[0, 1) from uniform_draw(seed, i)
// clamped to s; all in float32 (round to nearest, no fused multiply-add). The decoded value is
// +-level * (N / s) (float32 ops). A bucket of norm 0 sends all levels 0.
// A sign code is 1 bit, 1 for v < 0; the decoded value is -+S with S the bucket's mean |v|.
//
// State update (the decoded value q of each element, bitwise what a receiver decodes):
//   EF: e = v - q;  EF21: h += q.
// Torch-free; safe with n == 0 and null pointers in that case. Precondition: n < 2^32.
#pragma once

#include <cstdint>

#include "kimad/simd.h"
#include "kimad/topk.h"  // Feedback

#if defined(__CUDACC__)
#define KIMAD_HD __host__ __device__ __forceinline__
#else
#define KIMAD_HD inline
#endif

namespace kimad {

constexpr int kQuantHeaderBytes = 8;
constexpr uint8_t kQsgdTag = 0x51;  // 'Q'
constexpr uint8_t kSignTag = 0x53;  // 'S'

// What the encoders and quant_error_estimate report besides their outputs.
struct QuantStats {
  int64_t non_finite;  // entries of v that are NaN or +-Inf (or buckets whose float32 norm
                       // overflows); when > 0 nothing at all was written
  double sq_norm;      // ||v||^2
  double sq_error;     // ||v - Q(v)||^2 of what was sent, from the float32 residuals (encoders only)
};

// Why a message was refused by the decoder (kOk when it was accumulated).
enum class QuantDecodeStatus : int {
  kOk = 0,
  kBadLength = 1,     // payload size differs from quant_message_bytes for the expected layout
  kBadNumel = 2,      // header numel differs from the expected numel
  kBadFormat = 3,     // header tag or bits differ from the expected format
  kBadScale = 4,      // a bucket norm / scale is negative, NaN or Inf
  kBadBucket = 5,     // header bucket field differs from the expected bucket size
};

// The header's bucket field for n elements in buckets of `bucket`: the bucket size, or 0 when
// bucket >= n (one bucket spans the tensor, whatever its nominal size). Encoders require
// quant_bucket_fits(n, bucket).
KIMAD_HD uint16_t quant_bucket_field(int64_t n, int64_t bucket) {
  return bucket >= n ? 0 : static_cast<uint16_t>(bucket);
}
KIMAD_HD bool quant_bucket_fits(int64_t n, int64_t bucket) { return bucket >= n || bucket <= 0xFFFF; }

// Exact message size in bytes (kimad/compressors/wire.py message_bytes): bits = 1 means sign.
KIMAD_HD int64_t quant_message_bytes(int64_t n, int bits, int64_t bucket) {
  return kQuantHeaderBytes + 4 * ((n + bucket - 1) / bucket) + (n * bits + 7) / 8;
}

// The counter-based uniform draw of element `index` under `seed`: two rounds of the lowbias32
// integer hash (C. Wellons) keyed by the two halves of splitmix64(seed); the top 24 bits give a
// float32 in [0, 1) on the grid of 2^-24. Independent of thread count and device.
KIMAD_HD uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

KIMAD_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

struct DrawKey {
  uint32_t k1, k2;
};

KIMAD_HD DrawKey draw_key(uint64_t seed) {
  const uint64_t z = splitmix64(seed);
  return {static_cast<uint32_t>(z), static_cast<uint32_t>(z >> 32)};
}

KIMAD_HD float uniform_draw(DrawKey key, uint32_t index) {
  const uint32_t h = lowbias32(lowbias32(index ^ key.k1) ^ key.k2);
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// float32 product that is never fused into a multiply-add (the level must not depend on FMA).
KIMAD_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;  // the CPU kernels are compiled with fp-contract off
#endif
}

// Stochastic level of |v| in [0, s] given inv = float32(s / N) and the draw u (see the top):
// x = min(float32(|v| * inv), s), level = floor(x) + (u < x - floor(x)); x - floor(x) is exact.
// |v| / N may exceed 1 by rounding, and inv is capped at FLT_MAX for norms so small that s / N
// overflows: both end at level s.
KIMAD_HD uint32_t qsgd_level(float v, float inv, float u, uint32_t s) {
  float x = mul_rn(v < 0.0f ? -v : v, inv);
  x = x < static_cast<float>(s) ? x : static_cast<float>(s);
  const float fl = static_cast<float>(static_cast<uint32_t>(x));
  return static_cast<uint32_t>(fl) + (u < x - fl ? 1u : 0u);
}

// float32(s / N), capped at FLT_MAX; 0 for a bucket of norm 0 (all levels 0).
KIMAD_HD float qsgd_inverse_step(float norm, uint32_t s) {
  if (!(norm > 0.0f)) return 0.0f;
  const float inv = static_cast<float>(s) / norm;
  return inv <= 3.402823466e38f ? inv : 3.402823466e38f;
}

namespace cpu {

// QSGD encode with error feedback, in place on `state`. bits in {8, 4, 2}, bucket >= 1 with
// quant_bucket_fits(n, bucket), payload holds quant_message_bytes(n, bits, bucket) bytes. Multi-threaded (OpenMP); the payload and
// state are bitwise identical for any number of threads. If v has a non-finite entry, returns
// stats.non_finite > 0 and writes nothing (state and payload untouched).
QuantStats qsgd_encode(Grad grad, float* state, int64_t n, Feedback mode, int bits, int64_t bucket,
                       uint64_t seed, uint8_t* payload);

// Scaled sign encode with error feedback (EF-SignSGD), same contract with bits = 1.
QuantStats sign_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t bucket,
                       uint8_t* payload);

// Validating decode-and-accumulate: out[i] += scale * decoded[i] for i in [0, numel), where the
// message is expected to be QSGD with `bits` in {8, 4, 2} or sign with bits = 1, of `numel`
// elements in buckets of `bucket`. Checks the length, the header and every bucket scale first;
// on any mismatch returns the reason and leaves `out` untouched. Reads only payload[0, bytes).
QuantDecodeStatus quant_decode_accumulate(const uint8_t* payload, int64_t bytes, int bits, int64_t numel,
                                          int64_t bucket, float scale, float* out);

// Expected squared QSGD error E||v - Q(v)||^2 for bits 8, 4, 2 (errors[0..2]) and the exact squared
// error of the sign message (errors[3]), in one pass; the state is not modified. Per element of a
// bucket of norm N: (N / s)^2 * p (1 - p) with p = x - floor(x) the rounding probability.
QuantStats quant_error_estimate(Grad grad, const float* state, int64_t n, Feedback mode, int64_t bucket,
                                double errors[4]);

// n counter-based uniform draws u_i = uniform_draw(draw_key(seed), i) (for tests and references).
void uniform_draws(uint64_t seed, int64_t n, float* out);

}  // namespace cpu
}  // namespace kimad
