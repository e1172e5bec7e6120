// Specification of decode-and-accumulate (kimad::cpu::sparse_accumulate and friends).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kimad/kernels.h"

namespace {

// Plain reference: the loop the kernel must agree with.
std::vector<float> reference(const std::vector<float>& out, const std::vector<float>& values,
                             const std::vector<int32_t>& indices, float scale) {
  std::vector<float> r = out;
  for (size_t i = 0; i < values.size(); ++i) r[indices[i]] += scale * values[i];
  return r;
}

TEST(SparseAccumulate, EmptyMessageIsANoOp) {
  std::vector<float> out(5, 1.0f);
  EXPECT_EQ(kimad::cpu::sparse_accumulate(nullptr, nullptr, 0, 1.0f, out.data(), 5), -1);
  EXPECT_EQ(out, std::vector<float>(5, 1.0f));
}

TEST(SparseAccumulate, DuplicateIndicesAddUp) {
  std::vector<float> out(4, 0.0f);
  const std::vector<float> values = {1.0f, 2.0f, 4.0f};
  const std::vector<int32_t> indices = {2, 2, 2};
  ASSERT_EQ(kimad::cpu::sparse_accumulate(values.data(), indices.data(), 3, 0.5f, out.data(), 4), -1);
  EXPECT_EQ(out, (std::vector<float>{0.0f, 0.0f, 3.5f, 0.0f}));
}

TEST(SparseAccumulate, OutOfRangeIndexIsReportedAndNothingIsWritten) {
  for (int32_t bad : {-1, 4, 1 << 30}) {
    std::vector<float> out(4, 7.0f);
    const std::vector<float> values = {1.0f, 1.0f, 1.0f};
    const std::vector<int32_t> indices = {0, bad, 3};
    EXPECT_EQ(kimad::cpu::sparse_accumulate(values.data(), indices.data(), 3, 1.0f, out.data(), 4), 1);
    EXPECT_EQ(out, std::vector<float>(4, 7.0f));
  }
}

TEST(SparseAccumulate, FirstInvalidPositionIsFoundInLargeParallelMessages) {
  const int64_t count = 1 << 20;
  std::vector<int32_t> indices(count, 0);
  indices[count - 3] = -5;
  indices[count - 1] = 100;
  EXPECT_EQ(kimad::cpu::find_invalid_index(indices.data(), count, 10), count - 3);
  indices[count - 3] = 0;
  indices[count - 1] = 0;
  EXPECT_EQ(kimad::cpu::find_invalid_index(indices.data(), count, 10), -1);
}

TEST(SparseAccumulate, LargeRandomMessageMatchesReferenceBitForBit) {
  std::mt19937 rng(1234);
  const int64_t numel = 1 << 18;
  const int64_t count = 1 << 17;  // above the parallel grain: exercises the threaded path
  std::uniform_int_distribution<int32_t> pick(0, numel / 16);  // many duplicates
  std::normal_distribution<float> normal;
  std::vector<float> out(numel), values(count);
  std::vector<int32_t> indices(count);
  for (auto& x : out) x = normal(rng);
  for (auto& v : values) v = normal(rng);
  for (auto& j : indices) j = pick(rng);
  const auto expected = reference(out, values, indices, 0.25f);
  ASSERT_EQ(kimad::cpu::sparse_accumulate(values.data(), indices.data(), count, 0.25f, out.data(), numel), -1);
  EXPECT_EQ(out, expected);
}

}  // namespace
