// A gradient as the kernels read it: float32, float16 or bfloat16 elements, always computed
// with in float32 (the error-feedback state stays float32).
//
// Host code converts a block at a time into a float32 buffer (Grad::block), so the float32 loops
// that follow vectorise unchanged; device code reads one element at a time (operator[]), the
// branch on the type being uniform across a warp. Both conversions are exact (every float16 and
// bfloat16 value is a float32 value), so results equal those of a float32 copy of the gradient.
#pragma once

#include <cstdint>
#include <cstring>

#include "kimad/simd.h"

#if defined(__CUDACC__)
#define KIMAD_HOST_DEVICE __host__ __device__ __forceinline__
#define KIMAD_HOST __host__
#else
#define KIMAD_HOST_DEVICE inline
#define KIMAD_HOST
#endif

namespace kimad {

// Element type of a gradient.
enum class GradType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

KIMAD_HOST_DEVICE float float_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Exact IEEE binary16 -> binary32, branch-free (selects) so that a loop of it vectorises.
KIMAD_HOST_DEVICE float float16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;                           // exponent and mantissa
  const uint32_t normal = (em << 13) + 0x38000000u;          // rebias the exponent: 15 -> 127
  const uint32_t inf_nan = (em << 13) | 0x7F800000u;         // keeps a NaN's payload
  const float sub = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // m * 2^-24, exact
  uint32_t sub_bits;
#if defined(__CUDA_ARCH__)
  sub_bits = __float_as_uint(sub);
#else
  std::memcpy(&sub_bits, &sub, sizeof sub_bits);
#endif
  // Masks rather than ?: so that GCC sees no control flow and vectorises the loop.
  const uint32_t big = 0u - static_cast<uint32_t>(em >= 0x7C00u), small = 0u - static_cast<uint32_t>(em < 0x0400u);
  const uint32_t bits = (inf_nan & big) | (sub_bits & small) | (normal & ~(big | small));
  return float_from_bits(bits | sign);
}

// Exact bfloat16 -> binary32: the top half of the float's bits.
KIMAD_HOST_DEVICE float bfloat16_to_float(uint16_t b) { return float_from_bits(static_cast<uint32_t>(b) << 16); }

// A read-only gradient of any GradType. Converts implicitly from a float32 pointer.
struct Grad {
  const void* data;
  GradType type;

  KIMAD_HOST_DEVICE Grad(const float* p = nullptr) : data(p), type(GradType::kFloat32) {}
  KIMAD_HOST_DEVICE Grad(const void* p, GradType t) : data(p), type(t) {}

  // Element i as float32.
  KIMAD_HOST_DEVICE float operator[](int64_t i) const {
    if (type == GradType::kFloat32) return static_cast<const float*>(data)[i];
    const uint16_t h = static_cast<const uint16_t*>(data)[i];
    return type == GradType::kFloat16 ? float16_to_float(h) : bfloat16_to_float(h);
  }

  // The gradient from element `offset` on.
  KIMAD_HOST_DEVICE Grad operator+(int64_t offset) const {
    if (type == GradType::kFloat32) return Grad(static_cast<const float*>(data) + offset);
    return Grad(static_cast<const uint16_t*>(data) + offset, type);
  }

  // Elements [begin, begin + len) as float32: a pointer into the gradient itself when it is
  // float32, otherwise into `buffer` (len floats), which receives the converted elements.
  KIMAD_HOST const float* block(int64_t begin, int64_t len, float* buffer) const;
};

namespace cpu {
// Converts len float16 (bfloat16) bit patterns to float32 (vectorised; csrc/kernels/cpu/grad.cpp).
void convert_float16(const uint16_t* in, int64_t len, float* out);
void convert_bfloat16(const uint16_t* in, int64_t len, float* out);
}  // namespace cpu

inline KIMAD_HOST const float* Grad::block(int64_t begin, int64_t len, float* buffer) const {
  if (type == GradType::kFloat32) return static_cast<const float*>(data) + begin;
  const uint16_t* h = static_cast<const uint16_t*>(data) + begin;
  if (type == GradType::kFloat16) {
    cpu::convert_float16(h, len, buffer);
  } else {
    cpu::convert_bfloat16(h, len, buffer);
  }
  return buffer;
}

}  // namespace kimad
