// Specification of the QSGD / scaled-sign encoders with error feedback and their decoder (kimad/quant.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <random>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kimad/quant.h"

namespace {

using kimad::Feedback;
using kimad::QuantDecodeStatus;

struct Message {
  std::vector<uint8_t> payload;
  std::vector<float> state;
  double sq_error = 0.0;
};

std::vector<float> random_vector(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = normal(rng);
  return x;
}

// Plain reference of the documented layout: bits 1 = sign, otherwise QSGD.
Message reference(const std::vector<float>& g, std::vector<float> s, Feedback mode, int bits, int64_t bucket,
                  uint64_t seed) {
  const int64_t n = static_cast<int64_t>(g.size());
  const int64_t buckets = (n + bucket - 1) / bucket;
  const uint32_t levels = bits > 1 ? (1u << (bits - 1)) - 1u : 1u;
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = mode == Feedback::kEF ? g[i] + s[i] : g[i] - s[i];
  Message m;
  m.payload.assign(kimad::quant_message_bytes(n, bits, bucket), 0);
  const uint32_t numel = static_cast<uint32_t>(n);
  std::memcpy(m.payload.data(), &numel, 4);
  m.payload[4] = bits == 1 ? 0x53 : 0x51;
  m.payload[5] = static_cast<uint8_t>(bits);
  const int64_t field = bucket >= n ? 0 : bucket;  // the bucket field: 0 for one bucket over all
  m.payload[6] = static_cast<uint8_t>(field & 0xFF);
  m.payload[7] = static_cast<uint8_t>(field >> 8);
  uint8_t* codes = m.payload.data() + 8 + 4 * buckets;
  const kimad::DrawKey key = kimad::draw_key(seed);
  for (int64_t b = 0; b < buckets; ++b) {
    const int64_t begin = b * bucket, end = std::min(n, begin + bucket);
    double sq = 0.0, l1 = 0.0;
    for (int64_t i = begin; i < end; ++i) {
      sq += static_cast<double>(v[i]) * v[i];
      l1 += std::fabs(static_cast<double>(v[i]));
    }
    const float stat = bits == 1 ? static_cast<float>(l1 / (end - begin)) : static_cast<float>(std::sqrt(sq));
    std::memcpy(m.payload.data() + 8 + 4 * b, &stat, 4);
    for (int64_t i = begin; i < end; ++i) {
      const bool negative = v[i] < 0.0f;
      float q;
      uint32_t code;
      if (bits == 1) {
        q = negative ? -stat : stat;
        code = negative;
      } else {
        uint32_t level = 0;
        if (stat > 0.0f) {
          const float x = std::min(std::fabs(v[i]) * (static_cast<float>(levels) / stat), static_cast<float>(levels));
          const float fl = std::floor(x);
          level = static_cast<uint32_t>(fl) + (kimad::uniform_draw(key, i) < x - fl);
        }
        const float magnitude = static_cast<float>(level) * (stat / static_cast<float>(levels));
        q = negative ? -magnitude : magnitude;
        code = level | (static_cast<uint32_t>(negative) << (bits - 1));
      }
      codes[i * bits / 8] |= static_cast<uint8_t>(code << ((i * bits) % 8));
      const float residual = v[i] - q;  // the error is that of the float32 residual
      m.sq_error += static_cast<double>(residual) * residual;
      s[i] = mode == Feedback::kEF ? v[i] - q : s[i] + q;
    }
  }
  m.state = s;
  return m;
}

Message encode(const std::vector<float>& g, std::vector<float> s, Feedback mode, int bits, int64_t bucket,
               uint64_t seed, kimad::QuantStats* stats = nullptr) {
  const int64_t n = static_cast<int64_t>(g.size());
  Message m;
  m.payload.assign(kimad::quant_message_bytes(n, bits, bucket), 0xAB);
  const kimad::QuantStats st =
      bits == 1 ? kimad::cpu::sign_encode(g.data(), s.data(), n, mode, bucket, m.payload.data())
                : kimad::cpu::qsgd_encode(g.data(), s.data(), n, mode, bits, bucket, seed, m.payload.data());
  if (stats) *stats = st;
  m.state = s;
  m.sq_error = st.sq_error;
  return m;
}

struct Case {
  int64_t n, bucket;
  int bits;
};

class QuantMatchesReference : public ::testing::TestWithParam<Case> {};

TEST_P(QuantMatchesReference, PayloadAndStateBitForBit) {
  const Case c = GetParam();
  for (Feedback mode : {Feedback::kEF, Feedback::kEF21}) {
    const auto g = random_vector(c.n, 1), s = random_vector(c.n, 2, 0.1f);
    const Message want = reference(g, s, mode, c.bits, c.bucket, 42);
    const Message got = encode(g, s, mode, c.bits, c.bucket, 42);
    EXPECT_EQ(got.payload, want.payload);
    EXPECT_EQ(got.state, want.state);
    EXPECT_NEAR(got.sq_error, want.sq_error, 1e-9 * (1.0 + want.sq_error));
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, QuantMatchesReference,
                         ::testing::Values(Case{0, 512, 4}, Case{1, 512, 8}, Case{7, 3, 2}, Case{513, 512, 4},
                                           Case{1000, 1, 8}, Case{4097, 7, 1}, Case{300001, 512, 4},
                                           Case{300001, 1000, 2}, Case{300001, 512, 1}, Case{70000, 70000, 8}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "n" + std::to_string(info.param.n) + "_bucket" + std::to_string(info.param.bucket) +
                                  "_bits" + std::to_string(info.param.bits);
                         });

TEST(Quant, OutputDoesNotDependOnThreadCount) {
#ifdef _OPENMP
  const auto g = random_vector(500000, 3), s = random_vector(500000, 4, 0.1f);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const Message one = encode(g, s, Feedback::kEF21, 4, 300, 9);
  omp_set_num_threads(3);
  const Message three = encode(g, s, Feedback::kEF21, 4, 300, 9);
  omp_set_num_threads(saved);
  EXPECT_EQ(one.payload, three.payload);
  EXPECT_EQ(one.state, three.state);
#else
  GTEST_SKIP() << "built without OpenMP: one thread only";
#endif
}

TEST(Quant, NonFiniteInputWritesNothing) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto g = random_vector(100000, 5);
    g[77777] = bad;
    const std::vector<float> s(100000, 0.5f);
    kimad::QuantStats st{};
    const Message m = encode(g, s, Feedback::kEF, 4, 512, 1, &st);
    EXPECT_EQ(st.non_finite, 1);
    EXPECT_EQ(m.state, s);
    for (uint8_t b : m.payload) ASSERT_EQ(b, 0xAB);
  }
}

TEST(Quant, ZeroBucketSendsZeroLevelsWithoutNaN) {
  std::vector<float> g(16, 0.0f);
  g[9] = -2.0f;
  const Message m = encode(g, std::vector<float>(16, 0.0f), Feedback::kEF, 8, 8, 3);
  float norm0;
  std::memcpy(&norm0, m.payload.data() + 8, 4);
  EXPECT_EQ(norm0, 0.0f);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(m.payload[16 + i], 0);
  for (float x : m.state) EXPECT_TRUE(std::isfinite(x));
  EXPECT_EQ(m.state[9], 0.0f);  // |v| = norm: level s exactly, nothing left over
}

TEST(Quant, DecodeOfEf21MessageEqualsTheStateIncrement) {
  for (int bits : {8, 4, 2, 1}) {
    const auto g = random_vector(200003, 6);
    const Message m = encode(g, std::vector<float>(g.size(), 0.0f), Feedback::kEF21, bits, 500, 11);
    std::vector<float> out(g.size(), 0.0f);
    ASSERT_EQ(kimad::cpu::quant_decode_accumulate(m.payload.data(), m.payload.size(), bits, g.size(), 500, 1.0f,
                                                  out.data()),
              QuantDecodeStatus::kOk);
    EXPECT_EQ(out, m.state) << "bits=" << bits;
  }
}

TEST(Quant, CorruptMessagesAreRefusedAndOutIsUntouched) {
  const auto g = random_vector(1000, 7);
  const Message m = encode(g, std::vector<float>(1000, 0.0f), Feedback::kEF, 4, 100, 2);
  struct Bad {
    size_t pos;
    uint8_t value;
    QuantDecodeStatus want;
  };
  for (const Bad& bad : {Bad{0, 0xE9, QuantDecodeStatus::kBadNumel}, Bad{4, 0x53, QuantDecodeStatus::kBadFormat},
                         Bad{5, 8, QuantDecodeStatus::kBadFormat}, Bad{6, 101, QuantDecodeStatus::kBadBucket},
                         Bad{7, 1, QuantDecodeStatus::kBadBucket},
                         Bad{11, 0xFF, QuantDecodeStatus::kBadScale}, Bad{15, 0x80, QuantDecodeStatus::kBadScale}}) {
    std::vector<uint8_t> p = m.payload;
    p[bad.pos] = bad.value;
    std::vector<float> out(1000, 1.0f);
    EXPECT_EQ(kimad::cpu::quant_decode_accumulate(p.data(), p.size(), 4, 1000, 100, 1.0f, out.data()), bad.want)
        << "byte " << bad.pos;
    EXPECT_EQ(out, std::vector<float>(1000, 1.0f));
  }
  std::vector<float> out(1000, 1.0f);
  EXPECT_EQ(kimad::cpu::quant_decode_accumulate(m.payload.data(), m.payload.size() - 1, 4, 1000, 100, 1.0f, out.data()),
            QuantDecodeStatus::kBadLength);
  EXPECT_EQ(kimad::cpu::quant_decode_accumulate(m.payload.data(), m.payload.size(), 2, 1000, 100, 1.0f, out.data()),
            QuantDecodeStatus::kBadLength);
  EXPECT_EQ(out, std::vector<float>(1000, 1.0f));
}

TEST(Quant, HeaderRecordsTheBucketAndADecoderExpectingAnotherRefusesIt) {
  const auto g = random_vector(1000, 17);
  // 600 and 900 both make 2 buckets, so the length alone cannot tell them apart.
  const Message m = encode(g, std::vector<float>(1000, 0.0f), Feedback::kEF21, 8, 600, 3);
  EXPECT_EQ(m.payload[6] | (m.payload[7] << 8), 600);
  std::vector<float> out(1000, 1.0f);
  EXPECT_EQ(kimad::cpu::quant_decode_accumulate(m.payload.data(), m.payload.size(), 8, 1000, 900, 1.0f, out.data()),
            QuantDecodeStatus::kBadBucket);
  EXPECT_EQ(out, std::vector<float>(1000, 1.0f));
  EXPECT_EQ(kimad::cpu::quant_decode_accumulate(m.payload.data(), m.payload.size(), 8, 1000, 600, 1.0f, out.data()),
            QuantDecodeStatus::kOk);
  // Any bucket >= numel is one bucket: field 0, and every such receiver accepts the message.
  const Message whole = encode(g, std::vector<float>(1000, 0.0f), Feedback::kEF21, 8, 70000, 3);
  EXPECT_EQ(whole.payload[6] | whole.payload[7], 0);
  EXPECT_EQ(kimad::cpu::quant_decode_accumulate(whole.payload.data(), whole.payload.size(), 8, 1000, 1000, 1.0f,
                                                out.data()),
            QuantDecodeStatus::kOk);
}

TEST(Quant, ErrorEstimateMatchesSignErrorAndEmpiricalQsgdError) {
  const auto g = random_vector(20000, 8), s = random_vector(20000, 9, 0.1f);
  double errors[4];
  const kimad::QuantStats st =
      kimad::cpu::quant_error_estimate(g.data(), s.data(), 20000, Feedback::kEF21, 512, errors);
  EXPECT_EQ(st.non_finite, 0);
  EXPECT_NEAR(errors[3], encode(g, s, Feedback::kEF21, 1, 512, 0).sq_error, 1e-9 * errors[3]);
  EXPECT_LT(errors[0], errors[1]);
  EXPECT_LT(errors[1], errors[2]);
  double mean = 0.0;
  constexpr int kTrials = 200;
  for (int t = 0; t < kTrials; ++t) mean += encode(g, s, Feedback::kEF21, 4, 512, t).sq_error / kTrials;
  EXPECT_NEAR(mean, errors[1], 0.02 * errors[1]);
}

TEST(Quant, UniformDrawsAreDeterministicAndInUnitInterval) {
  std::vector<float> a(1000), b(1000);
  kimad::cpu::uniform_draws(5, 1000, a.data());
  kimad::cpu::uniform_draws(5, 1000, b.data());
  EXPECT_EQ(a, b);
  double sum = 0.0;
  for (float u : a) {
    ASSERT_GE(u, 0.0f);
    ASSERT_LT(u, 1.0f);
    sum += u;
  }
  EXPECT_NEAR(sum / 1000, 0.5, 0.05);
  EXPECT_EQ(kimad::quant_message_bytes(1000, 4, 100), 8 + 40 + 500);
  EXPECT_EQ(kimad::quant_message_bytes(9, 1, 512), 8 + 4 + 2);
}

}  // namespace
