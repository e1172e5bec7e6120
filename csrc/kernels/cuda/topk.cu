// Fused error feedback + exact top-k encode on the GPU.
//
// 1. histogram of the top 16 key bits of |v| (global atomics; counts, sums of squares, ||v||^2,
//    non-finite count), read back to the host, which finds the bin T of the k-th largest;
// 2. compaction: indices of bins > T (all sent) and composite keys (inverted low 16 key bits,
//    index) of bin T's candidates;
// 3. CUB radix sort of the candidates (descending |v|, then ascending index) and the first
//    `need` appended to the sent set; CUB radix sort of the k sent indices into `indices`;
// 4. values gathered and the state updated (EF: e = v everywhere, then zeroed where sent;
//    EF21: h += v where sent).
#include <cstdint>
#include <vector>

#include <cub/cub.cuh>

#include "kimad/topk_cuda.h"
#include "launch.cuh"

namespace kimad {
namespace cuda {
namespace {

using launch::blocks_for;
using launch::DeviceBuffer;
using launch::kThreads;

__device__ __forceinline__ uint32_t abs_key(float x) { return __float_as_uint(x) & 0x7FFFFFFFu; }

__global__ void histogram_kernel(Grad g, const float* __restrict__ s, int64_t n, float sign,
                                 unsigned int* __restrict__ counts, double* __restrict__ sums,
                                 unsigned long long* __restrict__ non_finite, double* __restrict__ sq_norm) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ unsigned long long block_bad;
  if (threadIdx.x == 0) block_bad = 0;
  __syncthreads();
  double sq = 0.0;
  unsigned long long bad = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = g[i] + sign * s[i];
    const uint32_t key = abs_key(v);
    if (key >= 0x7F800000u) {
      ++bad;
      continue;
    }
    const double v2 = static_cast<double>(v) * static_cast<double>(v);
    sq += v2;
    atomicAdd(counts + (key >> 16), 1u);
    atomicAdd(sums + (key >> 16), v2);
  }
  if (bad) atomicAdd(&block_bad, bad);
  const double block_sq = Reduce(tmp).Sum(sq);
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(sq_norm, block_sq);
    if (block_bad) atomicAdd(non_finite, block_bad);
  }
}

__global__ void compact_kernel(Grad g, const float* __restrict__ s, int64_t n, float sign,
                               uint32_t top_bin, int32_t* __restrict__ sure, unsigned int* __restrict__ sure_count,
                               unsigned long long* __restrict__ candidates, unsigned int* __restrict__ cand_count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t key = abs_key(g[i] + sign * s[i]);
    const uint32_t bin = key >> 16;
    if (bin > top_bin) {
      sure[atomicAdd(sure_count, 1u)] = static_cast<int32_t>(i);
    } else if (bin == top_bin) {
      // Ascending order of this key = descending |v|, then ascending index.
      candidates[atomicAdd(cand_count, 1u)] =
          (static_cast<unsigned long long>(0xFFFFu - (key & 0xFFFFu)) << 32) | static_cast<unsigned long long>(i);
    }
  }
}

// Appends the first `need` sorted candidates to the sent set; adds the squares of the rest.
__global__ void resolve_kernel(Grad g, const float* __restrict__ s, float sign,
                               const unsigned long long* __restrict__ sorted, int64_t count, int64_t need,
                               int32_t* __restrict__ sent, double* __restrict__ unsent_sq) {
  using Reduce = cub::BlockReduce<double, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  double sq = 0.0;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < count;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t i = static_cast<int32_t>(sorted[j] & 0xFFFFFFFFull);
    if (j < need) {
      sent[j] = i;
    } else {
      const float v = g[i] + sign * s[i];
      sq += static_cast<double>(v) * static_cast<double>(v);
    }
  }
  const double block_sq = Reduce(tmp).Sum(sq);
  if (threadIdx.x == 0) atomicAdd(unsent_sq, block_sq);
}

__global__ void ef_residual_kernel(Grad g, float* __restrict__ e, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    e[i] = g[i] + e[i];
  }
}

// EF: state already holds v; EF21: v = g - h. Indices are distinct, so there are no races.
__global__ void emit_kernel(Grad g, float* __restrict__ s, bool ef,
                            const int32_t* __restrict__ indices, int64_t k, float* __restrict__ values) {
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < k;
       j += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t i = indices[j];
    if (ef) {
      values[j] = s[i];
      s[i] = 0.0f;
    } else {
      const float v = g[i] - s[i];
      values[j] = v;
      s[i] += v;
    }
  }
}

float sign_of(Feedback mode) { return mode == Feedback::kEF ? 1.0f : -1.0f; }

}  // namespace

cudaError_t key_histogram(Grad grad, const float* state, int64_t n, Feedback mode,
                          uint32_t* counts_host, double* sum_squares_host, TopKStats* stats,
                          cudaStream_t stream) {
  *stats = TopKStats{0, 0.0, 0.0};
  const size_t counts_bytes = sizeof(unsigned int) * kTopKBins, sums_bytes = sizeof(double) * kTopKBins;
  DeviceBuffer buf(stream);
  KIMAD_TRY(buf.alloc(counts_bytes + sums_bytes + 2 * sizeof(double)));
  auto* sums = buf.as<double>();
  auto* sq_norm = sums + kTopKBins;
  auto* non_finite = reinterpret_cast<unsigned long long*>(sq_norm + 1);
  auto* counts = reinterpret_cast<unsigned int*>(non_finite + 1);
  KIMAD_TRY(cudaMemsetAsync(buf.ptr, 0, counts_bytes + sums_bytes + 2 * sizeof(double), stream));
  if (n > 0) {
    histogram_kernel<<<blocks_for(n), kThreads, 0, stream>>>(grad, state, n, sign_of(mode), counts, sums,
                                                             non_finite, sq_norm);
    KIMAD_TRY(cudaGetLastError());
  }
  unsigned long long bad = 0;
  KIMAD_TRY(cudaMemcpyAsync(counts_host, counts, counts_bytes, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaMemcpyAsync(sum_squares_host, sums, sums_bytes, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaMemcpyAsync(&stats->sq_norm, sq_norm, sizeof(double), cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaMemcpyAsync(&bad, non_finite, sizeof bad, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaStreamSynchronize(stream));
  stats->non_finite = static_cast<int64_t>(bad);
  return cudaSuccess;
}

cudaError_t topk_encode(Grad grad, float* state, int64_t n, Feedback mode, int64_t k,
                        float* values, int32_t* indices, TopKStats* stats, cudaStream_t stream) {
  *stats = TopKStats{0, 0.0, 0.0};
  if (n <= 0) return cudaSuccess;
  std::vector<uint32_t> counts(kTopKBins);
  std::vector<double> sums(kTopKBins);
  KIMAD_TRY(key_histogram(grad, state, n, mode, counts.data(), sums.data(), stats, stream));
  if (stats->non_finite > 0) return cudaSuccess;  // nothing written
  const bool ef = mode == Feedback::kEF;
  const float sign = sign_of(mode);

  // The bin T of the k-th largest, the entries above it, and how many of T's are sent.
  int64_t top_bin = -1, above = 0, need = 0;
  for (int64_t b = kTopKBins - 1; b >= 0 && k > 0; --b) {
    if (above + counts[b] >= k) {
      top_bin = b;
      need = k - above;
      break;
    }
    above += counts[b];
  }
  if (top_bin < 0) {  // k == 0: nothing sent
    for (int b = 0; b < kTopKBins; ++b) stats->sq_error += sums[b];
    if (ef) {
      ef_residual_kernel<<<blocks_for(n), kThreads, 0, stream>>>(grad, state, n);
      KIMAD_TRY(cudaGetLastError());
    }
    return cudaStreamSynchronize(stream);
  }
  for (int64_t b = 0; b < top_bin; ++b) stats->sq_error += sums[b];
  const int64_t cand = counts[top_bin];

  DeviceBuffer sent(stream), keys_in(stream), keys_out(stream), scalars(stream), temp(stream);
  KIMAD_TRY(sent.alloc(sizeof(int32_t) * k));
  KIMAD_TRY(keys_in.alloc(sizeof(unsigned long long) * cand));
  KIMAD_TRY(keys_out.alloc(sizeof(unsigned long long) * cand));
  KIMAD_TRY(scalars.alloc(sizeof(double) + 2 * sizeof(unsigned int)));
  KIMAD_TRY(cudaMemsetAsync(scalars.ptr, 0, sizeof(double) + 2 * sizeof(unsigned int), stream));
  auto* unsent_sq = scalars.as<double>();
  auto* sure_count = reinterpret_cast<unsigned int*>(unsent_sq + 1);
  auto* cand_count = sure_count + 1;

  compact_kernel<<<blocks_for(n), kThreads, 0, stream>>>(grad, state, n, sign, static_cast<uint32_t>(top_bin),
                                                         sent.as<int32_t>(), sure_count,
                                                         keys_in.as<unsigned long long>(), cand_count);
  KIMAD_TRY(cudaGetLastError());

  // Sort candidates (48 key bits: inverted low 16 key bits, 32 index bits) and the sent indices.
  size_t cand_temp = 0, sent_temp = 0;
  KIMAD_TRY(cub::DeviceRadixSort::SortKeys(nullptr, cand_temp, keys_in.as<unsigned long long>(),
                                           keys_out.as<unsigned long long>(), static_cast<int>(cand), 0, 48,
                                           stream));
  KIMAD_TRY(cub::DeviceRadixSort::SortKeys(nullptr, sent_temp, sent.as<int32_t>(), indices, static_cast<int>(k), 0,
                                           32, stream));
  KIMAD_TRY(temp.alloc(cand_temp > sent_temp ? cand_temp : sent_temp));
  KIMAD_TRY(cub::DeviceRadixSort::SortKeys(temp.ptr, cand_temp, keys_in.as<unsigned long long>(),
                                           keys_out.as<unsigned long long>(), static_cast<int>(cand), 0, 48,
                                           stream));
  resolve_kernel<<<blocks_for(cand), kThreads, 0, stream>>>(grad, state, sign, keys_out.as<unsigned long long>(),
                                                            cand, need, sent.as<int32_t>() + above, unsent_sq);
  KIMAD_TRY(cudaGetLastError());
  KIMAD_TRY(cub::DeviceRadixSort::SortKeys(temp.ptr, sent_temp, sent.as<int32_t>(), indices, static_cast<int>(k), 0,
                                           32, stream));

  if (ef) {
    ef_residual_kernel<<<blocks_for(n), kThreads, 0, stream>>>(grad, state, n);
    KIMAD_TRY(cudaGetLastError());
  }
  emit_kernel<<<blocks_for(k), kThreads, 0, stream>>>(grad, state, ef, indices, k, values);
  KIMAD_TRY(cudaGetLastError());
  double unsent = 0.0;
  KIMAD_TRY(cudaMemcpyAsync(&unsent, unsent_sq, sizeof unsent, cudaMemcpyDeviceToHost, stream));
  KIMAD_TRY(cudaStreamSynchronize(stream));
  stats->sq_error += unsent;
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace kimad
