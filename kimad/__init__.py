"""Kimad: bandwidth-aware adaptive gradient compression (Xin et al., arXiv 2312.08053).

Layers, top to bottom (imports only point downwards):

* ``kimad.ops``     typed, validating wrappers of the native kernels in ``kimad._C``;
* ``kimad.errors``  the named errors Kimad raises;
* ``kimad.bench``   training workloads used by the demo and the end-to-end benchmarks;
* ``kimad.horovod`` the Horovod compression plugin; ``kimad.Kimad`` is loaded from it on first use,
  so ``import kimad`` works without Horovod.

The native extension is loaded lazily by :mod:`kimad.ops`, so ``import kimad`` works (and
explains what to do) even where ``kimad._C`` was not built.
"""

import torch as _torch  # noqa: F401  (kimad._C links against libtorch: load it first)

from kimad.errors import CorruptMessageError, ExtensionNotBuiltError, KimadError

__version__ = "0.1.0"

__all__ = ["CorruptMessageError", "ExtensionNotBuiltError", "Kimad", "KimadError", "__version__"]


def __getattr__(name: str):
    # Lazy: kimad.horovod imports the controller and (when a Kimad is built) Horovod.
    if name == "Kimad":
        from kimad.horovod import Kimad

        return Kimad
    raise AttributeError(f"module 'kimad' has no attribute {name!r}")
