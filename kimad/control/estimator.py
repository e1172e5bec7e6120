"""Online estimate of the link's bandwidth and latency from timed collectives (the alpha-beta model).

Every timed collective gives one sample ``seconds ~ alpha * T + beta * X``: ``T`` latency terms and ``X``
wire bits on each ring link (:func:`kimad.control.cost.latency_terms`, and
:func:`~kimad.control.cost.link_bytes` times ``framing``, wire bytes per payload byte: the same formulas the cost
model predicts with), ``alpha`` the per-message latency in seconds and ``beta = 1 / bandwidth`` in seconds per
bit. The fit, redone lazily when an estimate is asked for (steps 2-4 in the native extension,
``kimad._C.estimator_fit``; csrc/kernels/include/kimad/fit.h):

1. Take the last ``window`` samples; weigh each by ``0.5 ** ((step_now - step) / half_life_steps)``
   so the estimate follows a changing link.
2. Fit ``alpha`` and ``beta`` jointly by weighted least squares (Gauss-Newton) on the log residual
   ``r = log(measured / predicted)``: a 1 KB and a 100 MB message count alike, a link 5x slower than
   predicted pulls as hard as one 5x faster, and multiplicative timing noise leaves no bias.
3. Reweigh robustly, knowing that stalls only ever inflate a duration: a rank descheduled inside a ring
   collective stalls every rank, often for several steps in a row, so the link time is the lower envelope
   of the measurements. The noise scale is read off the fast tail of ``r``: the spread between its 5% and
   30% weighted quantiles (1.12 standard deviations of a normal), which stalls widen by at most 1.4x while
   they hold under half the weight, and which cannot shrink onto a fit through a few samples; it is weighed
   over three half-lives (the noise is the machine's, not the link's), and while those weights count fewer
   than 12 samples (Kish) it is at least ``1.4826 * weighted MAD`` of ``r`` about its median. Three starts
   -- Huber fits of the whole window and of its last half-life, and the last estimate -- each lead Tukey
   biweight iterations that give zero weight to samples more than ``outlier_cutoff`` noise scales from the
   fit (each run of iterations ends early once a step moves no sample's predicted time by more than 1e-4 of
   it; the fit runs on every rank every step). The fit kept is the one with the smallest weighted median of
   ``r`` if slower than the fit and ``2 |r|`` if faster (a sample faster than a fit is evidence against it, a
   slower one may be a stall), weighed over two half-lives, so that a burst of stalled steps cannot outvote
   the link; the last estimate as a start keeps the fit where it was while the burst lasts. Zero-weight
   samples are counted in ``outliers``. On its own this fit follows a step change in the link once the new
   samples carry most of the (two half-life) weight; step 5 makes it faster.
4. If the samples do not separate ``alpha`` from ``beta`` (all of about one size, so ``X / T`` is the
   same everywhere), or the joint fit is unphysical (``alpha < 0`` or ``beta <= 0``), keep the last
   identified latency (initially the prior) and fit ``beta`` alone; failing that, ``alpha = 0``.
5. Regime change. Only samples that spend at least half their time on bits (:func:`bits_share`: beyond the
   fit's latency, of the predicted time or, if longer, the measured one) can see a bandwidth change -- a
   message sized for a 5x slower link looks half latency-bound to the old fit, but its 3x slower duration
   is bits --, and of a step's samples only its largest (most bits) is used: a step's small collective
   (Kimad's agree allgather) carries milliseconds of scheduling jitter, and on a slow link, where its bits
   count, its samples broke every run of faster large ones after a speed-up; the others are skipped. Walk
   back from the newest such sample over those whose ``r`` against
   the fit has its sign and exceeds the threshold; the first one that does not ends the run. The run is a
   new regime if older samples precede it and, when the samples got faster, it holds at least
   ``faster_change_samples`` (>= 2) such samples spanning at least ``0.2 * half_life_steps`` steps (1 step at
   the default 5) -- nothing but a faster link makes a collective faster, so two are evidence (replay of the
   Kimad and Kimad+ logs of eight 4-node CNN repeats and three LM comparisons: speed-ups within 15% in <= 5
   steps 124 -> 138 of 194 against 3 samples)
   -- but, when they got slower, at least ``change_samples`` (>= 3) spanning more than ``stall_steps`` steps
   (3: at least 4 steps), so that a burst of stalled steps no longer than that never
   resets the fit (the longest burst in six 2- and 4-node emulated runs, once waiting ranks stopped spinning,
   was 2 steps of samples 1.4x slower than predicted; with spinning ranks, bursts of 4 were seen). It is
   found against the current fit with a 10% threshold, then confirmed against a fit of the samples before
   it, with threshold ``max(change_sigmas * noise scale, log 1.1)`` of *their*
   residuals (the noise scale of step 3, every sample weighing alike; the current fit, already leaning
   to the new samples, would inflate the spread), capped at ``log 2``: a run of samples each 2x off the old
   fit is off it however noisy the old samples were (latency-bound ones jitter by the scheduler's
   milliseconds, which says nothing about the link). On a change the samples before the run are dropped and
   the fit is redone; for ``2 * half_life_steps`` steps the latency is then held at the inverse-variance
   pool of the old regime's latency and the new samples' joint estimate (a bandwidth change leaves the
   latency, and a few samples identify it poorly). ``regime_changes`` counts the changes. Detection is
   evaluated when an estimate is asked for: ask every step (as the controller does) for the fastest
   reaction. A stall burst straddling a slow-down counts towards its run: the new regime then starts
   with the burst's stalled samples, which the fit outweighs within 2 more steps than a clean change needs.

Samples that cannot be a real measurement -- a zero duration, or one implying more than
``max_bandwidth_bps`` -- are not fitted and are counted in ``rejected``. NaN, infinite or negative
inputs are caller bugs and raise :class:`EstimatorError`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch  # (kimad._C's tensors; the fit runs in the native extension)

from kimad._native import native
from kimad.control.cost import COLLECTIVES, check_framing, latency_terms, link_bytes
from kimad.errors import KimadError

_HUBER_C = 1.345
_HUBER_ITERS = 15
_TUKEY_ITERS = 10
# Iterations stop once a step moves no predicted time by more than this share of it: 0.01%, far below the timing
# noise (5-10%). 1e-7 took 1.8 ms a fit (benchmarks/control_step.py), 1e-4 1.2; replayed over the link times of
# 30 emulated runs (10,112 steps), 6 estimates moved by more than 5%, MdAPE and recoveries unchanged.
_FIT_TOLERANCE = 1e-4
_MIN_REL_SCALE = 1e-3  # relative residual scale floor: noise-free samples must not make every sample an outlier
_IDENTIFIABLE_TOL = 1e-4  # 1 - cos^2 between the latency and bandwidth columns below which they are collinear
_MIN_WEIGHT = 1e-4  # samples forgotten below this weight are dropped from the window
_MIN_CHANGE = math.log(1.1)  # a regime change moves the link by more than 10%, whatever the noise
# ... and samples 2x off the old fit are off it, however noisy it was: latency-bound samples (Kimad's small
# agree allgather) jitter by the scheduler's milliseconds, and with that in the noise scale a 4x slow-down
# at 4 ranks stayed within 4 noise scales for 10 steps. (Stall bursts are told apart by their length.)
_MAX_CHANGE = math.log(2.0)
_CHANGE_HALF_LIVES = 0.2  # ... and lasts at least this many half-lives (1 step at the default 5)
_HOLD_HALF_LIVES = 2.0  # after a regime change the old latency is held this many half-lives (few new samples)
INFORMATIVE_SHARE = 0.5  # a sample spending less of its time on bits than this cannot tell a bandwidth change apart
_FAST_PENALTY = 2.0  # choosing a fit, a sample faster than it counts this much more than one as much slower
_CHOICE_MEMORY = 2.0  # ... weighed with this many times the half-life: a stall burst must not outvote the link
_SCALE_MEMORY = 3.0  # the noise scale is a property of the machine: read it over this many half-lives
_SCALE_SAMPLES = 12.0  # below this Kish count the fast tail's quantiles are too few samples apart
# The constants of the native fit (steps 2-4; csrc/kernels/include/kimad/fit.h), passed with every call.
_FIT_SETTINGS = {"huber_c": _HUBER_C, "huber_iters": _HUBER_ITERS, "tukey_iters": _TUKEY_ITERS,
                 "scale_memory": _SCALE_MEMORY, "choice_memory": _CHOICE_MEMORY, "fast_penalty": _FAST_PENALTY,
                 "tolerance": _FIT_TOLERANCE, "identifiable_tol": _IDENTIFIABLE_TOL, "scale_samples": _SCALE_SAMPLES,
                 "min_rel_scale": _MIN_REL_SCALE}


class EstimatorError(KimadError, ValueError):
    """A bandwidth sample or estimator setting is invalid (NaN, negative, unknown collective, ...)."""


@dataclasses.dataclass(frozen=True)
class BandwidthEstimate:
    """The current alpha-beta estimate.

    Attributes:
        bandwidth_bps: link bandwidth, wire bits per second (payload bits times ``framing``).
        latency_s: per-message latency alpha, seconds.
        bandwidth_rel_stderr: relative standard error of ``bandwidth_bps`` from the fit residuals
            (``inf`` while there are too few effective samples to tell).
        effective_samples: Kish effective sample count ``(sum u)^2 / sum u^2`` of the final fit weights.
        latency_identified: whether ``latency_s`` was fitted jointly in this fit (else it was held).
        framing: wire bytes per payload byte the samples were counted with (1: ``bandwidth_bps`` is the
            payload rate); :meth:`kimad.control.cost.CostModel.from_estimate` prices with it.
    """

    bandwidth_bps: float
    latency_s: float
    bandwidth_rel_stderr: float
    effective_samples: float
    latency_identified: bool
    framing: float = 1.0


@dataclasses.dataclass
class EstimatorState:
    """Everything a :class:`BandwidthEstimator` knows: configuration, samples, counters, last fit.

    ``samples`` holds ``(latency_terms, link_wire_bits, seconds, step)`` per accepted sample.
    """

    initial_bandwidth_bps: float = 1e9
    initial_latency_s: float = 50e-6
    half_life_steps: float = 5.0
    window: int = 512
    max_bandwidth_bps: float = 1e13
    outlier_cutoff: float = 5.0
    change_samples: int = 3
    faster_change_samples: int = 2
    change_sigmas: float = 4.0
    stall_steps: int = 3
    framing: float = 1.0
    samples: list = dataclasses.field(default_factory=list)
    step_now: int = 0
    rejected_zero_duration: int = 0
    rejected_too_fast: int = 0
    ignored_single_rank: int = 0
    outliers: int = 0
    regime_changes: int = 0
    latency_held_until_step: int = -1
    old_regime_latency_s: float = math.nan
    old_regime_latency_var: float = math.inf
    bandwidth_bps: float = math.nan
    latency_s: float = math.nan
    bandwidth_rel_stderr: float = math.inf
    effective_samples: float = 0.0
    latency_identified: bool = False
    fitted: bool = True


def bits_share(latency_s, predicted_s, measured_s):
    """Share of a collective's duration that its latency does not explain: ``1 - latency_s / d`` with ``d`` the
    longer of its predicted and measured durations (a sample slower than the fit spent the extra time on bits,
    or in a stall). Samples under :data:`INFORMATIVE_SHARE` cannot tell a bandwidth change apart. Floats or
    numpy arrays, seconds (``latency_s``: the fit's latency times the collective's latency terms)."""
    duration = np.maximum(np.maximum(measured_s, predicted_s), 1e-300)
    return 1.0 - latency_s / duration


def _positive(name: str, value: float, allow_inf: bool = False) -> float:
    value = float(value)
    if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
        raise EstimatorError(f"{name} must be a {'' if allow_inf else 'finite '}number > 0, got {value!r}")
    return value


def _weighted_quantiles(x: np.ndarray, w: np.ndarray, quantiles: tuple[float, ...]) -> np.ndarray:
    """Weighted quantiles of ``x`` (weights ``w``), all from one sort: the smallest ``x`` whose cumulative weight
    reaches each quantile's share of the total."""
    order = np.argsort(x)
    cum = np.cumsum(w[order])
    return x[order][np.searchsorted(cum, np.asarray(quantiles) * cum[-1])]


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    return float(_weighted_quantiles(x, w, (0.5,))[0])


def _few_samples(w: np.ndarray) -> bool:
    """Whether weights ``w`` count fewer than ``_SCALE_SAMPLES`` samples (Kish's effective sample size)."""
    return float(np.sum(w)) ** 2 < _SCALE_SAMPLES * float(w @ w)


def _noise_scale(r: np.ndarray, w: np.ndarray, few: bool | None = None) -> float:
    """Robust standard deviation of the timing noise from log residuals ``r`` (weights ``w``), read off
    their fast tail (step 3 of the module docstring): stalls only inflate durations, so the spread between
    the 5% and 30% weighted quantiles (``1.12`` standard deviations of a normal) is mostly the noise's.
    Measured between quantiles rather than about the fit, it cannot shrink onto a fit through a few samples.
    ``few``: :func:`_few_samples` of ``w``, when the caller has it (the fit's iterations keep their weights)."""
    lo, hi, median = _weighted_quantiles(r, w, (0.05, 0.3, 0.5))
    scale = float(hi - lo) / 1.12
    if _few_samples(w) if few is None else few:
        # too few samples for quantiles 25% apart: the whole spread (stalls included) is the safer guess
        scale = max(scale, 1.4826 * _weighted_median(np.abs(r - median), w))
    return max(scale, _MIN_REL_SCALE)


class BandwidthEstimator:
    """Weighted, robust, forgetting least-squares fit of bandwidth (bits/s) and latency (s); see the module docstring.

    Args:
        initial_bandwidth_bps: prior bandwidth, wire bits/s, reported before any sample.
        initial_latency_s: prior latency, seconds, reported before any sample and held while the
            samples cannot identify it.
        half_life_steps: a sample ``half_life_steps`` steps old weighs half as much as a new one.
        window: at most this many recent samples are fitted.
        max_bandwidth_bps: a sample implying more bits/s than this is rejected as absurd.
        outlier_cutoff: samples farther than this many robust standard deviations from the fit get weight 0.
        change_samples: a slower link needs at least this many (>= 3) latest samples off the fit on that side.
        faster_change_samples: a faster link needs at least this many (>= 2, <= change_samples).
        change_sigmas: ... each farther than this many robust standard deviations (and 10%) from the fit.
        stall_steps: the longest burst of stalled steps to ride out: a run of slow samples is a slower link
            only once it spans more than this many steps (faster samples need no such wait: stalls never
            make a collective faster).
        framing: wire bytes per payload byte (>= 1; :data:`kimad.control.cost.TCP_ETHERNET_FRAMING` for TCP
            over Ethernet): the estimate is then the link's rate in wire bits. 1 (default): payload bits.
    """

    def __init__(self, *, initial_bandwidth_bps: float = 1e9, initial_latency_s: float = 50e-6,
                 half_life_steps: float = 5.0, window: int = 512, max_bandwidth_bps: float = 1e13,
                 outlier_cutoff: float = 5.0, change_samples: int = 3, faster_change_samples: int = 2,
                 change_sigmas: float = 4.0, stall_steps: int = 3, framing: float = 1.0) -> None:
        if not math.isfinite(float(initial_latency_s)) or initial_latency_s < 0:
            raise EstimatorError(f"initial_latency_s must be a finite number >= 0 seconds, got {initial_latency_s!r}")
        if not isinstance(window, int) or window < 1:
            raise EstimatorError(f"window must be an int >= 1 samples, got {window!r}")
        if not isinstance(change_samples, int) or isinstance(change_samples, bool) or change_samples < 3:
            raise EstimatorError(f"change_samples must be an int >= 3 samples (fewer lets outliers reset the fit), "
                                 f"got {change_samples!r}")
        if (not isinstance(faster_change_samples, int) or isinstance(faster_change_samples, bool)
                or not 2 <= faster_change_samples <= change_samples):
            raise EstimatorError(f"faster_change_samples must be an int in [2, change_samples={change_samples}] "
                                 f"samples, got {faster_change_samples!r}")
        if not isinstance(stall_steps, int) or isinstance(stall_steps, bool) or stall_steps < 0:
            raise EstimatorError(f"stall_steps must be an int >= 0 steps, got {stall_steps!r}")
        self.state = EstimatorState(
            initial_bandwidth_bps=_positive("initial_bandwidth_bps", initial_bandwidth_bps),
            initial_latency_s=float(initial_latency_s),
            half_life_steps=_positive("half_life_steps", half_life_steps),
            window=window,
            max_bandwidth_bps=_positive("max_bandwidth_bps", max_bandwidth_bps, allow_inf=True),
            outlier_cutoff=_positive("outlier_cutoff", outlier_cutoff),
            change_samples=change_samples,
            faster_change_samples=faster_change_samples,
            change_sigmas=_positive("change_sigmas", change_sigmas),
            stall_steps=stall_steps,
            framing=check_framing(framing, EstimatorError),
        )
        self.state.bandwidth_bps = self.state.initial_bandwidth_bps
        self.state.latency_s = self.state.initial_latency_s

    # -- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """A plain-dict copy of the whole state (JSON- and pickle-friendly)."""
        return dataclasses.asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`."""
        self.state = EstimatorState(**{**state, "samples": [tuple(s) for s in state["samples"]]})

    # -- samples ---------------------------------------------------------------------------------
    def add(self, kind: str, world_size: int, bytes_per_rank: int, seconds: float, step: int) -> bool:
        """Record one timed collective; returns whether it was accepted for fitting.

        Args:
            kind: ``"allreduce"`` (``bytes_per_rank`` = the buffer size) or ``"allgather"``
                (``bytes_per_rank`` = each rank's contribution).
            world_size: ranks in the collective (>= 1; single-rank samples carry no information
                and are ignored).
            bytes_per_rank: bytes, >= 0.
            seconds: measured wall time, >= 0 (0 is counted as rejected, not raised).
            step: training step of the measurement, >= 0.

        Raises:
            EstimatorError: unknown ``kind``, NaN/infinite/negative numbers, ``world_size < 1``.
        """
        if kind not in COLLECTIVES:
            raise EstimatorError(f"unknown collective kind {kind!r}; known: {COLLECTIVES}")
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise EstimatorError(f"world_size must be an int >= 1, got {world_size!r}")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise EstimatorError(f"step must be an int >= 0, got {step!r}")
        for name, value in (("bytes_per_rank", bytes_per_rank), ("seconds", seconds)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise EstimatorError(f"{name} of a {kind} sample must be a finite number >= 0, got {value!r}")
        s = self.state
        if step > s.step_now:  # time passing re-weighs the window even if this sample is rejected
            s.step_now, s.fitted = step, False
        if world_size == 1:
            s.ignored_single_rank += 1
            return False
        if seconds == 0:
            s.rejected_zero_duration += 1
            return False
        bits = 8.0 * s.framing * link_bytes(kind, world_size, float(bytes_per_rank))
        if bits / seconds > s.max_bandwidth_bps:
            s.rejected_too_fast += 1
            return False
        s.samples.append((float(latency_terms(kind, world_size)), bits, float(seconds), step))
        del s.samples[:-s.window]
        s.fitted = False
        return True

    @property
    def rejected(self) -> dict[str, int]:
        """Counts of samples not fitted, by reason; ``outliers`` counts zero-weight samples of the latest fit."""
        self.estimate()
        s = self.state
        return {"zero_duration": s.rejected_zero_duration, "too_fast": s.rejected_too_fast,
                "single_rank": s.ignored_single_rank, "outliers": s.outliers}

    # -- the fit ---------------------------------------------------------------------------------
    def estimate(self) -> BandwidthEstimate:
        """The current estimate (the prior before any accepted sample)."""
        s = self.state
        if not s.fitted:
            self._fit()
            s.fitted = True
        return BandwidthEstimate(s.bandwidth_bps, s.latency_s, s.bandwidth_rel_stderr, s.effective_samples,
                                 s.latency_identified, s.framing)

    @property
    def bandwidth_bps(self) -> float:
        return self.estimate().bandwidth_bps

    @property
    def latency_s(self) -> float:
        return self.estimate().latency_s

    def _fit(self) -> None:
        s = self.state
        if not s.samples:  # nothing accepted yet (e.g. a single rank): the prior stands
            s.bandwidth_rel_stderr, s.effective_samples, s.latency_identified, s.outliers = math.inf, 0.0, False, 0
            return
        data = np.asarray(s.samples, dtype=np.float64).reshape(-1, 4)
        w = 0.5 ** ((s.step_now - data[:, 3]) / s.half_life_steps)
        keep = w >= _MIN_WEIGHT
        s.samples = [x for x, k in zip(s.samples, keep) if k]
        data, w = data[keep], w[keep]
        if not s.samples:  # everything forgotten: keep the last estimate, with no evidence behind it
            s.bandwidth_rel_stderr, s.effective_samples, s.latency_identified, s.outliers = math.inf, 0.0, False, 0
            return
        fit = self._robust_fit(data, w)
        change, old = self._change_point(data, w, fit)
        if change > 0:  # a new regime: the samples before it describe a link that is gone
            s.old_regime_latency_s, s.old_regime_latency_var = old[0], self._latency_var(data[:len(old[3])], old)
            del s.samples[:change]
            data, w = data[change:], w[change:]
            s.regime_changes += 1
            s.latency_held_until_step = int(data[0, 3] + math.ceil(_HOLD_HALF_LIVES * s.half_life_steps))
            fit = self._robust_fit(data, w)
        if s.step_now < s.latency_held_until_step:
            # A bandwidth change leaves the latency: while the new samples are few, pool the old regime's
            # latency with theirs (inverse-variance weights) and fit the bandwidth with that latency held.
            var = self._latency_var(data, fit)
            parts = [(x, v) for x, v in ((s.old_regime_latency_s, s.old_regime_latency_var), (fit[0], var))
                     if math.isfinite(x) and 0 < v < math.inf]
            if parts:
                s.latency_s = sum(x / v for x, v in parts) / sum(1 / v for _, v in parts)
            elif math.isfinite(s.old_regime_latency_s):
                s.latency_s = s.old_regime_latency_s
            fit = self._robust_fit(data, w, joint=False)
        latency, seconds_per_bit, joint, u = fit

        # Uncertainty in the scaled columns of the fit (see _robust_fit).
        a, b = data[:, 0] / data[:, 2], data[:, 1] / data[:, 2]
        ca, cb = float(a.max()) or 1.0, float(b.max()) or 1.0
        a, b = a / ca, b / cb
        alpha, beta = latency * ca, seconds_per_bit * cb
        q = np.maximum(alpha * a + beta * b, 1e-12)
        r = -np.log(q)
        n_eff = float(np.sum(u)) ** 2 / float(np.sum(u * u))
        p = 2 if joint else 1
        rel_se = math.inf
        if n_eff > p and float(np.sum(u * b * b)) > 0:  # (zero-byte samples say nothing about bandwidth)
            v = u * (n_eff / float(np.sum(u)))  # the final robust weights, summing to n_eff
            sigma2 = float(np.sum(v * r * r)) / (n_eff - p)
            ja, jb = a / q, b / q  # Jacobian of the log residual
            vaa, vbb, vab = float(np.sum(v * ja * ja)), float(np.sum(v * jb * jb)), float(np.sum(v * ja * jb))
            det = vaa * vbb - vab * vab
            # The robust weights may leave samples of a single size: latency and bandwidth are then confounded.
            if not joint or det > _IDENTIFIABLE_TOL * vaa * vbb:
                var_beta = sigma2 * (vaa / det if joint else 1.0 / vbb)
                rel_se = math.sqrt(max(var_beta, 0.0)) / beta
        s.bandwidth_bps = 1.0 / seconds_per_bit
        s.latency_s = latency
        s.bandwidth_rel_stderr = rel_se
        s.effective_samples = n_eff
        s.latency_identified = joint
        s.outliers = int(np.sum((u == 0) & (w > 0)))

    @staticmethod
    def _latency_var(data: np.ndarray, fit: tuple) -> float:
        """Variance (s^2) of a joint fit's latency from its weighted log residuals; ``inf`` if not joint."""
        latency, seconds_per_bit, joint, u = fit
        n_eff = float(np.sum(u)) ** 2 / max(float(np.sum(u * u)), 1e-300)
        if not joint or n_eff <= 2:
            return math.inf
        predicted = np.maximum(latency * data[:, 0] + seconds_per_bit * data[:, 1], 1e-300)
        r = np.log(data[:, 2] / predicted)
        v = u * (n_eff / float(np.sum(u)))
        sigma2 = float(np.sum(v * r * r)) / (n_eff - 2)
        ja, jb = data[:, 0] / predicted, data[:, 1] / predicted  # Jacobian of the log residual
        vaa, vbb, vab = float(np.sum(v * ja * ja)), float(np.sum(v * jb * jb)), float(np.sum(v * ja * jb))
        det = vaa * vbb - vab * vab
        return sigma2 * vbb / det if det > _IDENTIFIABLE_TOL * vaa * vbb else math.inf

    def _robust_fit(self, data: np.ndarray, w: np.ndarray, joint: bool = True) -> tuple[float, float, bool, np.ndarray]:
        """Steps 2-4 of the module docstring on ``data`` (rows ``(T, X bits, seconds, step)``) with forgetting
        weights ``w`` (``joint=False``: hold ``state.latency_s``): returns ``(latency seconds, seconds per bit,
        latency identified, robust weights)``.

        The fit runs in the native extension (``kimad._C.estimator_fit``, csrc/kernels/cpu/fit.cpp; the NumPy
        version it replaced, kept as the tests' reference in tests/fit_reference.py, took 1.2-3.9 ms a step of the
        controller's ~2-6: every rank runs it every step)."""
        s = self.state
        latency, seconds_per_bit, identified, u = native().estimator_fit(
            torch.from_numpy(np.ascontiguousarray(data, dtype=np.float64)),
            torch.from_numpy(np.ascontiguousarray(w, dtype=np.float64)),
            float(s.step_now - s.half_life_steps), float(s.latency_s), float(s.bandwidth_bps), bool(joint),
            **_FIT_SETTINGS, outlier_cutoff=s.outlier_cutoff)
        return latency, seconds_per_bit, identified, u.numpy()

    def _change_point(self, data: np.ndarray, w: np.ndarray, fit: tuple) -> tuple[int, tuple | None]:
        """Step 5 of the module docstring: the index of the first sample of a new regime (0 if none) and
        the fit of the samples before it."""
        s = self.state

        # Of each step's samples only its largest (most bits) takes part: a step's small collective (Kimad's
        # agree allgather) jitters by the scheduler's milliseconds and must not break a run of large ones.
        order = np.lexsort((data[:, 1], data[:, 3]))  # by step, then bits: each step's largest comes last
        largest = np.zeros(len(data), dtype=bool)
        largest[order[np.r_[data[order[1:], 3] != data[order[:-1], 3], True]]] = True

        def trailing_run(fit: tuple, threshold: float) -> int:
            # walk back over the samples off the fit by more than threshold on the last one's side; samples
            # mostly spent on latency may sit in the run (they cannot see a bandwidth change), any other ends it
            latency, seconds_per_bit = fit[0], fit[1]
            predicted = latency * data[:, 0] + seconds_per_bit * data[:, 1]
            r = np.log(data[:, 2] / np.maximum(predicted, 1e-300))
            shares = bits_share(latency * data[:, 0], predicted, data[:, 2])
            informative = np.flatnonzero((shares >= INFORMATIVE_SHARE) & largest)
            if len(informative) == 0:
                return 0
            side, count, start = np.sign(r[informative[-1]]), 0, len(r)  # the newest sample that can see the link
            for i in informative[::-1]:
                if np.sign(r[i]) != side or abs(r[i]) <= threshold:
                    break
                count, start = count + 1, i
            # a slower link must outlast a stall burst; nothing but a faster link makes samples faster
            span = s.stall_steps if side > 0 else _CHANGE_HALF_LIVES * s.half_life_steps
            needed = s.change_samples if side > 0 else s.faster_change_samples
            if count < needed or data[-1, 3] - data[start, 3] < span:
                return 0
            return start

        # A candidate from the current fit, which may already lean towards the new samples ...
        candidate = trailing_run(fit, _MIN_CHANGE)
        if candidate == 0:
            return 0, None
        # ... confirmed against the fit of the samples before it, in units of their own robust spread.
        old = self._robust_fit(data[:candidate], w[:candidate])
        predicted = old[0] * data[:candidate, 0] + old[1] * data[:candidate, 1]
        r_old = np.log(data[:candidate, 2] / np.maximum(predicted, 1e-300))
        if not np.any(old[3] > 0):
            return 0, None
        scale = _noise_scale(r_old, np.ones(candidate))
        return trailing_run(old, min(max(s.change_sigmas * scale, _MIN_CHANGE), _MAX_CHANGE)), old
