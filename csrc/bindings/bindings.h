// Shared declarations of the kimad._C bindings: each op family binds itself from its own file.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>

#include "kimad/topk.h"  // Feedback, Grad

namespace kimad {
namespace bindings {

void bind_accumulate(pybind11::module_& m);
void bind_topk(pybind11::module_& m);
void bind_knapsack(pybind11::module_& m);
void bind_quant(pybind11::module_& m);
void bind_fit(pybind11::module_& m);
// (each new op family adds its bind_* declaration above this line)

// The error-feedback mode of an op's `mode` argument: 0 = EF, 1 = EF21.
inline Feedback feedback_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (EF) or 1 (EF21), got ", mode);
  return mode == 0 ? Feedback::kEF : Feedback::kEF21;
}

// A gradient and its error-feedback state, as every fused feedback op takes them: contiguous, of one
// size on one device, addressable with int32 indices; grad float32, float16 or bfloat16 (read
// natively, see kimad/grad.h), state float32.
inline void check_grad_state(const char* op, const torch::Tensor& grad, const torch::Tensor& state) {
  const auto g = grad.scalar_type();
  TORCH_CHECK((g == torch::kFloat32 || g == torch::kFloat16 || g == torch::kBFloat16) &&
                  state.scalar_type() == torch::kFloat32,
              op, ": grad must be float32, float16 or bfloat16 and state float32, got ", g, " and ",
              state.scalar_type());
  TORCH_CHECK(grad.is_contiguous() && state.is_contiguous(), op, ": grad and state must be contiguous");
  TORCH_CHECK(grad.numel() == state.numel(), op, ": grad has ", grad.numel(), " elements but state has ",
              state.numel());
  TORCH_CHECK(grad.device() == state.device(), op, ": grad and state must be on one device");
  TORCH_CHECK(grad.numel() <= std::numeric_limits<int32_t>::max(), op, ": ", grad.numel(),
              " elements exceed int32 indexing");
}

// The kernels' view of a gradient checked by check_grad_state.
inline Grad grad_of(const torch::Tensor& grad) {
  switch (grad.scalar_type()) {
    case torch::kFloat16: return Grad(grad.data_ptr(), GradType::kFloat16);
    case torch::kBFloat16: return Grad(grad.data_ptr(), GradType::kBFloat16);
    default: return Grad(grad.data_ptr<float>());
  }
}

}  // namespace bindings
}  // namespace kimad
