"""Loads the native extension ``kimad._C`` and turns a failure into an actionable error."""

from __future__ import annotations

import functools
from types import ModuleType

import torch  # noqa: F401  (kimad._C links against libtorch: load torch's libraries first)

from kimad.errors import ExtensionNotBuiltError

_HOW_TO_BUILD = (
    "build it with `make setup` from the repository root, or with "
    "`pip install --no-build-isolation -e .` in an environment that already has torch"
)


@functools.cache
def native() -> ModuleType:
    """Return the loaded ``kimad._C`` module.

    Raises:
        ExtensionNotBuiltError: the extension was not built, or was built against another torch.
    """
    try:
        from kimad import _C
    except ModuleNotFoundError as exc:
        raise ExtensionNotBuiltError(f"kimad's native extension kimad._C is not built; {_HOW_TO_BUILD}") from exc
    except ImportError as exc:
        raise ExtensionNotBuiltError(
            f"kimad._C exists but does not load ({exc}); it was probably built against another torch "
            f"than the installed {torch.__version__}. Rebuild: {_HOW_TO_BUILD}"
        ) from exc
    return _C


def build_info() -> dict:
    """What the loaded ``kimad._C`` was built with: ``{'cuda': bool, 'openmp': bool, 'cpu_threads': int}``."""
    return dict(native().build_info())
