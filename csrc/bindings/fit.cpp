// Binding of the bandwidth estimator's robust fit (csrc/kernels/cpu/fit.cpp).
#include <tuple>

#include "bindings.h"
#include "kimad/fit.h"

namespace kimad {
namespace bindings {
namespace {

// Returns (latency_s, seconds_per_bit, joint, u): the fit of kimad/fit.h and its robust weights (float64, n).
std::tuple<double, double, bool, torch::Tensor> estimator_fit(
    const torch::Tensor& samples, const torch::Tensor& weights, double recent_from_step, double held_latency_s,
    double held_bandwidth_bps, bool joint, double outlier_cutoff, double huber_c, int64_t huber_iters,
    int64_t tukey_iters, double scale_memory, double choice_memory, double fast_penalty, double tolerance,
    double identifiable_tol, double scale_samples, double min_rel_scale) {
  TORCH_CHECK(samples.scalar_type() == torch::kFloat64 && weights.scalar_type() == torch::kFloat64,
              "estimator_fit: samples and weights must be float64, got ", samples.scalar_type(), " and ",
              weights.scalar_type());
  TORCH_CHECK(samples.is_cpu() && weights.is_cpu(), "estimator_fit: samples and weights must be CPU tensors");
  TORCH_CHECK(samples.dim() == 2 && samples.size(1) == 4, "estimator_fit: samples must be n x 4 rows (T, X, y, step)");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == samples.size(0), "estimator_fit: ", samples.size(0),
              " samples but weights of shape ", weights.sizes());
  TORCH_CHECK(samples.is_contiguous() && weights.is_contiguous(), "estimator_fit: samples and weights must be contiguous");
  TORCH_CHECK(huber_iters >= 0 && huber_iters <= 1000 && tukey_iters >= 0 && tukey_iters <= 1000,
              "estimator_fit: huber_iters and tukey_iters must be in [0, 1000]");
  cpu::FitSettings settings;
  settings.outlier_cutoff = outlier_cutoff;
  settings.huber_c = huber_c;
  settings.huber_iters = static_cast<int32_t>(huber_iters);
  settings.tukey_iters = static_cast<int32_t>(tukey_iters);
  settings.scale_memory = scale_memory;
  settings.choice_memory = choice_memory;
  settings.fast_penalty = fast_penalty;
  settings.tolerance = tolerance;
  settings.identifiable_tol = identifiable_tol;
  settings.scale_samples = scale_samples;
  settings.min_rel_scale = min_rel_scale;
  const int64_t n = samples.size(0);
  auto u = torch::zeros({n}, torch::kFloat64);
  cpu::FitResult result;
  cpu::FitStatus status;
  {
    pybind11::gil_scoped_release release;
    status = cpu::robust_fit(samples.data_ptr<double>(), weights.data_ptr<double>(), n, recent_from_step,
                             held_latency_s, held_bandwidth_bps, joint, settings, &result, u.data_ptr<double>());
  }
  TORCH_CHECK(status == cpu::FitStatus::kOk,
              "estimator_fit: malformed input (needs >= 1 sample; T, X and weights finite and >= 0, y finite and > 0; "
              "held latency finite and >= 0, held bandwidth finite and > 0; settings positive)");
  return {result.latency_s, result.seconds_per_bit, result.joint, u};
}

}  // namespace

void bind_fit(pybind11::module_& m) {
  m.def("estimator_fit", &estimator_fit,
        "The bandwidth estimator's robust alpha-beta fit (kimad/fit.h): (latency_s, seconds_per_bit, joint, u).",
        pybind11::arg("samples"), pybind11::arg("weights"), pybind11::arg("recent_from_step"),
        pybind11::arg("held_latency_s"), pybind11::arg("held_bandwidth_bps"), pybind11::arg("joint"),
        pybind11::arg("outlier_cutoff"), pybind11::arg("huber_c"), pybind11::arg("huber_iters"),
        pybind11::arg("tukey_iters"), pybind11::arg("scale_memory"), pybind11::arg("choice_memory"),
        pybind11::arg("fast_penalty"), pybind11::arg("tolerance"), pybind11::arg("identifiable_tol"),
        pybind11::arg("scale_samples"), pybind11::arg("min_rel_scale"));
}

}  // namespace bindings
}  // namespace kimad
