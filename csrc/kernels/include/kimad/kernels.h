// Kimad's native kernels: the torch-free CPU API.
//
// Kernels take raw pointers and sizes and know nothing of torch, Python or policy; input
// validation of shapes and dtypes happens in csrc/bindings/, data-dependent checks (an index
// out of range inside a message) are reported through return values, never by writing out of
// bounds. Every function here is safe to call with count == 0 and null pointers in that case.
#pragma once

#include <cstdint>

#include "kimad/simd.h"

namespace kimad {
namespace cpu {

// Position of the first entry of `indices[0, count)` that is not in [0, numel), or -1 when
// every index is valid. Multi-threaded (OpenMP) and vectorised.
int64_t find_invalid_index(const int32_t* indices, int64_t count, int64_t numel);

// Decode-and-accumulate of one sparse message: out[indices[i]] += scale * values[i] for i in
// [0, count). Duplicate indices add up; for every output element the additions happen in
// message order, so the result is bitwise identical for any number of threads.
// Precondition: every index is in [0, numel) (check with find_invalid_index first).
void scatter_add(const float* values, const int32_t* indices, int64_t count, float scale,
                 float* out, int64_t numel);

// Validating decode-and-accumulate: checks every index, and only if all are valid performs
// scatter_add. Returns -1 on success, otherwise the position of the first invalid index, in
// which case `out` is left untouched.
int64_t sparse_accumulate(const float* values, const int32_t* indices, int64_t count,
                          float scale, float* out, int64_t numel);

// One rank's sparse message: `count` values and their flat int32 indices.
struct SparseMessage {
  const float* values;
  const int32_t* indices;
  int64_t count;
};

// Where the first out-of-range index of a batch of messages sits: message -1 when all are valid.
struct InvalidIndex {
  int64_t message;
  int64_t position;
};

// Decode-and-accumulate of n ranks' messages in one call: out = scale * (sum of the messages)
// (accumulate == false: every element of out is overwritten, untouched ones become 0) or
// out += scale * (sum of the messages) (accumulate == true). Every index is checked before
// anything is written: on an out-of-range index `out` is untouched and its (message, position)
// is returned. For every element the additions happen in message order and, within a message,
// in entry order, so the result is bitwise that of zeroing `out` (unless accumulating) and
// calling scatter_add once per message, for any number of threads. Messages whose indices are
// non-decreasing (as top-k encoders emit them) are merged block by block in one pass over `out`;
// any other message makes the whole batch take the slower per-message scatter.
InvalidIndex sparse_sum(const SparseMessage* messages, int64_t n, float scale, bool accumulate,
                        float* out, int64_t numel);

// out += scale * (sum of the n messages), each element's sum formed first (from 0, in message
// order, then entry order) and added to out once: bitwise what zeroing a buffer c, sparse_sum of
// the messages into it and out += c give, but only the elements some message names are read or
// written (an untouched -0.0 stays -0.0, where adding c's +0.0 would give +0.0). Every index is
// checked before anything is written, as for sparse_sum. Deterministic for any number of threads.
InvalidIndex sparse_add_sum(const SparseMessage* messages, int64_t n, float scale, float* out, int64_t numel);

// Decode of a top-k message's bitmap (kimad/compressors/topk.py): bit j of byte i marks position
// 8 i + j. Writes the positions of the set bits below n, ascending, to out[0, min(count, capacity))
// and returns count, the number of set bits below n (exact even when it exceeds capacity, so a
// caller expecting k positions passes capacity k and compares). Bits at positions >= n (the last
// byte's padding) are not read. Reads ceil(n / 8) bytes; O(n / 64 + count), single-threaded.
int64_t bitmap_positions(const uint8_t* bitmap, int64_t n, int32_t* out, int64_t capacity);

// Number of threads the OpenMP kernels use (1 when built without OpenMP).
int num_threads();

}  // namespace cpu
}  // namespace kimad
