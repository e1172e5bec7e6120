// The kimad._C extension module: torch tensors <-> raw pointers of the kernels in csrc/kernels.
#include "bindings.h"
#include "kimad/kernels.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef KIMAD_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_threads"] = kimad::cpu::num_threads();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Kimad native kernels (CPU, and CUDA when built with it). Use kimad.ops, not this module.";
  m.def("build_info", &build_info,
        "What this build of kimad._C contains: {'cuda': bool, 'openmp': bool, 'cpu_threads': int}.");
  kimad::bindings::bind_accumulate(m);
  kimad::bindings::bind_topk(m);
  kimad::bindings::bind_knapsack(m);
  kimad::bindings::bind_quant(m);
  kimad::bindings::bind_fit(m);
  // (each new op family adds its bind_* call above this line)
}
