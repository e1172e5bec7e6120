"""The native robust fit (``kimad._C.estimator_fit``) against the NumPy fit it replaced (tests/fit_reference.py)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from fit_reference import robust_fit_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from kimad._native import native
from kimad.control.cost import latency_terms, link_bytes
from kimad.control.estimator import (
    _CHOICE_MEMORY,
    _FAST_PENALTY,
    _FIT_SETTINGS,
    BandwidthEstimator,
    EstimatorState,
)


def window(seed: int, n_steps: int, world: int, rate_bps: float, latency_s: float, noise: float, stall_p: float,
           change_at: int | None, zero_bytes: bool) -> tuple[np.ndarray, np.ndarray]:
    """Rows (T, X bits, seconds, step) as the plugin feeds them: per step a data allgather of varying size and the
    small agree allgather, log-normal noise, stalls (x2-4), optionally a 5x rate change; forgetting weights."""
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(n_steps):
        rate = rate_bps / 5 if change_at is not None and step >= change_at else rate_bps
        for nbytes in (0 if zero_bytes else int(rng.integers(1_000, 400_000)), 504):
            t = float(latency_terms("allgather", world))
            bits = 8.0 * link_bytes("allgather", world, nbytes)
            y = (latency_s * t + bits / rate) * math.exp(rng.normal(0.0, noise))
            if rng.random() < stall_p:
                y *= rng.uniform(2.0, 4.0)
            if y == 0:  # (no latency, no bytes: the estimator rejects a zero duration)
                continue
            rows.append((t, bits, y, float(step)))
    data = np.asarray(rows, dtype=np.float64)
    w = 0.5 ** ((n_steps - 1 - data[:, 3]) / 5.0)
    return data, w


def native_fit(state: EstimatorState, data: np.ndarray, w: np.ndarray, joint: bool = True):
    latency, spb, identified, u = native().estimator_fit(
        torch.from_numpy(data), torch.from_numpy(w), float(state.step_now - state.half_life_steps),
        state.latency_s, state.bandwidth_bps, joint, **_FIT_SETTINGS, outlier_cutoff=state.outlier_cutoff)
    return latency, spb, identified, u.numpy()


def close(x: float, y: float, rel: float) -> bool:
    return abs(x - y) <= rel * max(abs(x), abs(y), 1e-300)


def choice_scores(data: np.ndarray, w: np.ndarray, fit: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The one-sided residual scores and weights by which a fit is chosen among the starts (weighted LMedS)."""
    r = -np.log(np.maximum((fit[0] * data[:, 0] + fit[1] * data[:, 1]) / data[:, 2], 1e-12))
    return np.where(r < 0, -_FAST_PENALTY * r, r), w ** (1.0 / _CHOICE_MEMORY)


def chosen_at_a_tie(data: np.ndarray, w: np.ndarray, fit: tuple) -> bool:
    """Whether the choice among the starts' fits was a tie that rounding decides: the weighted median that scores a
    fit sits where the cumulative weight meets half the total (e.g. a step's two samples, of one weight, on either
    side of the fit), and either of two values is the median. Both fits then have a fair claim."""
    score, weights = choice_scores(data, w, fit)
    cum = np.cumsum(weights[np.argsort(score)])
    return bool(np.any(np.abs(cum - 0.5 * cum[-1]) <= 1e-9 * cum[-1]))


RATES, LATENCIES, NOISES, STALLS = (20e6, 100e6, 10e9), (0.0, 50e-6, 2e-3), (0.0, 0.05, 0.3), (0.0, 0.1, 0.5)
HELD = ((50e-6, 1e9), (1e-3, 20e6), (0.0, 1e11))


def agree(data: np.ndarray, w: np.ndarray, got: tuple, ref: tuple) -> bool:
    """Whether the native fit ``got`` is the reference's ``ref`` up to rounding.

    Sums run in another order: a decision at a threshold (a converged step, a Tukey cut-off) may fall the other way,
    which moves the fit by about the iterations' tolerance (1e-4 of a predicted time), under 1%. A latency of zero
    sits on the joint solution's alpha >= 0 edge, where rounding picks the joint fit or the one at alpha = 0 (the
    same fit, flagged differently). And the choice among the starts can be an exact tie (:func:`chosen_at_a_tie`).
    """
    at_zero_latency = abs(got[0]) < 1e-9 and abs(ref[0]) < 1e-9
    same = ((got[2] == ref[2] or at_zero_latency) and (close(got[0], ref[0], 1e-2) or abs(got[0] - ref[0]) < 1e-9)
            and close(got[1], ref[1], 1e-2) and np.allclose(got[3], ref[3], rtol=5e-2, atol=5e-2))
    return same or chosen_at_a_tie(data, w, got) or chosen_at_a_tie(data, w, ref)


def test_the_native_fit_computes_what_the_numpy_fit_computed_on_nearly_every_window():
    """400 windows drawn across the whole space (links of 20 Mbit/s to 10 Gbit/s, no latency to 2 ms, noise-free to
    30% noise, up to half the samples stalled, a 5x change, zero-byte samples, last estimates 1000x off): the two
    agree on all but a few. The few are windows where a threshold decision steers the rest: the joint fit's alpha
    lands a rounding error below zero in one and above in the other (the solve then holds the last latency), or a
    start's Tukey iterations cycle without converging (noise-free samples collapse the noise scale to its floor;
    half the samples stalled is the weighted median's breakdown point). A hypothesis search finds such windows
    on purpose (seen: 1 in 1,500 uniformly drawn windows, 1 in 20 hypothesis runs), so parity is asserted on a
    fixed draw; the property below holds on every window."""
    rng = np.random.default_rng(2026)
    misses = []
    for i in range(400):
        seed, n_steps, world = int(rng.integers(2**31)), int(rng.integers(1, 81)), int(rng.choice([2, 4, 8]))
        rate, latency, noise, stall_p = (float(rng.choice(x)) for x in (RATES, LATENCIES, NOISES, STALLS))
        change, zero_bytes, joint = (bool(rng.integers(2)) for _ in range(3))
        held = HELD[int(rng.integers(len(HELD)))]
        data, w = window(seed, n_steps, world, rate, latency, noise, stall_p, n_steps // 2 if change else None,
                         zero_bytes)
        state = EstimatorState(latency_s=held[0], bandwidth_bps=held[1], step_now=n_steps - 1)
        ref, got = robust_fit_reference(state, data, w, joint), native_fit(state, data, w, joint)
        if not agree(data, w, got, ref):
            misses.append((i, rate, latency, noise, stall_p, held, got[:3], ref[:3]))
    assert len(misses) <= 4, misses


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**31), n_steps=st.integers(1, 80), world=st.sampled_from([2, 4, 8]),
       rate=st.sampled_from(RATES), latency=st.sampled_from(LATENCIES), noise=st.sampled_from(NOISES),
       stall_p=st.sampled_from(STALLS), change=st.booleans(), zero_bytes=st.booleans(), joint=st.booleans(),
       held=st.sampled_from(HELD))
def test_the_native_fit_is_physical_on_every_window(seed, n_steps, world, rate, latency, noise, stall_p, change,
                                                   zero_bytes, joint, held):
    """Latency >= 0, seconds per bit > 0, both finite; robust weights between 0 and the forgetting weights."""
    data, w = window(seed, n_steps, world, rate, latency, noise, stall_p, n_steps // 2 if change else None,
                     zero_bytes)
    state = EstimatorState(latency_s=held[0], bandwidth_bps=held[1], step_now=n_steps - 1)
    alpha, spb, identified, u = native_fit(state, data, w, joint)
    assert math.isfinite(alpha) and alpha >= 0 and math.isfinite(spb) and spb > 0
    assert u.shape == w.shape and bool(np.all((u >= 0) & (u <= w * (1 + 1e-12))))
    assert identified is False or joint  # a fit asked not to identify both never claims it did


def test_the_native_fit_matches_to_rounding_on_nearly_every_window():
    exact = 0
    for seed in range(200):
        data, w = window(seed, 60, 4, 100e6, 2e-3, 0.1, 0.1, 30 if seed % 2 else None, False)
        state = EstimatorState(latency_s=2e-3, bandwidth_bps=100e6, step_now=59)
        ref, got = robust_fit_reference(state, data, w), native_fit(state, data, w)
        exact += close(got[0], ref[0], 1e-9) and close(got[1], ref[1], 1e-9) and np.allclose(got[3], ref[3],
                                                                                            rtol=1e-9, atol=1e-12)
    assert exact >= 190


def test_an_estimator_on_the_native_fit_follows_the_same_estimates_as_on_the_numpy_fit(monkeypatch):
    """A whole run (square trace 100 <-> 20 Mbit/s, stalls): regime changes and the latency hold included."""
    def run() -> list[tuple[float, float]]:
        est, rng, out = BandwidthEstimator(initial_latency_s=2e-3), np.random.default_rng(7), []
        for step in range(300):
            rate = 100e6 if (step // 25) % 2 == 0 else 20e6
            for nbytes in (int(rng.integers(20_000, 300_000)), 504):
                y = (2e-3 * 3 + 8 * link_bytes("allgather", 4, nbytes) / rate) * math.exp(rng.normal(0, 0.1))
                est.add("allgather", 4, nbytes, y * (3.0 if rng.random() < 0.05 else 1.0), step)
            e = est.estimate()
            out.append((e.bandwidth_bps, e.latency_s))
        return out

    native_run = run()
    monkeypatch.setattr(BandwidthEstimator, "_robust_fit",
                        lambda self, data, w, joint=True: robust_fit_reference(self.state, data, w, joint))
    numpy_run = run()
    far = sum(not close(a[0], b[0], 1e-3) for a, b in zip(native_run, numpy_run))
    assert far <= 3, f"{far} of 300 estimates differ by more than 0.1%"


@pytest.mark.parametrize("change", [
    {"y": math.nan}, {"y": 0.0}, {"y": -1.0}, {"t": math.inf}, {"x": -1.0}, {"w": math.nan}, {"w": -0.5},
])
def test_malformed_samples_are_refused_with_a_named_error(change):
    data, w = window(0, 5, 4, 100e6, 1e-3, 0.1, 0.0, None, False)
    column = {"t": 0, "x": 1, "y": 2}
    for key, value in change.items():
        if key == "w":
            w[3] = value
        else:
            data[3, column[key]] = value
    with pytest.raises(RuntimeError, match="estimator_fit: malformed input"):
        native_fit(EstimatorState(latency_s=1e-3, bandwidth_bps=1e8, step_now=4), data, w)


def test_bad_shapes_and_settings_are_refused():
    data, w = window(0, 5, 4, 100e6, 1e-3, 0.1, 0.0, None, False)
    state = EstimatorState(latency_s=1e-3, bandwidth_bps=1e8, step_now=4)
    with pytest.raises(RuntimeError, match="weights of shape"):
        native_fit(state, data, w[:-1])
    with pytest.raises(RuntimeError, match="n x 4"):
        native_fit(state, np.ascontiguousarray(data[:, :3]), w)
    with pytest.raises(RuntimeError, match="malformed input"):
        native_fit(dataclasses.replace(state, bandwidth_bps=0.0), data, w)
    with pytest.raises(RuntimeError, match="malformed input"):
        native_fit(dataclasses.replace(state, outlier_cutoff=-1.0), data, w)
    with pytest.raises(RuntimeError, match="at least 1|malformed input"):
        native_fit(state, data[:0].copy(), w[:0].copy())
