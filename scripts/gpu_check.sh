#!/usr/bin/env bash
# One short, prepared GPU check (for a lent CUDA machine, e.g. through the device tool):
# builds kimad._C with CUDA for sm_90 (+PTX) against that machine's own CUDA torch, runs the
# op tests (their CUDA cases run there instead of skipping) and the kernel benchmark on CUDA
# tensors. Results go to $OUT (default ./runs/gpu_check). Takes a few minutes on an H100/H200.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU visible"; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" || true
echo "== build (KIMAD_WITH_CUDA=1)"
KIMAD_WITH_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
"$PY" -c 'import kimad._native as n; info = n.build_info(); print(info); assert info["cuda"], "built without CUDA"'
echo "== op tests (CPU and CUDA cases)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_ops_accumulate.py tests/test_ops_topk.py tests/test_ops_quant.py \
  2>&1 | tee "$OUT/pytest.log" | tail -15
echo "== kernel benchmark on CUDA tensors"
"$PY" benchmarks/kernels.py --quick --device cuda --json "$OUT/kernels_cuda.json" 2>&1 | tee "$OUT/bench.log"
