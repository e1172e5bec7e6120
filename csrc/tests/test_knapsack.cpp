// Specification of the layerwise allocator's knapsack (kimad::cpu::knapsack_min_error).
#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "kimad/knapsack.h"

namespace {

using kimad::cpu::knapsack_lagrangian;
using kimad::cpu::knapsack_min_error;
using kimad::cpu::KnapsackStatus;

struct Problem {
  std::vector<int64_t> costs;
  std::vector<double> errors;
  std::vector<int64_t> offsets{0};
  void add(const std::vector<int64_t>& c, const std::vector<double>& e) {
    costs.insert(costs.end(), c.begin(), c.end());
    errors.insert(errors.end(), e.begin(), e.end());
    offsets.push_back(static_cast<int64_t>(costs.size()));
  }
  int64_t tensors() const { return static_cast<int64_t>(offsets.size()) - 1; }
};

// Plain reference: every combination of options, the least total error within capacity
// (+inf when none fits). Sums in tensor order, as the kernel does.
double brute_force(const Problem& p, int64_t capacity) {
  const int64_t n = p.tensors();
  std::vector<int64_t> pick(n, 0);
  double best = std::numeric_limits<double>::infinity();
  while (true) {
    int64_t cost = 0;
    double error = 0.0;
    for (int64_t l = 0; l < n; ++l) {
      cost += p.costs[p.offsets[l] + pick[l]];
      error += p.errors[p.offsets[l] + pick[l]];
    }
    if (cost <= capacity && error < best) best = error;
    int64_t l = 0;
    while (l < n && ++pick[l] == p.offsets[l + 1] - p.offsets[l]) pick[l++] = 0;
    if (l == n) return best;
  }
}

KnapsackStatus solve(const Problem& p, int64_t capacity, std::vector<int64_t>& choice, double& total) {
  choice.assign(p.tensors(), -1);
  return knapsack_min_error(p.costs.data(), p.errors.data(), p.offsets.data(), p.tensors(), capacity,
                            choice.data(), &total);
}

TEST(Knapsack, NoTensorsIsTheEmptyOptimalPlan) {
  const int64_t offsets[1] = {0};
  double total = -1.0;
  EXPECT_EQ(knapsack_min_error(nullptr, nullptr, offsets, 0, 10, nullptr, &total), KnapsackStatus::kOptimal);
  EXPECT_EQ(total, 0.0);
}

TEST(Knapsack, MatchesBruteForceOnRandomSmallInstances) {
  std::mt19937 rng(2024);
  for (int trial = 0; trial < 2000; ++trial) {
    Problem p;
    const int tensors = std::uniform_int_distribution<int>(1, 5)(rng);
    for (int l = 0; l < tensors; ++l) {
      const int options = std::uniform_int_distribution<int>(1, 4)(rng);
      std::vector<int64_t> c(options);
      std::vector<double> e(options);
      // Small ranges on purpose: many equal costs and errors exercise the tie-break.
      for (auto& x : c) x = std::uniform_int_distribution<int64_t>(0, 6)(rng);
      for (auto& x : e) x = std::uniform_int_distribution<int>(0, 8)(rng) * 0.25;
      p.add(c, e);
    }
    const int64_t capacity = std::uniform_int_distribution<int64_t>(0, 20)(rng);
    const double expected = brute_force(p, capacity);
    std::vector<int64_t> choice;
    double total = 0.0;
    const KnapsackStatus status = solve(p, capacity, choice, total);
    if (expected == std::numeric_limits<double>::infinity()) {
      EXPECT_EQ(status, KnapsackStatus::kInfeasible) << "trial " << trial;
      continue;
    }
    ASSERT_EQ(status, KnapsackStatus::kOptimal) << "trial " << trial;
    int64_t cost = 0;
    double error = 0.0;
    for (int64_t l = 0; l < p.tensors(); ++l) {
      ASSERT_GE(choice[l], 0);
      ASSERT_LT(choice[l], p.offsets[l + 1] - p.offsets[l]);
      cost += p.costs[p.offsets[l] + choice[l]];
      error += p.errors[p.offsets[l] + choice[l]];
    }
    EXPECT_LE(cost, capacity) << "trial " << trial;
    EXPECT_EQ(error, expected) << "trial " << trial;
    EXPECT_EQ(total, error) << "trial " << trial;
  }
}

TEST(Knapsack, InfeasibleWhenTheCheapestOptionsExceedCapacityAndChoiceIsUntouched) {
  Problem p;
  p.add({3, 5}, {1.0, 0.0});
  p.add({4}, {0.0});
  std::vector<int64_t> choice;
  double total = -1.0;
  EXPECT_EQ(solve(p, 6, choice, total), KnapsackStatus::kInfeasible);
  EXPECT_EQ(choice, (std::vector<int64_t>{-1, -1}));
  EXPECT_EQ(solve(p, 7, choice, total), KnapsackStatus::kOptimal);
  EXPECT_EQ(choice, (std::vector<int64_t>{0, 0}));
}

TEST(Knapsack, EqualErrorsGoToTheCheaperOptionThenTheLowerIndex) {
  Problem p;
  p.add({5, 2, 2, 7}, {1.0, 1.0, 1.0, 1.0});  // option 1 and 2 tie on cost: lower index 1 wins
  std::vector<int64_t> choice;
  double total = 0.0;
  ASSERT_EQ(solve(p, 10, choice, total), KnapsackStatus::kOptimal);
  EXPECT_EQ(choice, (std::vector<int64_t>{1}));
}

TEST(Knapsack, ZeroCostOptionsFitAZeroCapacity) {
  Problem p;
  p.add({0, 1}, {2.0, 0.5});
  p.add({1, 0, 0}, {0.0, 3.0, 1.0});
  std::vector<int64_t> choice;
  double total = 0.0;
  ASSERT_EQ(solve(p, 0, choice, total), KnapsackStatus::kOptimal);
  EXPECT_EQ(choice, (std::vector<int64_t>{0, 2}));
  EXPECT_EQ(total, 3.0);
}

TEST(Knapsack, MenusLongerThan256OptionsUseTheWideTable) {
  std::mt19937 rng(7);
  Problem p;
  for (int l = 0; l < 2; ++l) {
    std::vector<int64_t> c(300);
    std::vector<double> e(300);
    for (int r = 0; r < 300; ++r) {
      c[r] = 300 - r;  // the best options sit at indices > 255
      e[r] = r * 0.5 + std::uniform_real_distribution<double>(0.0, 0.1)(rng);
    }
    p.add(c, e);
  }
  for (const int64_t capacity : {2, 10, 250, 600}) {
    std::vector<int64_t> choice;
    double total = 0.0;
    ASSERT_EQ(solve(p, capacity, choice, total), KnapsackStatus::kOptimal);
    EXPECT_EQ(total, brute_force(p, capacity)) << "capacity " << capacity;
  }
}

TEST(Knapsack, RejectsMalformedInput) {
  std::vector<int64_t> choice(2, -1);
  double total = 0.0;
  const int64_t costs[3] = {1, -1, 2};
  const double errors[3] = {0.0, 0.0, 0.0};
  const int64_t good[3] = {0, 1, 3}, empty_menu[3] = {0, 0, 3}, shifted[3] = {1, 2, 3};
  const int64_t ok_costs[3] = {1, 1, 2};
  EXPECT_EQ(knapsack_min_error(costs, errors, good, 2, 5, choice.data(), &total), KnapsackStatus::kBadInput);
  EXPECT_EQ(knapsack_min_error(ok_costs, errors, empty_menu, 2, 5, choice.data(), &total),
            KnapsackStatus::kBadInput);
  EXPECT_EQ(knapsack_min_error(ok_costs, errors, shifted, 2, 5, choice.data(), &total), KnapsackStatus::kBadInput);
  EXPECT_EQ(knapsack_min_error(ok_costs, errors, good, 2, -1, choice.data(), &total), KnapsackStatus::kBadInput);
  EXPECT_EQ(choice, (std::vector<int64_t>{-1, -1}));
  EXPECT_EQ(knapsack_min_error(ok_costs, errors, good, 2, 5, choice.data(), &total), KnapsackStatus::kOptimal);
}

TEST(Knapsack, SameInputSameChoice) {
  std::mt19937 rng(99);
  Problem p;
  for (int l = 0; l < 50; ++l) {
    std::vector<int64_t> c(8);
    std::vector<double> e(8);
    for (int r = 0; r < 8; ++r) {
      c[r] = std::uniform_int_distribution<int64_t>(0, 40)(rng);
      e[r] = std::uniform_int_distribution<int>(0, 3)(rng);  // heavy ties
    }
    p.add(c, e);
  }
  std::vector<int64_t> first, second;
  double t1 = 0.0, t2 = 0.0;
  ASSERT_EQ(solve(p, 500, first, t1), KnapsackStatus::kOptimal);
  ASSERT_EQ(solve(p, 500, second, t2), KnapsackStatus::kOptimal);
  EXPECT_EQ(first, second);
}

// ---- the Lagrangian relaxation, on real costs ----------------------------------------------

struct RealProblem {
  std::vector<double> costs, errors;
  std::vector<int64_t> offsets{0};
  int64_t tensors() const { return static_cast<int64_t>(offsets.size()) - 1; }
};

// Plain reference on real costs: the least total error of a plan costing at most `budget`.
double brute_force_real(const RealProblem& p, double budget) {
  const int64_t n = p.tensors();
  std::vector<int64_t> pick(n, 0);
  double best = std::numeric_limits<double>::infinity();
  while (true) {
    double cost = 0.0, error = 0.0;
    for (int64_t l = 0; l < n; ++l) {
      cost += p.costs[p.offsets[l] + pick[l]];
      error += p.errors[p.offsets[l] + pick[l]];
    }
    if (cost <= budget && error < best) best = error;
    int64_t l = 0;
    while (l < n && ++pick[l] == p.offsets[l + 1] - p.offsets[l]) pick[l++] = 0;
    if (l == n) return best;
  }
}

TEST(KnapsackLagrangian, PlanFitsAndIsOptimalForItsOwnCostOnRandomInstances) {
  std::mt19937 rng(77);
  for (int trial = 0; trial < 2000; ++trial) {
    RealProblem p;
    const int tensors = std::uniform_int_distribution<int>(1, 5)(rng);
    double cheapest = 0.0, dearest = 0.0;
    for (int l = 0; l < tensors; ++l) {
      const int options = std::uniform_int_distribution<int>(1, 4)(rng);
      double lo = std::numeric_limits<double>::infinity(), hi = 0.0;
      for (int r = 0; r < options; ++r) {
        // Integer grid (exact sums) so "optimal for its own cost" is checked without rounding slack.
        const double c = std::uniform_int_distribution<int>(0, 8)(rng);
        p.costs.push_back(c);
        p.errors.push_back(std::uniform_int_distribution<int>(0, 8)(rng));
        lo = std::min(lo, c);
        hi = std::max(hi, c);
      }
      p.offsets.push_back(static_cast<int64_t>(p.costs.size()));
      cheapest += lo;
      dearest += hi;
    }
    const double budget =
        std::uniform_int_distribution<int>(static_cast<int>(cheapest), static_cast<int>(dearest))(rng);
    std::vector<int64_t> choice(tensors, -1);
    double lambda = -1.0;
    ASSERT_EQ(knapsack_lagrangian(p.costs.data(), p.errors.data(), p.offsets.data(), tensors, budget, choice.data(),
                                  &lambda),
              KnapsackStatus::kOptimal)
        << "trial " << trial;
    double cost = 0.0, error = 0.0;
    for (int l = 0; l < tensors; ++l) {
      cost += p.costs[p.offsets[l] + choice[l]];
      error += p.errors[p.offsets[l] + choice[l]];
    }
    EXPECT_LE(cost, budget) << "trial " << trial;
    EXPECT_GE(lambda, 0.0);
    EXPECT_EQ(error, brute_force_real(p, cost)) << "trial " << trial;
    EXPECT_GE(error, brute_force_real(p, budget)) << "trial " << trial;
  }
}

TEST(KnapsackLagrangian, SkipsOptionsAboveTheConvexHull) {
  // (1, 9) lies above the segment from (0, 10) to (2, 0): only the hull's vertices are ever chosen.
  const double costs[3] = {0.0, 1.0, 2.0}, errors[3] = {10.0, 9.0, 0.0};
  const int64_t offsets[2] = {0, 3};
  int64_t choice = -1;
  double lambda = 0.0;
  ASSERT_EQ(knapsack_lagrangian(costs, errors, offsets, 1, 1.5, &choice, &lambda), KnapsackStatus::kOptimal);
  EXPECT_EQ(choice, 0);
  EXPECT_EQ(lambda, 5.0);
  ASSERT_EQ(knapsack_lagrangian(costs, errors, offsets, 1, 2.0, &choice, &lambda), KnapsackStatus::kOptimal);
  EXPECT_EQ(choice, 2);
  EXPECT_EQ(lambda, 0.0);
}

TEST(KnapsackLagrangian, InfeasibleAndMalformedInputLeaveChoiceUntouched) {
  const double costs[2] = {3.0, 2.0}, errors[2] = {0.0, 1.0};
  const double nan_costs[2] = {3.0, std::numeric_limits<double>::quiet_NaN()};
  const int64_t offsets[2] = {0, 2};
  int64_t choice = -1;
  EXPECT_EQ(knapsack_lagrangian(costs, errors, offsets, 1, 1.0, &choice, nullptr), KnapsackStatus::kInfeasible);
  EXPECT_EQ(knapsack_lagrangian(nan_costs, errors, offsets, 1, 5.0, &choice, nullptr), KnapsackStatus::kBadInput);
  EXPECT_EQ(knapsack_lagrangian(costs, errors, offsets, 1, -1.0, &choice, nullptr), KnapsackStatus::kBadInput);
  EXPECT_EQ(choice, -1);
}

TEST(KnapsackLagrangian, FitTestSurvivesCostsOfVeryDifferentMagnitudes) {
  // Tensor 1 must pay 1; tensor 0's option 1 adds 1e-300, which the rounded total (as Python's
  // math.fsum gives it) does not show: it fits a budget of 1, and beats the free option's error.
  const double costs[4] = {1.0, 1e-300, 0.0, 1.0}, errors[4] = {0.0, 0.5, 1.0, 0.0};
  const int64_t offsets[3] = {0, 3, 4};
  int64_t choice[2] = {-1, -1};
  ASSERT_EQ(knapsack_lagrangian(costs, errors, offsets, 2, 1.0, choice, nullptr), KnapsackStatus::kOptimal);
  EXPECT_EQ(choice[0], 1);
}

}  // namespace
