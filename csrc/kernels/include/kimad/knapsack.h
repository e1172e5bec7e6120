// Kimad+'s layerwise allocator: the multiple-choice knapsack, solved exactly by dynamic programming.
//
// Torch-free, on raw pointers. Tensor l (of num_tensors) offers options offsets[l] .. offsets[l+1]-1
// of the flat arrays costs_in_bins / errors; exactly one option per tensor is chosen so that
// the sum of chosen errors is minimal subject to the sum of chosen costs <= capacity (all costs
// are whole bins: the caller rounds real costs up, so a plan that fits here fits in real units).
//
// Algorithm: best[l][b] = least total error of tensors 0..l using at most b bins,
//   best[l][b] = min over options r of tensor l with cost c_r <= b of best[l-1][b - c_r] + e_r,
// with best[-1][b] = 0; a choice table (uint8 when every menu has <= 256 options, else uint16)
// records the minimising r for backtracking. O(num_tensors * capacity * R) time,
// O(num_tensors * capacity) bytes of choice table.
//
// Tie-break (deterministic): dominated options (another option is no costlier in bins and has
// no larger error; ties keep the lower index) are dropped first, and among options reaching the
// same error the cheaper one (in bins), then the lower index, wins.
#pragma once

#include <cstdint>

namespace kimad {
namespace cpu {

enum class KnapsackStatus : int32_t {
  kOptimal = 0,     // `choice` holds an optimal plan
  kInfeasible = 1,  // even the cheapest options exceed `capacity`; `choice` is untouched
  kBadInput = 2,    // offsets not increasing from 0, an empty menu, a negative cost, capacity < 0,
                    // or a menu of more than 65,536 options; `choice` is untouched
};

// Solves the multiple-choice knapsack described above.
//   costs_in_bins[offsets[num_tensors]]  cost of every option, in whole bins (>= 0)
//   errors[offsets[num_tensors]]         error of every option (finite; e.g. squared L2 norm)
//   offsets[num_tensors + 1]             offsets[0] == 0, strictly increasing
//   capacity                             budget, in bins
//   choice[num_tensors]                  out: chosen option per tensor, 0 .. R_l - 1
//   total_error                          out (may be null): the sum of chosen errors
// Safe with num_tensors == 0 (the empty plan is optimal).
KnapsackStatus knapsack_min_error(const int64_t* costs_in_bins, const double* errors, const int64_t* offsets,
                                  int64_t num_tensors, int64_t capacity, int64_t* choice,
                                  double* total_error);

// The Lagrangian (convex-hull) relaxation of the same problem, on real costs: for a multiplier
// lambda >= 0 every tensor takes the option minimising error + lambda * cost (ties: the cheaper,
// then the lower index); returns the plan of the smallest lambda whose total cost fits `budget`.
// Exact, not a numeric bisection of lambda: the plan only changes where lambda crosses the price
// (error added per unit of cost saved) of a segment of some tensor's lower convex hull, so the
// critical price is found by a selection search over all segments (expected O(T log T) for T
// options in all, no full sort). Fit tests use a compensated sum, close to a correctly rounded one.
// The plan is optimal for its own total cost but may leave budget unused (options off the hull
// are never chosen).
//   costs[offsets[num_tensors]], errors[...]  finite, >= 0;  budget >= 0
//   choice[num_tensors]  out: chosen option per tensor;  multiplier  out (may be null): lambda
// Returns kOptimal, kInfeasible (the cheapest options exceed budget; choice untouched) or
// kBadInput (as knapsack_min_error, or a NaN/infinite/negative cost, error or budget).
KnapsackStatus knapsack_lagrangian(const double* costs, const double* errors, const int64_t* offsets,
                                   int64_t num_tensors, double budget, int64_t* choice, double* multiplier);

}  // namespace cpu
}  // namespace kimad
