// Specification of the top-k bitmap decode (kimad/kernels.h: bitmap_positions).
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <vector>

#include "kimad/kernels.h"

namespace {

// The bitmap of ceil(n / 8) bytes marking `positions`, and, past n, every padding bit set when `dirty`.
std::vector<uint8_t> bitmap_of(const std::vector<int32_t>& positions, int64_t n, bool dirty = false) {
  std::vector<uint8_t> bytes((n + 7) / 8, 0);
  for (int32_t p : positions) bytes[p / 8] |= static_cast<uint8_t>(1u << (p % 8));
  if (dirty && n % 8) bytes.back() |= static_cast<uint8_t>(0xFFu << (n % 8));
  return bytes;
}

std::vector<int32_t> decode(const std::vector<uint8_t>& bytes, int64_t n, int64_t capacity, int64_t* count) {
  std::vector<int32_t> out(capacity, -1);
  *count = kimad::cpu::bitmap_positions(bytes.data(), n, out.data(), capacity);
  return out;
}

TEST(BitmapPositions, EmptyBitmapIsZero) {
  EXPECT_EQ(kimad::cpu::bitmap_positions(nullptr, 0, nullptr, 0), 0);
}

TEST(BitmapPositions, RandomBitmapsOfEverySizeMatchTheirPositions) {
  std::mt19937 rng(7);
  for (int64_t n : {1, 7, 8, 9, 63, 64, 65, 127, 128, 1000, 4099}) {
    for (double density : {0.0, 0.03, 0.5, 1.0}) {
      std::vector<int32_t> expected;
      std::bernoulli_distribution pick(density);
      for (int32_t p = 0; p < n; ++p) {
        if (pick(rng)) expected.push_back(p);
      }
      int64_t count = 0;
      const auto got = decode(bitmap_of(expected, n, /*dirty=*/true), n, expected.size(), &count);
      EXPECT_EQ(count, static_cast<int64_t>(expected.size())) << "n=" << n << " density=" << density;
      EXPECT_EQ(got, expected) << "n=" << n << " density=" << density;
    }
  }
}

TEST(BitmapPositions, CountsEverySetBitButWritesOnlyCapacity) {
  const std::vector<int32_t> positions = {0, 5, 64, 70, 99};
  int64_t count = 0;
  const auto got = decode(bitmap_of(positions, 100), 100, 3, &count);
  EXPECT_EQ(count, 5);
  EXPECT_EQ(got, (std::vector<int32_t>{0, 5, 64}));
}

TEST(BitmapPositions, PaddingBitsPastNAreNotRead) {
  int64_t count = 0;
  const auto got = decode(bitmap_of({2, 68}, 69, /*dirty=*/true), 69, 4, &count);
  EXPECT_EQ(count, 2);
  EXPECT_EQ(got, (std::vector<int32_t>{2, 68, -1, -1}));
}

}  // namespace
