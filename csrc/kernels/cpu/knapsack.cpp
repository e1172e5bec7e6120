// Multiple-choice knapsack by dynamic programming over a binned cost axis (Kimad+ allocator).
#include "kimad/knapsack.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "kimad/simd.h"

namespace kimad {
namespace cpu {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr int64_t kMaxOptions = 1 << 16;  // option indices are stored as uint16 at most

// The options of one tensor that can be optimal: costs strictly increasing, errors strictly decreasing.
template <typename Cost>
struct Menu {
  std::vector<Cost> cost;
  std::vector<double> error;
  std::vector<int64_t> index;  // position in the tensor's original menu
};

// Drops options that cannot be in any optimal plan under the tie-break: too costly to fit, or
// dominated (another option costs no more and errs no more; equal ones keep the lower index).
template <typename Cost>
void undominated(const Cost* cost, const double* error, int64_t count, Cost capacity, Menu<Cost>& out,
                 std::vector<int64_t>& order) {
  order.resize(count);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (cost[a] != cost[b]) return cost[a] < cost[b];
    if (error[a] != error[b]) return error[a] < error[b];
    return a < b;
  });
  out.cost.clear();
  out.error.clear();
  out.index.clear();
  for (const int64_t r : order) {
    if (cost[r] > capacity) break;
    if (!out.error.empty() && !(error[r] < out.error.back())) continue;
    out.cost.push_back(cost[r]);
    out.error.push_back(error[r]);
    out.index.push_back(r);
  }
}

// cur[b] = prev[b - c] + e for b in [c, capacity] (and +inf below c): the first, cheapest option.
KIMAD_SIMD_CLONES
void first_option(const double* prev, double* cur, int32_t* pick, int64_t capacity, int64_t c, double e,
                  int32_t r) {
  for (int64_t b = 0; b < c; ++b) {
    cur[b] = kInf;
    pick[b] = r;
  }
  for (int64_t b = c; b <= capacity; ++b) {
    cur[b] = prev[b - c] + e;
    pick[b] = r;
  }
}

// Relaxation by one more option; strict `<` keeps the cheaper option on ties. Branch-free (and
// with 32-bit picks beside 64-bit values) so it vectorises.
KIMAD_SIMD_CLONES
void relax_option(const double* prev, double* cur, int32_t* pick, int64_t capacity, int64_t c, double e,
                  int32_t r) {
  for (int64_t b = c; b <= capacity; ++b) {
    const double v = prev[b - c] + e;
    const bool better = v < cur[b];
    cur[b] = better ? v : cur[b];
    pick[b] = better ? r : pick[b];
  }
}

template <typename Index>
KnapsackStatus solve(const int64_t* costs, const double* errors, const int64_t* offsets, int64_t num_tensors,
                     int64_t capacity, int64_t* choice, double* total_error) {
  const int64_t width = capacity + 1;
  std::vector<Index> table(static_cast<size_t>(num_tensors * width));
  std::vector<double> prev(width, 0.0), cur(width);
  std::vector<int32_t> pick(width);
  Menu<int64_t> menu;
  std::vector<int64_t> order;
  for (int64_t l = 0; l < num_tensors; ++l) {
    const int64_t begin = offsets[l];
    undominated(costs + begin, errors + begin, offsets[l + 1] - begin, capacity, menu, order);
    if (menu.cost.empty()) return KnapsackStatus::kInfeasible;
    const size_t m = menu.cost.size();
    first_option(prev.data(), cur.data(), pick.data(), capacity, menu.cost[0], menu.error[0],
                 static_cast<int32_t>(menu.index[0]));
    for (size_t k = 1; k < m; ++k) {
      relax_option(prev.data(), cur.data(), pick.data(), capacity, menu.cost[k], menu.error[k],
                   static_cast<int32_t>(menu.index[k]));
    }
    Index* row = table.data() + l * width;
    for (int64_t b = 0; b < width; ++b) row[b] = static_cast<Index>(pick[b]);
    prev.swap(cur);
  }
  if (num_tensors > 0 && !(prev[capacity] < kInf)) return KnapsackStatus::kInfeasible;
  int64_t b = capacity;
  for (int64_t l = num_tensors - 1; l >= 0; --l) {
    const int64_t r = table[l * width + b];
    choice[l] = r;
    b -= costs[offsets[l] + r];
  }
  if (total_error != nullptr) {
    double sum = 0.0;
    for (int64_t l = 0; l < num_tensors; ++l) sum += errors[offsets[l] + choice[l]];
    *total_error = sum;
  }
  return KnapsackStatus::kOptimal;
}

// Keeps the lower convex hull of a menu (costs increasing, errors decreasing): the options that
// minimise error + lambda * cost for some lambda >= 0. Collinear middle points never win alone.
void lower_hull(Menu<double>& menu) {
  size_t kept = 0;
  for (size_t i = 0; i < menu.cost.size(); ++i) {
    while (kept >= 2) {
      const size_t a = kept - 2, b = kept - 1;
      const double left = (menu.error[a] - menu.error[b]) * (menu.cost[i] - menu.cost[b]);
      const double right = (menu.error[b] - menu.error[i]) * (menu.cost[b] - menu.cost[a]);
      if (left > right) break;  // slope a->b strictly steeper than b->i: b is a vertex
      --kept;
    }
    menu.cost[kept] = menu.cost[i];
    menu.error[kept] = menu.error[i];
    menu.index[kept] = menu.index[i];
    ++kept;
  }
  menu.cost.resize(kept);
  menu.error.resize(kept);
  menu.index.resize(kept);
}

// One step down a tensor's hull, to the next cheaper vertex.
struct Step {
  double price;  // error added per unit of cost saved: the lambda at which the tensor steps
  int64_t tensor;
  int64_t to;  // the vertex reached, as a position in the flat hull arrays
};

// Sum in double-double (TwoSum compensation), then rounded: close to the correctly rounded sum
// (Python's math.fsum), so a plan that fits here fits there, even mixing 1 and 1e-100.
class CompensatedSum {
 public:
  void add(double x) {
    const double s = hi_ + x;
    const double b = s - hi_;
    lo_ += (hi_ - (s - b)) + (x - b);
    hi_ = s;
  }
  double value() const { return hi_ + lo_; }

 private:
  double hi_ = 0.0, lo_ = 0.0;
};

}  // namespace

KnapsackStatus knapsack_lagrangian(const double* costs, const double* errors, const int64_t* offsets,
                                   int64_t num_tensors, double budget, int64_t* choice, double* multiplier) {
  if (num_tensors < 0 || !(budget >= 0.0)) return KnapsackStatus::kBadInput;
  if (num_tensors > 0 && offsets[0] != 0) return KnapsackStatus::kBadInput;
  for (int64_t l = 0; l < num_tensors; ++l) {
    if (offsets[l + 1] - offsets[l] < 1) return KnapsackStatus::kBadInput;
  }
  const int64_t total = num_tensors > 0 ? offsets[num_tensors] : 0;
  for (int64_t i = 0; i < total; ++i) {
    if (!(costs[i] >= 0.0 && costs[i] < kInf && errors[i] >= 0.0 && errors[i] < kInf)) {
      return KnapsackStatus::kBadInput;
    }
  }
  // Every tensor's hull, flat and cheapest first; top[l] is the position of its dearest vertex.
  Menu<double> menu, hulls;
  std::vector<int64_t> order, top(num_tensors), at(num_tensors);
  std::vector<Step> steps;
  CompensatedSum cheapest;
  for (int64_t l = 0; l < num_tensors; ++l) {
    undominated(costs + offsets[l], errors + offsets[l], offsets[l + 1] - offsets[l], kInf, menu, order);
    lower_hull(menu);
    const int64_t base = static_cast<int64_t>(hulls.cost.size());
    const size_t n = menu.cost.size();
    hulls.cost.insert(hulls.cost.end(), menu.cost.begin(), menu.cost.end());
    hulls.error.insert(hulls.error.end(), menu.error.begin(), menu.error.end());
    hulls.index.insert(hulls.index.end(), menu.index.begin(), menu.index.end());
    top[l] = base + static_cast<int64_t>(n) - 1;  // lambda = 0: the least error (the cheapest such)
    cheapest.add(menu.cost.front());
    for (size_t v = 0; v + 1 < n; ++v) {
      const double price = (menu.error[v] - menu.error[v + 1]) / (menu.cost[v + 1] - menu.cost[v]);
      steps.push_back({price, l, base + static_cast<int64_t>(v)});
    }
  }
  if (cheapest.value() > budget) return KnapsackStatus::kInfeasible;
  // Prices rise along each hull, so the steps priced <= p form a chain down from every tensor's
  // top vertex: the plan of the lambda just above p. Fitting is monotone in p; the critical p is
  // found by a selection search (nth_element), steps[0, taken) being the ones taken.
  const auto fits_after = [&](size_t taken) {
    at = top;
    for (size_t i = 0; i < taken; ++i) at[steps[i].tensor] = std::min(at[steps[i].tensor], steps[i].to);
    CompensatedSum spent;
    for (int64_t l = 0; l < num_tensors; ++l) spent.add(hulls.cost[at[l]]);
    return spent.value() <= budget;
  };
  const auto by_price = [](const Step& a, const Step& b) { return a.price < b.price; };
  double lambda = 0.0;
  size_t taken = 0;
  if (!fits_after(0)) {
    // Invariant: every step in [0, lo) is priced below, every step in [hi, end) above, those in
    // [lo, hi); taking [0, lo) does not fit, taking [0, hi) does (all steps: the cheapest plan).
    auto lo = steps.begin(), hi = steps.end();
    while (true) {
      auto mid = lo + (hi - lo) / 2;
      std::nth_element(lo, mid, hi, by_price);
      const double pivot = mid->price;
      auto less_end = std::partition(lo, hi, [pivot](const Step& a) { return a.price < pivot; });
      auto equal_end = std::partition(less_end, hi, [pivot](const Step& a) { return a.price == pivot; });
      if (less_end != lo && fits_after(less_end - steps.begin())) {
        hi = less_end;
      } else if (fits_after(equal_end - steps.begin())) {
        lambda = pivot;
        taken = equal_end - steps.begin();
        break;
      } else {
        lo = equal_end;
      }
    }
  }
  fits_after(taken);
  for (int64_t l = 0; l < num_tensors; ++l) choice[l] = hulls.index[at[l]];
  if (multiplier != nullptr) *multiplier = lambda;
  return KnapsackStatus::kOptimal;
}

KnapsackStatus knapsack_min_error(const int64_t* costs_in_bins, const double* errors, const int64_t* offsets,
                                  int64_t num_tensors, int64_t capacity, int64_t* choice,
                                  double* total_error) {
  if (num_tensors < 0 || capacity < 0) return KnapsackStatus::kBadInput;
  if (num_tensors > 0 && offsets[0] != 0) return KnapsackStatus::kBadInput;
  int64_t widest = 0;
  for (int64_t l = 0; l < num_tensors; ++l) {
    const int64_t count = offsets[l + 1] - offsets[l];
    if (count < 1 || count > kMaxOptions) return KnapsackStatus::kBadInput;
    widest = std::max(widest, count);
  }
  const int64_t total = num_tensors > 0 ? offsets[num_tensors] : 0;
  for (int64_t i = 0; i < total; ++i) {
    if (costs_in_bins[i] < 0) return KnapsackStatus::kBadInput;
  }
  if (num_tensors == 0 && total_error != nullptr) *total_error = 0.0;
  // One byte per cell when it suffices: the table is the DP's largest memory stream.
  return widest <= 256 ? solve<uint8_t>(costs_in_bins, errors, offsets, num_tensors, capacity, choice, total_error)
                       : solve<uint16_t>(costs_in_bins, errors, offsets, num_tensors, capacity, choice, total_error);
}

}  // namespace cpu
}  // namespace kimad
