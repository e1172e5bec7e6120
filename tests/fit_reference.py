"""The NumPy robust fit the bandwidth estimator ran before it moved to the native extension (steps 2-4 of
:mod:`kimad.control.estimator`'s docstring), kept verbatim as the reference ``kimad._C.estimator_fit`` must match
(tests/test_estimator_fit.py)."""

from __future__ import annotations

import numpy as np

from kimad.control.estimator import (
    _CHOICE_MEMORY,
    _FAST_PENALTY,
    _FIT_TOLERANCE,
    _HUBER_C,
    _HUBER_ITERS,
    _IDENTIFIABLE_TOL,
    _SCALE_MEMORY,
    _TUKEY_ITERS,
    EstimatorState,
    _few_samples,
    _noise_scale,
    _weighted_median,
)


def robust_fit_reference(s: EstimatorState, data: np.ndarray, w: np.ndarray,
                         joint: bool = True) -> tuple[float, float, bool, np.ndarray]:
    """``BandwidthEstimator._robust_fit`` of 1c4f157 on estimator state ``s``: ``(latency s, seconds per bit,
    latency identified, robust weights)``."""
    # Rows divided by the measured time: the model reads 1 ~ alpha * T / y + beta * X / y.
    a, b = data[:, 0] / data[:, 2], data[:, 1] / data[:, 2]
    ca, cb = float(a.max()) or 1.0, float(b.max()) or 1.0  # (zero-byte samples only: b is all 0)
    a, b = a / ca, b / cb  # scaled columns keep the 2x2 normal equations well conditioned
    held_alpha, held_beta = s.latency_s * ca, cb / s.bandwidth_bps

    # Every weighted sum the fit needs is one matrix product: rows a^2, b^2, a*b (the normal equations) and
    # a, b (their right-hand sides, times the target). The fit runs every step on every rank, so it is kept
    # to a few numpy calls per iteration (benchmarks/control_step.py).
    products, columns = np.stack((a * a, b * b, a * b)), np.stack((a, b))
    saa, sbb, sab = (float(x) for x in products @ w)
    identifiable = joint and saa > 0 and sbb > 0 and 1 - sab ** 2 / (saa * sbb) >= _IDENTIFIABLE_TOL

    def solve(u: np.ndarray, target: np.ndarray | float = 1.0) -> tuple[float, float, bool]:
        # weighted least squares of alpha * a + beta * b against target, physical solutions only
        uaa, ubb, uab = (float(x) for x in products @ u)
        ua, ub = (float(x) for x in columns @ (u * target))
        det = uaa * ubb - uab * uab
        if identifiable and det > 0:
            alpha, beta = (ubb * ua - uab * ub) / det, (uaa * ub - uab * ua) / det
            if alpha >= 0 and beta > 0:
                return alpha, beta, True
        if ubb > 0:
            for alpha in (held_alpha, 0.0):  # hold the known latency; if that leaves no time for bytes, none
                beta = (ub - alpha * uab) / ubb
                if beta > 0:
                    return alpha, beta, False
        if uaa > 0:  # only zero-byte samples: they measure latency alone
            return max(0.0, (ua - held_beta * uab) / uaa), held_beta, False
        return held_alpha, held_beta, False

    def residuals(alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray]:
        q = np.maximum(alpha * a + beta * b, 1e-12)  # predicted / measured
        return -np.log(q), q

    def reweigh(base: np.ndarray, alpha: float, beta: float, iters: int, tukey: bool):
        u, joint = base, False
        scale_w = base ** (1.0 / _SCALE_MEMORY)
        few = _few_samples(scale_w)
        for _ in range(iters):
            r, q = residuals(alpha, beta)
            t = np.abs(r) / _noise_scale(r, scale_w, few)
            if tukey:
                c = s.outlier_cutoff
                new_u = base * np.where(t < c, (1.0 - (t / c) ** 2) ** 2, 0.0)
            else:
                new_u = base * np.minimum(1.0, _HUBER_C / np.maximum(t, 1e-300))
            if not np.any(new_u > 0):  # every sample far off this fit: nothing to refit on
                break
            u = new_u
            # Gauss-Newton step on the log residual: log q' ~ log q + (q' - q) / q
            step = solve(u / q ** 2, q * (1.0 + r))
            # In the scaled columns (a, b <= 1) this bounds how far the step moved any sample's predicted time,
            # relative to its measured one: once that is negligible, more iterations change nothing that counts.
            converged = step[2] == joint and abs(step[0] - alpha) + abs(step[1] - beta) <= _FIT_TOLERANCE
            alpha, beta, joint = step
            if converged:
                break
        return alpha, beta, joint, u

    # Three starts: the whole window, its last half-life (so the estimate switches to a new link rate
    # once the new samples outweigh the old ones) and the last estimate; Tukey from each; keep the one
    # with the smallest weighted median of the one-sided residual over two half-lives (least median of
    # squares, with faster samples counting double: stalls only make samples slower).
    recent = w * (data[:, 3] >= s.step_now - s.half_life_steps)
    choice_w = w ** (1.0 / _CHOICE_MEMORY)
    best = None
    for base in (w, recent, None):
        if base is None:  # the last estimate: a stall burst cannot drag a start that is not fitted to it
            start = (held_alpha, held_beta)
        else:
            start = solve(base)
            start = reweigh(base, start[0], start[1], _HUBER_ITERS, tukey=False)
        fit = reweigh(w, start[0], start[1], _TUKEY_ITERS, tukey=True)
        r = residuals(fit[0], fit[1])[0]
        lmeds = _weighted_median(np.where(r < 0, -_FAST_PENALTY * r, r), choice_w)
        if best is None or lmeds < best[0]:
            best = (lmeds, fit)
    alpha, beta, joint, u = best[1]
    return alpha / ca, beta / cb, joint, u
