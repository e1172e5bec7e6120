"""Build of the native extension ``kimad._C`` (project metadata lives in pyproject.toml).

Sources are found by directory, the same convention CMakeLists.txt uses, so there is no list
of files to keep in step between the two builds:

* ``csrc/kernels/cpu/*.cpp``  torch-free CPU kernels (always built);
* ``csrc/kernels/cuda/*.cu``  torch-free CUDA kernels (built when the installed torch has CUDA);
* ``csrc/bindings/*.cpp``     pybind11 bindings, torch tensors <-> raw pointers.

Environment: ``KIMAD_WITH_CUDA=0|1`` forces the CUDA build off or on (default: on when
``torch.version.cuda`` is set and nvcc is found); ``MAX_JOBS`` caps parallel compile jobs.
"""

import os
from pathlib import Path

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "kimad's native extension is built against the installed torch, and none was found "
        f"({exc}). Install torch first (pip install torch==2.13.0) and build without isolation: "
        "pip install --no-build-isolation -e ."
    ) from exc

ROOT = Path(__file__).resolve().parent


def _sources(pattern: str) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _want_cuda() -> bool:
    forced = os.environ.get("KIMAD_WITH_CUDA")
    if forced is not None:
        return forced.strip() not in ("", "0", "false", "no")
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    include = [str(ROOT / "csrc" / "kernels" / "include")]
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wall", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
    sources = _sources("csrc/kernels/cpu/*.cpp") + _sources("csrc/bindings/*.cpp")
    if _want_cuda():
        nvcc = [
            "-O3",
            "-std=c++17",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",  # PTX, so newer GPUs can JIT it
            "--expt-relaxed-constexpr",
        ]
        return cpp_extension.CUDAExtension(
            "kimad._C",
            sources + _sources("csrc/kernels/cuda/*.cu"),
            include_dirs=include,
            define_macros=[("KIMAD_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        "kimad._C",
        sources,
        include_dirs=include,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
