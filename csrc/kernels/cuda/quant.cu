// QSGD and scaled-sign encoders fused with error feedback, and their decoder, on the GPU
// (layout and contracts in kimad/quant.h).
//
// Encode: 1. one warp per bucket: the float32 L2 norm (or mean |v|), ||v||^2 and the non-finite
// count, read back to the host; 2. if all is finite, the header and the bucket statistics are
// copied into the payload and one thread per code byte forms v for its 8 / bits elements, writes
// their codes into that byte and updates the state (no two threads share a byte or an element).
// Decode: the header is read back and checked on the host, then every bucket scale on the device;
// only then one thread per element accumulates into out. Error estimate: one warp per bucket.
#include <cstdint>
#include <cstring>

#include <cub/cub.cuh>

#include "kimad/quant_cuda.h"
#include "launch.cuh"

namespace kimad {
namespace cuda {
namespace {

using launch::blocks_for;
using launch::DeviceBuffer;
using launch::kThreads;

struct Counters {
  unsigned long long bad;
  double sq_norm;
  double sq_error;
};

__device__ __forceinline__ bool non_finite_bits(float x) { return (__float_as_uint(x) & 0x7FFFFFFFu) >= 0x7F800000u; }

// The float32 at an arbitrary byte address (the payload's statistics need not be 4-byte aligned).
__device__ __forceinline__ float load_f32(const uint8_t* p) {
  const uint32_t u = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                     (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
  return __uint_as_float(u);
}

// Pass 1: one warp per bucket.
__global__ void bucket_stats_kernel(Grad g, const float* __restrict__ s, int64_t n, float sign,
                                    int64_t bucket, int64_t buckets, bool mean_abs, float* __restrict__ stat,
                                    Counters* __restrict__ counters) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  unsigned long long bad = 0;
  double sq_total = 0.0;
  for (int64_t b = warp; b < buckets; b += warps) {
    const int64_t begin = b * bucket, end = min(n, begin + bucket);
    double sq = 0.0, l1 = 0.0;
    unsigned long long bucket_bad = 0;
    for (int64_t i = begin + lane; i < end; i += 32) {
      const float x = g[i] + sign * s[i];
      bucket_bad += non_finite_bits(x);
      const double d = static_cast<double>(x);
      sq += d * d;
      l1 += fabs(d);
    }
    for (int off = 16; off > 0; off >>= 1) {
      sq += __shfl_down_sync(0xFFFFFFFFu, sq, off);
      l1 += __shfl_down_sync(0xFFFFFFFFu, l1, off);
    }
    const bool finite = !__any_sync(0xFFFFFFFFu, bucket_bad != 0);
    bad += bucket_bad;
    if (lane == 0) {
      const float value = mean_abs ? static_cast<float>(l1 / static_cast<double>(end - begin))
                                   : static_cast<float>(sqrt(sq));
      bad += finite && isinf(value) ? 1 : 0;
      stat[b] = value;
      sq_total += sq;
    }
  }
  if (bad) atomicAdd(&counters->bad, bad);
  if (lane == 0 && sq_total != 0.0) atomicAdd(&counters->sq_norm, sq_total);
}

// Pass 2: one thread per code byte, covering elements [j * 8 / bits, (j + 1) * 8 / bits).
__global__ void encode_kernel(Grad g, float* __restrict__ s, int64_t n, float sign, bool ef,
                              int bits, int64_t bucket, DrawKey key, const float* __restrict__ stat,
                              uint8_t* __restrict__ codes, int64_t code_bytes, Counters* __restrict__ counters) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int per_byte = 8 / bits;
  const uint32_t levels = bits > 1 ? (1u << (bits - 1)) - 1u : 1u;
  double err = 0.0;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < code_bytes;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    uint32_t byte = 0;
    const int64_t first = j * per_byte;
    for (int k = 0; k < per_byte && first + k < n; ++k) {
      const int64_t i = first + k;
      const float st = stat[i / bucket];
      const float x = g[i] + sign * s[i];
      const bool negative = x < 0.0f;
      float q;
      uint32_t code;
      if (bits == 1) {
        q = negative ? -st : st;
        code = negative;
      } else {
        const uint32_t level =
            qsgd_level(x, qsgd_inverse_step(st, levels), uniform_draw(key, static_cast<uint32_t>(i)), levels);
        const float magnitude = __fmul_rn(static_cast<float>(level), __fdiv_rn(st, static_cast<float>(levels)));
        q = negative ? -magnitude : magnitude;
        code = level | (static_cast<uint32_t>(negative) << (bits - 1));
      }
      byte |= code << (k * bits);
      s[i] = ef ? __fsub_rn(x, q) : __fadd_rn(s[i], q);
      const double r = static_cast<double>(__fsub_rn(x, q));  // the float32 residual, as on the CPU
      err += r * r;
    }
    codes[j] = static_cast<uint8_t>(byte);
  }
  const double block_err = Reduce(tmp).Sum(err);
  if (threadIdx.x == 0 && block_err != 0.0) atomicAdd(&counters->sq_error, block_err);
}

__global__ void check_scales_kernel(const uint8_t* __restrict__ stat, int64_t buckets, unsigned int* __restrict__ bad) {
  for (int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; b < buckets;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = load_f32(stat + 4 * b);
    if (!(x >= 0.0f) || isinf(x)) atomicAdd(bad, 1u);
  }
}

__global__ void decode_kernel(const uint8_t* __restrict__ stat, const uint8_t* __restrict__ codes, int64_t numel,
                              int bits, int64_t bucket, float scale, float* __restrict__ out) {
  const uint32_t mask = (1u << bits) - 1u;
  const float levels = bits > 1 ? static_cast<float>((1u << (bits - 1)) - 1u) : 1.0f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float st = load_f32(stat + 4 * (i / bucket));
    const uint64_t p = static_cast<uint64_t>(i) * static_cast<uint64_t>(bits);
    const uint32_t c = (static_cast<uint32_t>(codes[p >> 3]) >> (p & 7)) & mask;
    float q;
    if (bits == 1) {
      q = c ? -st : st;
    } else {
      const float magnitude = __fmul_rn(static_cast<float>(c & (mask >> 1)), __fdiv_rn(st, levels));
      q = (c >> (bits - 1)) ? -magnitude : magnitude;
    }
    out[i] = __fadd_rn(out[i], __fmul_rn(scale, q));
  }
}

// Sum over the 32 lanes of a warp, the total in every lane (butterfly order: the same in all lanes).
__device__ __forceinline__ double warp_sum(double x) {
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, off);
  return x;
}

// One warp per bucket: its sums, then a second pass over the (cached) bucket for the errors.
// errors[0..3]: QSGD 8, 4, 2 bits and sign.
__global__ void error_estimate_kernel(Grad g, const float* __restrict__ s, int64_t n, float sign,
                                      int64_t bucket, int64_t buckets, double* __restrict__ errors,
                                      Counters* __restrict__ counters) {
  const uint32_t kLevels[3] = {127u, 7u, 1u};
  const int lane = threadIdx.x & 31;
  const int64_t warp = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  unsigned long long bad = 0;
  double sq_total = 0.0, err[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t b = warp; b < buckets; b += warps) {
    const int64_t begin = b * bucket, end = min(n, begin + bucket);
    double sq = 0.0, l1 = 0.0;
    unsigned long long bucket_bad = 0;
    for (int64_t i = begin + lane; i < end; i += 32) {
      const float x = g[i] + sign * s[i];
      bucket_bad += non_finite_bits(x);
      sq += static_cast<double>(x) * static_cast<double>(x);
      l1 += fabs(static_cast<double>(x));
    }
    sq = warp_sum(sq);
    l1 = warp_sum(l1);
    const bool finite = !__any_sync(0xFFFFFFFFu, bucket_bad != 0);
    bad += bucket_bad;
    const float norm = static_cast<float>(sqrt(sq));
    if (lane == 0) {
      sq_total += sq;
      bad += finite && isinf(norm) ? 1 : 0;
    }
    if (!finite) continue;  // the whole warp skips the bucket
    const float mean_abs = static_cast<float>(l1 / static_cast<double>(end - begin));
    float inv[3];
    double acc[3] = {0.0, 0.0, 0.0}, sign_err = 0.0;
    for (int r = 0; r < 3; ++r) inv[r] = qsgd_inverse_step(norm, kLevels[r]);
    for (int64_t i = begin + lane; i < end; i += 32) {
      const float x = g[i] + sign * s[i];
      const float ax = fabsf(x);
      for (int r = 0; r < 3; ++r) {
        const float y = mul_rn(ax, inv[r]);
        if (y < static_cast<float>(kLevels[r])) {
          const double p = static_cast<double>(__fsub_rn(y, static_cast<float>(static_cast<int32_t>(y))));
          acc[r] += p * (1.0 - p);
        }
      }
      const double d = static_cast<double>(__fsub_rn(ax, mean_abs));
      sign_err += d * d;
    }
    for (int r = 0; r < 3; ++r) {
      const double step = static_cast<double>(__fdiv_rn(norm, static_cast<float>(kLevels[r])));
      err[r] += step * step * acc[r];
    }
    err[3] += sign_err;
  }
  for (int r = 0; r < 4; ++r) err[r] = warp_sum(err[r]);
  if (bad) atomicAdd(&counters->bad, bad);
  if (lane == 0) {
    if (sq_total != 0.0) atomicAdd(&counters->sq_norm, sq_total);
    for (int r = 0; r < 4; ++r) {
      if (err[r] != 0.0) atomicAdd(errors + r, err[r]);
    }
  }
}

}  // namespace

cudaError_t quant_error_estimate(Grad grad, const float* state, int64_t n, Feedback mode, int64_t bucket,
                                 double* errors, QuantStats* stats, cudaStream_t stream) {
  *stats = QuantStats{0, 0.0, 0.0};
  if (n <= 0) {
    for (int r = 0; r < 4; ++r) errors[r] = 0.0;
    return cudaSuccess;
  }
  const int64_t buckets = (n + bucket - 1) / bucket;
  struct Results {
    Counters counters;
    double errors[4];
  };
  DeviceBuffer buf(stream);
  KIMAD_TRY(buf.alloc(sizeof(Results)));
  Results* dev = buf.as<Results>();
  KIMAD_TRY(cudaMemsetAsync(dev, 0, sizeof(Results), stream));
  error_estimate_kernel<<<blocks_for(buckets * 32), kThreads, 0, stream>>>(
      grad, state, n, mode == Feedback::kEF ? 1.0f : -1.0f, bucket, buckets, dev->errors, &dev->counters);
  KIMAD_TRY(cudaGetLastError());
  Results host{};
  KIMAD_TRY(cudaMemcpyAsync(&host, dev, sizeof host, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaStreamSynchronize(stream));
  stats->non_finite = static_cast<int64_t>(host.counters.bad);
  stats->sq_norm = host.counters.sq_norm;
  if (host.counters.bad == 0) {
    for (int r = 0; r < 4; ++r) errors[r] = host.errors[r];
  }
  return cudaSuccess;
}

cudaError_t quant_encode(Grad grad, float* state, int64_t n, Feedback mode, int bits, int64_t bucket,
                         uint64_t seed, uint8_t* payload, QuantStats* stats, cudaStream_t stream) {
  *stats = QuantStats{0, 0.0, 0.0};
  const int64_t buckets = n > 0 ? (n + bucket - 1) / bucket : 0;
  const float sign = mode == Feedback::kEF ? 1.0f : -1.0f;
  DeviceBuffer stat_buf(stream), counter_buf(stream);
  KIMAD_TRY(stat_buf.alloc(static_cast<size_t>(buckets) * sizeof(float)));
  KIMAD_TRY(counter_buf.alloc(sizeof(Counters)));
  Counters* counters = counter_buf.as<Counters>();
  KIMAD_TRY(cudaMemsetAsync(counters, 0, sizeof(Counters), stream));
  Counters host{};
  if (n > 0) {
    const int64_t warps_needed = buckets;
    bucket_stats_kernel<<<blocks_for(warps_needed * 32), kThreads, 0, stream>>>(
        grad, state, n, sign, bucket, buckets, bits == 1, stat_buf.as<float>(), counters);
    KIMAD_TRY(cudaGetLastError());
    KIMAD_TRY(cudaMemcpyAsync(&host, counters, sizeof host, cudaMemcpyDeviceToHost, stream));
    KIMAD_TRY(cudaStreamSynchronize(stream));
    stats->non_finite = static_cast<int64_t>(host.bad);
    stats->sq_norm = host.sq_norm;
    if (host.bad > 0) return cudaSuccess;
  }
  uint8_t header[kQuantHeaderBytes];
  const uint32_t numel = static_cast<uint32_t>(n);
  std::memcpy(header, &numel, 4);
  header[4] = bits == 1 ? kSignTag : kQsgdTag;
  header[5] = static_cast<uint8_t>(bits);
  const uint16_t field = quant_bucket_field(n, bucket);
  std::memcpy(header + 6, &field, 2);
  KIMAD_TRY(cudaMemcpyAsync(payload, header, sizeof header, cudaMemcpyHostToDevice, stream));
  if (n > 0) {
    KIMAD_TRY(cudaMemcpyAsync(payload + kQuantHeaderBytes, stat_buf.ptr, static_cast<size_t>(buckets) * sizeof(float),
                              cudaMemcpyDeviceToDevice, stream));
    const int64_t code_bytes = (n * bits + 7) / 8;
    encode_kernel<<<blocks_for(code_bytes), kThreads, 0, stream>>>(
        grad, state, n, sign, mode == Feedback::kEF, bits, bucket, draw_key(seed), stat_buf.as<float>(),
        payload + kQuantHeaderBytes + 4 * buckets, code_bytes, counters);
    KIMAD_TRY(cudaGetLastError());
    KIMAD_TRY(cudaMemcpyAsync(&host, counters, sizeof host, cudaMemcpyDeviceToHost, stream));
  }
  KIMAD_TRY(cudaStreamSynchronize(stream));  // also keeps `header` alive until it is copied
  stats->sq_error = host.sq_error;
  return cudaSuccess;
}

cudaError_t quant_decode_accumulate(const uint8_t* payload, int64_t bytes, int bits, int64_t numel, int64_t bucket,
                                    float scale, float* out, QuantDecodeStatus* status, cudaStream_t stream) {
  if (bytes != quant_message_bytes(numel, bits, bucket)) {
    *status = QuantDecodeStatus::kBadLength;
    return cudaSuccess;
  }
  uint8_t header[kQuantHeaderBytes];
  KIMAD_TRY(cudaMemcpyAsync(header, payload, sizeof header, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaStreamSynchronize(stream));
  uint32_t header_numel;
  std::memcpy(&header_numel, header, 4);
  if (static_cast<int64_t>(header_numel) != numel) {
    *status = QuantDecodeStatus::kBadNumel;
    return cudaSuccess;
  }
  if (header[4] != (bits == 1 ? kSignTag : kQsgdTag) || header[5] != bits) {
    *status = QuantDecodeStatus::kBadFormat;
    return cudaSuccess;
  }
  uint16_t field;
  std::memcpy(&field, header + 6, 2);
  if (field != quant_bucket_field(numel, bucket)) {
    *status = QuantDecodeStatus::kBadBucket;
    return cudaSuccess;
  }
  *status = QuantDecodeStatus::kOk;
  if (numel == 0) return cudaSuccess;
  const int64_t buckets = (numel + bucket - 1) / bucket;
  DeviceBuffer bad_buf(stream);
  KIMAD_TRY(bad_buf.alloc(sizeof(unsigned int)));
  KIMAD_TRY(cudaMemsetAsync(bad_buf.ptr, 0, sizeof(unsigned int), stream));
  check_scales_kernel<<<blocks_for(buckets), kThreads, 0, stream>>>(payload + kQuantHeaderBytes, buckets,
                                                                    bad_buf.as<unsigned int>());
  KIMAD_TRY(cudaGetLastError());
  unsigned int bad = 0;
  KIMAD_TRY(cudaMemcpyAsync(&bad, bad_buf.ptr, sizeof bad, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaStreamSynchronize(stream));
  if (bad > 0) {
    *status = QuantDecodeStatus::kBadScale;
    return cudaSuccess;
  }
  decode_kernel<<<blocks_for(numel), kThreads, 0, stream>>>(payload + kQuantHeaderBytes,
                                                            payload + kQuantHeaderBytes + 4 * buckets, numel, bits,
                                                            bucket, scale, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace kimad
