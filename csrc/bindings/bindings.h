// Shared declarations of the kimad._C bindings: each op family binds itself from its own file.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <limits>

#include "kimad/topk.h"  // Feedback

namespace kimad {
namespace bindings {

void bind_accumulate(pybind11::module_& m);
void bind_topk(pybind11::module_& m);
void bind_knapsack(pybind11::module_& m);
void bind_quant(pybind11::module_& m);
// (each new op family adds its bind_* declaration above this line)

// The error-feedback mode of an op's `mode` argument: 0 = EF, 1 = EF21.
inline Feedback feedback_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode == 0 || mode == 1, op, ": mode must be 0 (EF) or 1 (EF21), got ", mode);
  return mode == 0 ? Feedback::kEF : Feedback::kEF21;
}

// A gradient and its error-feedback state, as every fused feedback op takes them: contiguous float32
// of one size on one device, addressable with int32 indices.
inline void check_grad_state(const char* op, const torch::Tensor& grad, const torch::Tensor& state) {
  TORCH_CHECK(grad.scalar_type() == torch::kFloat32 && state.scalar_type() == torch::kFloat32, op,
              ": grad and state must be float32, got ", grad.scalar_type(), " and ", state.scalar_type());
  TORCH_CHECK(grad.is_contiguous() && state.is_contiguous(), op, ": grad and state must be contiguous");
  TORCH_CHECK(grad.numel() == state.numel(), op, ": grad has ", grad.numel(), " elements but state has ",
              state.numel());
  TORCH_CHECK(grad.device() == state.device(), op, ": grad and state must be on one device");
  TORCH_CHECK(grad.numel() <= std::numeric_limits<int32_t>::max(), op, ": ", grad.numel(),
              " elements exceed int32 indexing");
}

}  // namespace bindings
}  // namespace kimad
