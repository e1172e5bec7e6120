// Bindings of the fused error feedback + top-k encode and the error profile
// (csrc/kernels/*/topk.*).
#include <limits>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "kimad/topk.h"

#ifdef KIMAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kimad/topk_cuda.h"
#endif

namespace kimad {
namespace bindings {
namespace {

// Returns (non_finite, sq_norm, sq_error); values/indices are written only when non_finite == 0.
// `histogram` (may be None): kept by error_profile for this same (grad, state), see kimad/topk.h.
std::tuple<int64_t, double, double> topk_encode(const torch::Tensor& grad, torch::Tensor state, int64_t k,
                                                int64_t mode, torch::Tensor values, torch::Tensor indices,
                                                const TopKHistogram* histogram) {
  check_grad_state("topk_encode", grad, state);
  const int64_t n = grad.numel();
  TORCH_CHECK(k >= 0 && k <= n, "topk_encode: k=", k, " must be in [0, ", n, "]");
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && indices.scalar_type() == torch::kInt32,
              "topk_encode: values must be float32 and indices int32");
  TORCH_CHECK(values.dim() == 1 && indices.dim() == 1 && values.numel() == k && indices.numel() == k,
              "topk_encode: values and indices must be 1-D with k=", k, " elements");
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous(), "topk_encode: values and indices must be contiguous");
  TORCH_CHECK(values.device() == grad.device() && indices.device() == grad.device(),
              "topk_encode: values and indices must be on grad's device");
  const Feedback fb = feedback_mode("topk", mode);
  TopKStats st{};
  if (grad.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    C10_CUDA_CHECK(cuda::topk_encode(grad_of(grad), state.data_ptr<float>(), n, fb, k,
                                     values.data_ptr<float>(), indices.data_ptr<int32_t>(), &st,
                                     at::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "topk_encode: kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  } else {
    TORCH_CHECK(grad.is_cpu(), "topk_encode: unsupported device ", grad.device());
    st = cpu::topk_encode(grad_of(grad), state.data_ptr<float>(), n, fb, k, values.data_ptr<float>(),
                          indices.data_ptr<int32_t>(), histogram);
  }
  return {st.non_finite, st.sq_norm, st.sq_error};
}

// Returns (non_finite, sq_norm, errors, kept); errors is meaningful only when non_finite == 0; kept:
// whether `histogram` (may be None; CPU only) now holds the pass-1 histogram for topk_encode.
std::tuple<int64_t, double, std::vector<double>, bool> error_profile(const torch::Tensor& grad,
                                                                     const torch::Tensor& state,
                                                                     const std::vector<int64_t>& ks, int64_t mode,
                                                                     TopKHistogram* histogram) {
  check_grad_state("error_profile", grad, state);
  const int64_t n = grad.numel();
  for (int64_t k : ks) TORCH_CHECK(k >= 0 && k <= n, "error_profile: k=", k, " must be in [0, ", n, "]");
  const Feedback fb = feedback_mode("topk", mode);
  std::vector<double> errors(ks.size(), 0.0);
  TopKStats st{};
  if (grad.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    std::vector<uint32_t> counts(kTopKBins);
    std::vector<double> sums(kTopKBins);
    C10_CUDA_CHECK(cuda::key_histogram(grad_of(grad), state.data_ptr<float>(), n, fb, counts.data(),
                                       sums.data(), &st, at::cuda::getCurrentCUDAStream()));
    if (st.non_finite == 0) {
      cpu::profile_from_histogram(counts.data(), st.sq_norm, ks.data(), static_cast<int64_t>(ks.size()),
                                  errors.data());
    }
#else
    TORCH_CHECK(false, "error_profile: kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  } else {
    TORCH_CHECK(grad.is_cpu(), "error_profile: unsupported device ", grad.device());
    st = cpu::error_profile(grad_of(grad), state.data_ptr<float>(), n, fb, ks.data(),
                            static_cast<int64_t>(ks.size()), errors.data(), histogram);
  }
  if (histogram != nullptr && grad.is_cuda()) {  // nothing kept on the GPU: mark the buffer refilled, empty
    histogram->segments = 0;
    ++histogram->generation;
  }
  return {st.non_finite, st.sq_norm, errors, histogram != nullptr && histogram->segments > 0};
}

}  // namespace

void bind_topk(pybind11::module_& m) {
  pybind11::class_<TopKHistogram>(m, "TopKHistogram",
                                  "Opaque pass-1 histogram: filled by error_profile, reused by topk_encode.")
      .def(pybind11::init<>())
      .def_property_readonly("generation", [](const TopKHistogram& h) { return h.generation; })
      .def_property_readonly("numel", [](const TopKHistogram& h) { return h.n; })
      .def_property_readonly("nbytes", [](const TopKHistogram& h) {
        return static_cast<int64_t>((h.counts.size() + h.seg_counts.size()) * sizeof(uint32_t));
      });
  m.def("topk_encode", &topk_encode, pybind11::arg("grad"), pybind11::arg("state"), pybind11::arg("k"),
        pybind11::arg("mode"), pybind11::arg("values"), pybind11::arg("indices"),
        pybind11::arg("histogram").none(true) = pybind11::none(),
        "Exact top-k of v = grad + state (mode 0, EF) or grad - state (mode 1, EF21) into values (float32, k) "
        "and indices (int32, k, ascending), updating state in place. Returns (non_finite, sq_norm, sq_error); "
        "when non_finite > 0 nothing was written. histogram: one error_profile filled for this same, unchanged "
        "(grad, state), whose first pass the encode then skips (ignored if its size, mode or threads differ).",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("error_profile", &error_profile, pybind11::arg("grad"), pybind11::arg("state"), pybind11::arg("ks"),
        pybind11::arg("mode"), pybind11::arg("histogram").none(true) = pybind11::none(),
        "||v - TopK_k(v)||^2 for each k in ks from one histogram pass. Returns (non_finite, sq_norm, errors, "
        "kept): kept when `histogram` (CPU) now holds the pass for topk_encode's `histogram` argument.",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace bindings
}  // namespace kimad
