"""Allocator benchmark: Kimad+'s knapsack DP against its Lagrangian relaxation and Kimad's uniform level.

    python benchmarks/allocator.py [--quick] [--repeats N] [--bins B] [--json PATH]

Menus are random but shaped like a real model's: L tensors of log-uniform size (1e3 .. 1e7
elements); option r of R is top-k at density ``d_r`` (geometric from 1 = dense down to 1e-3),
costing ``latency + bytes / bandwidth`` seconds (4 bytes per element dense; top-k at the exact size
of its wire message, ``kimad.compressors.wire.message_bytes``: about 4 bytes per kept entry) and
leaving error ``||g||^2 * (1 - d_r ** 0.3)`` (gradient energy is concentrated, so a few entries hold
most of it). Cost falls and error rises with compression.
The budget is 30% of the all-dense cost.

Per row: median wall-clock milliseconds (after one warm-up) of ``allocate_layerwise`` (the DP,
end to end from Python), of ``allocate_lagrangian``, and the relative error gaps
``(error - dp_error) / dp_error`` of the Lagrangian and of the uniform level (Kimad) against the
DP. A negative gap means the DP lost more to its cost bins than the other method to its own
restriction. ``--json`` writes the rows (L, R, bins, dp_ms, lagrangian_ms, gap, uniform_gap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from kimad.bench.machine import describe_cpu
from kimad.compressors.wire import message_bytes
from kimad.control.allocate import allocate_lagrangian, allocate_layerwise, allocate_uniform

BANDWIDTH_BYTES_PER_S = 10e9 / 8  # 10 Gbit/s
LATENCY_S = 20e-6


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock milliseconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def machine() -> str:
    return f"{describe_cpu()}, numpy {np.__version__}"


def model_menus(tensors: int, options: int, seed: int):
    """Costs (seconds), errors and uniform levels of a random model's top-k menus (see module doc)."""
    rng = np.random.default_rng(seed)
    density = np.geomspace(1.0, 1e-3, options)
    sizes = np.exp(rng.uniform(np.log(1e3), np.log(1e7), tensors)).astype(np.int64)
    energy = rng.lognormal(0.0, 2.0, tensors) * sizes  # ||g||^2 grows with the tensor
    costs, errors, levels = [], [], []
    for n, g2 in zip(sizes, energy):
        kept = np.maximum(1, np.round(density * n)).astype(np.int64)
        wire = np.array([4 * n if d >= 1.0 else message_bytes("topk", int(n), k=int(min(k, n)))
                         for d, k in zip(density, kept)], dtype=float)
        costs.append(LATENCY_S + wire / BANDWIDTH_BYTES_PER_S)
        errors.append(g2 * (1.0 - np.minimum(1.0, kept / n) ** 0.3))
        levels.append(np.arange(options, dtype=float))
    return costs, errors, levels


def bench(tensors: int, options: int, bins: int, repeats: int) -> dict:
    costs, errors, levels = model_menus(tensors, options, seed=tensors)
    budget = 0.3 * sum(float(c[0]) for c in costs)
    dp = allocate_layerwise(costs, errors, budget, bins=bins)
    lagrangian = allocate_lagrangian(costs, errors, budget)
    uniform = allocate_uniform(costs, errors, levels, budget)
    for a in (dp, lagrangian, uniform):
        assert a.over_budget or a.total_cost <= budget, a.method
    return {
        "L": tensors,
        "R": options,
        "bins": bins,
        "dp_ms": median_ms(lambda: allocate_layerwise(costs, errors, budget, bins=bins), repeats),
        "lagrangian_ms": median_ms(lambda: allocate_lagrangian(costs, errors, budget), repeats),
        "gap": (lagrangian.total_error - dp.total_error) / dp.total_error,
        "uniform_gap": (uniform.total_error - dp.total_error) / dp.total_error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per figure (default 50, quick 10)")
    parser.add_argument("--bins", type=int, nargs="+", default=[1000], help="DP cost-axis resolutions")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = parser.parse_args(argv)
    repeats = args.repeats or (10 if args.quick else 50)
    rows = [bench(tensors, 16, bins, repeats) for bins in args.bins for tensors in (50, 200, 1000)]
    print(f"# allocators on {machine()}; median of {repeats} runs; gaps relative to the DP's error")
    print(f"{'L':>6} {'R':>4} {'bins':>6} {'dp_ms':>9} {'lagr_ms':>9} {'lagr_gap':>10} {'uniform_gap':>12}")
    for r in rows:
        print(
            f"{r['L']:>6} {r['R']:>4} {r['bins']:>6} {r['dp_ms']:>9.3f} {r['lagrangian_ms']:>9.3f} "
            f"{r['gap']:>+10.4f} {r['uniform_gap']:>+12.4f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "repeats": repeats, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
