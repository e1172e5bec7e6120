// Positions of the set bits of a top-k message's bitmap (see kimad/kernels.h).
//
// Eight bytes are read at a time as one little-endian 64-bit word (memcpy: no alignment is assumed),
// so a word without set bits costs one compare, and each set bit one count-trailing-zeros: the scan
// is O(n / 64 + count) where building a byte per position and scanning those (torch's nonzero over an
// unpacked bitmap) reads and writes n bytes.
#include <cstdint>
#include <cstring>

#include "kimad/kernels.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "bitmap words are read as little-endian 64-bit loads");

namespace kimad {
namespace cpu {

namespace {

// Appends the positions base + j of the set bits j of word, counting every one, storing the first ones
// while out has room.
inline void emit(uint64_t word, int64_t base, int32_t* out, int64_t capacity, int64_t& count) {
  while (word != 0) {
    if (count < capacity) out[count] = static_cast<int32_t>(base + __builtin_ctzll(word));
    ++count;
    word &= word - 1;
  }
}

}  // namespace

int64_t bitmap_positions(const uint8_t* bitmap, int64_t n, int32_t* out, int64_t capacity) {
  if (n <= 0) return 0;
  int64_t count = 0;
  const int64_t words = n / 64;
  for (int64_t w = 0; w < words; ++w) {
    uint64_t word;
    std::memcpy(&word, bitmap + 8 * w, sizeof word);
    emit(word, 64 * w, out, capacity, count);
  }
  const int64_t tail_bits = n - 64 * words;  // 0..63 positions left, in ceil(tail_bits / 8) bytes
  if (tail_bits > 0) {
    uint64_t word = 0;
    std::memcpy(&word, bitmap + 8 * words, static_cast<size_t>((tail_bits + 7) / 8));
    word &= (uint64_t{1} << tail_bits) - 1;  // drop the padding bits past n
    emit(word, 64 * words, out, capacity, count);
  }
  return count;
}

}  // namespace cpu
}  // namespace kimad
