"""Kimad: bandwidth-aware adaptive gradient compression (Xin et al., arXiv 2312.08053).

Layers, top to bottom (imports only point downwards):

* ``kimad.ops``     typed, validating wrappers of the native kernels in ``kimad._C``;
* ``kimad.errors``  the named errors Kimad raises;
* ``kimad.bench``   training workloads used by the demo and the end-to-end benchmarks.

The native extension is loaded lazily by :mod:`kimad.ops`, so ``import kimad`` works (and
explains what to do) even where ``kimad._C`` was not built.
"""

import torch as _torch  # noqa: F401  (kimad._C links against libtorch: load it first)

from kimad.errors import CorruptMessageError, ExtensionNotBuiltError, KimadError

__version__ = "0.1.0"

__all__ = ["CorruptMessageError", "ExtensionNotBuiltError", "KimadError", "__version__"]
