"""Allocators of the Kimad controller: which compression option each tensor uses this step.

Every tensor ``l`` offers a menu of ``R_l`` options; option ``r`` costs ``costs[l][r]`` seconds of
communication and leaves ``errors[l][r]`` of compression error (e.g. the squared L2 norm of what
the compressor drops). Given a budget in seconds, an allocator picks one option per tensor:

* :func:`allocate_uniform` (Kimad): one global compression level for all tensors, the least
  aggressive one whose total cost fits;
* :func:`allocate_layerwise` (Kimad+): the multiple-choice knapsack, minimise the sum of errors
  subject to the sum of costs <= budget, solved exactly by dynamic programming in C++
  (``kimad._C.knapsack_min_error``) over a binned cost axis;
* :func:`allocate_lagrangian`: the convex-hull (Lagrangian) relaxation of the same knapsack, a
  fast approximation for very many tensors.

All three always return a plan for every tensor. When even the cheapest option of every tensor
overruns the budget, the plan is that cheapest one and ``over_budget`` is True.

Ties are broken deterministically everywhere: among equally good options the cheaper one (for
the DP: cheaper in bins), then the one with the lower index, is chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kimad._native import native
from kimad.errors import KimadError

# The DP's choice table holds tensors x (bins + 1) cells of 1-2 bytes: refuse what cannot be fast.
_MAX_TABLE_CELLS = 1 << 30
# If float rounding of binned costs lets a DP plan overrun by an ulp, the DP reruns keeping this much unspent.
_HEADROOM = 1e-9


class ConfigError(KimadError, ValueError):
    """An allocator was called with an impossible configuration (bad budget, menu or bins)."""


@dataclass(frozen=True)
class Allocation:
    """One option per tensor, and what it adds up to.

    Attributes:
        choice: the chosen option index of every tensor, in tensor order.
        total_cost: sum of the chosen options' costs (seconds).
        total_error: sum of the chosen options' errors.
        over_budget: True when even the cheapest options overrun the budget (uniform: when no
            global level fits); ``total_cost`` then exceeds the budget.
        method: ``"dp"``, ``"lagrangian"`` or ``"uniform"``.
    """

    choice: tuple[int, ...]
    total_cost: float
    total_error: float
    over_budget: bool
    method: str


class _Menus:
    """All tensors' options as flat float64 arrays; tensor ``t`` owns ``[offsets[t], offsets[t+1])``."""

    def __init__(self, costs: Sequence[np.ndarray], errors: Sequence[np.ndarray]) -> None:
        if len(costs) != len(errors):
            raise ConfigError(f"{len(costs)} cost menus but {len(errors)} error menus; give one of each per tensor")
        flat_costs, flat_errors, sizes = [], [], []
        for t, (c, e) in enumerate(zip(costs, errors)):
            c = np.asarray(c, dtype=np.float64)
            e = np.asarray(e, dtype=np.float64)
            if c.ndim != 1 or e.ndim != 1:
                raise ConfigError(f"tensor {t}: costs and errors must be 1-D menus, got shapes {c.shape} and {e.shape}")
            if c.size == 0:
                raise ConfigError(f"tensor {t} has an empty menu; every tensor needs at least one option (e.g. dense)")
            if c.size != e.size:
                raise ConfigError(f"tensor {t} has {c.size} option costs but {e.size} option errors")
            flat_costs.append(c)
            flat_errors.append(e)
            sizes.append(c.size)
        self.count = len(sizes)
        self.offsets = np.zeros(self.count + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.offsets[1:])
        self.starts = self.offsets[:-1]
        self.cost = np.concatenate(flat_costs) if sizes else np.zeros(0)
        self.error = np.concatenate(flat_errors) if sizes else np.zeros(0)
        self.tensor_of = np.repeat(np.arange(self.count), sizes)
        self._check_values(self.cost, "cost")
        self._check_values(self.error, "error")

    def _check_values(self, values: np.ndarray, what: str) -> None:
        bad = ~(np.isfinite(values) & (values >= 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            t = int(self.tensor_of[i])
            raise ConfigError(
                f"tensor {t} option {i - int(self.offsets[t])} has {what} {float(values[i])}; "
                f"{what}s must be finite and >= 0"
            )

    def first_argmin(self, keys: Sequence[np.ndarray], mask: np.ndarray | None = None) -> np.ndarray:
        """Per tensor, the lowest option index among ``mask`` minimising ``keys`` lexicographically."""
        if self.count == 0:
            return np.zeros(0, dtype=np.int64)
        mask = np.ones(self.cost.size, dtype=bool) if mask is None else mask
        for key in keys:
            masked = np.where(mask, key, np.inf)
            mask = mask & (masked == np.minimum.reduceat(masked, self.starts)[self.tensor_of])
        pos = np.flatnonzero(mask)
        owner = self.tensor_of[pos]
        first = pos[np.concatenate(([True], owner[1:] != owner[:-1]))]
        return first - self.starts

    def cheapest(self) -> np.ndarray:
        """Per tensor, its cheapest option (the lowest error among equally cheap ones)."""
        return self.first_argmin([self.cost, self.error])

    def allocation(self, choice: np.ndarray, over_budget: bool, method: str) -> Allocation:
        flat = self.starts + choice
        return Allocation(
            choice=tuple(int(r) for r in choice),
            total_cost=math.fsum(self.cost[flat]),
            total_error=math.fsum(self.error[flat]),
            over_budget=over_budget,
            method=method,
        )


def _budget(budget: float) -> float:
    budget = float(budget)
    if math.isnan(budget) or budget < 0:
        raise ConfigError(f"budget is {budget!r} seconds; it must be >= 0 (math.inf means unconstrained)")
    return budget


def _fits(menus: _Menus, budget: float) -> bool:
    """Whether the cheapest option of every tensor fits the budget (so some plan does)."""
    return math.fsum(np.minimum.reduceat(menus.cost, menus.starts)) <= budget


def costs_in_bins(cost: np.ndarray, budget: float, bins: int) -> np.ndarray:
    """Costs in whole bins of ``budget / bins`` seconds, rounded up; options that can never fit get ``bins + 1``.

    Rounding up makes any plan whose binned costs sum to <= ``bins`` fit ``budget`` in seconds
    (up to float rounding of the products, which is why a ceil that lands short is bumped).
    """
    width = budget / bins
    if width == 0.0:  # budget 0 (or underflow): only free options fit
        return np.where(cost == 0.0, 0, bins + 1).astype(np.int64)
    if math.isinf(width):  # no limit: everything is free
        return np.zeros(cost.shape, dtype=np.int64)
    with np.errstate(over="ignore"):  # a cost of many budgets overflows to inf bins: clipped below
        in_bins = np.ceil(cost / width)
        in_bins += in_bins * width < cost
    return np.minimum(in_bins, bins + 1).astype(np.int64)


def allocate_layerwise(
    costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float, *, bins: int = 1000
) -> Allocation:
    """Kimad+: the plan of least total error whose total cost fits the budget (multiple-choice knapsack).

    Every plan pays at least ``C0 = sum_l min_r costs[l][r]``, so the DP bins only what options
    cost beyond their tensor's cheapest one (``extra = costs[l][r] - min_r costs[l][r]``) against the
    spare budget ``S = budget - C0``: ``bins`` bins of width ``w = S / bins`` seconds, extras
    rounded up to whole bins; O(L * bins * R) time in C++, single-threaded. (Should float rounding
    make the plan overrun the budget by an ulp, the DP reruns with ``S`` reduced by ``1e-9 * budget``.)

    Guarantees for L tensors (tests/test_allocate.py checks them against brute force):

    * the plan fits: ``total_cost <= budget``, since rounding up makes binned costs over-estimate;
    * near-optimality: ``total_error <= OPT(C0 + S - L * w) = OPT(C0 + S * (1 - L / bins))``, the
      true optimum at a budget L bins smaller. Proof: a plan whose true extras sum to
      ``X <= S - L*w`` has binned cost ``sum ceil(x_l / w) <= X / w + L <= bins``, so the DP sees it
      and does at least as well. And ``total_error >= OPT(budget)`` since the plan fits.
    * if the cheapest plan fits but binning makes every plan look too costly (the spare budget is
      under L bins), the cheapest plan is returned: it fits.

    The bound is loose when L approaches ``bins`` (each tensor may waste up to one bin): on the
    realistic menus of benchmarks/allocator.py, bins=1000, the Lagrangian plan had 3% less error
    than this DP at L=200 and 18% less at L=1000. Scale ``bins`` with L where that matters.

    Args:
        costs: per tensor, a 1-D array of its options' costs (seconds, finite, >= 0).
        errors: per tensor, a 1-D array of its options' errors (finite, >= 0), same lengths.
        budget: communication time available (seconds, >= 0; ``math.inf`` for no limit).
        bins: resolution of the cost axis (>= 1); more bins, tighter bound, slower solve.

    Raises:
        ConfigError: bad budget, bins, or menus (empty, mismatched, NaN or negative entries).
    """
    budget = _budget(budget)
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ConfigError(f"bins is {bins!r}; it must be an integer >= 1")
    bins = int(bins)
    menus = _Menus(costs, errors)
    if menus.count == 0:
        return menus.allocation(np.zeros(0, dtype=np.int64), False, "dp")
    if not _fits(menus, budget):
        return menus.allocation(menus.cheapest(), True, "dp")
    if menus.count * (bins + 1) > _MAX_TABLE_CELLS:
        raise ConfigError(
            f"{menus.count:,} tensors x {bins + 1:,} bins exceed the DP's table of {_MAX_TABLE_CELLS:,} cells; "
            "use fewer bins or allocate_lagrangian"
        )
    # Every plan pays each tensor's cheapest option: bin only the extra, so free upgrades stay free.
    cheapest = np.minimum.reduceat(menus.cost, menus.starts)
    extra = menus.cost - cheapest[menus.tensor_of]
    error, offsets = torch.from_numpy(menus.error), torch.from_numpy(menus.offsets)
    floor = math.fsum(cheapest)
    for headroom in (0.0, _HEADROOM):  # the second pass only when float rounding overran the first
        spare = max(0.0, budget - floor - headroom * budget) if math.isfinite(budget) else math.inf
        feasible, choice = native().knapsack_min_error(
            torch.from_numpy(costs_in_bins(extra, spare, bins)), error, offsets, bins
        )
        if feasible:
            allocation = menus.allocation(choice.numpy(), False, "dp")
            if allocation.total_cost <= budget:
                return allocation
    return menus.allocation(menus.cheapest(), False, "dp")  # only binning overruns: the cheapest plan fits


def allocate_lagrangian(costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], budget: float) -> Allocation:
    """The Lagrangian (convex-hull) relaxation of :func:`allocate_layerwise`: fast, not always optimal.

    For a multiplier ``lam >= 0`` each tensor independently takes the option minimising
    ``error + lam * cost`` (ties: the cheaper, then the lower index); the total cost falls as
    ``lam`` grows, and the plan of the smallest ``lam`` that fits is returned. That ``lam`` is found
    exactly, not by bisection: the plan only changes where ``lam`` crosses the slope of a segment of
    some tensor's lower convex hull of (cost, error), so the kernel (``kimad._C.knapsack_lagrangian``)
    finds the critical slope by a selection search over all hull segments (expected O(T log T) for
    T options in all), on real costs (no bins).

    The plan fits the budget and is optimal for its own total cost (no plan as cheap has less
    error), but it may leave budget unused: options off a tensor's hull are never chosen.

    Args and Raises: as :func:`allocate_layerwise` (no bins).
    """
    budget = _budget(budget)
    menus = _Menus(costs, errors)
    if menus.count == 0 or not _fits(menus, budget):
        return menus.allocation(menus.cheapest(), menus.count > 0, "lagrangian")
    feasible, choice, _ = native().knapsack_lagrangian(
        torch.from_numpy(menus.cost), torch.from_numpy(menus.error), torch.from_numpy(menus.offsets), budget
    )
    allocation = menus.allocation(choice.numpy(), False, "lagrangian")
    if not feasible or allocation.total_cost > budget:  # the kernel's compensated sum and fsum disagree
        return menus.allocation(menus.cheapest(), False, "lagrangian")
    return allocation


def allocate_uniform(
    costs: Sequence[np.ndarray], errors: Sequence[np.ndarray], levels: Sequence[np.ndarray], budget: float
) -> Allocation:
    """Kimad: one global compression level for every tensor, the least aggressive that fits.

    ``levels[l][r]`` is the global level of option ``r`` of tensor ``l`` (0 = least aggressive,
    e.g. dense; higher = more compressed). At global level ``lam`` each tensor takes its option of
    the largest level ``<= lam`` (a tensor whose menu lacks ``lam``, e.g. a tiny tensor offering
    only dense, uses its nearest lower level; one with no level ``<= lam`` its lowest level;
    several options at one level: the cheapest, then lowest error, then lowest index). The
    candidate levels are all levels present in any menu; the least aggressive one whose total
    cost fits the budget wins. If none fits, the most aggressive one is returned with
    ``over_budget=True``.

    Args:
        costs, errors, budget: as :func:`allocate_layerwise`.
        levels: per tensor, a 1-D array of its options' levels (finite), same lengths as costs.

    Raises:
        ConfigError: as :func:`allocate_layerwise`, or levels mismatched or not finite.
    """
    budget = _budget(budget)
    menus = _Menus(costs, errors)
    if len(levels) != menus.count:
        raise ConfigError(f"{len(levels)} level menus for {menus.count} tensors; give one per tensor")
    flat_levels = []
    for t, lv in enumerate(levels):
        lv = np.asarray(lv, dtype=np.float64)
        size = int(menus.offsets[t + 1] - menus.offsets[t])
        if lv.shape != (size,):
            raise ConfigError(f"tensor {t} has {size} options but levels of shape {lv.shape}")
        if not np.isfinite(lv).all():
            raise ConfigError(f"tensor {t} has a non-finite level in {lv.tolist()}")
        flat_levels.append(lv)
    if menus.count == 0:
        return menus.allocation(np.zeros(0, dtype=np.int64), False, "uniform")
    level = np.concatenate(flat_levels)
    lowest = np.minimum.reduceat(level, menus.starts)
    for lam in np.unique(level):
        below = np.maximum.reduceat(np.where(level <= lam, level, -np.inf), menus.starts)
        target = np.where(np.isneginf(below), lowest, below)
        choice = menus.first_argmin([menus.cost, menus.error], level == target[menus.tensor_of])
        if math.fsum(menus.cost[menus.starts + choice]) <= budget:
            return menus.allocation(choice, False, "uniform")
    return menus.allocation(choice, True, "uniform")
