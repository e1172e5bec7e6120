// Shared declarations of the kimad._C bindings: each op family binds itself from its own file.
#pragma once

#include <torch/extension.h>

namespace kimad {
namespace bindings {

void bind_accumulate(pybind11::module_& m);
void bind_topk(pybind11::module_& m);
void bind_knapsack(pybind11::module_& m);
void bind_quant(pybind11::module_& m);
// (each new op family adds its bind_* declaration above this line)

}  // namespace bindings
}  // namespace kimad
