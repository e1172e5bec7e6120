// Specification of the bandwidth estimator's robust fit (kimad::cpu::robust_fit).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kimad/fit.h"

namespace {

using kimad::cpu::FitResult;
using kimad::cpu::FitSettings;
using kimad::cpu::FitStatus;
using kimad::cpu::robust_fit;

// Rows (T, X, y, step) of a ring allgather at 4 ranks (T = 3) timed on a link of `latency` s and `rate` bits/s:
// two messages a step (one large, one small), multiplicative noise `noise`, and weights halving every 5 steps.
struct Window {
  std::vector<double> rows, w;
  int64_t n() const { return static_cast<int64_t>(w.size()); }
};

Window make_window(int steps, double latency, double rate, double noise, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, noise);
  std::uniform_real_distribution<double> size(1e5, 3e6);
  Window win;
  for (int step = 0; step < steps; ++step) {
    for (const double bits : {size(gen), 12096.0}) {
      const double y = (3 * latency + bits / rate) * std::exp(noise > 0 ? normal(gen) : 0.0);
      win.rows.insert(win.rows.end(), {3.0, bits, y, static_cast<double>(step)});
      win.w.push_back(std::pow(0.5, (steps - 1 - step) / 5.0));
    }
  }
  return win;
}

FitResult fit(const Window& win, std::vector<double>* u, bool joint = true, double held_latency = 50e-6,
              double held_rate = 1e9) {
  FitResult result;
  u->assign(win.w.size(), -1.0);
  EXPECT_EQ(robust_fit(win.rows.data(), win.w.data(), win.n(), win.w.size() / 2.0 - 5.0, held_latency, held_rate,
                       joint, FitSettings{}, &result, u->data()),
            FitStatus::kOk);
  return result;
}

TEST(RobustFit, RecoversLatencyAndBandwidthFromNoiseFreeSamples) {
  const Window win = make_window(40, 2e-3, 100e6, 0.0, 1);
  std::vector<double> u;
  const FitResult r = fit(win, &u);
  EXPECT_TRUE(r.joint);
  EXPECT_NEAR(r.latency_s, 2e-3, 2e-3 * 1e-3);
  EXPECT_NEAR(1.0 / r.seconds_per_bit, 100e6, 100e6 * 1e-3);
  for (const double x : u) EXPECT_GT(x, 0.0);
}

TEST(RobustFit, IgnoresStalledSamples) {
  Window win = make_window(60, 1e-3, 20e6, 0.05, 2);
  for (int64_t i = 0; i < win.n(); i += 9) win.rows[4 * i + 2] *= 4.0;  // every 9th sample stalled 4x
  std::vector<double> u;
  const FitResult r = fit(win, &u);
  EXPECT_NEAR(1.0 / r.seconds_per_bit, 20e6, 20e6 * 0.05);
  for (int64_t i = 0; i < win.n(); i += 9) EXPECT_EQ(u[i], 0.0) << "stalled sample " << i << " kept";
}

TEST(RobustFit, HoldsTheLatencyWhenNotJoint) {
  const Window win = make_window(30, 1e-3, 50e6, 0.0, 3);
  std::vector<double> u;
  const FitResult r = fit(win, &u, /*joint=*/false, /*held_latency=*/1e-3);
  EXPECT_FALSE(r.joint);
  EXPECT_DOUBLE_EQ(r.latency_s, 1e-3);
  EXPECT_NEAR(1.0 / r.seconds_per_bit, 50e6, 50e6 * 1e-3);
}

TEST(RobustFit, ZeroByteSamplesMeasureLatencyAlone) {
  Window win;
  for (int step = 0; step < 10; ++step) {
    win.rows.insert(win.rows.end(), {3.0, 0.0, 3 * 4e-4, static_cast<double>(step)});
    win.w.push_back(1.0);
  }
  std::vector<double> u;
  const FitResult r = fit(win, &u, true, 1e-4, 1e8);
  EXPECT_NEAR(r.latency_s, 4e-4, 4e-4 * 1e-6);
  EXPECT_DOUBLE_EQ(1.0 / r.seconds_per_bit, 1e8);  // (the held bandwidth: nothing measured it)
}

TEST(RobustFit, RefusesMalformedInput) {
  const Window good = make_window(5, 1e-3, 1e8, 0.0, 4);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  FitResult r;
  std::vector<double> u(good.w.size());
  auto status = [&](const Window& win, double held_latency, double held_rate, FitSettings s) {
    return robust_fit(win.rows.data(), win.w.data(), win.n(), 0.0, held_latency, held_rate, true, s, &r, u.data());
  };
  EXPECT_EQ(status(good, 1e-3, 1e8, {}), FitStatus::kOk);
  for (const int col : {0, 1, 2}) {
    for (const double bad : {nan, -1.0, std::numeric_limits<double>::infinity()}) {
      Window win = good;
      win.rows[4 * 2 + col] = bad;
      EXPECT_EQ(status(win, 1e-3, 1e8, {}), FitStatus::kBadInput) << "column " << col << " = " << bad;
    }
  }
  Window zero_time = good;
  zero_time.rows[2] = 0.0;
  EXPECT_EQ(status(zero_time, 1e-3, 1e8, {}), FitStatus::kBadInput);
  Window bad_weight = good;
  bad_weight.w[1] = nan;
  EXPECT_EQ(status(bad_weight, 1e-3, 1e8, {}), FitStatus::kBadInput);
  EXPECT_EQ(status(good, nan, 1e8, {}), FitStatus::kBadInput);
  EXPECT_EQ(status(good, 1e-3, 0.0, {}), FitStatus::kBadInput);
  FitSettings bad_settings;
  bad_settings.min_rel_scale = 0.0;
  EXPECT_EQ(status(good, 1e-3, 1e8, bad_settings), FitStatus::kBadInput);
  EXPECT_EQ(robust_fit(good.rows.data(), good.w.data(), 0, 0.0, 1e-3, 1e8, true, {}, &r, u.data()),
            FitStatus::kBadInput);
}

}  // namespace
