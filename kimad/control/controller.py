"""The Kimad controller: from measured throughput and a time budget to one step's :class:`Plan`.

Each step (Xin et al., arXiv 2312.08053, Algorithm 1 with the layer-wise extension):

1. **Monitor** -- every collective is reported with :meth:`Controller.observe_collective`
   (kind, bytes per rank, seconds); the :class:`BandwidthEstimator` fits latency and bandwidth.
2. **Budget** -- :class:`FixedBudget` (seconds per step) or :class:`AutoBudget` (a fraction of the
   measured compute time, fed by :meth:`Controller.observe_compute`).
3. **Price** -- a :class:`CostModel` built from the current estimate and the world size prices
   every option of every tensor's menu (exact wire bytes -> seconds), with the squared error the
   error-profile op measured for it. *Probe:* for ``probe_steps`` plans after the estimator declares a
   faster link (a regime change that lifts the estimate more than :data:`PROBE_TRIGGER` times), the
   bandwidth is priced ``probe_factor`` times higher. The messages then in flight were sized for the slow
   link -- at 4 emulated ranks on 2 cores, 12-22 kB per rank, 2-3 ms of bits at 100 Mbit/s against
   1-3 ms of latency and milliseconds of scheduler jitter -- so they hardly show the new rate, and the
   estimate climbs only as fast as the messages grow; probing sends messages that do show it. Measured on
   4 emulated nodes, square trace 100 <-> 20 Mbit/s, Kimad+ (``e2e --repeats``): within 15% of the new rate
   in <= 5 steps after 14 of 16 speed-ups (worst 8 steps) with probing, 17 of 24 (worst 14) without;
   comm time within 25% of the budget on 84-85% of steps either way. No probe starts when the largest new
   sample, priced at the new estimate, already spends :data:`PROBE_BITS_SHARE` of its time on bits (the LM's
   ~70 kB messages at 4 ranks: ~0.9; the CNN's 12 kB: ~0.55), or its bits alone take :data:`PROBE_BITS_S`,
   well above the milliseconds of jitter (the LM's ~110 kB messages with the compact wire: ~30 ms, at only
   ~0.6 of their time where latency is 15-20 ms; the CNN's 12-25 kB: 2-5 ms): its messages show the rate
   without one, and a probe only overruns the budget (by 1.6-1.9x in the LM's comparisons; on 12-02 probing
   plans chose a dense allreduce at ~2x the budget, 2-12 times a repeat).
   *Hedge:* when the last step's collective with the most bits is informative
   (:func:`~kimad.control.estimator.bits_share`) and took ``hedge_trigger`` times longer than the estimate of
   the last plan predicted, while the estimator, with that sample, still sees a link more than
   :data:`HEDGE_MARGIN` times faster than the sample implies, the next plan is priced at the sample's own rate
   (its bits over the time it took beyond the latency), and so is every following plan whose last sample
   still implies a link that much slower than the estimate. The estimator needs ``change_samples`` slow samples
   over more than ``stall_steps`` steps to tell a slower link from a burst of stalls, and until then every
   plan sized for the old link overruns the budget by the slow-down (5x on a 100 -> 20 Mbit/s step); a plan
   priced low by mistake costs one step of fewer entries, which error feedback carries to the next. Stalls
   are rarely that slow: replaying the link times of six 4-node CNN repeats and one LM comparison (square
   trace 100 <-> 20 Mbit/s), 2-3 plans per step-down were hedged, at 0.77-1.12x the shaped rate, and 3 plans
   in ~6,800 CNN steps on a steady link.
   *Lift:* the hedge's mirror for a faster link whose messages show it. When the last step's collective with the
   most bits ran ``lift_trigger`` times faster than the last plan's estimate predicted and spent at least
   :data:`PROBE_BITS_SHARE` of its own (measured) time on bits, while the estimator, with that sample, still sees
   a link more than :data:`HEDGE_MARGIN` times slower than the sample implies, the next plan is priced at the
   sample's rate. The estimator needs ``faster_change_samples`` (2) fast samples to declare a faster link, so
   without the lift the plan after the first one is still sized for the slow link and sends a fifth of the budget
   on a 20 -> 100 Mbit/s step; stalls never make a collective faster, so one fast, bits-bound sample is evidence.
   Replaying the link times of three LM comparisons (9 repeats, 4 emulated nodes, square trace 100 <-> 20 Mbit/s),
   the plan right after the first fast sample was priced at 0.23x the new rate (median) and would have been lifted
   to 0.95x [0.38-1.19] in 61 of 108 speed-ups (the others' first fast step straddled the change), 24 plans in the
   next two steps at 0.98x and 5 later ones (the estimator still lagging) at 0.86-0.96x, no other; the CNN's
   messages after a speed-up are too small to show the rate (the probe's case) and were never lifted.
4. **Allocate** -- ``"uniform"`` (Kimad: one compression level for all tensors, the least
   aggressive that fits), ``"layerwise"`` (Kimad+: multiple-choice knapsack minimising the sum of
   squared errors under the budget, exact DP over ``bins`` cost bins, or the convex-hull
   (Lagrangian) solution when that is better, since the DP loses up to one bin per tensor to
   rounding), ``"lagrangian"`` (the relaxation alone) or ``"static"`` (the GRACE/DGC baseline, not
   Kimad: every tensor of at least ``min_compress_numel`` elements takes top-k at the controller's
   single density ``densities=(d,)``, tiny tensors go dense, whatever the budget; ``over_budget``
   still says honestly whether that plan's predicted time exceeds the budget). When nothing fits, every
   tensor takes its cheapest option and the plan says ``over_budget``; no tensor is ever dropped.

The controller is framework-free (no Horovod import) and deterministic: the same profiles,
samples and configuration give the same plan, byte for byte, in every process. Frontends must
therefore feed every rank the same (agreed) inputs -- e.g. allreduced error profiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from kimad.compressors.wire import MessageFormat
from kimad.control.allocate import Allocation, allocate_lagrangian, allocate_layerwise, allocate_uniform
from kimad.control.budget import AutoBudget, FixedBudget
from kimad.control.cost import CostModel
from kimad.control.estimator import INFORMATIVE_SHARE, BandwidthEstimate, BandwidthEstimator, bits_share
from kimad.control.menu import Option, build_menu, geometric_densities
from kimad.control.plan import Plan
from kimad.errors import KimadError

ALLOCATORS = ("layerwise", "uniform", "lagrangian", "static")
PROBE_TRIGGER = 1.5  # a regime change lifting the estimate by more than this starts a probe (see the docstring)
PROBE_BITS_SHARE = 0.8  # ... unless the largest new sample spent this share of its time on bits (a lift: one that did)
PROBE_BITS_S = 0.015  # ... or its bits alone took this long, seconds (several times the scheduling jitter)
_MAX_FRESH = 64  # samples kept for the hedge and lift between two plans (a step has 2-3)
HEDGE_MARGIN = 1.5  # a hedge (lift) needs the estimate still this many times above (below) the sample's rate


class ControllerError(KimadError, ValueError):
    """The controller is misconfigured or was given profiles that do not fit its configuration."""


@dataclasses.dataclass(frozen=True)
class TensorProfile:
    """What the controller must know of one tensor this step (agreed across ranks).

    Attributes:
        name: the tensor's (parameter's) name, unique in the step.
        numel: number of elements (>= 1).
        sq_norm: ``||v||^2`` of the error-feedback-corrected gradient.
        topk_errors: ``||v - TopK_k(v)||^2`` for each of the controller's ``densities``, in that order.
        qsgd_errors: squared error per QSGD bit width, needed only when ``"qsgd"`` is offered.
        sign_error: squared error of scaled sign, needed only when ``"sign"`` is offered.
    """

    name: str
    numel: int
    sq_norm: float
    topk_errors: tuple[float, ...]
    qsgd_errors: Mapping[int, float] | None = None
    sign_error: float | None = None


class Controller:
    """Turns measured throughput, a budget and per-tensor error profiles into a :class:`Plan` per step.

    Args:
        world_size: number of ranks (>= 1).
        budget: seconds of communication per step (float > 0), ``"auto"`` (an :class:`AutoBudget`
            with its defaults), or a :class:`FixedBudget` / :class:`AutoBudget`.
        allocator: ``"layerwise"`` (Kimad+), ``"uniform"`` (Kimad), ``"lagrangian"``, or ``"static"``
            (fixed top-k at the one density of ``densities``, budget ignored; needs ``"topk"``).
        compressors: which compressors menus offer besides dense: ``"topk"``, ``"qsgd"``, ``"sign"``.
        densities: top-k densities of the menus (default: 16 geometric from 1e-4 to 1).
        min_compress_numel: tensors with fewer elements are always sent dense.
        bins: cost bins of the layerwise DP (>= 1).
        estimator: the bandwidth estimator to use (default: a new :class:`BandwidthEstimator`).
        batched: the frontend sends a step's messages together, paying the collectives' latencies once
            (:meth:`CostModel.batched_byte_budget`): options are priced by their bytes only, and the
            frontend's budget object should give the allocator what is left for bytes.
        fill: after allocating, spend what the plan leaves of the budget on more top-k entries
            (:func:`fill_budget`; not for ``"static"``). The menus' density grid is geometric, so a
            plan of few large tensors can otherwise land a grid step (1.85x at 16 densities) under
            the budget.
        probe_factor: after the link turned faster, plans price the bandwidth this many times higher
            (>= 1; 1: never probe) ...
        probe_steps: ... for this many plans (>= 0); see step 3 of the module docstring. :attr:`probing`
            says whether the last plan probed.
        hedge_trigger: a collective this many times slower than predicted (> 1; ``math.inf``: never) prices the
            next plan at its own rate until the estimator decides (step 3 of the module docstring);
            :attr:`hedging` says whether the last plan did.
        lift_trigger: a bits-bound collective this many times faster than predicted (> 1; ``math.inf``: never)
            prices the next plan at its own rate while the estimator has not followed (step 3 of the module
            docstring); :attr:`lifting` says whether the last plan did.

    Attributes:
        planned_bandwidth_bps: the bandwidth (wire bits/s) the last plan was priced at: the estimator's, the
            hedge's slow-sample rate while :attr:`hedging`, the lift's fast-sample rate while :attr:`lifting`,
            ``probe_factor`` times the estimator's while :attr:`probing` (``nan`` before the first plan).
    """

    def __init__(self, *, world_size: int, budget: float | str | FixedBudget | AutoBudget = "auto",
                 allocator: str = "layerwise", compressors: Sequence[str] = ("topk",),
                 densities: Sequence[float] | None = None, min_compress_numel: int = 1024, bins: int = 1000,
                 estimator: BandwidthEstimator | None = None, batched: bool = False, fill: bool = False,
                 probe_factor: float = 2.0, probe_steps: int = 2, hedge_trigger: float = 2.5,
                 lift_trigger: float = 2.0) -> None:
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise ControllerError(f"world_size must be an int >= 1, got {world_size!r}")
        if allocator not in ALLOCATORS:
            raise ControllerError(f"unknown allocator {allocator!r}; known: {ALLOCATORS}")
        if not isinstance(bins, int) or bins < 1:
            raise ControllerError(f"bins must be an int >= 1, got {bins!r}")
        if isinstance(probe_factor, bool) or not isinstance(probe_factor, (int, float)) \
                or not math.isfinite(probe_factor) or probe_factor < 1:
            raise ControllerError(f"probe_factor must be a finite number >= 1, got {probe_factor!r}")
        if not isinstance(probe_steps, int) or isinstance(probe_steps, bool) or probe_steps < 0:
            raise ControllerError(f"probe_steps must be an int >= 0, got {probe_steps!r}")
        if isinstance(hedge_trigger, bool) or not isinstance(hedge_trigger, (int, float)) \
                or math.isnan(hedge_trigger) or hedge_trigger <= 1:
            raise ControllerError(f"hedge_trigger must be a number > 1 (math.inf: never hedge), got {hedge_trigger!r}")
        if isinstance(lift_trigger, bool) or not isinstance(lift_trigger, (int, float)) \
                or math.isnan(lift_trigger) or lift_trigger <= 1:
            raise ControllerError(f"lift_trigger must be a number > 1 (math.inf: never lift), got {lift_trigger!r}")
        if allocator == "static" and ("topk" not in tuple(compressors) or densities is None
                                      or len(tuple(densities)) != 1):
            raise ControllerError("allocator 'static' needs compressors including 'topk' and exactly one density, "
                                  f"densities=(d,); got compressors={tuple(compressors)!r}, densities={densities!r}")
        self.world_size = world_size
        self.allocator = allocator
        self.compressors = tuple(compressors)
        self.densities = tuple(float(d) for d in (densities if densities is not None else geometric_densities()))
        self.min_compress_numel = min_compress_numel
        self.bins = bins
        self.budget = _make_budget(budget)
        self.estimator = estimator if estimator is not None else BandwidthEstimator()
        self.batched = batched
        self.fill = bool(fill)
        self.probe_factor, self.probe_steps = float(probe_factor), probe_steps
        self.probing = False
        self._seen_changes, self._last_bandwidth, self._probe_until = 0, math.inf, -1
        self.hedge_trigger = float(hedge_trigger)
        self.hedging = False
        self.lift_trigger = float(lift_trigger)
        self.lifting = False
        self.planned_bandwidth_bps = math.nan
        self._planned_estimate: BandwidthEstimate | None = None  # the estimator's, at the last plan
        self._fresh: list[tuple[str, int, float]] = []  # (kind, bytes per rank, seconds) since the last plan

    # -- measurements --------------------------------------------------------------------------
    def observe_collective(self, kind: str, bytes_per_rank: int, seconds: float, step: int) -> bool:
        """Feed one timed collective to the estimator; returns whether the sample was accepted."""
        accepted = self.estimator.add(kind, self.world_size, bytes_per_rank, seconds, step)
        if accepted and self._planned_estimate is not None:
            self._fresh.append((kind, bytes_per_rank, seconds))
            del self._fresh[:-_MAX_FRESH]
        return accepted

    def observe_compute(self, seconds: float) -> None:
        """Record the step's measured compute time, seconds (drives an ``"auto"`` budget)."""
        self.budget.observe_compute(seconds)

    def estimate(self) -> BandwidthEstimate:
        """The estimator's current bandwidth (bits/s) and latency (s)."""
        return self.estimator.estimate()

    # -- planning ------------------------------------------------------------------------------
    def cost_model(self, estimate: BandwidthEstimate | None = None) -> CostModel:
        """The cost model of ``estimate`` (default: the current one), batched as the controller is."""
        return CostModel.from_estimate(estimate if estimate is not None else self.estimate(), self.world_size,
                                       batched=self.batched)

    def menus(self, profiles: Sequence[TensorProfile],
              cost_model: CostModel | None = None) -> list[tuple[str, tuple[Option, ...]]]:
        """Every tensor's priced menu under the current estimate (or ``cost_model``)."""
        cost_model = cost_model if cost_model is not None else self.cost_model()
        names = [p.name for p in profiles]
        if len(set(names)) != len(names):
            raise ControllerError("tensor names in one step must be unique; duplicated: "
                                  f"{sorted({n for n in names if names.count(n) > 1})}")
        return [
            (p.name, build_menu(p.name, p.numel, cost_model=cost_model, densities=self.densities,
                                topk_errors=p.topk_errors, sq_norm=p.sq_norm, qsgd_errors=p.qsgd_errors,
                                sign_error=p.sign_error, compressors=self.compressors,
                                min_compress_numel=self.min_compress_numel))
            for p in profiles
        ]

    def plan(self, profiles: Sequence[TensorProfile], step: int) -> Plan:
        """The plan of ``step`` for these tensors (in this order); see the module docstring."""
        if not profiles:
            raise ControllerError("a plan needs at least one tensor profile")
        cost_model = self.cost_model(self._planning_estimate(step))
        menus = self.menus(profiles, cost_model)
        budget_s = self.budget.budget_s()
        allocation = self._allocate(menus, budget_s)
        plan = Plan.from_choice(menus, list(allocation.choice), budget_s=budget_s,
                                over_budget=allocation.over_budget, step=step, allocator=self.allocator)
        if self.fill and self.allocator != "static":
            plan = fill_budget(plan, menus, [p.numel for p in profiles], cost_model)
        return plan

    def _planning_estimate(self, step: int) -> BandwidthEstimate:
        """The estimate ``plan`` prices with (step 3 of the module docstring): the estimator's; while hedging,
        the same at the slow sample's rate; while lifting, at the fast sample's; else while probing, with
        ``probe_factor`` times its bandwidth. Sets :attr:`probing`, :attr:`hedging`, :attr:`lifting` and
        :attr:`planned_bandwidth_bps`."""
        est = self.estimate()
        changes = self.estimator.state.regime_changes
        if (changes > self._seen_changes and est.bandwidth_bps > PROBE_TRIGGER * self._last_bandwidth
                and self._weak_evidence(est)):
            self._probe_until = step + self.probe_steps - 1
        self._seen_changes, self._last_bandwidth = changes, est.bandwidth_bps
        hedge_bps = self._hedge_bandwidth(est)
        lift_bps = self._lift_bandwidth(est) if hedge_bps is None else None
        self._planned_estimate, self._fresh = est, []
        self.hedging, self.lifting = hedge_bps is not None, lift_bps is not None
        self.probing = not (self.hedging or self.lifting) and step <= self._probe_until and self.probe_factor > 1
        if self.hedging or self.lifting:
            est = dataclasses.replace(est, bandwidth_bps=hedge_bps if self.hedging else lift_bps)
        elif self.probing:
            est = dataclasses.replace(est, bandwidth_bps=self.probe_factor * est.bandwidth_bps)
        self.planned_bandwidth_bps = est.bandwidth_bps
        return est

    def _weak_evidence(self, est: BandwidthEstimate) -> bool:
        """Whether the collective with the most bits since the last plan, priced at ``est``, spends less than
        :data:`PROBE_BITS_SHARE` of its time on bits and less than :data:`PROBE_BITS_S` seconds (or there is
        none): messages that latency and scheduling jitter drown need a probe to show the new rate, larger ones
        show it anyway."""
        if not self._fresh:
            return True
        bits_s, latency_s, _ = self._most_bits(est)
        return bits_s < PROBE_BITS_SHARE * (bits_s + latency_s) and bits_s < PROBE_BITS_S

    def _most_bits(self, est: BandwidthEstimate) -> tuple[float, float, float]:
        """``(bits-time, latency, measured)`` seconds, priced at ``est``, of the collective with the most bits
        since the last plan (then the slowest)."""
        model = CostModel.from_estimate(est, self.world_size)
        return max((model.collective_time(kind, nbytes) - model.collective_time(kind, 0),
                    model.collective_time(kind, 0), s) for kind, nbytes, s in self._fresh)

    def _hedge_bandwidth(self, est: BandwidthEstimate) -> float | None:
        """The rate of the collective with the most bits since the last plan if it is informative (``bits_share``),
        ran ``hedge_trigger`` times slower than that plan's estimate predicted (or the last plan hedged), and
        ``est`` (which includes it) is still over :data:`HEDGE_MARGIN` times faster; else None (the hedge of step
        3 of the module docstring)."""
        if self._planned_estimate is None or not self._fresh or math.isinf(self.hedge_trigger):
            return None
        bits_s, latency_s, seconds = self._most_bits(self._planned_estimate)
        if bits_s <= 0 or seconds <= latency_s \
                or bits_share(latency_s, latency_s + bits_s, seconds) < INFORMATIVE_SHARE:
            return None  # (a sample within its latency says nothing of the rate)
        # A hedge starts on a sample hedge_trigger times slower than predicted; once running, it holds while the
        # samples stay slow (a hedged plan's small message is latency-heavy: 5x slower bits may make it only
        # 2-3x slower in all), and ends when one is fast again (a stall) or the estimator has followed.
        if not self.hedging and seconds < self.hedge_trigger * (latency_s + bits_s):
            return None
        rate = self._sample_rate(bits_s, latency_s, seconds)
        return rate if est.bandwidth_bps > HEDGE_MARGIN * rate else None

    def _lift_bandwidth(self, est: BandwidthEstimate) -> float | None:
        """The rate of the collective with the most bits since the last plan if it ran ``lift_trigger`` times
        faster than that plan's estimate predicted, spent at least :data:`PROBE_BITS_SHARE` of its measured time on
        bits, and ``est`` (which includes it) is still over :data:`HEDGE_MARGIN` times slower; else None (the lift
        of step 3 of the module docstring)."""
        if self._planned_estimate is None or not self._fresh or math.isinf(self.lift_trigger):
            return None
        bits_s, latency_s, seconds = self._most_bits(self._planned_estimate)
        if bits_s <= 0 or self.lift_trigger * seconds > latency_s + bits_s \
                or seconds - latency_s < PROBE_BITS_SHARE * seconds:
            return None  # (not that much faster, or mostly latency: its rate is the scheduler's jitter)
        rate = self._sample_rate(bits_s, latency_s, seconds)
        return rate if rate > HEDGE_MARGIN * est.bandwidth_bps else None

    def _sample_rate(self, bits_s: float, latency_s: float, seconds: float) -> float:
        """The bandwidth a collective implies: its bits (``bits_s`` seconds of them at the last plan's estimate)
        over the time it took beyond its latency (``seconds > latency_s``)."""
        return self._planned_estimate.bandwidth_bps * bits_s / (seconds - latency_s)

    def _allocate(self, menus: Sequence[tuple[str, Sequence[Option]]], budget_s: float) -> Allocation:
        costs = [np.array([o.time_s for o in opts], dtype=np.float64) for _, opts in menus]
        errors = [np.array([o.error for o in opts], dtype=np.float64) for _, opts in menus]
        if self.allocator == "static":
            return _allocate_static(menus, costs, errors, budget_s)
        if math.isinf(budget_s):
            # No limit: every tensor takes its least-error option (dense), cheapest among equals.
            choice = tuple(int(np.lexsort((c, e))[0]) for c, e in zip(costs, errors))
            return Allocation(choice, float(sum(c[i] for c, i in zip(costs, choice))),
                              float(sum(e[i] for e, i in zip(errors, choice))), False, self.allocator)
        if self.allocator == "layerwise":
            # The DP loses up to one cost bin per tensor to rounding; the Lagrangian plan (also within
            # budget, ~0.2 ms for 200 tensors) is sometimes better then: keep whichever errs less.
            dp = allocate_layerwise(costs, errors, budget_s, bins=self.bins)
            if dp.over_budget:
                return dp
            hull = allocate_lagrangian(costs, errors, budget_s)
            return hull if not hull.over_budget and hull.total_error < dp.total_error else dp
        if self.allocator == "lagrangian":
            return allocate_lagrangian(costs, errors, budget_s)
        levels = [np.array([o.level for o in opts], dtype=np.int64) for _, opts in menus]
        return allocate_uniform(costs, errors, levels, budget_s)

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the controller learnt (the estimator's samples and fit, and where a probe stands), as
        plain data."""
        return {"estimator": self.estimator.state_dict(),
                "probe": {"seen_changes": self._seen_changes, "last_bandwidth_bps": self._last_bandwidth,
                          "until_step": self._probe_until}}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (one without ``"probe"``, from before the probe, resumes with none
        running and the restored estimator's regime changes taken as seen). A hedge or lift is not checkpointed: the
        first plan after a restore has no earlier plan to hold new samples against, and never hedges or lifts."""
        self.estimator.load_state_dict(state["estimator"])
        probe = state.get("probe")
        if probe is None:
            probe = {"seen_changes": self.estimator.state.regime_changes,
                     "last_bandwidth_bps": self.estimator.state.bandwidth_bps, "until_step": -1}
        self._seen_changes, self._last_bandwidth = int(probe["seen_changes"]), float(probe["last_bandwidth_bps"])
        self._probe_until = int(probe["until_step"])


_FILL_ITERATIONS = 40  # at most this many bisection steps on the growth factor


def fill_budget(plan: Plan, menus: Sequence[tuple[str, Sequence[Option]]], numels: Sequence[int],
                cost_model: CostModel) -> Plan:
    """``plan`` with every top-k entry's ``k`` grown by one common factor ``f >= 1``, the largest whose plan
    still fits ``plan.budget_s`` (each ``k`` rounded down, and capped at the ``k`` of the next denser top-k
    option of its menu, or the tensor's size when there is none).

    One factor for all keeps Kimad's (``uniform``) single ratio for all tensors; for Kimad+ it spends the
    slack the knapsack leaves between grid points. A grown entry keeps its option's level and error (its
    true error is at most that: more entries sent), is labelled ``topk<k / numel>``, and is priced exactly
    by ``cost_model`` (wire bytes). Plans that are over budget, have an infinite budget, no top-k entry or
    no slack are returned unchanged.
    """
    if plan.over_budget or not math.isfinite(plan.budget_s) or plan.total_time_s >= plan.budget_s:
        return plan
    grow = []  # (entry index, k, cap)
    for i, (entry, (_, options), numel) in enumerate(zip(plan.entries, menus, numels)):
        if entry.fmt is not MessageFormat.TOPK:
            continue
        denser = [o.k for o in options if o.fmt is MessageFormat.TOPK and o.k > entry.k]
        cap = min(denser) if denser else numel
        if cap > entry.k:
            grow.append((i, entry.k, cap))
    if not grow:
        return plan
    growing = {i for i, _, _ in grow}
    fixed_s = math.fsum(e.time_s for i, e in enumerate(plan.entries) if i not in growing)

    def grown(f: float) -> tuple[list[tuple[int, int, float]], float]:
        """(entry index, k, seconds) of every growing entry at factor f, and the plan's total seconds."""
        times = []
        for i, k, cap in grow:
            k = min(cap, int(k * f))
            times.append((i, k, cost_model.option_time(MessageFormat.TOPK, numels[i], k=k)))
        return times, fixed_s + math.fsum(t for _, _, t in times)

    lo, hi = 1.0, max(cap / k for _, k, cap in grow)
    resolution = 0.5 / max(cap for _, _, cap in grow)  # finer steps of f change no k
    if grown(hi)[1] > plan.budget_s:
        for _ in range(_FILL_ITERATIONS):
            if hi - lo < resolution:
                break
            mid = 0.5 * (lo + hi)
            if grown(mid)[1] <= plan.budget_s:
                lo = mid
            else:
                hi = mid
    else:
        lo = hi
    times, total_s = grown(lo)
    if total_s > plan.budget_s:  # (only float rounding at f = 1)
        return plan
    entries = list(plan.entries)
    for i, k, seconds in times:
        e, n = entries[i], numels[i]
        if k == e.k:
            continue
        entries[i] = dataclasses.replace(e, label=f"topk{k / n:.6g}", k=k, time_s=float(seconds),
                                         bytes=cost_model.option_bytes(MessageFormat.TOPK, n, k=k))
    return dataclasses.replace(plan, entries=tuple(entries), total_bytes=sum(e.bytes for e in entries),
                               total_time_s=math.fsum(e.time_s for e in entries))


def _allocate_static(menus, costs, errors, budget_s: float) -> Allocation:
    """Top-k (the menu's only top-k option) wherever the menu offers it, else its first option (dense)."""
    choice = tuple(next((i for i, o in enumerate(opts) if o.fmt is MessageFormat.TOPK), 0) for _, opts in menus)
    total_cost = math.fsum(float(c[i]) for c, i in zip(costs, choice))
    return Allocation(choice, total_cost, math.fsum(float(e[i]) for e, i in zip(errors, choice)),
                      total_cost > budget_s, "static")


def _make_budget(budget: float | str | FixedBudget | AutoBudget) -> FixedBudget | AutoBudget:
    if isinstance(budget, (FixedBudget, AutoBudget)):
        return budget
    if budget == "auto":
        return AutoBudget()
    if isinstance(budget, str):
        raise ControllerError(f"budget must be seconds (> 0), 'auto' or a budget object, got {budget!r}")
    return FixedBudget(budget)
