// Specification of decode-and-accumulate (kimad::cpu::sparse_accumulate and friends).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
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

// ---- sparse_sum: all ranks' messages in one call --------------------------------------------

struct Batch {
  std::vector<std::vector<float>> values;
  std::vector<std::vector<int32_t>> indices;
  std::vector<kimad::cpu::SparseMessage> messages() const {
    std::vector<kimad::cpu::SparseMessage> m;
    for (size_t r = 0; r < values.size(); ++r) {
      m.push_back({values[r].data(), indices[r].data(), static_cast<int64_t>(values[r].size())});
    }
    return m;
  }
};

Batch random_batch(std::mt19937& rng, int ranks, int64_t count, int64_t hi, bool sorted) {
  std::uniform_int_distribution<int32_t> pick(0, static_cast<int32_t>(hi));
  std::normal_distribution<float> normal;
  Batch b;
  for (int r = 0; r < ranks; ++r) {
    b.values.emplace_back(count);
    b.indices.emplace_back(count);
    for (auto& v : b.values.back()) v = normal(rng);
    for (auto& j : b.indices.back()) j = pick(rng);
    if (sorted) std::sort(b.indices.back().begin(), b.indices.back().end());
  }
  return b;
}

// Zero (unless accumulating), then one scatter per message in order: what sparse_sum must equal.
std::vector<float> reference_sum(std::vector<float> out, const Batch& b, float scale, bool accumulate) {
  if (!accumulate) std::fill(out.begin(), out.end(), 0.0f);
  for (size_t r = 0; r < b.values.size(); ++r) out = reference(out, b.values[r], b.indices[r], scale);
  return out;
}

TEST(SparseSum, MatchesPerMessageReferenceBitForBitSortedOrNotAccumulatingOrNot) {
  std::mt19937 rng(99);
  const int64_t numel = (1 << 18) + 7;  // not a whole number of merge blocks
  for (bool sorted : {true, false}) {
    for (bool accumulate : {false, true}) {
      const Batch b = random_batch(rng, 8, 1 << 15, numel - 1, sorted);
      std::vector<float> out(numel);
      std::normal_distribution<float> normal;
      for (auto& x : out) x = normal(rng);
      const auto expected = reference_sum(out, b, 0.125f, accumulate);
      const auto m = b.messages();
      const auto bad = kimad::cpu::sparse_sum(m.data(), 8, 0.125f, accumulate, out.data(), numel);
      EXPECT_EQ(bad.message, -1);
      EXPECT_EQ(out, expected) << "sorted=" << sorted << " accumulate=" << accumulate;
    }
  }
}

TEST(SparseSum, DuplicatesWithinAndAcrossMessagesAddUp) {
  Batch b;
  b.values = {{1.0f, 2.0f}, {4.0f}, {}};
  b.indices = {{2, 2}, {2}, {}};
  std::vector<float> out(3, 9.0f);
  const auto m = b.messages();
  EXPECT_EQ(kimad::cpu::sparse_sum(m.data(), 3, 0.5f, false, out.data(), 3).message, -1);
  EXPECT_EQ(out, (std::vector<float>{0.0f, 0.0f, 3.5f}));
}

TEST(SparseSum, FirstInvalidIndexIsReportedByMessageAndPositionAndNothingIsWritten) {
  std::mt19937 rng(5);
  const int64_t numel = 1 << 16;
  for (bool sorted : {true, false}) {
    Batch b = random_batch(rng, 4, 1 << 16, numel - 1, sorted);  // several validation chunks per message
    b.indices[2][(1 << 16) - 5] = static_cast<int32_t>(numel);
    b.indices[3][7] = -1;
    std::vector<float> out(numel, 7.0f);
    const auto m = b.messages();
    const auto bad = kimad::cpu::sparse_sum(m.data(), 4, 1.0f, false, out.data(), numel);
    EXPECT_EQ(bad.message, 2);
    EXPECT_EQ(bad.position, (1 << 16) - 5);
    EXPECT_EQ(out, std::vector<float>(numel, 7.0f));
  }
}

TEST(SparseAddSum, IsOutPlusTheSumFormedFirstBitForBitSortedOrNot) {
  std::mt19937 rng(101);
  const int64_t numel = (1 << 18) + 7;
  for (bool sorted : {true, false}) {
    for (int64_t count : {int64_t{100}, int64_t{1} << 15}) {  // one thread, and the threaded path
      const Batch b = random_batch(rng, 8, count, numel - 1, sorted);
      std::vector<float> out(numel);
      std::normal_distribution<float> normal;
      for (auto& x : out) x = normal(rng);
      const auto sum = reference_sum(std::vector<float>(numel, 0.0f), b, 0.125f, false);
      std::vector<float> expected = out;
      for (int64_t j = 0; j < numel; ++j) expected[j] += sum[j];
      const auto m = b.messages();
      EXPECT_EQ(kimad::cpu::sparse_add_sum(m.data(), 8, 0.125f, out.data(), numel).message, -1);
      EXPECT_EQ(out, expected) << "sorted=" << sorted << " count=" << count;
    }
  }
}

TEST(SparseAddSum, TouchesOnlyNamedElementsAndChecksFirst) {
  Batch b;
  b.values = {{1.0f, 2.0f}, {4.0f}};
  b.indices = {{1, 1}, {1}};
  std::vector<float> out = {-0.0f, 10.0f, -0.0f};
  auto m = b.messages();
  EXPECT_EQ(kimad::cpu::sparse_add_sum(m.data(), 2, 0.5f, out.data(), 3).message, -1);
  EXPECT_TRUE(std::signbit(out[0]) && std::signbit(out[2]));  // untouched -0.0 stays -0.0
  EXPECT_EQ(out[1], 13.5f);
  b.indices[1][0] = 3;
  m = b.messages();
  const auto bad = kimad::cpu::sparse_add_sum(m.data(), 2, 0.5f, out.data(), 3);
  EXPECT_EQ(bad.message, 1);
  EXPECT_EQ(bad.position, 0);
  EXPECT_EQ(out[1], 13.5f);  // nothing written
}

TEST(SparseSum, NoMessagesZeroesOrLeavesOut) {
  std::vector<float> out(5, 1.0f);
  EXPECT_EQ(kimad::cpu::sparse_sum(nullptr, 0, 1.0f, true, out.data(), 5).message, -1);
  EXPECT_EQ(out, std::vector<float>(5, 1.0f));
  EXPECT_EQ(kimad::cpu::sparse_sum(nullptr, 0, 1.0f, false, out.data(), 5).message, -1);
  EXPECT_EQ(out, std::vector<float>(5, 0.0f));
}

}  // namespace
