// The bandwidth estimator's robust alpha-beta fit: steps 2-4 of the docstring of kimad/control/estimator.py
// (kimad.control.BandwidthEstimator), which keeps the samples, the forgetting weights, the change-point test
// and the latency hold, and calls this for every fit.
//
// Torch-free, on raw pointers. Every sample is a row (T, X, y, step): T latency terms, X wire bits, y measured
// seconds (> 0). The model is y ~ alpha * T + beta * X (alpha: latency, seconds; beta: seconds per bit). Dividing
// each row by y, a = T / y and b = X / y (each scaled by its largest value, for well-conditioned 2x2 normal
// equations) and the fit reads 1 ~ alpha * a + beta * b; the log residual of a sample is r = -log(q), q = alpha * a +
// beta * b (predicted over measured time).
//
// Three starts -- weighted least squares of the whole window (weights w) and of its recent part (w, zero for samples
// before `recent_from_step`), each followed by Huber iterations, and the last estimate (held_latency_s,
// held_bandwidth_bps) -- each lead Tukey biweight iterations with weights w. Every iteration is one Gauss-Newton
// step on the log residual, with robust weights from |r| over the noise scale: the spread between the 5% and 30%
// weighted quantiles of r over 1.12 (weights w ** (1 / scale_memory) of the run's base weights), and, while those
// weights count fewer than `scale_samples` (Kish), at least 1.4826 times the weighted MAD of r about its median;
// floored at `min_rel_scale`. A run of iterations ends once a step moves alpha and beta (scaled) by at most
// `tolerance` in all and keeps the joint/held status. The kept fit has the smallest weighted median (weights
// w ** (1 / choice_memory)) of r where r > 0 and -fast_penalty * r where r < 0; the first start wins ties.
// Solutions must be physical (alpha >= 0, beta > 0): failing that, or when the columns are collinear
// (1 - cos^2 < identifiable_tol) or `joint` is false, alpha is held at held_latency_s, then at 0.
//
// It computes what the NumPy fit it replaced computed, to rounding: sums run in another order, so a decision at a
// threshold (a converged step, a Tukey cut-off) may fall the other way, moving the result by about `tolerance`.
#pragma once

#include <cstdint>

namespace kimad {
namespace cpu {

struct FitSettings {
  double outlier_cutoff = 5.0;     // Tukey: samples this many noise scales off the fit get weight 0
  double huber_c = 1.345;          // Huber's constant
  int32_t huber_iters = 15;        // at most this many Huber iterations per start
  int32_t tukey_iters = 10;        // ... and Tukey iterations
  double scale_memory = 3.0;       // noise-scale weights: w ** (1 / scale_memory)
  double choice_memory = 2.0;      // weights choosing among the starts' fits: w ** (1 / choice_memory)
  double fast_penalty = 2.0;       // choosing a fit, a sample faster than it counts this much more
  double tolerance = 1e-4;         // a run of iterations ends once a step moves (scaled) alpha + beta this little
  double identifiable_tol = 1e-4;  // 1 - cos^2 of the two columns below which the latency is not identified
  double scale_samples = 12.0;     // Kish count below which the noise scale is at least 1.4826 * MAD
  double min_rel_scale = 1e-3;     // floor of the noise scale (log units)
};

struct FitResult {
  double latency_s = 0.0;        // alpha
  double seconds_per_bit = 0.0;  // beta = 1 / bandwidth
  bool joint = false;            // whether the latency was fitted (else held, or 0)
};

enum class FitStatus : int32_t {
  kOk = 0,
  kBadInput = 1,  // n < 1, a NaN/infinite/non-positive y, a NaN/infinite/negative T, X or weight,
                  // held_bandwidth_bps not finite and > 0, held_latency_s not finite and >= 0, bad settings
};

// The robust fit described above.
//   samples[4 * n]   rows (T, X, y, step), row-major
//   w[n]             forgetting weights (finite, >= 0)
//   u[n]             out: the kept fit's robust weights (0: an outlier)
FitStatus robust_fit(const double* samples, const double* w, int64_t n, double recent_from_step,
                     double held_latency_s, double held_bandwidth_bps, bool joint, const FitSettings& settings,
                     FitResult* result, double* u);

}  // namespace cpu
}  // namespace kimad
