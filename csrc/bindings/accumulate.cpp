// Bindings of decode-and-accumulate (csrc/kernels/*/accumulate.*) and of the top-k bitmap decode (bitmap.cpp).
#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "bindings.h"
#include "kimad/kernels.h"

#ifdef KIMAD_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "kimad/cuda.h"
#endif

namespace kimad {
namespace bindings {
namespace {

// out[indices[i]] += scale * values[i]; returns -1, or the position of the first index outside
// [0, out.numel()) in which case `out` is untouched.
int64_t sparse_accumulate(torch::Tensor out, const torch::Tensor& values, const torch::Tensor& indices,
                          double scale) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32, "sparse_accumulate: out must be float32, got ",
              out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "sparse_accumulate: out must be contiguous");
  TORCH_CHECK(values.scalar_type() == torch::kFloat32, "sparse_accumulate: values must be float32, got ",
              values.scalar_type());
  TORCH_CHECK(indices.scalar_type() == torch::kInt32, "sparse_accumulate: indices must be int32, got ",
              indices.scalar_type());
  TORCH_CHECK(values.dim() == 1 && indices.dim() == 1, "sparse_accumulate: values and indices must be 1-D");
  TORCH_CHECK(values.is_contiguous() && indices.is_contiguous(),
              "sparse_accumulate: values and indices must be contiguous");
  TORCH_CHECK(values.numel() == indices.numel(), "sparse_accumulate: ", values.numel(), " values but ",
              indices.numel(), " indices");
  TORCH_CHECK(out.numel() <= std::numeric_limits<int32_t>::max(), "sparse_accumulate: out has ",
              out.numel(), " elements; int32 indices address at most 2^31-1");
  TORCH_CHECK(out.device() == values.device() && out.device() == indices.device(),
              "sparse_accumulate: out, values and indices must be on one device");
  const int64_t count = values.numel();
  const float s = static_cast<float>(scale);
  if (out.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    auto first = torch::full({1}, std::numeric_limits<int64_t>::max(),
                             torch::dtype(torch::kInt64).device(out.device()));
    C10_CUDA_CHECK(cuda::find_invalid_index(indices.data_ptr<int32_t>(), count, out.numel(),
                                            first.data_ptr<int64_t>(), stream));
    const int64_t bad = first.item<int64_t>();  // synchronises: nothing is written before the check
    if (bad != std::numeric_limits<int64_t>::max()) return bad;
    C10_CUDA_CHECK(cuda::scatter_add(values.data_ptr<float>(), indices.data_ptr<int32_t>(), count, s,
                                     out.data_ptr<float>(), stream));
    return -1;
#else
    TORCH_CHECK(false, "sparse_accumulate: kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  }
  TORCH_CHECK(out.is_cpu(), "sparse_accumulate: unsupported device ", out.device());
  return cpu::sparse_accumulate(values.data_ptr<float>(), indices.data_ptr<int32_t>(), count, s,
                                out.data_ptr<float>(), out.numel());
}

// out = scale * sum (or out += scale * sum when accumulating) of the messages (values[r], indices[r]);
// returns (-1, -1), or (message, position) of the first out-of-range index, in which case `out` is
// untouched.
// sum_first: out += scale * (the messages' sum, formed first); see cpu::sparse_add_sum.
std::tuple<int64_t, int64_t> sparse_sum(torch::Tensor out, const std::vector<torch::Tensor>& values,
                                        const std::vector<torch::Tensor>& indices, double scale, bool accumulate,
                                        bool sum_first) {
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous(),
              "sparse_sum: out must be a contiguous float32 tensor, got ", out.scalar_type());
  TORCH_CHECK(out.numel() <= std::numeric_limits<int32_t>::max(), "sparse_sum: out has ", out.numel(),
              " elements; int32 indices address at most 2^31-1");
  TORCH_CHECK(values.size() == indices.size(), "sparse_sum: ", values.size(), " value tensors but ", indices.size(),
              " index tensors");
  const int64_t n = static_cast<int64_t>(values.size());
  std::vector<cpu::SparseMessage> messages(values.size());
  for (int64_t r = 0; r < n; ++r) {
    const torch::Tensor& v = values[r];
    const torch::Tensor& i = indices[r];
    TORCH_CHECK(v.scalar_type() == torch::kFloat32 && i.scalar_type() == torch::kInt32, "sparse_sum: message ", r,
                " must have float32 values and int32 indices, got ", v.scalar_type(), " and ", i.scalar_type());
    TORCH_CHECK(v.dim() == 1 && i.dim() == 1 && v.is_contiguous() && i.is_contiguous() && v.numel() == i.numel(),
                "sparse_sum: message ", r, " must be two contiguous 1-D tensors of one length");
    TORCH_CHECK(v.device() == out.device() && i.device() == out.device(), "sparse_sum: message ", r,
                " is not on out's device");
    messages[r] = {v.data_ptr<float>(), i.data_ptr<int32_t>(), v.numel()};
  }
  const float s = static_cast<float>(scale);
  if (out.is_cuda()) {
#ifdef KIMAD_WITH_CUDA
    const c10::cuda::CUDAGuard guard(out.device());
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    auto first = torch::full({std::max<int64_t>(n, 1)}, std::numeric_limits<int64_t>::max(),
                             torch::dtype(torch::kInt64).device(out.device()));
    for (int64_t r = 0; r < n; ++r) {
      C10_CUDA_CHECK(cuda::find_invalid_index(messages[r].indices, messages[r].count, out.numel(),
                                              first.data_ptr<int64_t>() + r, stream));
    }
    const auto first_host = first.cpu();  // synchronises: nothing is written before the check
    for (int64_t r = 0; r < n; ++r) {
      const int64_t bad = first_host.data_ptr<int64_t>()[r];
      if (bad != std::numeric_limits<int64_t>::max()) return {r, bad};
    }
    // sum_first: the sum in a zeroed buffer of its own, then added (dense on the GPU).
    torch::Tensor target = sum_first ? torch::zeros_like(out) : out;
    if (!accumulate && !sum_first) {
      C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr<float>(), 0, out.numel() * sizeof(float), stream));
    }
    for (int64_t r = 0; r < n; ++r) {
      C10_CUDA_CHECK(cuda::scatter_add(messages[r].values, messages[r].indices, messages[r].count, s,
                                       target.data_ptr<float>(), stream));
    }
    if (sum_first) out.add_(target);
    return {-1, -1};
#else
    TORCH_CHECK(false, "sparse_sum: kimad._C was built without CUDA; rebuild with a CUDA torch");
#endif
  }
  TORCH_CHECK(out.is_cpu(), "sparse_sum: unsupported device ", out.device());
  const cpu::InvalidIndex bad =
      sum_first ? cpu::sparse_add_sum(messages.data(), n, s, out.data_ptr<float>(), out.numel())
                : cpu::sparse_sum(messages.data(), n, s, accumulate, out.data_ptr<float>(), out.numel());
  return {bad.message, bad.position};
}

// Positions of the set bits below n of a top-k message's bitmap, written to out (at most out.numel() of
// them); returns how many bits are set below n. CPU only (a CUDA bitmap is decoded by torch ops).
int64_t bitmap_positions(const torch::Tensor& bitmap, int64_t n, torch::Tensor out) {
  TORCH_CHECK(n >= 0 && n - 1 <= std::numeric_limits<int32_t>::max(), "bitmap_positions: n must be in [0, 2^31], got ",
              n);
  TORCH_CHECK(bitmap.scalar_type() == torch::kUInt8 && bitmap.dim() == 1 && bitmap.is_contiguous(),
              "bitmap_positions: bitmap must be a contiguous 1-D uint8 tensor, got ", bitmap.scalar_type(), " of ",
              bitmap.dim(), " dimensions");
  TORCH_CHECK(bitmap.numel() == (n + 7) / 8, "bitmap_positions: a bitmap of n=", n, " positions has ", (n + 7) / 8,
              " bytes, got ", bitmap.numel());
  TORCH_CHECK(out.scalar_type() == torch::kInt32 && out.dim() == 1 && out.is_contiguous(),
              "bitmap_positions: out must be a contiguous 1-D int32 tensor, got ", out.scalar_type());
  TORCH_CHECK(bitmap.is_cpu() && out.is_cpu(), "bitmap_positions: bitmap and out must be CPU tensors");
  return cpu::bitmap_positions(bitmap.data_ptr<uint8_t>(), n, out.data_ptr<int32_t>(), out.numel());
}

}  // namespace

void bind_accumulate(pybind11::module_& m) {
  m.def("bitmap_positions", &bitmap_positions, pybind11::arg("bitmap"), pybind11::arg("n"), pybind11::arg("out"),
        "Positions of the set bits below n of a little-endian bitmap (bit j of byte i = position 8i+j), "
        "ascending, into int32 out (at most out.numel()); returns the number of set bits below n. CPU tensors.",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("sparse_accumulate", &sparse_accumulate, pybind11::arg("out"), pybind11::arg("values"),
        pybind11::arg("indices"), pybind11::arg("scale"),
        "out[indices[i]] += scale * values[i] (float32 out/values, int32 indices, contiguous). Returns -1, "
        "or the position of the first out-of-range index, in which case out is untouched.",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("sparse_sum", &sparse_sum, pybind11::arg("out"), pybind11::arg("values"), pybind11::arg("indices"),
        pybind11::arg("scale"), pybind11::arg("accumulate"), pybind11::arg("sum_first") = false,
        "out = scale * sum of the messages (values[r], indices[r]) (or out += ... when accumulate; with "
        "sum_first, out += the per-element sum formed first, touching only named elements). Returns "
        "(-1, -1), or (message, position) of the first out-of-range index, in which case out is untouched.",
        pybind11::call_guard<pybind11::gil_scoped_release>());
}

}  // namespace bindings
}  // namespace kimad
