// Block conversion of float16 / bfloat16 gradients to float32 (kimad/grad.h).
#include "kimad/grad.h"

namespace kimad {
namespace cpu {

KIMAD_SIMD_CLONES
void convert_float16(const uint16_t* in, int64_t len, float* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = float16_to_float(in[i]);
}

KIMAD_SIMD_CLONES
void convert_bfloat16(const uint16_t* in, int64_t len, float* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = bfloat16_to_float(in[i]);
}

}  // namespace cpu
}  // namespace kimad
