// Bindings of the QSGD / scaled-sign encoders with error feedback, their decoder and error
// estimate (csrc/kernels/*/quant.*).
#include <array>
#include <limits>
#include <tuple>

#include "bindings.h"
#include "kimad/quant.h"

#ifdef KIMAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kimad/quant_cuda.h"
#endif

namespace kimad {
namespace bindings {
namespace {

void check_pair(const char* op, const torch::Tensor& grad, const torch::Tensor& state, int64_t bucket) {
  check_grad_state(op, grad, state);
  TORCH_CHECK(bucket >= 1, op, ": bucket must be >= 1, got ", bucket);
}

void check_payload(const char* op, const torch::Tensor& payload, const torch::Tensor& like, int64_t bytes) {
  TORCH_CHECK(payload.scalar_type() == torch::kUInt8 && payload.dim() == 1 && payload.is_contiguous(), op,
              ": payload must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(payload.numel() == bytes, op, ": payload has ", payload.numel(), " bytes, the message needs ", bytes);
  TORCH_CHECK(payload.device() == like.device(), op, ": payload must be on grad's device");
}

// Returns (non_finite, sq_norm, sq_error); payload is written only when non_finite == 0.
std::tuple<int64_t, double, double> encode(const char* op, const torch::Tensor& grad, torch::Tensor state, int bits,
                                           int64_t bucket, uint64_t seed, int64_t mode, torch::Tensor payload) {
  check_pair(op, grad, state, bucket);
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, op, ": bits must be 8, 4 or 2, got ", bits);
  const int64_t n = grad.numel();
  check_payload(op, payload, grad, quant_message_bytes(n, bits, bucket));
  TORCH_CHECK(quant_bucket_fits(n, bucket), op, ": bucket=", bucket, " does not fit the header's 16-bit field (at most ",
              0xFFFF, " unless >= numel=", n, ")");
  const Feedback fb = feedback_mode(op, mode);
  QuantStats st{};
  if (grad.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    C10_CUDA_CHECK(cuda::quant_encode(grad_of(grad), state.data_ptr<float>(), n, fb, bits, bucket, seed,
                                      payload.data_ptr<uint8_t>(), &st, at::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, op, ": kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  } else {
    TORCH_CHECK(grad.is_cpu(), op, ": unsupported device ", grad.device());
    st = bits == 1 ? cpu::sign_encode(grad_of(grad), state.data_ptr<float>(), n, fb, bucket,
                                      payload.data_ptr<uint8_t>())
                   : cpu::qsgd_encode(grad_of(grad), state.data_ptr<float>(), n, fb, bits, bucket, seed,
                                      payload.data_ptr<uint8_t>());
  }
  return {st.non_finite, st.sq_norm, st.sq_error};
}

std::tuple<int64_t, double, double> qsgd_encode(const torch::Tensor& grad, torch::Tensor state, int64_t bits,
                                                int64_t bucket, uint64_t seed, int64_t mode, torch::Tensor payload) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "qsgd_encode: bits must be 8, 4 or 2, got ", bits);
  return encode("qsgd_encode", grad, state, static_cast<int>(bits), bucket, seed, mode, payload);
}

std::tuple<int64_t, double, double> sign_encode(const torch::Tensor& grad, torch::Tensor state, int64_t bucket,
                                                int64_t mode, torch::Tensor payload) {
  return encode("sign_encode", grad, state, 1, bucket, 0, mode, payload);
}

// Returns the QuantDecodeStatus code (0: accumulated; otherwise out is untouched).
int64_t quant_decode_accumulate(torch::Tensor out, const torch::Tensor& payload, int64_t bits, int64_t bucket,
                                double scale) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous(),
              "quant_decode_accumulate: out must be a contiguous float32 tensor");
  TORCH_CHECK(payload.scalar_type() == torch::kUInt8 && payload.dim() == 1 && payload.is_contiguous(),
              "quant_decode_accumulate: payload must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(payload.device() == out.device(), "quant_decode_accumulate: payload and out must be on one device");
  TORCH_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "quant_decode_accumulate: bits must be 8, 4, 2 or 1");
  TORCH_CHECK(bucket >= 1, "quant_decode_accumulate: bucket must be >= 1, got ", bucket);
  TORCH_CHECK(out.numel() <= std::numeric_limits<int32_t>::max(), "quant_decode_accumulate: too many elements");
  QuantDecodeStatus status = QuantDecodeStatus::kOk;
  if (out.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    C10_CUDA_CHECK(cuda::quant_decode_accumulate(payload.data_ptr<uint8_t>(), payload.numel(), static_cast<int>(bits),
                                                 out.numel(), bucket, static_cast<float>(scale),
                                                 out.data_ptr<float>(), &status, at::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "quant_decode_accumulate: kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  } else {
    TORCH_CHECK(out.is_cpu(), "quant_decode_accumulate: unsupported device ", out.device());
    status = cpu::quant_decode_accumulate(payload.data_ptr<uint8_t>(), payload.numel(), static_cast<int>(bits),
                                          out.numel(), bucket, static_cast<float>(scale), out.data_ptr<float>());
  }
  return static_cast<int64_t>(status);
}

// Returns (non_finite, sq_norm, [E err qsgd8, qsgd4, qsgd2, sign err]).
std::tuple<int64_t, double, std::array<double, 4>> quant_error_estimate(const torch::Tensor& grad,
                                                                        const torch::Tensor& state, int64_t bucket,
                                                                        int64_t mode) {
  check_pair("quant_error_estimate", grad, state, bucket);
  const Feedback fb = feedback_mode("quant_error_estimate", mode);
  std::array<double, 4> errors{0.0, 0.0, 0.0, 0.0};
  QuantStats st{};
  if (grad.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    C10_CUDA_CHECK(cuda::quant_error_estimate(grad_of(grad), state.data_ptr<float>(), grad.numel(), fb,
                                              bucket, errors.data(), &st, at::cuda::getCurrentCUDAStream()));
#else
    TORCH_CHECK(false, "quant_error_estimate: kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  } else {
    TORCH_CHECK(grad.is_cpu(), "quant_error_estimate: unsupported device ", grad.device());
    st = cpu::quant_error_estimate(grad_of(grad), state.data_ptr<float>(), grad.numel(), fb, bucket,
                                   errors.data());
  }
  return {st.non_finite, st.sq_norm, errors};
}

torch::Tensor uniform_draws(uint64_t seed, int64_t n) {
  TORCH_CHECK(n >= 0 && n <= std::numeric_limits<uint32_t>::max(), "uniform_draws: n=", n, " out of range");
  torch::Tensor out = torch::empty({n}, torch::kFloat32);
  cpu::uniform_draws(seed, n, out.data_ptr<float>());
  return out;
}

}  // namespace

void bind_quant(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("quant_message_bytes", [](int64_t n, int64_t bits, int64_t bucket) {
          TORCH_CHECK(n >= 0 && bucket >= 1 && (bits == 1 || bits == 2 || bits == 4 || bits == 8),
                      "quant_message_bytes: bad arguments");
          return quant_message_bytes(n, static_cast<int>(bits), bucket);
        },
        py::arg("n"), py::arg("bits"), py::arg("bucket"),
        "Exact bytes of a QSGD (bits 8/4/2) or sign (bits 1) message of n elements.");
  m.def("qsgd_encode", &qsgd_encode, py::arg("grad"), py::arg("state"), py::arg("bits"), py::arg("bucket"),
        py::arg("seed"), py::arg("mode"), py::arg("payload"),
        "QSGD of v = grad + state (mode 0, EF) or grad - state (mode 1, EF21) into payload (uint8), updating "
        "state in place. Returns (non_finite, sq_norm, sq_error); when non_finite > 0 nothing was written.",
        py::call_guard<py::gil_scoped_release>());
  m.def("sign_encode", &sign_encode, py::arg("grad"), py::arg("state"), py::arg("bucket"), py::arg("mode"),
        py::arg("payload"), "Scaled sign of v into payload, updating state. Returns (non_finite, sq_norm, sq_error).",
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_decode_accumulate", &quant_decode_accumulate, py::arg("out"), py::arg("payload"), py::arg("bits"),
        py::arg("bucket"), py::arg("scale"),
        "out += scale * decode(payload) (bits 1 = sign). Returns 0, or the reason (1 length, 2 numel, 3 format, "
        "4 scale) the message was refused with out untouched.",
        py::call_guard<py::gil_scoped_release>());
  m.def("quant_error_estimate", &quant_error_estimate, py::arg("grad"), py::arg("state"), py::arg("bucket"),
        py::arg("mode"), "Expected QSGD squared errors (bits 8, 4, 2) and the sign squared error, one pass.",
        py::call_guard<py::gil_scoped_release>());
  m.def("uniform_draws", &uniform_draws, py::arg("seed"), py::arg("n"),
        "The n counter-based U[0,1) draws the QSGD encoder uses under seed (float32).",
        py::call_guard<py::gil_scoped_release>());
}

}  // namespace bindings
}  // namespace kimad
