#!/usr/bin/env bash
# Compile-check the CUDA branches of csrc/bindings/*.cpp (#ifdef KIMAD_WITH_CUDA) on a machine without a GPU
# or a CUDA build of torch: g++ -fsyntax-only against the installed torch's headers and the CUDA toolkit's
# runtime headers. torch's ATen/cuda headers also include cuBLAS/cuSPARSE/cuSOLVER headers that a bare
# toolkit may lack; the few handle/status typedefs they need are stubbed in a temporary directory (only
# declarations: nothing is linked). nvcc's own check of csrc/kernels/cuda/*.cu is the CMake target
# kimad_cuda_compile_check; this covers the torch side that only a CUDA torch would otherwise compile.
#   usage: scripts/check_cuda_bindings.sh [python]    (exit 0: every file compiles; 2: no CUDA headers)
set -euo pipefail
PY=${1:-${PYTHON:-python}}
CUDA_INC=${CUDA_HOME:-/usr/local/cuda}/include
if [ ! -f "$CUDA_INC/cuda_runtime.h" ]; then
  echo "[check_cuda_bindings] skipped: no CUDA runtime headers in $CUDA_INC (set CUDA_HOME)" >&2
  exit 2
fi
stubs=$(mktemp -d)
trap 'rm -rf "$stubs"' EXIT
mkdir -p "$stubs/c10/cuda/impl"
stub() { [ -f "$CUDA_INC/$1" ] || printf '#pragma once\n%s\n' "$2" > "$stubs/$1"; }
stub cusparse.h 'typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;'
stub cublas_v2.h 'typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;'
stub cublasLt.h 'typedef struct cublasLtContext* cublasLtHandle_t;'
stub cusolver_common.h 'typedef int cusolverStatus_t;'
stub cusolverDn.h 'typedef struct cusolverDnContext* cusolverDnHandle_t; typedef int cusolverStatus_t;'
printf '#pragma once\n' > "$stubs/c10/cuda/impl/cuda_cmake_macros.h"
read -r -a flags <<<"$("$PY" - <<'PY'
import sysconfig, pybind11, torch.utils.cpp_extension as c
print(" ".join(["-I" + p for p in c.include_paths()] + ["-I" + sysconfig.get_paths()["include"],
                "-I" + pybind11.get_include()]))
PY
)"
root=$(cd "$(dirname "$0")/.." && pwd)
status=0
for f in "$root"/csrc/bindings/*.cpp; do
  if g++ -std=c++17 -fsyntax-only -DKIMAD_WITH_CUDA -DTORCH_EXTENSION_NAME=_C "${flags[@]}" -I"$stubs" \
       -I"$CUDA_INC" -I"$root/csrc/kernels/include" -I"$root/csrc/bindings" -Wno-c++20-extensions "$f"; then
    echo "[check_cuda_bindings] ok: ${f#"$root"/}"
  else
    echo "[check_cuda_bindings] FAILED: ${f#"$root"/}" >&2; status=1
  fi
done
exit $status
