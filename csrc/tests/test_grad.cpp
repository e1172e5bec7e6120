// Specification of the half-precision gradient reads (kimad/grad.h) and of the kernels fed with them.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "kimad/grad.h"
#include "kimad/quant.h"
#include "kimad/topk.h"

namespace {

uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE binary16 by its definition: (-1)^s * 2^(e-15) * 1.m, subnormals 2^-14 * 0.m.
float reference_float16(uint16_t h) {
  const int sign = h >> 15, e = (h >> 10) & 0x1F, m = h & 0x3FF;
  float magnitude;
  if (e == 0) {
    magnitude = std::ldexp(static_cast<float>(m), -24);
  } else if (e == 31) {
    magnitude = m == 0 ? INFINITY : NAN;
  } else {
    magnitude = std::ldexp(static_cast<float>(1024 + m), e - 25);
  }
  return sign ? -magnitude : magnitude;
}

TEST(Grad, EveryFloat16PatternConvertsExactly) {
  std::vector<uint16_t> all(1 << 16);
  for (uint32_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> out(all.size());
  kimad::cpu::convert_float16(all.data(), static_cast<int64_t>(all.size()), out.data());
  for (uint32_t i = 0; i < all.size(); ++i) {
    const float want = reference_float16(all[i]);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(out[i])) << "pattern " << i;
      EXPECT_EQ(bits_of(out[i]) >> 31, i >> 15) << "sign of NaN pattern " << i;
    } else {
      EXPECT_EQ(bits_of(out[i]), bits_of(want)) << "pattern " << i;
    }
    EXPECT_EQ(bits_of(kimad::float16_to_float(all[i])), bits_of(out[i])) << "scalar and block differ at " << i;
  }
}

TEST(Grad, EveryBFloat16PatternIsTheTopHalfOfAFloat) {
  std::vector<uint16_t> all(1 << 16);
  for (uint32_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  std::vector<float> out(all.size());
  kimad::cpu::convert_bfloat16(all.data(), static_cast<int64_t>(all.size()), out.data());
  for (uint32_t i = 0; i < all.size(); ++i) EXPECT_EQ(bits_of(out[i]), i << 16) << "pattern " << i;
}

TEST(Grad, Float32BlocksAreReadInPlace) {
  const std::vector<float> g = {1.0f, 2.0f, 3.0f};
  float buffer[3];
  EXPECT_EQ(kimad::Grad(g.data()).block(1, 2, buffer), g.data() + 1);
}

// n random finite float16 bit patterns (subnormals included) and their float32 values.
void random_float16(int64_t n, uint32_t seed, std::vector<uint16_t>& half, std::vector<float>& full) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> pick(0, 0x7BFF);  // finite magnitudes, subnormals included
  half.resize(n);
  full.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    half[i] = static_cast<uint16_t>(pick(rng) | ((rng() & 1u) << 15));
    full[i] = reference_float16(half[i]);
  }
}

TEST(Grad, TopKOfAFloat16GradientEqualsThatOfItsFloat32Copy) {
  const int64_t n = 1 << 18, k = n / 100;  // threaded path
  std::vector<uint16_t> half;
  std::vector<float> full;
  random_float16(n, 3, half, full);
  for (kimad::Feedback mode : {kimad::Feedback::kEF, kimad::Feedback::kEF21}) {
    std::vector<float> s1(n, 0.5f), s2(n, 0.5f), v1(k), v2(k);
    std::vector<int32_t> i1(k), i2(k);
    const auto a = kimad::cpu::topk_encode(kimad::Grad(half.data(), kimad::GradType::kFloat16), s1.data(), n, mode,
                                           k, v1.data(), i1.data());
    const auto b = kimad::cpu::topk_encode(full.data(), s2.data(), n, mode, k, v2.data(), i2.data());
    EXPECT_EQ(a.non_finite, 0);
    EXPECT_EQ(a.sq_error, b.sq_error);
    EXPECT_EQ(v1, v2);
    EXPECT_EQ(i1, i2);
    EXPECT_EQ(s1, s2);
  }
}

TEST(Grad, QsgdOfAFloat16GradientEqualsThatOfItsFloat32Copy) {
  const int64_t n = (1 << 18) + 3, bucket = 512;
  std::vector<uint16_t> half;
  std::vector<float> full;
  random_float16(n, 4, half, full);
  for (int bits : {8, 4, 2, 1}) {
    const int64_t bytes = kimad::quant_message_bytes(n, bits, bucket);
    std::vector<uint8_t> p1(bytes), p2(bytes);
    std::vector<float> s1(n, 0.25f), s2(n, 0.25f);
    const kimad::Grad g16(half.data(), kimad::GradType::kFloat16);
    if (bits == 1) {
      kimad::cpu::sign_encode(g16, s1.data(), n, kimad::Feedback::kEF, bucket, p1.data());
      kimad::cpu::sign_encode(full.data(), s2.data(), n, kimad::Feedback::kEF, bucket, p2.data());
    } else {
      kimad::cpu::qsgd_encode(g16, s1.data(), n, kimad::Feedback::kEF21, bits, bucket, 7, p1.data());
      kimad::cpu::qsgd_encode(full.data(), s2.data(), n, kimad::Feedback::kEF21, bits, bucket, 7, p2.data());
    }
    EXPECT_EQ(p1, p2) << "bits " << bits;
    EXPECT_EQ(s1, s2) << "bits " << bits;
  }
}

}  // namespace
