// Binding of the layerwise allocator's knapsack (csrc/kernels/cpu/knapsack.cpp).
#include <tuple>

#include "bindings.h"
#include "kimad/knapsack.h"

namespace kimad {
namespace bindings {
namespace {

// Returns (feasible, choice): choice is an int64 tensor of one option index per tensor (all -1
// when infeasible, i.e. even the cheapest options exceed `capacity` bins).
std::tuple<bool, torch::Tensor> knapsack_min_error(const torch::Tensor& costs_in_bins, const torch::Tensor& errors,
                                                   const torch::Tensor& offsets, int64_t capacity) {
  TORCH_CHECK(costs_in_bins.scalar_type() == torch::kInt64, "knapsack_min_error: costs_in_bins must be int64, got ",
              costs_in_bins.scalar_type());
  TORCH_CHECK(errors.scalar_type() == torch::kFloat64, "knapsack_min_error: errors must be float64, got ",
              errors.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64, "knapsack_min_error: offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(costs_in_bins.is_cpu() && errors.is_cpu() && offsets.is_cpu(),
              "knapsack_min_error: costs_in_bins, errors and offsets must be CPU tensors");
  TORCH_CHECK(costs_in_bins.dim() == 1 && errors.dim() == 1 && offsets.dim() == 1,
              "knapsack_min_error: costs_in_bins, errors and offsets must be 1-D");
  TORCH_CHECK(costs_in_bins.is_contiguous() && errors.is_contiguous() && offsets.is_contiguous(),
              "knapsack_min_error: costs_in_bins, errors and offsets must be contiguous");
  TORCH_CHECK(offsets.numel() >= 1, "knapsack_min_error: offsets needs num_tensors + 1 >= 1 entries");
  TORCH_CHECK(costs_in_bins.numel() == errors.numel(), "knapsack_min_error: ", costs_in_bins.numel(),
              " costs but ", errors.numel(), " errors");
  const int64_t num_tensors = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[num_tensors] == costs_in_bins.numel(), "knapsack_min_error: offsets end at ", off[num_tensors],
              " but there are ", costs_in_bins.numel(), " options");
  auto choice = torch::full({num_tensors}, -1, torch::kInt64);
  cpu::KnapsackStatus status;
  {
    pybind11::gil_scoped_release release;
    status = cpu::knapsack_min_error(costs_in_bins.data_ptr<int64_t>(), errors.data_ptr<double>(), off, num_tensors,
                                     capacity, choice.data_ptr<int64_t>(), nullptr);
  }
  TORCH_CHECK(status != cpu::KnapsackStatus::kBadInput,
              "knapsack_min_error: malformed input (offsets must start at 0 and increase, every menu needs 1 to "
              "65,536 options, costs and capacity must be >= 0)");
  return {status == cpu::KnapsackStatus::kOptimal, choice};
}

// Returns (feasible, choice, multiplier) of the Lagrangian relaxation (choice all -1 when infeasible).
std::tuple<bool, torch::Tensor, double> knapsack_lagrangian(const torch::Tensor& costs, const torch::Tensor& errors,
                                                            const torch::Tensor& offsets, double budget) {
  TORCH_CHECK(costs.scalar_type() == torch::kFloat64 && errors.scalar_type() == torch::kFloat64,
              "knapsack_lagrangian: costs and errors must be float64, got ", costs.scalar_type(), " and ",
              errors.scalar_type());
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64, "knapsack_lagrangian: offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(costs.is_cpu() && errors.is_cpu() && offsets.is_cpu(),
              "knapsack_lagrangian: costs, errors and offsets must be CPU tensors");
  TORCH_CHECK(costs.dim() == 1 && errors.dim() == 1 && offsets.dim() == 1,
              "knapsack_lagrangian: costs, errors and offsets must be 1-D");
  TORCH_CHECK(costs.is_contiguous() && errors.is_contiguous() && offsets.is_contiguous(),
              "knapsack_lagrangian: costs, errors and offsets must be contiguous");
  TORCH_CHECK(offsets.numel() >= 1, "knapsack_lagrangian: offsets needs num_tensors + 1 >= 1 entries");
  TORCH_CHECK(costs.numel() == errors.numel(), "knapsack_lagrangian: ", costs.numel(), " costs but ",
              errors.numel(), " errors");
  const int64_t num_tensors = offsets.numel() - 1;
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[num_tensors] == costs.numel(), "knapsack_lagrangian: offsets end at ", off[num_tensors],
              " but there are ", costs.numel(), " options");
  auto choice = torch::full({num_tensors}, -1, torch::kInt64);
  double multiplier = 0.0;
  cpu::KnapsackStatus status;
  {
    pybind11::gil_scoped_release release;
    status = cpu::knapsack_lagrangian(costs.data_ptr<double>(), errors.data_ptr<double>(), off, num_tensors, budget,
                                      choice.data_ptr<int64_t>(), &multiplier);
  }
  TORCH_CHECK(status != cpu::KnapsackStatus::kBadInput,
              "knapsack_lagrangian: malformed input (offsets must start at 0 and increase; costs and errors "
              "must be finite and >= 0, budget >= 0)");
  return {status == cpu::KnapsackStatus::kOptimal, choice, multiplier};
}

}  // namespace

void bind_knapsack(pybind11::module_& m) {
  m.def("knapsack_min_error", &knapsack_min_error, pybind11::arg("costs_in_bins"), pybind11::arg("errors"),
        pybind11::arg("offsets"), pybind11::arg("capacity"),
        "Multiple-choice knapsack (Kimad+): one option per tensor minimising the sum of errors subject to the "
        "sum of costs <= capacity. costs_in_bins int64, errors float64 (flat, all tensors' options), offsets "
        "int64 (num_tensors + 1, from 0). Returns (feasible, choice int64[num_tensors]).");
  m.def("knapsack_lagrangian", &knapsack_lagrangian, pybind11::arg("costs"), pybind11::arg("errors"),
        pybind11::arg("offsets"), pybind11::arg("budget"),
        "Lagrangian (convex-hull) relaxation of knapsack_min_error on real costs (float64): the plan of the "
        "smallest multiplier whose total cost fits budget. Returns (feasible, choice int64[num_tensors], "
        "multiplier).");
}

}  // namespace bindings
}  // namespace kimad
