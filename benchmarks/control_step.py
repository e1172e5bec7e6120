"""Per-step cost of Kimad's control plane (estimate, plan, digest) against the step's own compute.

    python benchmarks/control_step.py [--steps 300] [--warmup 50] [--models digits-cnn resnet18 stdlib-lm]
                                      [--json PATH]

Every rank of the Horovod plugin runs, each step, on the CPU and in Python: the bandwidth fit of
:class:`~kimad.control.BandwidthEstimator` over the recent link samples, the menus and the allocation of
:meth:`~kimad.control.Controller.plan`, and the plan's digest. This measures that work on one core,
the way the plugin drives it, and holds it against the time the same model needs for one forward and
backward pass of its batch (the baseline, measured in the same run, one torch thread):

* **tensors** -- the model's parameters (the end-to-end comparison's digits CNN, 10 tensors, and character
  transformer, 30; the ResNet-18 of ``benchmarks/overhead.py``, 62 tensors), each with a top-k error profile
  measured once on a random normal vector of its size (``||v||^2`` and ``||v - TopK(v)||^2`` at the controller's 16
  densities), scaled by a factor that drifts from step to step;
* **link** -- 4 ranks; a square trace, 100 <-> 20 Mbit/s every 25 steps, 2 ms latency per ring
  step; every step the plan's allgather and the 504-byte agree allgather are "timed" with the cost
  model's ring formulas times log-normal noise (sigma 0.1) and an occasional stall (1 in 20: x3), and fed
  to :meth:`~kimad.control.Controller.observe_collective`, as the plugin feeds the previous step's;
* **step** -- ``observe_collective`` x2, ``observe_compute``, ``estimate()`` (the fit),
  ``plan(profiles)`` (``layerwise``: Kimad+; ``uniform``: Kimad) and ``plan.digest()``.

Output per model and allocator: median milliseconds per step over the steps after ``--warmup`` of the
fit, the plan, the digest and all together, the model's forward+backward (median of 20), and the ratio
control / compute. With 4 ranks on 2 cores (the emulated cluster) every millisecond here is about two of
wall time per step.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kimad.bench.resnet import ResNet18  # noqa: E402
from kimad.bench.workloads import VOCAB, CharTransformer, DigitsCNN  # noqa: E402
from kimad.control import (  # noqa: E402
    TCP_ETHERNET_FRAMING,
    BandwidthEstimator,
    Controller,
    CostModel,
    TensorProfile,
    geometric_densities,
)

WORLD, LATENCY_S, AGREE_BYTES, PERIOD = 4, 2e-3, 504, 25
# model class and a batch of its input (the end-to-end comparison's batch sizes for the CNN and the LM)
MODELS = {"digits-cnn": (DigitsCNN, lambda: torch.randn(32, 1, 28, 28)),
          "resnet18": (ResNet18, lambda: torch.randn(32, 3, 32, 32)),
          "stdlib-lm": (CharTransformer, lambda: torch.randint(0, VOCAB, (32, 64)))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="simulated steps per model and allocator (default: 300)")
    p.add_argument("--warmup", type=int, default=50, help="steps left out of the medians (default: 50)")
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS),
                   help="tensor sets to plan for (default: all)")
    p.add_argument("--allocators", nargs="+", choices=("layerwise", "uniform"), default=["layerwise", "uniform"],
                   help="Kimad+ (layerwise), Kimad (uniform) (default: both)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.steps < 1 or not 0 <= args.warmup < args.steps:
        p.error("--steps must be >= 1 and --warmup in [0, steps)")
    return args


def profiles_of(model: torch.nn.Module, densities: tuple[float, ...]) -> list[TensorProfile]:
    """Exact top-k error profiles of a random normal vector of every parameter's size."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, p in model.named_parameters():
        sq = torch.randn(p.numel(), generator=gen, dtype=torch.float64).square().sort(descending=True).values
        tail = sq.flip(0).cumsum(0).flip(0)  # tail[k] = sum of all but the k largest squares
        total = float(tail[0])
        errors = []
        for d in densities:
            k = min(max(1, round(d * p.numel())), p.numel())
            errors.append(float(tail[k]) if k < p.numel() else 0.0)
        out.append(TensorProfile(name, p.numel(), total, tuple(errors)))
    return out


def compute_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Median milliseconds of one forward + backward pass on the batch ``x`` (20 after 3 unmeasured)."""
    times = []
    for i in range(23):
        model.zero_grad()
        t = time.perf_counter()
        model(x).square().mean().backward()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def run(profiles: list[TensorProfile], allocator: str, densities: tuple[float, ...], steps: int,
        warmup: int) -> dict[str, float]:
    """Median ms per step of fit, plan, digest and their sum over the steps after ``warmup``."""
    rng = np.random.default_rng(1)
    controller = Controller(world_size=WORLD, budget="auto", allocator=allocator, densities=densities,
                            estimator=BandwidthEstimator(framing=TCP_ETHERNET_FRAMING), batched=True, fill=True)
    plan_bytes, parts = 64 * 1024, {"fit": [], "plan": [], "digest": []}
    for step in range(steps):
        rate = 100e6 if (step // PERIOD) % 2 == 0 else 20e6
        link = CostModel(rate, LATENCY_S, WORLD, False, TCP_ETHERNET_FRAMING)
        for nbytes in (plan_bytes, AGREE_BYTES):
            seconds = link.collective_time("allgather", nbytes) * math.exp(rng.normal(0.0, 0.1))
            controller.observe_collective("allgather", nbytes, seconds * (3.0 if rng.random() < 0.05 else 1.0), step)
        controller.observe_compute(0.03)
        scale = math.exp(rng.normal(0.0, 0.2))
        step_profiles = [TensorProfile(p.name, p.numel, p.sq_norm * scale, tuple(e * scale for e in p.topk_errors))
                         for p in profiles]
        t0 = time.perf_counter()
        controller.estimate()
        t1 = time.perf_counter()
        plan = controller.plan(step_profiles, step)
        t2 = time.perf_counter()
        plan.digest()
        t3 = time.perf_counter()
        plan_bytes = max(plan.total_bytes, 1)
        if step >= warmup:
            for key, seconds in (("fit", t1 - t0), ("plan", t2 - t1), ("digest", t3 - t2)):
                parts[key].append(seconds)
    row = {f"{key}_ms": 1e3 * statistics.median(v) for key, v in parts.items()}
    row["control_ms"] = 1e3 * statistics.median([sum(t) for t in zip(*parts.values())])
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    densities = geometric_densities()
    rows = []
    print(f"{'model':<11} {'tensors':>7} {'allocator':<10} {'fit ms':>7} {'plan ms':>8} {'digest ms':>9} "
          f"{'control ms':>10} {'compute ms':>10} {'control/compute':>15}")
    for name in args.models:
        cls, batch = MODELS[name]
        torch.manual_seed(0)
        model = cls()
        profiles = profiles_of(model, densities)
        base = compute_ms(model, batch())
        for allocator in args.allocators:
            row = {"model": name, "tensors": len(profiles), "allocator": allocator,
                   **run(profiles, allocator, densities, args.steps, args.warmup), "compute_ms": base}
            row["ratio"] = row["control_ms"] / base
            rows.append(row)
            print(f"{name:<11} {row['tensors']:>7} {allocator:<10} {row['fit_ms']:>7.2f} {row['plan_ms']:>8.2f} "
                  f"{row['digest_ms']:>9.2f} {row['control_ms']:>10.2f} {base:>10.2f} {row['ratio']:>15.3f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
