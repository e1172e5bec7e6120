// The bandwidth estimator's robust alpha-beta fit (see kimad/fit.h).
#include "kimad/fit.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace kimad {
namespace cpu {
namespace {

struct Line {
  double alpha, beta;
  bool joint;
};

class Fitter {
 public:
  Fitter(const double* samples, const double* w, int64_t n, double held_latency_s, double held_bandwidth_bps,
         bool joint, const FitSettings& settings)
      : s_(settings), n_(n), w_(w, w + n), a_(n), b_(n) {
    for (int64_t i = 0; i < n; ++i) {
      a_[i] = samples[4 * i] / samples[4 * i + 2];
      b_[i] = samples[4 * i + 1] / samples[4 * i + 2];
    }
    ca_ = *std::max_element(a_.begin(), a_.end());
    cb_ = *std::max_element(b_.begin(), b_.end());
    if (ca_ == 0.0) ca_ = 1.0;  // (zero-byte samples only: b is all 0; no latency terms: a is)
    if (cb_ == 0.0) cb_ = 1.0;
    for (int64_t i = 0; i < n; ++i) {
      a_[i] /= ca_;
      b_[i] /= cb_;
    }
    held_ = {held_latency_s * ca_, cb_ / held_bandwidth_bps, false};
    double saa = 0.0, sbb = 0.0, sab = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      saa += a_[i] * a_[i] * w_[i];
      sbb += b_[i] * b_[i] * w_[i];
      sab += a_[i] * b_[i] * w_[i];
    }
    identifiable_ = joint && saa > 0 && sbb > 0 && 1.0 - sab * sab / (saa * sbb) >= s_.identifiable_tol;
    r_.resize(n);
    q_.resize(n);
    scratch_.resize(n);
    solve_w_.resize(n);
    target_.resize(n);
    order_.resize(n);
    cum_.resize(n);
  }

  // Steps 2-4 from the three starts; returns the kept fit (scaled back) and its robust weights in `u`.
  FitResult run(const double* samples, double recent_from_step, double* u) {
    std::vector<double> recent(n_), choice_w(n_), base_u, best_u;
    for (int64_t i = 0; i < n_; ++i) {
      recent[i] = samples[4 * i + 3] >= recent_from_step ? w_[i] : 0.0;
      choice_w[i] = std::pow(w_[i], 1.0 / s_.choice_memory);
    }
    double best_lmeds = 0.0;
    Line best{};
    bool have_best = false;
    const std::vector<double>* bases[3] = {&w_, &recent, nullptr};
    for (const auto* base : bases) {
      Line start = held_;
      if (base != nullptr) {
        start = solve(*base, nullptr);
        start = reweigh(*base, start, s_.huber_iters, false, &base_u);
      }
      std::vector<double> fit_u;
      const Line fit = reweigh(w_, start, s_.tukey_iters, true, &fit_u);
      residuals(fit);
      for (int64_t i = 0; i < n_; ++i) scratch_[i] = r_[i] < 0 ? -s_.fast_penalty * r_[i] : r_[i];
      const double lmeds = weighted_quantile(scratch_, choice_w, 0.5);
      if (!have_best || lmeds < best_lmeds) {
        have_best = true;
        best_lmeds = lmeds;
        best = fit;
        best_u.swap(fit_u);
      }
    }
    std::copy(best_u.begin(), best_u.end(), u);
    return {best.alpha / ca_, best.beta / cb_, best.joint};
  }

 private:
  // Weighted least squares of alpha * a + beta * b against `target` (1 where null), weights `u`; physical
  // solutions only (alpha >= 0, beta > 0), else the held latency, then none.
  Line solve(const std::vector<double>& u, const std::vector<double>* target) const {
    double uaa = 0.0, ubb = 0.0, uab = 0.0, ua = 0.0, ub = 0.0;
    for (int64_t i = 0; i < n_; ++i) {
      const double ut = target == nullptr ? u[i] : u[i] * (*target)[i];
      uaa += a_[i] * a_[i] * u[i];
      ubb += b_[i] * b_[i] * u[i];
      uab += a_[i] * b_[i] * u[i];
      ua += a_[i] * ut;
      ub += b_[i] * ut;
    }
    const double det = uaa * ubb - uab * uab;
    if (identifiable_ && det > 0) {
      const double alpha = (ubb * ua - uab * ub) / det, beta = (uaa * ub - uab * ua) / det;
      if (alpha >= 0 && beta > 0) return {alpha, beta, true};
    }
    if (ubb > 0) {
      for (const double alpha : {held_.alpha, 0.0}) {  // hold the known latency; if that leaves no time for bits, none
        const double beta = (ub - alpha * uab) / ubb;
        if (beta > 0) return {alpha, beta, false};
      }
    }
    if (uaa > 0) return {std::max(0.0, (ua - held_.beta * uab) / uaa), held_.beta, false};  // zero-byte samples only
    return held_;
  }

  // r = -log(q), q = predicted / measured (floored at 1e-12), of every sample under `line`.
  void residuals(const Line& line) {
    for (int64_t i = 0; i < n_; ++i) {
      q_[i] = std::max(line.alpha * a_[i] + line.beta * b_[i], 1e-12);
      r_[i] = -std::log(q_[i]);
    }
  }

  // The smallest x whose cumulative weight, in ascending x, reaches `share` of the total weight.
  double weighted_quantile(const std::vector<double>& x, const std::vector<double>& w, double share) {
    const double shares[1] = {share};
    double out[1];
    weighted_quantiles(x, w, shares, 1, out);
    return out[0];
  }

  void weighted_quantiles(const std::vector<double>& x, const std::vector<double>& w, const double* shares, int count,
                          double* out) {
    std::iota(order_.begin(), order_.end(), int64_t{0});
    std::sort(order_.begin(), order_.end(), [&x](int64_t i, int64_t j) { return x[i] < x[j]; });
    double sum = 0.0;
    for (int64_t i = 0; i < n_; ++i) cum_[i] = sum += w[order_[i]];
    for (int k = 0; k < count; ++k) {
      const auto at = std::lower_bound(cum_.begin(), cum_.end(), shares[k] * sum) - cum_.begin();
      out[k] = x[order_[std::min<int64_t>(at, n_ - 1)]];
    }
  }

  // The robust spread of r (weights `scale_w`), see kimad/fit.h.
  double noise_scale(const std::vector<double>& scale_w, bool few) {
    static constexpr double kShares[3] = {0.05, 0.3, 0.5};
    double q[3];
    weighted_quantiles(r_, scale_w, kShares, 3, q);
    double scale = (q[1] - q[0]) / 1.12;
    if (few) {
      for (int64_t i = 0; i < n_; ++i) scratch_[i] = std::abs(r_[i] - q[2]);
      scale = std::max(scale, 1.4826 * weighted_quantile(scratch_, scale_w, 0.5));
    }
    return std::max(scale, s_.min_rel_scale);
  }

  // Huber (tukey = false) or Tukey biweight iterations from `line` on base weights `base`; `u` gets the robust weights.
  Line reweigh(const std::vector<double>& base, Line line, int iters, bool tukey, std::vector<double>* u) {
    *u = base;
    line.joint = false;
    std::vector<double> scale_w(n_), new_u(n_);
    double sum = 0.0, sum_sq = 0.0;
    for (int64_t i = 0; i < n_; ++i) {
      scale_w[i] = std::pow(base[i], 1.0 / s_.scale_memory);
      sum += scale_w[i];
      sum_sq += scale_w[i] * scale_w[i];
    }
    const bool few = sum * sum < s_.scale_samples * sum_sq;
    const double c = s_.outlier_cutoff;
    for (int it = 0; it < iters; ++it) {
      residuals(line);
      const double scale = noise_scale(scale_w, few);
      bool any = false;
      for (int64_t i = 0; i < n_; ++i) {
        const double t = std::abs(r_[i]) / scale;
        double weight;
        if (tukey) {
          const double x = t / c;
          weight = t < c ? (1.0 - x * x) * (1.0 - x * x) : 0.0;
        } else {
          weight = std::min(1.0, s_.huber_c / std::max(t, 1e-300));
        }
        new_u[i] = base[i] * weight;
        any = any || new_u[i] > 0;
      }
      if (!any) break;  // every sample far off this fit: nothing to refit on
      u->swap(new_u);
      // Gauss-Newton step on the log residual: log q' ~ log q + (q' - q) / q
      for (int64_t i = 0; i < n_; ++i) {
        solve_w_[i] = (*u)[i] / (q_[i] * q_[i]);
        target_[i] = q_[i] * (1.0 + r_[i]);
      }
      const Line step = solve(solve_w_, &target_);
      const bool converged =
          step.joint == line.joint && std::abs(step.alpha - line.alpha) + std::abs(step.beta - line.beta) <= s_.tolerance;
      line = step;
      if (converged) break;
    }
    return line;
  }

  const FitSettings& s_;
  int64_t n_;
  std::vector<double> w_, a_, b_;
  double ca_ = 1.0, cb_ = 1.0;
  Line held_{};
  bool identifiable_ = false;
  std::vector<double> r_, q_, scratch_, solve_w_, target_, cum_;
  std::vector<int64_t> order_;
};

bool finite_at_least(double x, double lo) { return std::isfinite(x) && x >= lo; }

}  // namespace

FitStatus robust_fit(const double* samples, const double* w, int64_t n, double recent_from_step,
                     double held_latency_s, double held_bandwidth_bps, bool joint, const FitSettings& settings,
                     FitResult* result, double* u) {
  if (n < 1 || samples == nullptr || w == nullptr || result == nullptr || u == nullptr) return FitStatus::kBadInput;
  if (!finite_at_least(held_latency_s, 0.0) || !(std::isfinite(held_bandwidth_bps) && held_bandwidth_bps > 0) ||
      std::isnan(recent_from_step)) {
    return FitStatus::kBadInput;
  }
  const FitSettings& s = settings;
  if (!(s.outlier_cutoff > 0) || !(s.huber_c > 0) || s.huber_iters < 0 || s.tukey_iters < 0 || !(s.scale_memory > 0) ||
      !(s.choice_memory > 0) || !(s.fast_penalty > 0) || !finite_at_least(s.tolerance, 0.0) ||
      !finite_at_least(s.identifiable_tol, 0.0) || !finite_at_least(s.scale_samples, 0.0) ||
      !(std::isfinite(s.min_rel_scale) && s.min_rel_scale > 0)) {
    return FitStatus::kBadInput;
  }
  for (int64_t i = 0; i < n; ++i) {
    const double* row = samples + 4 * i;
    if (!finite_at_least(row[0], 0.0) || !finite_at_least(row[1], 0.0) || !(std::isfinite(row[2]) && row[2] > 0) ||
        std::isnan(row[3]) || !finite_at_least(w[i], 0.0)) {
      return FitStatus::kBadInput;
    }
  }
  Fitter fitter(samples, w, n, held_latency_s, held_bandwidth_bps, joint, settings);
  *result = fitter.run(samples, recent_from_step, u);
  return FitStatus::kOk;
}

}  // namespace cpu
}  // namespace kimad
