// Specification of the fused error feedback + top-k encode and the error profile (kimad/topk.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "kimad/topk.h"

namespace {

using kimad::Feedback;

struct Encoded {
  std::vector<float> values;
  std::vector<int32_t> indices;
  std::vector<float> state;
  double sq_error = 0.0;
};

// Plain reference: form v, stable-sort indices by descending |v| (ties: lower index first), take
// k, sort them, update the state.
Encoded reference(const std::vector<float>& g, std::vector<float> s, Feedback mode, int64_t k) {
  const size_t n = g.size();
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = mode == Feedback::kEF ? g[i] + s[i] : g[i] - s[i];
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int32_t a, int32_t b) { return std::fabs(v[a]) > std::fabs(v[b]); });
  Encoded r;
  r.indices.assign(order.begin(), order.begin() + k);
  std::sort(r.indices.begin(), r.indices.end());
  std::vector<bool> sent(n, false);
  for (int32_t i : r.indices) {
    r.values.push_back(v[i]);
    sent[i] = true;
  }
  for (size_t i = 0; i < n; ++i) {
    if (!sent[i]) r.sq_error += static_cast<double>(v[i]) * v[i];
    if (mode == Feedback::kEF) s[i] = sent[i] ? 0.0f : v[i];
    else if (sent[i]) s[i] += v[i];
  }
  r.state = s;
  return r;
}

Encoded encode(const std::vector<float>& g, std::vector<float> s, Feedback mode, int64_t k,
               kimad::TopKStats* stats = nullptr) {
  Encoded r;
  r.values.assign(k, -1.0f);
  r.indices.assign(k, -1);
  const auto st = kimad::cpu::topk_encode(g.data(), s.data(), static_cast<int64_t>(g.size()), mode, k,
                                          r.values.data(), r.indices.data());
  if (stats) *stats = st;
  r.state = s;
  r.sq_error = st.sq_error;
  return r;
}

void expect_same(const Encoded& got, const Encoded& want) {
  EXPECT_EQ(got.indices, want.indices);
  EXPECT_EQ(got.values, want.values);
  EXPECT_EQ(got.state, want.state);
  EXPECT_NEAR(got.sq_error, want.sq_error, 1e-9 * (1.0 + want.sq_error));
}

std::vector<float> random_vector(size_t n, unsigned seed, bool ties) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> tiny(-2, 2);
  std::vector<float> x(n);
  for (auto& e : x) e = ties ? 0.5f * tiny(rng) : normal(rng);
  return x;
}

TEST(TopKEncode, EmptyTensorIsANoOp) {
  const auto st = kimad::cpu::topk_encode(nullptr, nullptr, 0, Feedback::kEF21, 0, nullptr, nullptr);
  EXPECT_EQ(st.non_finite, 0);
  EXPECT_EQ(st.sq_norm, 0.0);
  EXPECT_EQ(st.sq_error, 0.0);
}

TEST(TopKEncode, PicksLargestMagnitudesSortedByIndex) {
  const std::vector<float> g = {0.5f, -3.0f, 1.0f, 2.0f, -0.25f};
  const auto r = encode(g, std::vector<float>(5, 0.0f), Feedback::kEF, 2);
  EXPECT_EQ(r.indices, (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(r.values, (std::vector<float>{-3.0f, 2.0f}));
  EXPECT_EQ(r.state, (std::vector<float>{0.5f, 0.0f, 1.0f, 0.0f, -0.25f}));
  EXPECT_DOUBLE_EQ(r.sq_error, 0.25 + 1.0 + 0.0625);
}

TEST(TopKEncode, TiesGoToTheLowerIndex) {
  const std::vector<float> g = {1.0f, -1.0f, 1.0f, 1.0f, 0.0f};
  const auto r = encode(g, std::vector<float>(5, 0.0f), Feedback::kEF21, 2);
  EXPECT_EQ(r.indices, (std::vector<int32_t>{0, 1}));
}

TEST(TopKEncode, Ef21AddsTheMessageToTheEstimate) {
  const std::vector<float> g = {4.0f, 1.0f, -2.0f};
  const std::vector<float> h = {1.0f, 1.0f, 1.0f};
  const auto r = encode(g, h, Feedback::kEF21, 1);  // v = {3, 0, -3}: tie, index 0 wins
  EXPECT_EQ(r.indices, (std::vector<int32_t>{0}));
  EXPECT_EQ(r.values, (std::vector<float>{3.0f}));
  EXPECT_EQ(r.state, (std::vector<float>{4.0f, 1.0f, 1.0f}));
}

TEST(TopKEncode, KZeroAndKNMatchReference) {
  for (Feedback mode : {Feedback::kEF, Feedback::kEF21}) {
    const auto g = random_vector(37, 1, false);
    const auto s = random_vector(37, 2, false);
    for (int64_t k : {0, 1, 36, 37}) expect_same(encode(g, s, mode, k), reference(g, s, mode, k));
  }
}

TEST(TopKEncode, AllZeroAndHeavyTiesMatchReference) {
  for (Feedback mode : {Feedback::kEF, Feedback::kEF21}) {
    const std::vector<float> zeros(1001, 0.0f);
    for (int64_t k : {0, 1, 500, 1001}) expect_same(encode(zeros, zeros, mode, k), reference(zeros, zeros, mode, k));
    const auto g = random_vector(999, 3, true);
    const auto s = random_vector(999, 4, true);
    for (int64_t k : {1, 7, 400, 998}) expect_same(encode(g, s, mode, k), reference(g, s, mode, k));
  }
}

TEST(TopKEncode, NonFiniteInputIsReportedAndNothingIsWritten) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<float> g = random_vector(300000, 5, false);  // threaded path
    g[123456] = bad;
    std::vector<float> s(g.size(), 1.0f);
    std::vector<float> values(10, -7.0f);
    std::vector<int32_t> indices(10, -7);
    const auto st = kimad::cpu::topk_encode(g.data(), s.data(), static_cast<int64_t>(g.size()), Feedback::kEF,
                                            10, values.data(), indices.data());
    EXPECT_EQ(st.non_finite, 1);
    EXPECT_EQ(s, std::vector<float>(g.size(), 1.0f));
    EXPECT_EQ(values, std::vector<float>(10, -7.0f));
    EXPECT_EQ(indices, std::vector<int32_t>(10, -7));
  }
}

TEST(TopKEncode, LargeThreadedCaseMatchesStableSortReferenceOverSteps) {
  const size_t n = 1 << 19;  // several segments of the parallel grain
  for (Feedback mode : {Feedback::kEF, Feedback::kEF21}) {
    std::vector<float> s(n, 0.0f), s_ref(n, 0.0f);
    for (unsigned step = 0; step < 3; ++step) {
      auto g = random_vector(n, 10 + step, step == 1);
      const int64_t k = step == 2 ? static_cast<int64_t>(n) / 3 : static_cast<int64_t>(n) / 100;
      kimad::TopKStats st;
      const auto got = encode(g, s, mode, k, &st);
      const auto want = reference(g, s_ref, mode, k);
      expect_same(got, want);
      EXPECT_EQ(st.non_finite, 0);
      s = got.state;
      s_ref = want.state;
    }
  }
}

double exact_error(const std::vector<float>& g, const std::vector<float>& s, Feedback mode, int64_t k) {
  return reference(g, s, mode, k).sq_error;
}

TEST(ErrorProfile, ExactAtTheEndsAndWithinTheBoundInside) {
  const size_t n = 200000;
  const auto g = random_vector(n, 20, false);
  const auto s = random_vector(n, 21, false);
  const std::vector<int64_t> ks = {0, 1, 20, 2000, 100000, 199999, 200000};
  std::vector<double> errors(ks.size(), -1.0);
  const auto state_before = s;
  const auto st = kimad::cpu::error_profile(g.data(), s.data(), n, Feedback::kEF21, ks.data(),
                                            static_cast<int64_t>(ks.size()), errors.data());
  EXPECT_EQ(st.non_finite, 0);
  EXPECT_EQ(s, state_before);
  EXPECT_NEAR(st.sq_norm, exact_error(g, s, Feedback::kEF21, 0), 1e-12 * st.sq_norm);
  EXPECT_EQ(errors[0], st.sq_norm);
  EXPECT_EQ(errors.back(), 0.0);
  for (size_t r = 1; r + 1 < ks.size(); ++r) {
    const double exact = exact_error(g, s, Feedback::kEF21, ks[r]);
    // Never below, and above by less than a factor 1 + 2^-6 + 2^-14 (no subnormals here).
    EXPECT_GE(errors[r], exact * (1 - 1e-12)) << "k=" << ks[r];
    EXPECT_LE(errors[r], exact * (1 + std::ldexp(1.0, -6) + std::ldexp(1.0, -14)) * (1 + 1e-12)) << "k=" << ks[r];
  }
}

TEST(ErrorProfile, NeverAboveTheNorm) {
  // Every |v| at the bottom of its bin: counted at the bin's top, 9999 of them would exceed ||v||^2.
  const std::vector<float> g(10000, 1.0f), s(10000, 0.0f);
  const int64_t k = 1;
  double err = -1.0;
  const auto st = kimad::cpu::error_profile(g.data(), s.data(), 10000, Feedback::kEF, &k, 1, &err);
  EXPECT_EQ(st.sq_norm, 10000.0);
  EXPECT_EQ(err, 10000.0);  // exact 9999: within the bound, and clamped to the norm
}

TEST(ErrorProfile, SmallTensorsAreExact) {
  const size_t n = 3000;  // < kTopKSmallN: sorted squares
  for (bool ties : {false, true}) {
    const auto g = random_vector(n, 22, ties);
    const auto s = random_vector(n, 23, ties);
    const std::vector<int64_t> ks = {0, 1, 30, 1500, 2999, 3000, 30};
    std::vector<double> errors(ks.size(), -1.0);
    const auto st = kimad::cpu::error_profile(g.data(), s.data(), n, Feedback::kEF, ks.data(),
                                              static_cast<int64_t>(ks.size()), errors.data());
    for (size_t r = 0; r < ks.size(); ++r) {
      const double exact = exact_error(g, s, Feedback::kEF, ks[r]);
      EXPECT_NEAR(errors[r], exact, 1e-12 * (1.0 + exact)) << "k=" << ks[r];
    }
    EXPECT_EQ(errors[0], st.sq_norm);
  }
}

TEST(ErrorProfile, NoCandidatesGiveTheNormOnly) {
  for (size_t n : {size_t{100}, size_t{300000}}) {
    const auto g = random_vector(n, 24, false);
    const auto s = random_vector(n, 25, false);
    const auto st = kimad::cpu::error_profile(g.data(), s.data(), static_cast<int64_t>(n), Feedback::kEF21,
                                              nullptr, 0, nullptr);
    EXPECT_EQ(st.non_finite, 0);
    EXPECT_NEAR(st.sq_norm, exact_error(g, s, Feedback::kEF21, 0), 1e-12 * st.sq_norm) << "n=" << n;
  }
}

TEST(ErrorProfile, KeptHistogramMakesTheSameEncode) {
  // Single-segment and threaded sizes, heavy ties, EF and EF21: the encode reusing the profile's
  // histogram equals the one that builds its own.
  for (size_t n : {size_t{5000}, size_t{70000}, size_t{400000}}) {
    for (Feedback mode : {Feedback::kEF, Feedback::kEF21}) {
      const auto g = random_vector(n, 26, n == 70000);
      const auto s = random_vector(n, 27, n == 70000);
      const int64_t k = static_cast<int64_t>(n) / 50;
      kimad::TopKHistogram kept;
      double err = -1.0;
      kimad::cpu::error_profile(g.data(), s.data(), static_cast<int64_t>(n), mode, &k, 1, &err, &kept);
      ASSERT_GT(kept.segments, 0) << "n=" << n;
      std::vector<float> s_reuse = s;
      Encoded got;
      got.values.assign(k, -1.0f);
      got.indices.assign(k, -1);
      const auto st = kimad::cpu::topk_encode(g.data(), s_reuse.data(), static_cast<int64_t>(n), mode, k,
                                              got.values.data(), got.indices.data(), &kept);
      got.state = s_reuse;
      got.sq_error = st.sq_error;
      const auto want = reference(g, s, mode, k);
      expect_same(got, want);
      EXPECT_GE(err, want.sq_error * (1 - 1e-12));
    }
  }
}

TEST(ErrorProfile, AHistogramOfAnotherSizeOrModeIsIgnored) {
  const auto g = random_vector(80000, 28, false);
  const auto s = random_vector(80000, 29, false);
  const int64_t k = 800;
  kimad::TopKHistogram other;
  double err;
  kimad::cpu::error_profile(g.data(), s.data(), 60000, Feedback::kEF21, &k, 1, &err, &other);  // a prefix
  for (Feedback mode : {Feedback::kEF, Feedback::kEF21}) {
    Encoded got;
    got.values.assign(k, -1.0f);
    got.indices.assign(k, -1);
    got.state = s;
    got.sq_error = kimad::cpu::topk_encode(g.data(), got.state.data(), 80000, mode, k, got.values.data(),
                                           got.indices.data(), &other).sq_error;
    expect_same(got, reference(g, s, mode, k));
  }
}

TEST(TopKEncode, SortAndHistogramPathsMatchReferenceAroundTheThreshold) {
  for (size_t n : {size_t{4095}, size_t{4096}, size_t{4097}, size_t{20000}}) {
    for (bool ties : {false, true}) {
      const auto g = random_vector(n, 30, ties);
      const auto s = random_vector(n, 31, ties);
      for (int64_t k : {int64_t{0}, int64_t{1}, static_cast<int64_t>(n) / 100, static_cast<int64_t>(n) / 2,
                        static_cast<int64_t>(n)}) {
        expect_same(encode(g, s, Feedback::kEF21, k), reference(g, s, Feedback::kEF21, k));
      }
    }
  }
}

TEST(ErrorProfile, NonFiniteInputIsReported) {
  // The sorted path, the histogram path (which then keeps nothing) and the norm-only path.
  for (size_t n : {size_t{2}, size_t{300000}}) {
    std::vector<float> g(n, 1.0f);
    g[n - 1] = std::numeric_limits<float>::infinity();
    std::vector<float> s(n, 0.0f);
    const int64_t k = 1;
    double err = -1.0;
    kimad::TopKHistogram kept;
    auto st = kimad::cpu::error_profile(g.data(), s.data(), static_cast<int64_t>(n), Feedback::kEF, &k, 1, &err,
                                        &kept);
    EXPECT_EQ(st.non_finite, 1);
    EXPECT_EQ(err, -1.0);
    EXPECT_EQ(kept.segments, 0);
    st = kimad::cpu::error_profile(g.data(), s.data(), static_cast<int64_t>(n), Feedback::kEF, nullptr, 0, nullptr);
    EXPECT_EQ(st.non_finite, 1);
  }
}

}  // namespace
