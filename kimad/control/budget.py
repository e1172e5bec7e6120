"""Communication-time budgets: how many seconds of collectives one step may spend.

``FixedBudget(seconds)`` is a constant. ``AutoBudget(fraction, min_s, max_s)`` follows the
step's measured compute time: ``budget = clamp(fraction * median(recent compute times), min_s, max_s)``
(the median of the last ``window`` steps, so one slow step does not swing the plan). Both have
``observe_compute(seconds)`` and ``budget_s()``, so the controller treats them alike.
"""

from __future__ import annotations

import collections
import math
import statistics

from kimad.errors import KimadError


class BudgetError(KimadError, ValueError):
    """A budget or a measured compute time is not usable (negative, NaN, zero, inverted bounds)."""


def _positive_seconds(name: str, value: float, allow_inf: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"{name} must be a number of seconds, got {value!r}") from None
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise BudgetError(f"{name} must be a {'' if allow_inf else 'finite '}number of seconds > 0, got {value!r}")
    return value


def _check_compute(seconds: float) -> float:
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        raise BudgetError(f"a step's compute time must be a number of seconds, got {seconds!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise BudgetError(f"a step's compute time must be a finite number of seconds >= 0, got {seconds!r}")
    return seconds


class FixedBudget:
    """A constant budget of ``seconds`` (> 0, finite) of communication per step."""

    def __init__(self, seconds: float) -> None:
        self.seconds = _positive_seconds("the fixed budget", seconds)

    def observe_compute(self, seconds: float) -> None:
        """Accepted (and validated) for symmetry with :class:`AutoBudget`; a fixed budget ignores it."""
        _check_compute(seconds)

    def budget_s(self) -> float:
        """The budget, seconds."""
        return self.seconds

    def __repr__(self) -> str:
        return f"FixedBudget(seconds={self.seconds!r})"


class AutoBudget:
    """A budget proportional to the step's compute time, so communication hides behind computation.

    Args:
        fraction: budget per second of compute (> 0, finite; 1.0 = as long as the compute).
        min_s: smallest budget, seconds (> 0).
        max_s: largest budget, seconds (>= min_s; ``inf`` allowed). Before any compute time is
            observed the budget is ``max_s`` (no compression pressure until something is measured).
        window: how many recent steps the median covers (>= 1).
    """

    def __init__(self, fraction: float = 0.5, min_s: float = 1e-3, max_s: float = math.inf, window: int = 20) -> None:
        self.fraction = _positive_seconds("fraction", fraction)
        self.min_s = _positive_seconds("min_s", min_s)
        self.max_s = _positive_seconds("max_s", max_s, allow_inf=True)
        if self.max_s < self.min_s:
            raise BudgetError(f"budget bounds are inverted: min_s={self.min_s!r} > max_s={self.max_s!r}")
        if not isinstance(window, int) or window < 1:
            raise BudgetError(f"window must be an int >= 1 steps, got {window!r}")
        self._compute = collections.deque(maxlen=window)

    def observe_compute(self, seconds: float) -> None:
        """Record one step's measured compute time, seconds (finite, >= 0)."""
        self._compute.append(_check_compute(seconds))

    def compute_s(self) -> float | None:
        """Median compute time of the recent steps, seconds (``None`` before any)."""
        return statistics.median(self._compute) if self._compute else None

    def budget_s(self) -> float:
        """``clamp(fraction * median compute, min_s, max_s)`` seconds; ``max_s`` before any observation."""
        compute = self.compute_s()
        if compute is None:
            return self.max_s
        return min(max(self.fraction * compute, self.min_s), self.max_s)

    def __repr__(self) -> str:
        return f"AutoBudget(fraction={self.fraction!r}, min_s={self.min_s!r}, max_s={self.max_s!r})"
