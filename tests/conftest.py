"""Shared fixtures and skip rules. A skip always says why (pytest runs with -ra)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def cuda_available() -> tuple[bool, str]:
    """Whether the CUDA tests can run here, and if not, why."""
    if not torch.cuda.is_available():
        return False, f"no CUDA GPU visible to torch {torch.__version__} (CPU build: {torch.version.cuda is None})"
    from kimad._native import build_info

    if not build_info()["cuda"]:
        return False, "kimad._C was built without CUDA (rebuild with a CUDA torch: KIMAD_WITH_CUDA=1)"
    return True, ""


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> torch.device:
    """Every op test runs on the CPU, and on CUDA where a GPU and a CUDA build exist."""
    if request.param == "cuda":
        ok, why = cuda_available()
        if not ok:
            pytest.skip(why)
    return torch.device(request.param)


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` imported as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
